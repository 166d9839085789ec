"""``python -m sagecheck compare``: runs side by side, matched points only, and what was left out said."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import numpy as np
import pytest

from sagecheck.report import compare as C
from sagecheck import results as R
from sagecheck.params import ParamError, load_params
from tests.conftest import CI_PARAMS, report_page, run_cli

GPU_ENV = {"gpu": "NVIDIA H100 80GB HBM3", "gpus": [{"name": "NVIDIA H100 80GB HBM3"}], "driver": "580.159.04", "cuda": "13.0",
           "versions": {"torch": "2.11.0", "sglang": "0.5.15", "sageattention": "1.0.6"}, "git": {"sha": "a" * 40, "dirty": False},
           "dtype": "bfloat16"}


def base_params(**changes) -> dict:
    params = load_params(CI_PARAMS).model_dump(mode="json")
    for key, value in changes.items():
        target = params
        *parents, last = key.split(".")
        for p in parents:
            target = target[p]
        target[last] = value
    return params


def throughput_table(points, speedup=0.8, status=None):
    rows = []
    for batch, length in points:
        st = (status or {}).get((batch, length), "ok")
        rows.append({"batch": batch, "input_length": length, "implementation": "sdpa", "status": "ok", "prefill_tok_s": 1000.0,
                     "decode_tok_s_total": 100.0})
        rows.append({"batch": batch, "input_length": length, "implementation": "sage-emulated", "status": st,
                     "prefill_tok_s": 1000.0 * speedup, "decode_tok_s_total": 100.0, "prefill_speedup": speedup,
                     "prefill_speedup_p10": speedup - 0.05, "prefill_speedup_p90": speedup + 0.05, "decode_speedup": 1.0,
                     "decode_speedup_p10": 0.95, "decode_speedup_p90": 1.05})
    return rows


def speed_table(lengths, sage_tops=100.0, sdpa_tops=200.0):
    rows = []
    for n in lengths:
        for impl, tops in (("sdpa", sdpa_tops), ("sage", sage_tops)):
            rows.append({"implementation": impl, "seq_len": n, "batch": 4, "heads": 32, "head_dim": 64, "causal": False,
                         "dtype": "float16", "status": "ok", "tops": tops, "ms_median": 1.0, "ms_p10": 0.9, "ms_p90": 1.1,
                         "clock": "cuda-events"})
    return rows


def engine_facts(params: dict) -> dict:
    """What a notebook records of its engine (sagecheck.engines.Engine.facts), for these parameters."""
    from sagecheck import engines
    from sagecheck.params import validate

    return engines.facts(validate({k: v for k, v in params.items() if k != "title"}))


def make_run(folder: Path, params: dict, env: dict | None = None, verdicts: dict | None = None,
             tables: dict | None = None, statuses: dict | None = None) -> Path:
    """A run folder as `sagecheck run` writes it: run.json and results/*.json (what compare reads)."""
    env = env or GPU_ENV
    folder.mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"run": folder.name, "params": params, "started_at": "2026-11-24T10:00:00+00:00"}))
    names = set(verdicts or {}) | set(tables or {}) | set(statuses or {}) | {"00_environment"}
    facts = engine_facts(params)
    for name in names:
        r = R.Results(notebook=name, results_dir=folder / "results", params=params,
                      environment={"gpu": env["gpu"], "engine": facts})
        if name == "00_environment":
            r.metrics = dict(env)
        for check, (value, cmp, threshold) in (verdicts or {}).get(name, {}).items():
            kind = "control" if check.startswith("A/A") else "accuracy"
            vid = f"throughput.aa.{check.split('(')[1].split(')')[0]}" if check.startswith("A/A") else check
            r.verdict(vid, kind, check, value, cmp, threshold, source="control of this run" if kind == "accuracy" else "")
        if name == "04_throughput":
            r.metric("labels", {"baseline": params.get("baseline"), "candidate": params.get("candidate"), "copy": None})
        for tname, rows in (tables or {}).get(name, {}).items():
            r.table(tname, rows)
        if name in (statuses or {}):
            r.status, r.reason = statuses[name]
        r.save()
    return folder


def test_a_run_of_another_model_is_left_out_of_the_measurements_with_why(tmp_path):
    points = [(1, 128), (1, 512), (4, 128)]
    a = make_run(tmp_path / "a", base_params(), tables={"04_throughput": {"throughput": throughput_table(points)}},
                 verdicts={"02_logits": {"mean KL": (0.0005, "<=", 0.001)}})
    b = make_run(tmp_path / "b", base_params(model="random:llama-3.1-8b"), env={**GPU_ENV, "gpu": "NVIDIA H200"},
                 tables={"04_throughput": {"throughput": throughput_table(points)}},
                 verdicts={"02_logits": {"mean KL": (0.002, "<=", 0.001)}})
    runs = C.load_runs([a, b])
    assert [r.label for r in runs] == ["H100", "H200"]
    cmp = C.compare_section(runs, C.SECTIONS[0])
    assert cmp.runs == ["H100"] and cmp.left_out_runs == [
        {"run": "H200", "why": "measured differently: model random:llama-3.1-8b vs builtin in H100"}]
    diffs = {d["parameter"]: d["values"] for d in C.param_differences(runs)}
    assert diffs == {"model": ["builtin", "random:llama-3.1-8b"]}
    # the checks are still shown per run, and the verdict that differs is named
    checks = C.check_rows(runs)
    assert [(c["check"], c["verdicts_differ"]) for c in checks] == [("mean KL", True)]
    data = C.comparison_data(runs)
    assert any("1 check(s) with a different verdict" in s and "H100 pass · H200 fail" in s for s in data["headline"])
    assert not any("Serving speedup" in s for s in data["headline"])  # one run left: nothing side by side


def test_points_not_measured_alike_are_left_out_and_named(tmp_path):
    a = make_run(tmp_path / "a", base_params(), tables={
        "04_throughput": {"throughput": throughput_table([(1, 128), (1, 512), (4, 128)], speedup=0.8,
                                                         status={(4, 128): "out of memory"})},
        "08_kernel": {"speed": speed_table([1024, 2048])}})
    b = make_run(tmp_path / "b", base_params(), env={**GPU_ENV, "gpu": "NVIDIA H200"}, tables={
        "04_throughput": {"throughput": throughput_table([(1, 128), (1, 512), (4, 128), (8, 128)], speedup=0.9)},
        "08_kernel": {"speed": speed_table([1024, 4096], sage_tops=110.0)}})
    runs = C.load_runs([a, b])
    sections = C.compare_all(runs)
    tp = sections["throughput"]
    assert [(p["batch"], p["input_length"]) for p in tp.points] == [(1, 128), (1, 512)]
    assert tp.series("H100", "prefill_speedup") == [0.8, 0.8] and tp.series("H200", "prefill_speedup") == [0.9, 0.9]
    assert {(p["batch"], p["input_length"]): p["why"] for p in tp.left_out_points} == {
        (4, 128): "out of memory in H100", (8, 128): "not measured in H100"}
    kn = sections["kernel"]
    assert sorted({p["seq_len"] for p in kn.points}) == [1024]
    assert {p["why"] for p in kn.left_out_points} == {"not measured in H200", "not measured in H100"}
    sage = next(p for p in kn.points if p["implementation"] == "sage")
    assert sage["runs"]["H100"]["over_sdpa"] == pytest.approx(0.5) and sage["runs"]["H200"]["over_sdpa"] == pytest.approx(0.55)
    text = " ".join(C.headline(runs, sections, C.check_rows(runs)))
    assert "prefill H100 0.80x · H200 0.90x" in text and "H100 0.50x · H200 0.55x" in text and "H200 1.10x" in text
    assert "6 point(s) not measured alike" in text and "(not measured in any run): memory" in text


def test_labels_name_the_gpu_the_tensor_parallel_size_then_what_differs(tmp_path):
    runs = [C.Run(tmp_path / n, {}, p, {}) for n, p in (("x", {"engine": "sglang", "sglang": {"tp": 1}, "seed": 0}),
                                                         ("y", {"engine": "sglang", "sglang": {"tp": 2}, "seed": 0}))]
    for run in runs:
        run.results = {"00_environment": R.Results("00_environment", tmp_path, metrics={"gpu": "NVIDIA H200"},
                                                   environment={"engine": engine_facts(run.params)})}
    C.assign_labels(runs)
    assert [r.label for r in runs] == ["H200", "H200 tp2"]
    for run, seed in zip(runs, (0, 1)):
        run.params = {"engine": "hf", "seed": seed}
        run.results["00_environment"].environment = {"engine": engine_facts(run.params)}
        run.__dict__.pop("facts", None)  # read again from the results
    C.assign_labels(runs)
    assert [r.label for r in runs] == ["H200, seed 0", "H200, seed 1"]
    for run in runs:
        run.params = {"engine": "hf"}
        run.results["00_environment"].environment = {"engine": engine_facts(run.params)}
        run.__dict__.pop("facts", None)
    C.assign_labels(runs)
    assert [r.label for r in runs] == ["H200 (x)", "H200 (y)"]
    # the kernel's version tells runs apart (a source build of SageAttention 2 by its first word)
    for run, version in zip(runs, ("1.0.6", "2.x built from source (no package metadata) at /tmp/sa2/sageattention")):
        run.results["00_environment"].metrics["versions"] = {"sageattention": version}
    C.assign_labels(runs)
    assert [r.label for r in runs] == ["H200, sageattention 1.0.6", "H200, sageattention 2.x"]
    # two runs alike in everything, in folders of the same name: as many of their paths' parts as tell them apart
    twins = [C.Run(tmp_path / parent / "all" / "acc", {}, {"engine": "hf"}, {}) for parent in ("monday", "tuesday")]
    for run in twins:
        run.results = {"00_environment": R.Results("00_environment", tmp_path, metrics={"gpu": "NVIDIA H200"},
                                                   environment={"engine": engine_facts(run.params)})}
    C.assign_labels(twins)
    assert [r.label for r in twins] == ["H200 (monday/all/acc)", "H200 (tuesday/all/acc)"]
    assert C.gpu_short("none (CPU only)") == "CPU" and C.gpu_short("NVIDIA GeForce RTX 4090") == "RTX 4090"
    assert C.gpu_short("NVIDIA A100-SXM4-80GB") == "A100"


def test_runs_alike_in_parameters_are_said_to_differ_in_what_ran_them(tmp_path):
    """Two runs of the same parameters with two versions of the kernel on the same GPU: the page names the kernel's
    version as what differs (not "the machine"), and the labels carry it."""
    a = make_run(tmp_path / "v1" / "run", base_params())
    b = make_run(tmp_path / "v2" / "run", base_params(),
                 env={**GPU_ENV, "versions": {**GPU_ENV["versions"], "sageattention": "2.x built from source"}})
    out = tmp_path / "cmp"
    done = run_cli("compare", str(a), str(b), "--out", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    page = (out / "compare.html").read_text()
    banner = re.search(r'id="compare-params-warning">(.*?)</div>', page, flags=re.S).group(1)
    assert "they differ only in what ran them: sageattention (shaded below)" in " ".join(banner.split())
    assert "H100, sageattention 1.0.6 · H100, sageattention 2.x" in page


def test_a_check_missing_from_a_run_says_why(tmp_path):
    a = make_run(tmp_path / "a", base_params(), verdicts={"02_logits": {"mean KL": (0.0005, "<=", 0.001)},
                                                        "03_perplexity": {"delta": (0.1, "abs<=", 1.0)}})
    b = make_run(tmp_path / "b", base_params(), statuses={"02_logits": ("failed", "CUDA error: out of memory")})
    (b / "results" / "03_perplexity.json").write_text("{not json")  # a results file that cannot be read
    runs = C.load_runs([a, b])
    rows = {r["check"]: r["runs"][1] for r in C.check_rows(runs)}
    assert rows == {"mean KL": {"missing": "notebook failed"}, "delta": {"missing": "notebook failed"}}
    status = {r["notebook"]: r["runs"][1] for r in C.notebook_status_rows(runs)}
    assert status["02_logits"]["reason"] == "CUDA error: out of memory" and "unreadable results" in status["03_perplexity"]["reason"]


def test_bad_input_is_one_line_and_exit_2(tmp_path):
    a = make_run(tmp_path / "a", base_params(), verdicts={"02_logits": {"mean KL": (0.0005, "<=", 0.001)}})
    (tmp_path / "empty").mkdir()
    cases = [([str(a)], "compare needs two or more run folders, got 1"),
             ([str(a), str(tmp_path / "nope")], "run folder not found"),
             ([str(a), str(tmp_path / "empty")], "is not a run folder: no results/*.json"),
             ([str(a), str(a)], "the same run folder is named twice")]
    for folders, message in cases:
        done = run_cli("compare", *folders, "--out", str(tmp_path / "out"))
        assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
    with pytest.raises(ParamError):
        C.load_runs([a])


def test_compare_two_cpu_runs_of_the_built_in_model_with_different_seeds(ci_run, tmp_path):
    """The CI comparison: the report's run (seed 0) against a second one with seed 1 on some notebooks."""
    _, first = ci_run
    second = tmp_path / "seed1"
    done = run_cli("run", "--params", str(CI_PARAMS), "-p", "seed=1", "--only", "00,04,08", "--out", str(second), "-q")
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "cmp"
    done = run_cli("compare", str(first), str(second), "--out", str(out))
    assert done.returncode == 0 and done.stderr == "", done.stderr[-2000:]
    assert done.stdout.split() == [str(out / "compare.html"), str(out / "compare.md")]
    data = json.loads((out / "compare.json").read_text())
    assert [r["label"] for r in data["runs"]] == ["CPU, seed 0", "CPU, seed 1"]
    assert {d["parameter"]: d["values"] for d in data["param_differences"]}["seed"] == [0, 1]

    # every check of both runs, from the results files themselves
    def checks(run):
        return {(r.notebook, v.name): v for r in R.load_all(run / "results") if not r.notebook.startswith("99")
                for v in r.verdicts}
    a, b = checks(first), checks(second)
    rows = {(r["notebook"], r["check"]): r for r in data["checks"]}
    assert set(rows) == set(a) | set(b)
    for key, row in rows.items():
        for verdicts, cell in ((a, row["runs"][0]), (b, row["runs"][1])):
            if key in verdicts:
                assert cell["value"] == pytest.approx(verdicts[key].value) and cell["passed"] == verdicts[key].passed
            else:
                assert cell == {"missing": "not run"} and key[0][:2] in ("01", "02", "03", "05", "06", "07", "09", "10")

    # throughput: the points both measured, with each run's own speedups
    def speedups(run):
        table = R.load(run / "results" / "04_throughput.json").tables["throughput"]
        return {(r["batch"], r["input_length"]): r["prefill_speedup"] for r in table
                if r["implementation"] == "sage-emulated" and r["status"] == "ok"}
    sa, sb = speedups(first), speedups(second)
    tp = data["sections"]["throughput"]
    assert {(p["batch"], p["input_length"]) for p in tp["points"]} == set(sa) & set(sb) and tp["points"]
    for p in tp["points"]:
        key = (p["batch"], p["input_length"])
        assert p["runs"]["CPU, seed 0"]["prefill_speedup"] == sa[key] and p["runs"]["CPU, seed 1"]["prefill_speedup"] == sb[key]
    median = np.median([sa[(p["batch"], p["input_length"])] for p in tp["points"]])
    assert f"prefill CPU, seed 0 {median:.2f}x" in " ".join(data["headline"])
    # the kernel's CPU timings of sdpa, matched shape by shape; memory is a GPU measurement: both runs left out with why
    assert data["sections"]["kernel"]["points"] and data["sections"]["kernel"]["runs"] == ["CPU, seed 0", "CPU, seed 1"]
    assert [x["why"] for x in data["sections"]["memory"]["left_out_runs"]] == [
        "05_memory skipped: no CUDA device: peak GPU memory cannot be measured here; weights and KV-cache sizes are computed "
        "from the shapes", "05_memory was not run"]

    md = (out / "compare.md").read_text()
    assert len(re.findall(r"^\| \d\d \| ", md, flags=re.M)) == len(rows) and "`seed` 0 / 1" in md
    # the legend says what is true of these runs: a differing verdict is named only where one differs; no emoji
    differing = sum(r["verdicts_differ"] for r in rows.values())
    assert ("No verdict differs between the runs." in md) == (differing == 0)
    assert md.count("(verdict differs)") == differing and "⚠" not in md and "✅" not in md
    page = (out / "compare.html").read_text()
    assert "Traceback" not in page and len(re.findall(r"<img class=[\"']sc-figure", page)) >= 2
    with report_page(out / "compare.html", 1400, 1000) as view:
        assert view.locator("#compare-headline li").count() >= 3
        assert view.locator("#compare-checks tbody tr").count() == len(rows)
        view.evaluate("document.querySelectorAll('details').forEach(d => d.open = true)")
        assert view.evaluate("document.documentElement.scrollWidth") <= 1400


def test_tp2_against_tp1_is_compared_point_by_point(tmp_path):
    """A TP=2 run is another machine set-up, not another measurement: its points are compared with TP=1's."""
    tp1 = base_params(engine="sglang")
    tp2 = copy.deepcopy(tp1)
    tp2["sglang"]["tp"] = 2
    env2 = {**GPU_ENV, "gpu": "NVIDIA H200", "gpus": [{"name": "NVIDIA H200"}] * 2}
    a = make_run(tmp_path / "tp1", tp1, env={**GPU_ENV, "gpu": "NVIDIA H200"},
                 tables={"04_throughput": {"throughput": throughput_table([(1, 128)], speedup=0.8)}})
    b = make_run(tmp_path / "tp2", tp2, env=env2, tables={"04_throughput": {"throughput": throughput_table([(1, 128)], speedup=0.7)}})
    runs = C.load_runs([a, b])
    assert [r.label for r in runs] == ["H200", "H200 tp2"]
    tp = C.compare_section(runs, C.SECTIONS[0])
    assert tp.runs == ["H200", "H200 tp2"] and len(tp.points) == 1
    env = {row["fact"]: row for row in C.environment_rows(runs)}
    assert env["tensor parallel"]["values"] == [1, 2] and env["tensor parallel"]["differs"]
    assert env["GPUs in the machine"]["values"] == [1, 2]


def test_points_apart_are_those_whose_intervals_do_not_overlap():
    def point(length, a, b):
        return {"batch": 1, "input_length": length, "runs": {
            "A": {"prefill_speedup_p10": a[0], "prefill_speedup_p90": a[1]},
            "B": {"prefill_speedup_p10": b[0], "prefill_speedup_p90": b[1]}}}
    cmp = C.Comparison("throughput", ("batch", "input_length"), (), ["A", "B"], points=[
        point(128, (0.7, 0.8), (0.81, 0.9)),   # above: apart
        point(256, (0.7, 0.8), (0.5, 0.69)),   # below: apart
        point(512, (0.7, 0.8), (0.8, 0.9)),    # touching: not apart
        point(1024, (0.7, 0.8), (None, 0.9)),  # no interval: not judged
    ])
    assert [p["input_length"] for p in C.disjoint_points(cmp, "A", "B", "prefill")] == [128, 256]
    assert C.disjoint_points(cmp, "A", "B", "decode") == []


def test_the_aa_control_is_read_as_04_judged_it(tmp_path):
    aa = "A/A control (prefill): the baseline's copy measures as the baseline"
    table = {"throughput": throughput_table([(1, 128)])}
    a = make_run(tmp_path / "a", base_params(), tables={"04_throughput": table},
                 verdicts={"04_throughput": {aa: (22.1, "<=", 3.0), "A/A control (decode): x": (4.0, "<=", 3.0)}})
    b = make_run(tmp_path / "b", base_params(), env={**GPU_ENV, "gpu": "NVIDIA H200"}, tables={"04_throughput": table},
                 verdicts={"04_throughput": {aa: (1.2, "<=", 3.0)}})
    runs = C.load_runs([a, b])
    assert C.aa_control(runs, ["H100", "H200"]) == {"H100": {"pct": 22.1, "limit": 3.0, "passed": False},
                                                    "H200": {"pct": 1.2, "limit": 3.0, "passed": True}}
    text = " ".join(C.comparison_data(runs)["headline"])
    assert "failed in H100 22.1 %" in text and "H200 1.2" not in text
    page = C.compare_section(runs, C.SECTIONS[0])
    from sagecheck.report.compare_html import throughput_view
    assert "H100: 22.1 % — failed, limit 3 %; H200: 1.2 %" in throughput_view(page, runs)["aa"]


def test_the_comparison_figures_are_seaborn_facets_drawing_each_runs_values():
    import matplotlib

    matplotlib.use("Agg")
    from sagecheck import plots

    runs = ["H100", "H200"]
    kernel = [{"head_dim": d, "causal": c, "seq_len": n, "implementation": impl,
               "runs": {r: {"tops": 100.0 * (i + 1) + n / 1024 + (50 if impl == "sdpa" else 0) + d} for i, r in enumerate(runs)}}
              for d, c in ((64, False), (128, True)) for n in (1024, 4096) for impl in ("sage", "sdpa")]
    fig = plots.kernel_by_run(kernel, runs, "tops", "TOPS", "kernel")
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["head dim 64, full", "head dim 128, causal"]
    for ax, d in zip(panels, (64, 128)):
        drawn = sorted(tuple(line.get_ydata()) for line in ax.get_lines() if len(line.get_xdata()) == 2)
        want = sorted(tuple(p["runs"][r]["tops"] for p in kernel if p["head_dim"] == d and p["implementation"] == impl)
                      for r in runs for impl in ("sage", "sdpa"))
        assert drawn == want
    serving = [{"batch": b, "input_length": n, "runs": {r: {"prefill_speedup": 0.8 + i / 10, "prefill_speedup_p10": 0.7 + i / 10,
                                                            "prefill_speedup_p90": None, "decode_speedup": 1.0} for i, r in enumerate(runs)}}
               for b in (1, 8) for n in (128, 512, 2048)]
    fig = plots.speedup_by_run(serving, runs, ("prefill", "decode"), "serving")
    grid = [ax for ax in fig.axes if ax.get_title() or ax.get_xlabel() or ax.get_ylabel()]
    assert len(grid) == 4 and [ax.get_title() for ax in grid[:2]] == ["batch 1", "batch 8"]
    prefill = grid[0]
    bars = [c for c in prefill.containers]
    assert [list(c.lines[0].get_ydata()) for c in bars] == [[0.8] * 3, [0.9] * 3]
    low, high = bars[0].lines[2][0].get_segments()[0][:, 1]  # p10 below, no p90: the bar ends at the value
    assert (low, high) == pytest.approx((0.7, 0.8))
