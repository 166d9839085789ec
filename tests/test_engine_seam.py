"""The engine seam: a notebook runs alone with its own parameters, and a third engine, added by a package of its own
(one file and one entry point: ``tests/engines/site``), runs 02 and 10 with nothing changed in sagecheck."""

from __future__ import annotations

import os

import pytest

from sagecheck import results as R
from tests.conftest import CI_PARAMS, ROOT, run_cli

SITE = ROOT / "tests" / "engines" / "site"


@pytest.mark.slow
def test_one_notebook_runs_alone_with_its_own_parameters(run_notebook):
    res = run_notebook("02_logits", n_short=2, short_tokens=64, n_long=1, long_tokens=256, greedy_tokens=4)
    o = res.metrics["overall"]
    assert res.status == "ok" and o["positions"] == 2 * 64 + 256
    assert res.params["n_short"] == 2 and res.environment["engine"]["name"] == "hf"
    assert res.find("logits.kl_mean").passed and res.find("logits.kl_mean").threshold == res.metrics["control"]["kl_mean"]


@pytest.mark.slow
def test_a_third_engine_in_a_package_of_its_own_runs_02_and_10(tmp_path):
    out = tmp_path / "stub"
    env = {"PYTHONPATH": os.pathsep.join([str(SITE), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = run_cli("run", "--params", str(CI_PARAMS), "-p", "engine=stub", "-p", "logits.long_tokens=256", "--only", "02,10",
                   "--kernel", "sagecheck", "--out", str(out), "-q", env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    logits, paths = (R.load(out / "results" / f"{nb}.json") for nb in ("02_logits", "10_code_paths"))
    for res in (logits, paths):
        assert res.status == "ok" and res.environment["engine"]["name"] == "stub"
        assert res.verdicts and all(v.passed for v in res.verdicts), [(v.id, v.value, v.threshold) for v in res.verdicts]
        # the stub has no accepted-precision control of its own: measured in process, and said
        assert any("measured in process (hf)" in n for n in res.notes), res.notes
    # top-k only: 02 compares the top-20 as a server's results are compared
    assert logits.metrics["candidate_ran"].startswith("the stub engine served") and "rms_logit_diff" not in logits.metrics["overall"]
    rows = {r["id"]: r for r in paths.tables["paths"]}
    assert {p for p, r in rows.items() if r["exercised"]} == {"cold", "prefix", "chunked", "decode_eager", "batch"}
