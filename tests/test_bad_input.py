"""Every bad input a user can give the command line: exit code 2 and one line naming the cause, before any notebook runs
(in process through ``sagecheck.__main__.main``, as ``python -m sagecheck`` calls it); Ctrl-C: one line, exit 130, and the
finished notebooks kept for ``--resume`` (a real SIGINT to a real run)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sagecheck.__main__ import main
from tests.conftest import CI_PARAMS, ROOT

NOT_UTF8 = b"model: \xff\xfe builtin\n"

# (what a user gives: arguments, with {dir} the test's folder and {params} a file of the YAML below; that YAML; what the
# one line must say)
CASES = [
    (["run", "--params", "{params}"], "modle: builtin\n", "unknown parameter 'modle'"),
    (["run", "--params", "{params}"], "logits:\n  n_shrt: 3\n", "(did you mean 'n_short'?)"),
    (["run", "--params", "{params}"], "logits:\n  n_short: many\n", "parameter 'logits.n_short'"),
    (["run", "--params", "{params}"], "engine: vllm\n", "Unknown engine 'vllm'. Available: hf, sglang"),
    (["run", "--params", "{params}"], "candidate: sage2\n", "Unknown attention implementation 'sage2'"),
    (["run", "--params", "{params}"], "baseline: sage\n", "'sage' is not allowed here; allowed: sdpa, eager"),
    (["run", "--params", "{params}"], "device: tpu\n", "must be auto, cpu, cuda or cuda:N"),
    (["run", "--params", "{params}"], "model: ./no/such/model\n", "local path does not exist"),
    (["run", "--params", "{params}"], "perplexity:\n  dataset: missing.txt\n", "parameter 'perplexity.dataset'"),
    (["run", "--params", "{params}"], "perplexity:\n  window: 64\n  stride: 128\n", "stride must be at most window"),
    (["run", "--params", "{params}"], "- a\n- b\n", "must hold a mapping"),
    (["run", "--params", "{params}"], "model: [unclosed\n", "is not valid YAML"),
    (["run", "--params", "{params}"], NOT_UTF8, "is not UTF-8 text"),
    (["run", "--params", "{dir}"], None, "is a folder, not a YAML file"),
    (["run", "--params", "{dir}/nope.yaml"], None, "params file not found"),
    (["run", "-p", "logits.top_k=-1"], None, "parameter 'logits.top_k'"),
    (["run", "-p", "nonsense"], None, "must look like key=value"),
    (["run", "-p", "1abc=2"], None, "is not a parameter name"),
    (["run", "-p", "throughput.batch_sizes=[]"], None, "'throughput.batch_sizes' = []: must list at least one value"),
    (["run", "-p", "throughput.cpu_batch_sizes=[]"], None, "'throughput.cpu_batch_sizes' = []: must list at least one value"),
    (["run", "-p", "memory.batch_sizes=[]"], None, "'memory.batch_sizes' = []: must list at least one value"),
    (["run", "-p", "tasks.tasks=[]"], None, "'tasks.tasks' = []: must list at least one value"),
    (["run", "-p", "throughput.batch_sizes=[-1]"], None, "'throughput.batch_sizes[0]' = -1"),
    (["run", "-p", "logits.n_short=1e23"], None, "'logits.n_short' = '1e23'"),
    (["run", "-p", "logits.n_short=1.0e+23"], None, "'logits.n_short' = 1e+23"),
    (["run", "-p", "logits.n_short=100000000000"], None, "less than or equal to 100000"),
    (["run", "-p", "seed=100000000000000000000000"], None, "is far too large"),
    (["run", "-p", "context_length.depths=[2]"], None, "'context_length.depths[0]' = 2"),
    (["run", "-p", "tasks.tasks=[{name: a, kind: generate, source: gsm8k, stopp: []}]"], None,
     "unknown parameter 'tasks.tasks[0].stopp' (did you mean 'stop'?)"),
    (["run", "-p", "tasks.tasks=[{name: a, kind: generate, source: 'builtin:nope'}]"], None, "Unknown task source 'builtin:nope'"),
    (["run", "-p", "device=cuda:7"], None, "parameter 'device' = 'cuda:7': this machine has no CUDA GPU"),
    (["run", "--only", ","], None, "--only names no notebook"),
    (["run", "--only", "03,nope"], None, "no notebook named 'nope'"),
    (["run", "--kernel", "nosuchkernel"], None, "--kernel 'nosuchkernel': no such Jupyter kernel on this machine"),
    (["run", "--notebooks", "{dir}/none"], None, "notebooks folder not found"),
    (["run", "--notebooks", "{dir}"], None, "no notebooks (NN_name.ipynb)"),
    (["report", "{dir}/nothing"], None, "run folder not found"),
    (["params", "-p", "memory.batch_sizes=[0]"], None, "'memory.batch_sizes[0]' = 0"),
    (["run", "--params", "{params}"], "seed: 1\nseed: 2\n", "'seed' is given twice (lines 1 and 2)"),
    (["run", "--params", "{params}"], "logits:\n  n_short: 2\nlogits:\n  n_long: 1\n", "'logits' is given twice"),
    (["run", "--params", "{params}", "-p", "seed=abc"], "seed: 1\n", "unable to parse string as an integer (given as -p seed=abc)"),
    (["run", "--params", "{params}", "-p", "logits.n_shrt=2"], "seed: 1\n", "short_tokens, text, top_k (given as -p logits.n_shrt=2)"),
    (["run", "-p", "model=nosuch-org/no-such-model"], None, "parameter 'model' = 'nosuch-org/no-such-model': not a local folder"),
]


@pytest.mark.parametrize("argv, yaml_text, expected", CASES, ids=[c[2][:48] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capfd, argv, yaml_text, expected):
    if yaml_text is not None:
        (tmp_path / "p.yaml").write_bytes(yaml_text if isinstance(yaml_text, bytes) else yaml_text.encode())
    args = [a.replace("{dir}", str(tmp_path)).replace("{params}", str(tmp_path / "p.yaml")) for a in argv]
    if args[0] == "run":
        args += ["--out", str(tmp_path / "run"), "-q"]
    code = main(args)
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("sagecheck: error: ") and expected in lines[0], lines[0]
    assert "p.yaml" not in lines[0] or "-p " not in expected  # a -p value is not blamed on the params file
    assert not (tmp_path / "run").exists()  # nothing ran, no run folder


def _one_line_refusal(capfd, args: list[str]) -> str:
    code = main(args)
    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    return lines[0]


def test_out_is_a_new_folder_or_an_earlier_run_never_a_folder_of_other_files(tmp_path, capfd):
    """`--out .` from the project's root once overwrote two notebooks with executed copies and wrote results/ there."""
    before = sorted(p.name for p in ROOT.iterdir())
    line = _one_line_refusal(capfd, ["run", "--out", str(ROOT), "-q"])
    assert "holds files that are not a sagecheck run" in line and sorted(p.name for p in ROOT.iterdir()) == before
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert "holds files that are not a sagecheck run (notes.txt)" in _one_line_refusal(capfd, ["run", "--out", str(mine), "-q"])
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    a_file = tmp_path / "a.txt"
    a_file.write_text("x")
    assert "a file, not a folder" in _one_line_refusal(capfd, ["run", "--out", str(a_file), "-q"])
    assert "is a file, so the run folder cannot be made" in _one_line_refusal(capfd, ["run", "--out", str(a_file / "run"), "-q"])
    assert a_file.read_text() == "x"


def test_an_unreachable_hub_model_is_refused_within_seconds(tmp_path, capfd):
    t0 = time.monotonic()
    line = _one_line_refusal(capfd, ["run", "-p", "model=nosuch-org/no-such-model", "--out", str(tmp_path / "r"), "-q"])
    assert time.monotonic() - t0 < 30 and ("cannot be reached" in line or "no such model on the Hugging Face hub" in line)
    assert not (tmp_path / "r").exists()


def test_a_run_without_params_is_the_embedded_default(capfd):
    assert main(["params"]) == 0
    bare = capfd.readouterr().out
    assert main(["params", "--params", str(ROOT / "params" / "default.yaml")]) == 0
    assert capfd.readouterr().out == bare and "{model}" in bare  # the title names the model that ran


SMALL = ["--params", str(CI_PARAMS), "--only", "00,03", "-p", "perplexity.max_tokens=400", "-p", "perplexity.window=64",
         "-p", "perplexity.stride=32"]


def _finished(out: Path, name: str) -> bool:
    try:
        return any(n["name"] == name for n in json.loads((out / "run.json").read_text())["notebooks"])
    except (OSError, ValueError, KeyError):
        return False


def _interrupt_after_first_notebook(out: Path) -> subprocess.CompletedProcess:
    """A real run, sent SIGINT (as a terminal's Ctrl-C: to the whole process group) once its first notebook finished."""
    proc = subprocess.Popen([sys.executable, "-m", "sagecheck", "run", *SMALL, "--out", str(out), "-q"], cwd=ROOT, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not _finished(out, "00_environment") and time.monotonic() < deadline:  # the runner has recorded it
        time.sleep(0.2)
    time.sleep(1)  # 03 is starting now
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.slow
def test_ctrl_c_is_one_line_exit_130_and_resume_completes_the_run(tmp_path):
    out = tmp_path / "run"
    done = _interrupt_after_first_notebook(out)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 130 and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("sagecheck: interrupted (Ctrl-C); 1 finished notebook(s) kept (00_environment)")
    assert "--resume` goes on from there" in lines[0]
    assert f"`{sys.executable} -m sagecheck run" in lines[0]  # the hint runs as printed: this interpreter, not a python on PATH
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["interrupted_at"] and [n["name"] for n in manifest["notebooks"]] == ["00_environment"]
    assert not (out / "results" / "03_perplexity.json").exists()
    again = subprocess.run([sys.executable, "-m", "sagecheck", "run", *SMALL, "--out", str(out), "-q", "--resume", "--no-report"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    statuses = {n["name"]: n["status"] for n in json.loads((out / "run.json").read_text())["notebooks"]}
    assert statuses == {"00_environment": "reused", "03_perplexity": "ok", "99_summary": "ok"}
