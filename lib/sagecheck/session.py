"""What every notebook starts with: validated parameters, seeds, its results, and the engine it asks for.

::

    nb = sagecheck.session.start("02_logits", globals())   # after the parameters cell
    engine = nb.engine()                                     # the run's engine (or what a capability needs)
    ...
    nb.finish()                                              # the verdicts shown, the results saved

``nb.P`` reads the notebook's own section and the common keys alike (``nb.P.n_short``, ``nb.P.model``);
``nb.R`` collects metrics, tables and verdicts (:class:`sagecheck.results.Results`). A notebook names the
capabilities it needs, never an engine: where the run's engine lacks one, the in-process engine on the
same model stands in if it has it, and the notebook says so in the words every notebook uses.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

from sagecheck import engines, environment, models, results, runtime, sources
from sagecheck import params as sp


class Notebook:
    def __init__(self, P: sp.NotebookParams, R: results.Results) -> None:
        self.P = P
        self.R = R
        self.baseline, self.candidate = sp.labels(P)
        self._engines: list[engines.Engine] = []

    @property
    def device(self) -> Any:
        return runtime.resolve_device(self.P.device)

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def where(self) -> str:
        """What this notebook measures on, in words for captions: the GPU and dtype, or that these are CPU figures."""
        dtype = runtime.dtype_name(runtime.resolve_dtype(self.P.dtype, self.device))
        if self.on_gpu:
            return f"{environment.gpu_name()}, {dtype}"
        return f"CPU (no GPU: CPU figures, not GPU ones), {dtype}"

    def engine(self, *needs: str) -> engines.Engine:
        """The run's engine, or where it lacks one of ``needs``, the in-process engine on the same model (said in the
        notebook and in the results); :class:`~sagecheck.engines.NotAvailable` where neither has it. One engine of a
        kind per notebook: asked again, the same engine (the model is loaded once)."""
        lacking = engines.missing(self.P.engine, *needs)
        if not lacking:
            return self._engine(self.P)
        stand_in = "hf"
        still = engines.missing(stand_in, *needs)
        if still:
            raise engines.NotAvailable(self.P.engine, still[0])
        why = str(engines.NotAvailable(self.P.engine, lacking[0]))
        self.say(f"**{why[0].upper() + why[1:]}.** Measured in process ({stand_in}) with the same model (`{self.P.model}`) "
                 "and the same attention implementations instead.")
        self.R.note(f"{why}; measured in process ({stand_in}) with the same model")
        return self._engine(self.P.with_common(engine=stand_in))

    def control_engine(self) -> engines.Engine:
        """The engine that measures the accepted-precision control (``engine.control`` against ``engine.baseline``): the
        run's engine where it has one, else the in-process engine on the same model and inputs, said once."""
        if not engines.missing(self.P.engine, engines.ACCEPTED_PRECISION):
            return self._engine(self.P)
        P = self.P.with_common(engine="hf")
        known = any(e.name == P.engine for e in self._engines)
        engine = self._engine(P)
        if not known:
            text = (f"The accepted-precision control ({engine.control} against {engine.baseline}) is measured in process (hf) "
                    f"on the same model and inputs: a {self.P.engine} server with an FP8 KV cache rounds only the cached keys "
                    "and values a later step reads, not those a prefill computes, so it cannot give the control's figures.")
            self.say(text)
            self.R.note(text)
        return engine

    def _engine(self, P: Any) -> engines.Engine:
        for engine in self._engines:
            if engine.name == P.engine:
                return engine
        engine = engines.create(P, log_dir=self.R.log_dir)
        self._engines.append(engine)
        return engine

    def candidate_ran(self, engine: engines.Engine) -> Any:
        """What the candidate ran on ``engine`` (its calls, or its server's statistics): recorded, and shown."""
        from sagecheck import show

        text = engine.candidate_ran()
        self.R.metric("candidate_ran", text)
        return show.say(f"**What the candidate ran:** {text}")

    def say(self, text: str) -> None:
        from IPython.display import display

        from sagecheck import show

        display(show.say(text))

    def close_engines(self) -> None:
        for engine in self._engines:
            engine.close()
        self._engines.clear()

    def finish(self) -> Any:
        """Close the engines, save the results; the verdicts as the summary shows them."""
        from sagecheck import show

        self.close_engines()
        self.R.save()
        return show.verdicts(self.R)


class NotebookParameterError(Exception):
    """A bad parameter of a notebook (given by papermill, the runner or by hand). IPython shows what
    ``_render_traceback_`` returns instead of a traceback: one line naming the parameter."""

    def _render_traceback_(self) -> list[str]:
        return [f"sagecheck: {self}"]


def injected_names(namespace: dict[str, Any]) -> list[str]:
    """The names papermill injected into this kernel: the assignments of its last ``# Parameters`` cell (papermill's
    injected cell starts with that line), read from IPython's input history ``In``."""
    for source in reversed(namespace.get("In") or []):
        if isinstance(source, str) and source.splitlines()[:1] == ["# Parameters"]:
            try:
                tree = ast.parse(source)
            except SyntaxError:
                return []
            return [t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
                    if isinstance(t, ast.Name)]
    return []


def check_injected(notebook: str, namespace: dict[str, Any]) -> None:
    """A parameter papermill injected that this notebook does not have (``-p windw 100``) stops the notebook: papermill
    only warns and the notebook would run on the default."""
    known = set(sp.notebook_parameters(sp.Params(), notebook)) | set(sp.RUN_KEYS)
    unknown = [name for name in injected_names(namespace) if name not in known]
    if unknown:
        section = sp.section_for(notebook)
        allowed = sorted(known - set(sp.RUN_KEYS))
        hint = sp.did_you_mean(unknown[0], allowed)
        raise NotebookParameterError(f"{notebook} has no parameter {unknown[0]!r}{hint} (its parameters: the common ones and "
                                     f"the section {section!r}; `python -m sagecheck params` lists them)")


def start(notebook: str, namespace: dict[str, Any]) -> Notebook:
    """``nb = sagecheck.session.start("02_logits", globals())`` after the parameters cell. A bad parameter stops the
    notebook here with one line (:class:`NotebookParameterError`)."""
    check_injected(notebook, namespace)
    try:
        params = sp.from_notebook(notebook, namespace)
        sources.resolve(params, base=Path.cwd())
        sources.check_machine(params)
    except sp.ParamError as e:
        raise NotebookParameterError(str(e)) from None
    from sagecheck.attention import sage_kernel

    sage_kernel.select(params.sage_kernel)
    runtime.seed_everything(params.seed)
    flat = sp.notebook_parameters(params, notebook)
    R = results.Results(notebook=notebook, results_dir=sp.resolve_run_dir(str(namespace.get("run_dir", ""))) / "results",
                        params=flat, params_hash=sp.params_hash(flat),
                        environment={**environment.brief(), "model": models.describe_model(params.model, params.revision),
                                     "engine": engines.facts(params)})
    return Notebook(sp.NotebookParams(params, notebook, namespace.get("servers")), R)
