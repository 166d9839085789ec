"""STAND-IN for ``sglang.srt``: only the plugin hooks sagecheck's plugin uses (tests only)."""
