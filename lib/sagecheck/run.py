"""The batch runner: papermill over the notebooks, one run folder per parameter set.

``outputs/<run>/notebooks/``  executed notebooks (a failed one keeps its error)
``outputs/<run>/results/``    one results JSON per notebook (results.py)
``outputs/<run>/run.json``    the run's manifest: parameters, status of each notebook
``outputs/<run>/report.html`` and ``summary.md`` (report.py)

A failing notebook is recorded and the run goes on; the exit code is 1 if any
notebook failed. ``resume`` skips notebooks whose results exist for the same
parameters (same hash).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from sagecheck import params as P
from sagecheck import results as R
from sagecheck import sources
from sagecheck.environment import project_root
from sagecheck.forkserver import RUNNING_SERVER_ENV, ForkServer
from sagecheck.notebooks import default_dir, discover, select
from sagecheck.redact import redact_tree, secret_values

KERNEL_NAME = "sagecheck"
log = logging.getLogger("sagecheck.run")


# the kernel's own log stays out of the run's output: ipykernel's notice that its local TCP sockets are unencrypted, and
# on Ctrl-C (the terminal interrupts the kernel too) its error that the client closed the sockets before the reply
KERNEL_ARGS = ["-f", "{connection_file}", "--IPKernelApp.log_level=CRITICAL"]


def kernel_argv() -> list[str]:
    # sagecheck.kernel: ipykernel without the interpreter's teardown at exit (about a second per notebook; its docstring)
    return [sys.executable, "-m", "sagecheck.kernel", *KERNEL_ARGS]


# Batch runs write HTML, not a terminal: progress bars inside notebooks (transformers' "Loading weights", hub
# downloads) and tqdm's "IProgress not found" warning would only show as red stderr boxes in the report.
# The runner's own progress bar stays in the terminal.
# A third-party package compiled at import may warn about its own source (torchao in the SGLang kit: an invalid escape
# sequence): a SyntaxWarning of someone else's file is no finding of the report.
# glibc's malloc keeps what a kernel frees for its next tensor and backs large blocks with huge pages: torch's CPU
# tensors of tens of MB (the float64 reference, the emulations' blocks) were otherwise mapped and zeroed page by page
# at every allocation, and the operating system's share of a run's CPU time was large (README, Development, has the
# figures). The results are the same to the bit. Other C libraries ignore it.
MALLOC_TUNABLES = "glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=1073741824"
KERNEL_ENV = {"TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
              "PYTHONWARNINGS": "ignore:IProgress not found,ignore::SyntaxWarning", "GLIBC_TUNABLES": MALLOC_TUNABLES}


def check_kernel(name: str) -> str:
    """``--kernel NAME``: a Jupyter kernel this machine has, or :class:`ParamError` naming the ones it has."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    manager = KernelSpecManager()
    try:
        manager.get_kernel_spec(name)
    except NoSuchKernel:
        have = ", ".join(sorted(manager.find_kernel_specs())) or "none"
        raise P.ParamError(f"--kernel {name!r}: no such Jupyter kernel on this machine (installed: {have})") from None
    return name


def ensure_kernel(name: str = KERNEL_NAME) -> str:
    """Make sure the Jupyter kernel ``name`` runs this interpreter; write its spec into sys.prefix (or the user's folder)."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_core.paths import jupyter_data_dir

    ksm = KernelSpecManager()
    existing = ksm.find_kernel_specs().get(name)
    payload = {"argv": kernel_argv(), "display_name": f"Python ({name})", "language": "python", "env": KERNEL_ENV,
               "metadata": {"debugger": True}}
    if existing:
        spec = json.loads((Path(existing) / "kernel.json").read_text())
        if spec.get("argv") == payload["argv"] and spec.get("env") == payload["env"]:
            return name
    # the spec Jupyter finds first is the one to (re)write; else this interpreter's prefix, else the user's folder
    targets = ([Path(existing)] if existing else []) + [Path(sys.prefix) / "share" / "jupyter" / "kernels" / name,
                                                         Path(jupyter_data_dir()) / "kernels" / name]
    for folder in targets:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "kernel.json").write_text(json.dumps(payload, indent=1))
            return name
        except OSError:
            continue
    raise RuntimeError(f"could not write the Jupyter kernel spec '{name}' (tried {', '.join(map(str, targets))})")


@dataclass
class NotebookRun:
    name: str
    status: str  # ok | failed | reused
    duration_s: float = 0.0
    error: str | None = None
    output: str | None = None


class RunInterrupted(Exception):
    """Ctrl-C during a run: the notebooks that finished are kept (``--resume`` reuses them); the one that was running
    left no results."""

    def __init__(self, run_dir: Path, kept: list[str]) -> None:
        super().__init__(f"interrupted in {run_dir}")
        self.run_dir, self.kept = run_dir, kept


@dataclass
class RunOutcome:
    run_dir: Path
    notebooks: list[NotebookRun] = field(default_factory=list)
    report: Path | None = None
    report_error: str | None = None  # assembling the HTML failed after the notebooks ran: the cause, in one line

    @property
    def failed(self) -> list[NotebookRun]:
        return [n for n in self.notebooks if n.status == "failed"]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed or self.report_error else 0


def default_run_name(params_path: str | Path | None, params: P.Params) -> str:
    """``<params file>-<hash of what is measured>``: the title or the notebook selection do not change it."""
    stem = Path(params_path).stem if params_path else "default"
    return f"{stem}-{P.params_hash(params)[:8]}"


def check_run_folder(run_dir: Path) -> None:
    """``--out`` must be a new folder or an earlier run's (it holds its ``run.json``): a run never writes into a folder
    that holds anything else (the project's root, a home folder), nor tries a file or a place it cannot write."""
    if run_dir.exists() and not run_dir.is_dir():
        raise P.ParamError(f"--out {run_dir}: a file, not a folder; give a new folder or an earlier run's")
    if run_dir.is_dir() and not (run_dir / "run.json").is_file():
        held = sorted(p.name for p in run_dir.iterdir())
        if held:
            shown = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
            raise P.ParamError(f"--out {run_dir} holds files that are not a sagecheck run ({shown}); give a new folder, or "
                               "an earlier run's folder (with its run.json) to write again")
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing != run_dir and not existing.is_dir():
        raise P.ParamError(f"--out {run_dir}: {existing} is a file, so the run folder cannot be made under it")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise P.ParamError(f"--out {run_dir}: {existing} is not writable")


def _check_no_secret_in_params(params: P.Params) -> None:
    blob = json.dumps(params.model_dump(mode="json"))
    for var, value in secret_values().items():
        if value in blob:
            raise P.ParamError(
                f"a parameter holds the value of ${var}; secrets are read from the environment, never from parameters"
            )


def _write_manifest(run_dir: Path, manifest: dict[str, Any]) -> None:
    R.write_json_atomic(run_dir / "run.json", manifest)


def _error_summary(exc: BaseException) -> str:
    ename = getattr(exc, "ename", type(exc).__name__)
    evalue = getattr(exc, "evalue", str(exc))
    return f"{ename}: {evalue}".strip()


def error_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message``, for a failure said in one line."""
    return _error_summary(exc).splitlines()[0][:limit]


def _record_failure(results_dir: Path, nb: Path, flat: dict[str, Any], error: str) -> None:
    """The notebook failed: keep what it saved, mark it failed with the error."""
    path = results_dir / f"{nb.stem}.json"
    if path.exists():
        try:
            res = R.load(path)
        except Exception:
            res = R.Results(notebook=nb.stem, results_dir=results_dir)
    else:
        res = R.Results(notebook=nb.stem, results_dir=results_dir)
    res.params, res.params_hash = flat, P.params_hash(flat)
    res.status, res.reason = "failed", error
    res.save()


@dataclass
class RunContext:
    """One run, from its validated parameters to its report: what :func:`prepare` found, what :func:`execute` ran."""

    params: P.Params
    params_path: str | Path | None
    overrides: Sequence[str]
    notebooks: list[Path]
    nb_dir: Path
    kernel_name: str
    run_dir: Path
    resume: bool
    progress: bool
    fork_kernels: bool  # the default kernel: forked from one process that imported torch once (sagecheck.forkserver)
    manifest: dict[str, Any] = field(default_factory=dict)
    outcome: RunOutcome | None = None

    @property
    def results_dir(self) -> Path:
        return self.run_dir / "results"

    def write_manifest(self) -> None:
        _write_manifest(self.run_dir, self.manifest)


def run(
    params_path: str | Path | None,
    overrides: Sequence[str] = (),
    only: Sequence[str] | None = None,
    out: str | Path | None = None,
    resume: bool = False,
    notebooks_dir: str | Path | None = None,
    kernel: str | None = None,
    report: bool = True,
    progress: bool = True,
) -> RunOutcome:
    """Validate everything, then execute the notebooks one after the other, then the report."""
    ctx = prepare(params_path, overrides, only, out, resume, notebooks_dir, kernel, progress)
    execute(ctx)
    return finish(ctx, report)


def prepare(params_path: str | Path | None, overrides: Sequence[str] = (), only: Sequence[str] | None = None,
            out: str | Path | None = None, resume: bool = False, notebooks_dir: str | Path | None = None,
            kernel: str | None = None, progress: bool = True) -> RunContext:
    """Everything checked before any work (:class:`~sagecheck.params.ParamError` in one line otherwise), then the run
    folder and its manifest written."""
    from sagecheck.registry import ENGINES

    params = sources.load(params_path, overrides)  # raises ParamError before any notebook runs
    sources.check_machine(params)
    _check_no_secret_in_params(params)
    nb_dir = Path(notebooks_dir) if notebooks_dir else default_dir()
    if not nb_dir.is_dir():
        raise P.ParamError(f"notebooks folder not found: {nb_dir}")
    notebooks = select(discover(nb_dir), only if only is not None else params.notebooks)
    if not notebooks:
        raise P.ParamError(f"no notebooks (NN_name.ipynb) in {nb_dir}")
    kernel_name = check_kernel(kernel) if kernel else ensure_kernel()
    if ENGINES.info(params.engine).get("serves"):  # an engine of servers knows what they ask of this machine
        ENGINES.load(params.engine).check_machine(params)

    run_dir = Path(out) if out else (project_root() or Path.cwd()) / "outputs" / default_run_name(params_path, params)
    run_dir = run_dir.resolve()
    check_run_folder(run_dir)
    ctx = RunContext(params, params_path, list(overrides), notebooks, nb_dir, kernel_name, run_dir, resume, progress,
                     fork_kernels=not kernel)
    try:
        (run_dir / "notebooks").mkdir(parents=True, exist_ok=True)
        ctx.results_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise P.ParamError(f"--out {run_dir}: the run folder cannot be written ({e.strerror or e})") from None
    ctx.manifest = {
        "run": run_dir.name,
        "params_file": str(params_path) if params_path else None,
        "overrides": list(overrides),
        "params": params.model_dump(mode="json"),
        "started_at": R._now(),
        "finished_at": None,
        "kernel": kernel_name,
        "notebooks_dir": str(nb_dir.resolve()),
        "selected": [nb.stem for nb in notebooks],
        "available": [nb.stem for nb in discover(nb_dir)],
        "notebooks": [],
    }
    ctx.outcome = RunOutcome(run_dir=run_dir)
    ctx.write_manifest()
    return ctx


def execute(ctx: RunContext) -> None:
    """The engine's servers started once (where it serves), the notebooks run one after the other, the servers and
    the kernels' fork server stopped whatever happens; Ctrl-C raises :class:`RunInterrupted` naming what was kept."""
    servers = None
    # the default kernel's processes are forked from one that imported torch and transformers once (sagecheck.forkserver);
    # --kernel NAME starts that kernel spec's own processes, the project's included (--kernel sagecheck)
    # (one named in SAGECHECK_FORKSERVER, where one is running already: the tests keep one for their many runs)
    forks = ForkServer(KERNEL_ARGS, KERNEL_ENV, display_name=f"Python ({ctx.kernel_name})",
                       path=os.environ.get(RUNNING_SERVER_ENV) or None) if ctx.fork_kernels else None
    try:
        servers = _start_servers(ctx)
        handed = servers.as_dicts() if servers else {}
        ctx.manifest["servers"] = handed
        ctx.write_manifest()
        _run_notebooks(ctx, handed, forks)
    except KeyboardInterrupt:
        ctx.manifest["interrupted_at"] = R._now()
        ctx.write_manifest()
        raise RunInterrupted(ctx.run_dir, [n.name for n in ctx.outcome.notebooks if n.status in ("ok", "reused")]) from None
    finally:
        if forks:
            forks.close()
        if servers:
            servers.stop()


def finish(ctx: RunContext, report: bool = True) -> RunOutcome:
    """The manifest closed, any secret value redacted from the run folder, the report built."""
    ctx.manifest["finished_at"] = R._now()
    ctx.write_manifest()
    redacted = redact_tree(ctx.run_dir)
    if redacted:
        log.warning("redacted a secret value in %d file(s) of %s", redacted, ctx.run_dir)
    outcome = ctx.outcome
    if report:
        from sagecheck.report import build_report

        try:
            outcome.report = build_report(ctx.run_dir)
        except Exception as e:  # noqa: BLE001 - the results and executed notebooks stay; the cause is said in one line
            log.debug("building the report failed", exc_info=True)
            outcome.report_error = error_line(e)
    return outcome


def _start_servers(ctx: RunContext) -> Any:
    """The run's servers, started once for every notebook that needs them, through the engine's own interface (an
    engine that runs in process has none, and its class is not even imported: the runner's start stays light)."""
    from sagecheck.registry import ENGINES

    if not ENGINES.info(ctx.params.engine).get("serves"):
        return None
    return ENGINES.load(ctx.params.engine).run_servers(ctx.params, [nb.stem for nb in ctx.notebooks], ctx.run_dir / "logs",
                                                       progress=ctx.progress)


def _run_notebooks(ctx: RunContext, servers: dict[str, Any], forks: ForkServer | None) -> None:
    import papermill as pm
    from tqdm.auto import tqdm

    run_dir, results_dir, outcome, manifest, progress = ctx.run_dir, ctx.results_dir, ctx.outcome, ctx.manifest, ctx.progress
    bar = tqdm(ctx.notebooks, unit="notebook", disable=not progress, file=sys.stderr)
    for nb in bar:
        bar.set_description(f"running {nb.stem}")
        flat = P.notebook_parameters(ctx.params, nb.stem)
        flat["run_dir"] = str(run_dir)
        flat["servers"] = servers
        digest = P.params_hash(flat)
        out_nb = run_dir / "notebooks" / nb.name
        res_path = results_dir / f"{nb.stem}.json"

        if ctx.resume and res_path.exists() and out_nb.exists() and nb.stem != R.SUMMARY_NOTEBOOK:
            try:
                previous = R.load(res_path)
            except Exception:
                previous = None
            if previous and previous.params_hash == digest and previous.status in ("ok", "skipped"):
                outcome.notebooks.append(NotebookRun(nb.stem, "reused", 0.0, None, str(out_nb)))
                manifest["notebooks"].append(asdict(outcome.notebooks[-1]))
                _write_manifest(run_dir, manifest)
                continue

        res_path.unlink(missing_ok=True)  # never let an earlier run's results stand for this one
        t0 = time.perf_counter()
        error = None
        try:
            pm.execute_notebook(
                str(nb),
                str(out_nb),
                parameters=flat,
                kernel_name=ctx.kernel_name,
                progress_bar=False,
                cwd=str(ctx.nb_dir),
                log_output=False,
                request_save_on_cell_execute=True,
                **({"kernel_manager_class": forks.kernel_manager_class()} if forks else {}),
            )
            if not res_path.exists():
                error = "the notebook finished without writing its results JSON"
        except Exception as exc:  # PapermillExecutionError and kernel deaths alike
            error = _error_summary(exc)
            if not out_nb.exists():
                out_nb.write_text(_failure_notebook(nb, exc))
        duration = time.perf_counter() - t0
        if error:
            _record_failure(results_dir, nb, flat, error)
            log.warning("%s failed: %s", nb.stem, error)
            if progress:
                tqdm.write(f"  {nb.stem}: FAILED ({error.splitlines()[0][:160]})", file=sys.stderr)
        outcome.notebooks.append(NotebookRun(nb.stem, "failed" if error else "ok", round(duration, 2), error, str(out_nb)))
        manifest["notebooks"].append(asdict(outcome.notebooks[-1]))
        _write_manifest(run_dir, manifest)
    bar.close()


def _failure_notebook(nb: Path, exc: BaseException) -> str:
    """A stand-in executed notebook when papermill could not even save one (kernel never started)."""
    import nbformat

    cell = nbformat.v4.new_markdown_cell(
        f"**{nb.stem} could not be executed.**\n\n```\n{''.join(traceback.format_exception(exc))[-4000:]}\n```"
    )
    return nbformat.writes(nbformat.v4.new_notebook(cells=[cell]))
