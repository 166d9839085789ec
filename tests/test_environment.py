"""The environment record: which sagecheck ran, and its commit only where it is known to be sagecheck's."""

from __future__ import annotations

import subprocess

from sagecheck import environment


def _git(cwd, *args):
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def test_an_unpacked_copy_inside_another_repository_reports_no_commit(tmp_path, monkeypatch):
    other = tmp_path / "other-repo"
    copy = other / "vendor" / "sagecheck"
    (copy / "lib" / "sagecheck").mkdir(parents=True)
    (copy / "pyproject.toml").write_text("[project]\nname = 'sagecheck'\n")
    _git(other, "init", "-q")
    _git(other, "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q", "--allow-empty", "-m", "unrelated")
    monkeypatch.delenv("SAGECHECK_GIT_SHA", raising=False)
    monkeypatch.setattr(environment, "project_root", lambda: copy)
    assert environment.git_info.__wrapped__()["sha"] == "unknown (not run from a git checkout of sagecheck)"
    _git(copy, "init", "-q")  # its own checkout: its own commit
    _git(copy, "add", "pyproject.toml")
    _git(copy, "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q", "-m", "own")
    own = subprocess.run(["git", "rev-parse", "HEAD"], cwd=copy, capture_output=True, text=True).stdout.strip()
    assert environment.git_info.__wrapped__() == {"sha": own, "dirty": False}
    # changes not committed: marked, with a fingerprint of the files that ran
    (copy / "pyproject.toml").write_text("[project]\nname = 'sagecheck'\nversion = '1'\n")
    first = environment.git_info.__wrapped__()
    assert first["dirty"] is True and len(first["tree"]) == 12
    assert environment.git_info.__wrapped__()["tree"] == first["tree"]  # the same tree: the same fingerprint
    (copy / "lib" / "sagecheck" / "new.py").write_text("x = 1\n")  # a new file git would add: part of the code that ran
    with_new = environment.git_info.__wrapped__()
    assert with_new["dirty"] is True
    (copy / "lib" / "sagecheck" / "new.py").write_text("x = 2\n")
    as_it_ran = environment.git_info.__wrapped__()["tree"]
    assert len({first["tree"], with_new["tree"], as_it_ran}) == 3
    # the fingerprint is of the files, not of the commit: committed as they are, a checkout of that commit reads the same
    _git(copy, "add", "-A")
    _git(copy, "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q", "-m", "as it ran")
    assert environment.git_info.__wrapped__()["dirty"] is False
    files = subprocess.run(["git", "ls-files"], cwd=copy, capture_output=True, text=True).stdout.splitlines()
    assert environment.source_fingerprint(copy, files) == as_it_ran
    (copy / "lib" / "sagecheck" / "new.py").unlink()
    _git(copy, "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q", "-am", "without new.py")
    (copy / ".gitignore").write_text("outputs/\n")
    _git(copy, "add", ".gitignore")
    _git(copy, "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q", "-m", "ignore outputs")
    (copy / "outputs").mkdir()
    (copy / "outputs" / "run.json").write_text("{}")  # what git ignores is not code
    assert environment.git_info.__wrapped__()["dirty"] is False


def test_the_version_of_sagecheck_is_recorded():
    assert "sagecheck" in environment.PACKAGES and environment.package_version("sagecheck")


def test_the_summary_says_when_the_code_that_ran_was_not_the_recorded_commit():
    from sagecheck.report.summary import commit_label

    assert commit_label({"sha": "ad1d2b1384f05bb71baf958e8e4d07319b858de0", "dirty": True}) == "ad1d2b1384f0 + uncommitted changes"
    assert commit_label({"sha": "ad1d2b1384f05bb71baf958e8e4d07319b858de0", "dirty": True, "tree": "0123456789ab"}) == \
        "ad1d2b1384f0 + uncommitted changes (source 0123456789ab)"
    assert commit_label({"sha": "ad1d2b1384f05bb71baf958e8e4d07319b858de0", "dirty": False}) == "ad1d2b1384f0"
    assert commit_label({"sha": "unknown (installed package)", "dirty": None}) == "unknown (installed package)"


def test_an_sglang_candidate_other_than_sage_attn_is_named_not_reported_unknown():
    from types import SimpleNamespace

    from sagecheck.engines.sglang import CANDIDATE, SGLangEngine

    engine = SimpleNamespace(handles={CANDIDATE: SimpleNamespace(error=None)}, params=SimpleNamespace(sglang_attention_backend="triton"))
    assert SGLangEngine.candidate_ran(engine) == "--attention-backend triton, not sagecheck's sage_attn (no plugin statistics)"


def test_00_shows_the_gpus_power_limit_where_nvml_gives_it():
    """A GPU capped below its default power limit runs power-dense kernels at lower clocks: 00 says the limit in force
    (from NVML, through sagecheck.gpu_clocks), and says so where it is not known."""
    from sagecheck.sources import load

    env = environment.collect()
    gpu = {"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_gib": 79.2, "driver": "580.1", "power_limit_w": 500.0,
           "power_limit_default_w": 700.0, "sm_clock_max_mhz": 1980.0}
    env.update(gpus=[gpu], gpu=gpu["name"], gpu_memory_gib=79.2)
    facts = environment.facts(env, load(None, ["device=cpu"]))
    assert facts["GPU limits"] == "power limit 500 W of 700 W default, SM clock up to 1980 MHz"
    env["gpus"] = [{k: v for k, v in gpu.items() if k not in ("power_limit_w", "power_limit_default_w", "sm_clock_max_mhz")}]
    assert environment.facts(env, load(None, ["device=cpu"]))["GPU limits"] == "not known (NVML did not say)"
    env["gpus"] = []
    assert environment.facts(env, load(None, ["device=cpu"]))["GPU limits"] == "n/a"
