"""Shared fixtures: the project root, the built-in model loaded once, a helper to run the CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path


def _threads_per_worker() -> int:
    """The cores of this machine shared out between the pytest-xdist workers (``make test`` runs two)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


# Every process a test starts (runs, notebook kernels, stand-in servers) inherits this, and torch reads it when it is
# first imported, so it is set before that. OpenMP threads that outnumber the cores spin at each barrier while the
# thread they wait for is not running: two CI runs side by side on 2 cores took 423 s with 2 threads each, 174 s
# with 1 (and one run alone 165 s with 2).
# The pytest-xdist controller sets it too, and its workers, which inherit the controller's environment, set it again
# for their share; SAGECHECK_TEST_THREADS chooses another number.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = os.environ.get("SAGECHECK_TEST_THREADS") or str(_threads_per_worker())

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CI_PARAMS = ROOT / "tests" / "params_ci.yaml"
SHAKESPEARE = ROOT.parent / "shared" / "data" / "shakespeare"

# the sage_attn plugin of the stand-in servers writes its counters every 0.1 s (0.5 s by default), and readers wait
# accordingly: every server and run the tests start inherits it
os.environ.setdefault("SAGE_ATTN_STATS_INTERVAL_S", "0.1")


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """``python -m sagecheck ARGS`` in a fresh process, as a user runs it."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "sagecheck", *args], cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="session")
def builtin():
    """(engine, tokenizer) for the built-in model on the CPU in float32."""
    from sagecheck import models
    from sagecheck.engines.hf import HFEngine

    src = models.resolve("builtin")
    tok = models.load_tokenizer(src)
    model = models.load_model(src, torch.device("cpu"), torch.float32, "sagecheck-sdpa")
    return HFEngine(model, tok, torch.device("cpu"), torch.float32)


@contextmanager
def _fork_server_in_environment(server, variable: str):
    """``server`` started, its socket named in ``variable`` of the environment every process the tests start inherits."""
    with server:
        server.start()
        os.environ[variable] = server.path
        try:
            yield server
        finally:
            os.environ.pop(variable, None)


@pytest.fixture(scope="session", autouse=True)
def fork_servers():
    """Two fork servers per test worker, which import while the first tests run: one for the notebook kernels of the
    runs the tests start (each run would otherwise start its own and wait for its imports: ~6 s of a core per run;
    ``test_changing_only_the_title_reruns_no_notebook_under_resume`` starts its own, as a user's run does), one for
    the stand-in SGLang servers (tests/standin/forked.py). None on a machine with CUDA: the GPU tests need neither, and
    a CUDA context in either (the SGLang kit's transformers initializes CUDA at import) would take GPU memory that the
    GPU tests' servers count on."""
    from sagecheck.forkserver import RUNNING_SERVER_ENV, ForkServer
    from sagecheck.run import KERNEL_ARGS, KERNEL_ENV
    from tests.standin import forked

    if torch.cuda.is_available():
        yield {}
        return
    with _fork_server_in_environment(ForkServer(KERNEL_ARGS, KERNEL_ENV), RUNNING_SERVER_ENV) as kernels, \
            _fork_server_in_environment(forked.fork_server(), forked.SOCKET_ENV) as standins:
        yield {"kernels": kernels, "standins": standins}


@pytest.fixture
def run_notebook(tmp_path):
    """One notebook run alone, papermill's way, with its own small parameters (the defaults of its ``parameters`` cell
    for the rest): ``run_notebook("02_logits", n_short=2)`` -> its results. Its kernel is forked from the tests' fork
    server where there is one, as a run's are; ``kernel="sagecheck"`` starts a plain one (a kernel that must see an
    environment of its own, e.g. PYTHONPATH)."""
    import papermill as pm

    from sagecheck import results as R
    from sagecheck.forkserver import RUNNING_SERVER_ENV, ForkServer
    from sagecheck.run import KERNEL_ARGS, KERNEL_ENV, KERNEL_NAME, ensure_kernel

    def run(stem: str, kernel: str | None = None, **parameters):
        out = tmp_path / stem
        out.mkdir(parents=True, exist_ok=True)
        ensure_kernel()
        forks = None
        if kernel is None and os.environ.get(RUNNING_SERVER_ENV):
            forks = ForkServer(KERNEL_ARGS, KERNEL_ENV, path=os.environ[RUNNING_SERVER_ENV])
        try:
            pm.execute_notebook(str(ROOT / "notebooks" / f"{stem}.ipynb"), str(out / f"{stem}.ipynb"),
                                parameters={**parameters, "run_dir": str(out)}, kernel_name=kernel or KERNEL_NAME,
                                cwd=str(ROOT / "notebooks"), progress_bar=False, log_output=False,
                                **({"kernel_manager_class": forks.kernel_manager_class()} if forks else {}))
        finally:
            if forks:
                forks.close()
        return R.load(out / "results" / f"{stem}.json")

    return run


SECRET = "hf_PLANTEDsecret0123456789abcdef"


@pytest.fixture(scope="session")
def ci_run(tmp_path_factory):
    """The whole report on tests/params_ci.yaml, once per session, with a hub token planted in the environment."""
    out = tmp_path_factory.mktemp("runs") / "ci"
    done = run_cli("run", "--params", str(CI_PARAMS), "--out", str(out), "-q", env={"HF_TOKEN": SECRET})
    return done, out


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


# what of one report section runs off a page of the current width, or scrolls sideways: every element from the cell of
# the section's marker (``stem``) up to the next section's
SECTION_OVERFLOW_JS = """(stem) => {
  const cells = Array.from(document.querySelectorAll('.jp-Cell'));
  const start = cells.findIndex(c => c.querySelector('#nb-' + stem));
  let end = cells.findIndex((c, i) => i > start && c.querySelector('.sc-section'));
  if (end < 0) end = cells.length;
  const width = document.documentElement.clientWidth, out = [];
  for (const cell of cells.slice(start, end)) {
    for (const el of [cell, ...cell.querySelectorAll('*')]) {
      const r = el.getBoundingClientRect();
      if (r.width === 0) continue;
      if (r.right > width + 1) out.push('beyond the page: ' + el.tagName + ' ' + Math.round(r.right));
      if (el.scrollWidth > el.clientWidth + 1 && getComputedStyle(el).overflowX !== 'visible')
        out.push('scrolls: ' + el.tagName + '.' + el.className + ' ' + el.scrollWidth + '>' + el.clientWidth);
    }
  }
  return {cells: end - start, problems: out.slice(0, 10)};
}"""


@contextmanager
def report_page(out: Path, width: int, height: int):
    """``out`` (an HTML file, or a run folder's report.html) open in headless Chromium (skipped where there is none,
    unless CI requires it)."""
    browser = _chromium()
    if browser is None:
        if os.environ.get("SAGECHECK_REQUIRE_BROWSER"):
            pytest.fail("SAGECHECK_REQUIRE_BROWSER is set but no Chromium was found")
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=browser, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                                               "--disable-component-update", "--disable-sync", "--no-first-run"])
        page = b.new_page(viewport={"width": width, "height": height})
        page.goto((out if out.suffix == ".html" else out / "report.html").as_uri())
        try:
            yield page
        finally:
            b.close()


# Tests that share an expensive fixture run on one pytest-xdist worker (``make test`` runs two), so that the fixture is
# built once; the other tests are spread over both.
_SHARED_FIXTURE_GROUPS = {"ci_run": "ci_run", "judged": "code_paths_variants"}


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the groups
def pytest_collection_modifyitems(config, items):
    """Group the tests of a shared fixture; run the slow ones (notebooks through papermill, servers) first, so that the
    two workers finish together instead of one starting a long test when the other is done."""
    grouped = set()
    for item in items:
        for fixture, group in _SHARED_FIXTURE_GROUPS.items():
            if fixture in getattr(item, "fixturenames", ()):
                item.add_marker(pytest.mark.xdist_group(group))
                grouped.add(item.nodeid)
                break
    items.sort(key=lambda item: 0 if item.nodeid in grouped else 1 if item.get_closest_marker("slow") else 2)
