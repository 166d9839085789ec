"""Parameters: one schema, YAML files, -p overrides, and bad input stopped before any notebook runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from sagecheck import params as sp
from sagecheck import sources
from tests.conftest import CI_PARAMS, ROOT, run_cli


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(sp.ParamError, match="did you mean 'model'"):
        sp.load_params(None, ["modle=builtin"])


def test_defaults_are_the_embedded_default():
    p = sp.load_params(ROOT / "params" / "default.yaml")
    d = sp.Params()
    for key in ("model", "engine", "baseline", "candidate", "device", "dtype", "seed"):
        assert getattr(p, key) == getattr(d, key)
    assert p.model == "builtin" and p.candidate == "sage-emulated"


def test_aliases_resolve_to_the_registered_names():
    p = sp.load_params(None, ["candidate=sage_emulated", "engine=transformers"])
    assert (p.candidate, p.engine) == ("sage-emulated", "hf")


def test_overrides_and_yaml_values():
    p = sp.load_params(CI_PARAMS, ["logits.n_short=5", "candidate_phases=[prefill]", "seed=7"])
    assert p.logits.n_short == 5
    assert p.candidate_phases == ["prefill"]
    assert p.seed == 7
    assert p.kernel.heads == 4  # from the file


def test_every_shipped_preset_validates():
    for path in sorted((ROOT / "params").glob("*.yaml")):
        sources.load(path)


def test_notebook_view_reads_section_then_common():
    p = sp.load_params(CI_PARAMS)
    view = sp.NotebookParams(p, "02_logits")
    assert view.n_short == p.logits.n_short
    assert view.model == "builtin"
    assert view.with_common(engine="sglang").engine == "sglang"


def test_flat_keys_do_not_collide():
    common = set(sp.COMMON_KEYS) | set(sp.RUN_KEYS) | set(sp.RUN_LEVEL)
    for name, section in sp.SECTIONS.items():
        clash = common & set(section.model_fields)
        assert not clash, f"section {name} reuses common keys {clash}"


def test_from_notebook_round_trip():
    p = sp.load_params(CI_PARAMS)
    flat = sp.notebook_parameters(p, "07_context_length")
    again = sp.from_notebook("07_context_length", flat)
    assert again.context_length == p.context_length
    assert sp.params_hash(flat) == sp.params_hash(dict(flat))


def test_secret_in_parameters_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_planted_secret_123456")
    from sagecheck.run import _check_no_secret_in_params

    with pytest.raises(sp.ParamError, match="HF_TOKEN"):
        _check_no_secret_in_params(sp.load_params(None, ["title=hf_planted_secret_123456"]))


def test_local_paths_are_made_absolute_for_the_notebooks(tmp_path, monkeypatch):
    """Notebooks run in notebooks/, so a path relative to the params file (or to where the run started) must reach
    them absolute; an unknown key inside a task list is one line, not a traceback."""
    (tmp_path / "text.txt").write_text("To be, or not to be.\n")
    (tmp_path / "qa.jsonl").write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    f = tmp_path / "p.yaml"
    f.write_text("perplexity: {dataset: text.txt}\ntasks:\n  tasks:\n    - {name: qa, kind: generate, source: qa.jsonl}\n")
    monkeypatch.chdir(ROOT)
    p = sources.load(f)
    assert p.perplexity.dataset == str(tmp_path / "text.txt") and p.tasks.tasks[0].source == str(tmp_path / "qa.jsonl")
    monkeypatch.chdir(tmp_path)
    assert sources.load(None, ["logits.text=text.txt"]).logits.text == str(tmp_path / "text.txt")
    with pytest.raises(sp.ParamError, match=r"unknown parameter 'tasks.tasks\[0\].stopp' \(did you mean 'stop'\?\)"):
        sp.load_params(None, ["tasks.tasks=[{name: a, kind: generate, source: gsm8k, stopp: []}]"])


def test_only_measurement_parameters_are_hashed():
    """The title and the notebook selection name a run; they reach no notebook and change no hash."""
    a = sp.load_params(CI_PARAMS)
    b = sp.load_params(CI_PARAMS, ["title=another title", "notebooks=['02']"])
    assert sp.params_hash(a) == sp.params_hash(b)
    assert sp.notebook_parameters(a, "02_logits") == sp.notebook_parameters(b, "02_logits")
    assert "title" not in sp.notebook_parameters(a, "02_logits")
    assert sp.params_hash(a) != sp.params_hash(sp.load_params(CI_PARAMS, ["seed=1"]))
