"""STAND-IN for ``sglang.srt.plugins``: general plugins from the entry-point group ``sglang.srt.plugins``.

As SGLang 0.5.15: ``SGLANG_PLUGINS`` (comma-separated entry-point names) restricts which are
loaded; each is loaded once per process; a failing plugin is logged and skipped.
"""

import os
import sys
from importlib.metadata import entry_points

GENERAL_PLUGINS_GROUP = "sglang.srt.plugins"
_loaded = False


def load_plugins():
    global _loaded
    if _loaded:
        return
    _loaded = True
    allowed = {x.strip() for x in os.environ.get("SGLANG_PLUGINS", "").split(",") if x.strip()} or None
    for ep in entry_points(group=GENERAL_PLUGINS_GROUP):
        if allowed is not None and ep.name not in allowed:
            continue
        try:
            ep.load()()
        except Exception as e:  # as SGLang: logged, not fatal
            print(f"standin: failed to execute general plugin {ep.name}: {e}", file=sys.stderr)
