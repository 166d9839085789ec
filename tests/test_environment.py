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
    _git(copy, "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q", "--allow-empty", "-m", "own")
    own = subprocess.run(["git", "rev-parse", "HEAD"], cwd=copy, capture_output=True, text=True).stdout.strip()
    assert environment.git_info.__wrapped__()["sha"] == own


def test_the_version_of_sagecheck_is_recorded():
    assert "sagecheck" in environment.PACKAGES and environment.package_version("sagecheck")
