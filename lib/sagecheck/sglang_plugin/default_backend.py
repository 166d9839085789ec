"""Print, as JSON, the attention backend SGLang resolves for a command line, and whether ``sage_attn`` is a choice.

    python -m sagecheck.sglang_plugin.default_backend --model-path M [more server arguments]

It loads SGLang's general plugins as ``launch_server`` does (``SGLANG_PLUGINS`` restricts
them), then parses the arguments with SGLang's own ``prepare_server_args``, which fills in the
default backend for this GPU and model, without starting a server. 01_runtime_flag runs it
with and without the plugin to show that installing sagecheck leaves SGLang's default as it was.
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str]) -> int:
    from sglang.srt import server_args
    from sglang.srt.plugins import load_plugins

    from sagecheck.sglang_plugin.settings import NAME

    load_plugins()
    args = server_args.prepare_server_args(argv)
    prefill, decode = args.get_attention_backends()
    print(json.dumps({"attention_backend": args.attention_backend, "prefill": prefill, "decode": decode,
                      "sage_attn_is_a_choice": NAME in server_args.ATTENTION_BACKEND_CHOICES}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
