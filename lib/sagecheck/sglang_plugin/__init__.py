"""``--attention-backend sage_attn`` for stock SGLang.

An SGLang general plugin: ``pyproject.toml`` declares :func:`register` under the entry-point
group ``sglang.srt.plugins``. SGLang (0.5.15) calls it in ``launch_server`` before it parses
the command line, and again in every scheduler process, so the name is both accepted by the
argument parser (``add_attention_backend_choices``) and built by the model runner
(``register_attention_backend``). Registering imports neither torch kernels nor
sageattention; the backend (:mod:`sagecheck.sglang_plugin.backend`) is imported only when a
server asks for ``sage_attn``. A server that cannot use it fails at start with a message that says
why and what to use instead: in the launcher, before the model loads, where the arguments alone
decide (no sageattention, kernel decode under CUDA graphs: :mod:`.preflight`, hooked after
``ServerArgs.check_server_args``), else where the backend is built (the GPU, the model's heads).

What the backend computes, and its settings (environment variables of the server), are in
:mod:`sagecheck.sglang_plugin.backend` and :mod:`sagecheck.sglang_plugin.settings`.
"""

from __future__ import annotations

from sagecheck.sglang_plugin.settings import NAME


def create_backend(model_runner):  # noqa: ANN001 - SGLang's ModelRunner
    """SGLang's factory for ``sage_attn`` (called by the model runner in each scheduler process)."""
    from sagecheck.sglang_plugin.backend import SageAttnBackend

    return SageAttnBackend(model_runner)


def start_census() -> None:
    """Where the server was given a statistics folder (sagecheck started it for a report), record every call into
    sageattention in this process, whatever backend serves (sagecheck's, a fork's, any plugin's): its functions wrapped
    where they are bound (:func:`sagecheck.census.install`), the census written there for the notebooks (once per
    process). Elsewhere (a server in production) nothing is wrapped: no call pays for bookkeeping nobody reads."""
    import os

    from sagecheck import census
    from sagecheck.backend_stats import census_path, write_interval_s

    folder = os.environ.get("SAGE_ATTN_STATS_DIR")
    if not folder:
        return
    census.install()
    if not getattr(start_census, "started", False):
        start_census.started = True  # type: ignore[attr-defined]
        census.start_writer(census_path(folder), write_interval_s())


def register() -> None:
    """The entry point: add ``sage_attn`` to SGLang's attention backends (idempotent), and start the census of kernel
    calls where a report asked for it (:func:`start_census`)."""
    from sglang.srt import server_args
    from sglang.srt.layers.attention import attention_registry

    start_census()

    if NAME not in server_args.ATTENTION_BACKEND_CHOICES:
        server_args.add_attention_backend_choices([NAME])
    attention_registry.register_attention_backend(NAME)(create_backend)
    try:  # fail in seconds, before the model loads, where the arguments alone rule sage_attn out
        from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    except ImportError:  # an SGLang without the hook registry: the backend's own checks at start still refuse
        return
    from sagecheck.sglang_plugin.preflight import after_check_server_args

    HookRegistry.register("sglang.srt.server_args.ServerArgs.check_server_args", after_check_server_args, HookType.AFTER)
