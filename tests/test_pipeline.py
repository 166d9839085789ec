"""The whole report as users run it: every notebook executed by papermill on the built-in model."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import nbformat
import pytest

from sagecheck import results as R
from tests.conftest import SECTION_OVERFLOW_JS, CI_PARAMS, ROOT, report_page, run_cli

pytestmark = pytest.mark.slow
from tests.conftest import SECRET


def result(out: Path, name: str) -> R.Results:
    return R.load(out / "results" / f"{name}.json")


def test_every_notebook_ran(ci_run):
    done, out = ci_run
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("report.html")
    manifest = json.loads((out / "run.json").read_text())
    assert [n["status"] for n in manifest["notebooks"]] == ["ok"] * len(list((ROOT / "notebooks").glob("*.ipynb")))
    for nb in (ROOT / "notebooks").glob("*.ipynb"):
        executed = nbformat.read(out / "notebooks" / nb.name, as_version=4)
        assert any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells)


def test_planted_token_appears_nowhere(ci_run):
    _, out = ci_run
    for f in out.rglob("*"):
        if f.is_file():
            assert SECRET not in f.read_text(errors="replace"), f


def test_summary_markdown_for_the_pr(ci_run):
    _, out = ci_run
    md = (out / "summary.md").read_text()
    assert "| Notebook | Check | Value | Threshold | Result |" in md
    assert re.search(r"\| 03_perplexity \| token perplexity delta \(judged by its size\) \| [-\d.e]+ % \| abs<= [\d.]+ % "
                     r"\(control sdpa-fp8kv\) \| pass \|", md)
    # words, not emoji (the HTML report has no emoji font), and the speed line does not repeat its heading
    assert not re.search("[\u2600-\u27bf\U0001f300-\U0001faff]", md)
    assert "**Speed:** sage-emulated against sdpa: prefill: faster at" in md and "Speed: Speed" not in md
    # every point accounted for: faster, slower or no measurable difference, adding up to the points measured
    counts = re.search(r"prefill: faster at (\d+) of (\d+) points, slower at (\d+)(, no measurable difference at "
                       r"(\d+|input \d+, batch \d+( and input \d+, batch \d+)?))?", md)
    same = counts.group(5) or ""
    n_same = int(same) if same.isdigit() else same.count("input")
    assert int(counts.group(1)) + int(counts.group(3)) + n_same == int(counts.group(2))


def test_report_is_self_contained_with_summary_first(ci_run):
    _, out = ci_run
    html = (out / "report.html").read_text()
    assert "<script src=" not in html and "cdnjs" not in html
    summary_at = re.search(r"id=[\"']sagecheck-summary", html).start()
    assert summary_at < html.index("00 · Environment") < html.index("08 · Kernel")
    assert "data:image/png;base64" in html
    assert "import torch" not in html  # code hidden


def test_header_and_summary_give_one_count_and_one_order(ci_run):
    _, out = ci_run
    html = (out / "report.html").read_text()
    header = re.search(r"id=[\"']sagecheck-counts[\"']><b>(\d+) checks passed, (\d+) failed</b>; notebooks: (\d+) ok, (\d+) failed, (\d+) skipped", html)
    summary = re.search(r"(\d+) of (\d+) checks passed, (\d+) failed\.</strong> Notebooks: (\d+) ok, (\d+) failed, (\d+) skipped", html)
    assert header and summary
    assert "GPU <code>none (CPU only)</code>" in html  # the header names the machine (here: none)
    h, s = [int(x) for x in header.groups()], [int(x) for x in summary.groups()]
    assert (h[0], h[1]) == (s[0], s[2]) and h[2:] == s[3:]
    table = html[re.search(r"id=[\"']sagecheck-notebooks", html).start():]
    table = table[:table.index("</table>")]
    listed = re.findall(r"href=[\"']#nb-(\w+)", table)
    assert listed == sorted(listed) and "99_summary" not in listed and listed[0] == "00_environment"


def test_summary_table_is_visible_in_chromium(ci_run):
    _, out = ci_run
    with report_page(out, 1280, 900) as page:
        table = page.locator("#sagecheck-summary")
        assert table.is_visible()
        box = table.bounding_box()
        assert box and box["width"] > 300 and box["height"] > 100
        rows = table.locator("tbody tr")
        assert rows.count() > 10
        assert "PASS" in table.inner_text()
        assert page.locator("#nb-00_environment").count() == 1
        page.screenshot(path=str(out / "report.png"), full_page=False)


def test_report_reads_cleanly_in_chromium_at_1400_px(ci_run):
    """Every section fits 1400 px with its folded tables open (a screenshot of each is kept); no stderr box anywhere; the
    recommendation on top."""
    _, out = ci_run
    with report_page(out, 1400, 1000) as page:
        assert page.locator("[data-mime-type='application/vnd.jupyter.stderr']").count() == 0
        rec = page.locator("#sagecheck-recommendation")
        assert rec.is_visible() and rec.locator("li").count() >= 2 and "Speed of sage-emulated against sdpa" in rec.inner_text()
        assert page.locator("details.sc-folded").count() >= 2  # 08's full accuracy table and its speed table
        page.evaluate("document.querySelectorAll('details').forEach(d => d.open = true)")
        kernel = page.evaluate(SECTION_OVERFLOW_JS, "08_kernel")
        assert kernel["cells"] > 3
        stems = page.evaluate("Array.from(document.querySelectorAll('.sc-section')).map(e => e.id.replace('nb-', ''))")
        assert len(stems) == len(list((ROOT / "notebooks").glob("*.ipynb")))
        problems = {stem: page.evaluate(SECTION_OVERFLOW_JS, stem)["problems"] for stem in stems}
        assert not any(problems.values()), {k: v for k, v in problems.items() if v}
        assert page.evaluate("document.documentElement.scrollWidth") <= 1400
        # the PR block wraps at spaces, never inside a word ("0.56⏎5x"), whatever JupyterLab's own pre rules say
        pre = page.locator("pre.sc-pre")
        assert pre.count() == 1 and pre.evaluate("e => getComputedStyle(e).wordBreak") == "normal"
        page.screenshot(path=str(out / "report-1400px.png"), full_page=True)


# smaller sizes for the runs of a control or a wrong candidate (the CI run keeps the full ones): what each must show
# shows at these sizes too
SMALLER = ["-p", "logits.long_tokens=512", "-p", "perplexity.max_tokens=1500",
           "-p", "tasks.tasks=[{name: line ending, kind: multiple_choice, source: 'builtin:line_ending', limit: 60}]"]


# Float32 on a CPU is not always bitwise reproducible from one call to the next (CI once saw a mean KL of 7.6e-9
# nats between two sdpa passes over the same tokens; MKL's GEMM without its reproducibility mode may change its
# summation order). An A/A run must show no difference beyond that rounding: every figure at least three orders of
# magnitude inside its threshold, every verdict passing, no answer changed.
ROUNDING = {"kl_nats": 1e-6, "ppl_pct": 1e-4, "rel_l2": 1e-5}


@pytest.mark.xdist_group("ci_run")  # the same balance as the perturbed run below
def test_baseline_against_itself(tmp_path):
    out = tmp_path / "self"
    done = run_cli("run", "--params", str(CI_PARAMS), "-p", "candidate=sdpa", *SMALLER, "--only", "02,03,06,09", "--out",
                   str(out), "-q")
    assert done.returncode == 0, done.stderr[-2000:]
    o = result(out, "02_logits").metrics["overall"]
    assert o["kl_max"] <= ROUNDING["kl_nats"] and o["top1_agreement"] == 1 and o["top5_agreement"] == 1
    assert result(out, "03_perplexity").metrics["perplexity"].keys() == {"sdpa", "sdpa (candidate)", "sdpa-fp8kv (control)"}  # one name, two roles
    d = result(out, "03_perplexity").metrics["delta"]
    assert max(abs(d["delta_pct"]), abs(d["ci_low_pct"]), abs(d["ci_high_pct"])) <= ROUNDING["ppl_pct"]
    for r in result(out, "06_activation_drift").tables["drift"]:
        if r["mode"] != "control":  # the accepted-precision control differs, as it should: it sets the thresholds
            assert r["rel_l2"] <= ROUNDING["rel_l2"] and r["cosine"] == pytest.approx(1, abs=1e-9)
    tasks = result(out, "09_tasks")
    assert tasks.tables["flips"] == [] and all(r["delta_pp"] == 0 and r["mcnemar_p"] == 1 for r in tasks.tables["accuracy"])
    for name in ("02_logits", "03_perplexity", "06_activation_drift", "09_tasks"):
        verdicts = result(out, name).verdicts
        assert verdicts and all(v.passed for v in verdicts), (name, [v.name for v in verdicts if not v.passed])


# on the worker of the CI run's tests (tests/conftest.py): the two pytest-xdist workers then carry about the same load
@pytest.mark.xdist_group("ci_run")
def test_a_perturbed_candidate_is_caught_by_every_accuracy_notebook(tmp_path):
    out = tmp_path / "noisy"
    done = run_cli("run", "--params", str(CI_PARAMS), "-p", "candidate=sdpa-noisy", *SMALLER, "--only", "02,03,06,07,09",
                   "--out", str(out), "-q")
    assert done.returncode == 0, done.stderr[-2000:]
    verdicts = {v.id: v for name in ("02_logits", "03_perplexity", "06_activation_drift", "07_context_length", "09_tasks")
                for v in result(out, name).verdicts}
    # every accuracy verdict that measures a distribution fails, against the accepted-precision control of the same run
    for id in ("logits.kl_mean", "logits.top1", "perplexity.delta", "drift.final_cosine", "drift.final_rel_l2",
               "context.long_kl", "tasks.line ending.choice_kl"):
        assert not verdicts[id].passed, (id, verdicts[id].value, verdicts[id].threshold)
        assert "sdpa-fp8kv" in verdicts[id].source
    # the built-in model retrieves every passkey and answers 60 line endings alike under the noise (the answers move,
    # the choices' scores show it): these verdicts cannot see this defect, and are not expected to
    assert verdicts["context.passkey_loss"].value == 0


def test_throughput_with_no_point_run_records_it_and_fails_its_verdict(tmp_path):
    """The real kernel on a CPU: every point unsupported; 04 still finishes, says so, and its verdict fails."""
    out = tmp_path / "unsupported"
    done = run_cli("run", "--params", str(CI_PARAMS), "-p", "candidate=sage", "--only", "04", "--out", str(out), "-q")
    assert done.returncode == 0, done.stderr[-2000:]
    t = result(out, "04_throughput")
    assert t.status == "ok" and t.metrics["points_not_run"] == t.metrics["points"] == 4
    assert t.metrics["prefill_speedup_median_over_points"] is None
    assert all(r["status"] == "unsupported" for r in t.tables["throughput"])
    (v,) = [v for v in t.verdicts if v.name.startswith("points measured")]
    assert v.value == 0 and v.unit == "%" and not v.passed


def test_a_failing_notebook_is_recorded_and_the_run_goes_on(tmp_path):
    nb_dir = tmp_path / "notebooks"
    nb_dir.mkdir()
    for name in ("00_environment", "99_summary"):
        shutil.copy(ROOT / "notebooks" / f"{name}.ipynb", nb_dir)
    broken = nbformat.read(ROOT / "notebooks" / "00_environment.ipynb", as_version=4)
    broken.cells = [broken.cells[1], nbformat.v4.new_code_cell("raise ZeroDivisionError('planted failure for the test')")]
    nbformat.write(broken, nb_dir / "50_broken.ipynb")
    out = tmp_path / "run"
    done = run_cli("run", "--params", str(CI_PARAMS), "--notebooks", str(nb_dir), "--out", str(out), "-q")
    assert done.returncode == 1
    assert "FAILED 50_broken: ZeroDivisionError: planted failure for the test" in done.stderr
    manifest = json.loads((out / "run.json").read_text())
    assert [(n["name"], n["status"]) for n in manifest["notebooks"]] == [("00_environment", "ok"), ("50_broken", "failed"), ("99_summary", "ok")]
    failed = result(out, "50_broken")
    assert failed.status == "failed" and "planted failure" in failed.reason
    assert result(out, "99_summary").metrics["failed_notebooks"] == ["50_broken"]
    html = (out / "report.html").read_text()
    assert "50_broken FAILED" in html and "ZeroDivisionError" in html and "planted failure for the test" in html

    again = run_cli("run", "--params", str(CI_PARAMS), "--notebooks", str(nb_dir), "--out", str(out), "--resume", "-q")
    assert again.returncode == 1
    statuses = {n["name"]: n["status"] for n in json.loads((out / "run.json").read_text())["notebooks"]}
    assert statuses == {"00_environment": "reused", "50_broken": "failed", "99_summary": "ok"}
    # other measurement parameters change the hash, so nothing is reused: tests/test_params.py


def test_changing_only_the_title_reruns_no_notebook_under_resume(tmp_path):
    """The title names the run, it measures nothing: a resumed run with another title reuses every notebook. (The first
    run starts its own fork server for its kernels, as a user's run does: the other runs of the tests share one.)"""
    from sagecheck.forkserver import RUNNING_SERVER_ENV

    out = tmp_path / "titled"
    first = run_cli("run", "--params", str(CI_PARAMS), "--only", "00", "--out", str(out), "-q", env={RUNNING_SERVER_ENV: ""})
    assert first.returncode == 0, first.stderr[-2000:]
    again = run_cli("run", "--params", str(CI_PARAMS), "-p", "title=Another title", "--only", "00", "--out", str(out),
                    "--resume", "-q")
    assert again.returncode == 0, again.stderr[-2000:]
    statuses = {n["name"]: n["status"] for n in json.loads((out / "run.json").read_text())["notebooks"]}
    assert statuses == {"00_environment": "reused", "99_summary": "ok"}
    assert "Another title" in (out / "report.html").read_text()
    from sagecheck import run as runner, sources

    a, b = sources.load(CI_PARAMS), sources.load(CI_PARAMS, ["title=Another title"])
    assert runner.default_run_name(CI_PARAMS, a) == runner.default_run_name(CI_PARAMS, b)  # the same default folder too


def test_report_command_rebuilds_from_a_run_folder(ci_run, tmp_path):
    _, out = ci_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "report.html").unlink()
    done = run_cli("report", str(copy))
    assert done.returncode == 0 and (copy / "report.html").is_file()
    missing = run_cli("report", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and "run folder not found" in missing.stderr


def test_a_report_that_cannot_be_assembled_ends_the_run_with_one_line_and_keeps_the_results(tmp_path, monkeypatch, capsys):
    """As seen on the GPU machine: nbconvert without its 'lab' template, after every notebook ran."""
    from sagecheck import __main__ as cli
    from sagecheck import report

    def no_template(run_dir):
        raise ValueError("No template sub-directory with name 'lab' found in the following paths:\n\t/x\n\t/y")

    monkeypatch.setattr(report, "build_report", no_template)
    out = tmp_path / "no-template"
    code = cli.main(["run", "--params", str(CI_PARAMS), "--only", "00", "--out", str(out), "-q"])
    err = capsys.readouterr().err
    assert code == 1
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "could not be assembled: ValueError: No template sub-directory with name 'lab'" in lines[0]
    assert (out / "results" / "00_environment.json").is_file() and (out / "notebooks" / "00_environment.ipynb").is_file()
    assert cli.main(["report", str(out)]) == 1 and "ValueError" in capsys.readouterr().err


def test_executed_notebooks_have_no_stderr_output(ci_run):
    """Progress bars and tqdm's IProgress warning stay out of the report (they render as red stderr boxes)."""
    _, out = ci_run
    noise = []
    for path in sorted((out / "notebooks").glob("*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            noise += [(path.stem, o["text"][:120]) for o in cell.get("outputs", [])
                      if o.get("output_type") == "stream" and o.get("name") == "stderr"]
    assert not noise, noise
