"""The built-in reference model: what its card states is re-measured here."""

from __future__ import annotations

import json
import re
import shutil
import time

import pytest
import torch
from safetensors.torch import load_file

from sagecheck import models
from sagecheck.data import corpus
from sagecheck.metrics import perplexity as ppl
from tests.conftest import ROOT, SHAKESPEARE

CARD = models.builtin_path() / "README.md"


def card_number(label: str) -> float:
    m = re.search(rf"\| {re.escape(label)}[^|]*\| \**([\d.,]+)\**", CARD.read_text())
    assert m, f"{label} not in the model card"
    return float(m.group(1).replace(",", ""))


def test_shipped_files_and_size():
    folder = models.builtin_path()
    weights = folder / "model.safetensors"
    assert weights.stat().st_size <= 12 * 2**20
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["head_dim"] in (64, 96, 128)
    assert cfg["num_key_value_heads"] < cfg["num_attention_heads"]  # grouped-query attention
    assert set(load_file(weights)) and (folder / "tokenizer.json").is_file()


def test_load_and_one_forward_of_512_tokens_under_2_s():
    # importing the libraries (about 4 s on a 2-core machine, once per process) is not part of loading the model
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import PreTrainedTokenizerFast  # noqa: F401

    from sagecheck.attention.hf import register

    register()
    t0 = time.perf_counter()
    src = models.resolve("builtin")
    tok = models.load_tokenizer(src)
    model = models.load_model(src, torch.device("cpu"), torch.float32, "sagecheck-sdpa")
    ids = tok("word " * 600, return_tensors="pt").input_ids[:, :512]
    with torch.inference_mode():
        model(input_ids=ids)
    assert time.perf_counter() - t0 < 2.0


def test_heldout_perplexity_matches_the_card_and_beats_unigram(builtin):
    """Re-measured with the card's windows; within 1% of what the card states."""
    stated = card_number("held-out token perplexity")
    unigram = card_number("unigram model")
    window = int(re.search(r"Sliding windows of (\d+) tokens, stride (\d+)", CARD.read_text()).group(1))
    stride = int(re.search(r"Sliding windows of (\d+) tokens, stride (\d+)", CARD.read_text()).group(2))
    held = corpus.builtin_heldout()
    ids = builtin.tokenizer(held.text).input_ids
    with builtin.backend("sdpa") as b:
        measured = ppl.score_windows(ids, ppl.sliding_windows(len(ids), window, stride), b.token_logprobs).perplexity
    assert measured == pytest.approx(stated, rel=0.01)
    assert measured < unigram / 4


def test_card_states_passkey_accuracy_by_length():
    row = re.search(r"\| length \(tokens\) \|(.+)\|\n\|[-|]+\|\n\| accuracy \|(.+)\|", CARD.read_text())
    lengths = [int(x) for x in row.group(1).split("|")]
    acc = dict(zip(lengths, [float(x.strip(" %")) / 100 for x in row.group(2).split("|")]))
    assert lengths == [256, 512, 1024, 2048, 4096, 8192]
    assert all(acc[n] >= 0.9 for n in lengths if n <= 2048) and acc[4096] >= 0.7


def test_hub_id_and_local_folder_share_one_code_path(tmp_path, monkeypatch):
    folder = tmp_path / "copy"
    shutil.copytree(models.builtin_path(), folder)
    local = models.resolve(str(folder))
    hub = models.resolve("someone/some-model")
    assert local.kind == hub.kind == "pretrained"
    assert hub.location == "someone/some-model"
    model = models.load_model(local, torch.device("cpu"), torch.float32, "sagecheck-sdpa")
    tok = models.load_tokenizer(local)
    assert model.config.num_hidden_layers == 4 and tok("a").input_ids[0] == tok.bos_token_id
    seen = {}

    def fake_from_pretrained(location, **kwargs):
        seen["location"], seen["kwargs"] = location, kwargs
        return model

    monkeypatch.setenv("HF_TOKEN", "hf_test_token_value")
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", fake_from_pretrained)
    models.load_model(hub, torch.device("cpu"), torch.float32, "sagecheck-sdpa")
    assert seen["location"] == "someone/some-model" and seen["kwargs"]["token"] == "hf_test_token_value"


def test_random_weights_model_from_a_shipped_config():
    src = models.resolve("random:llama-3.1-8b")
    assert src.kind == "random" and src.tokenizer_location == str(models.builtin_path())
    cfg = json.loads(open(src.location).read())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_key_value_heads"]) == (4096, 32, 8)


@pytest.mark.skipif(not SHAKESPEARE.is_dir(), reason="the training corpus lives in ../shared (not on users' machines)")
def test_training_is_deterministic_for_a_seed(tmp_path):
    import subprocess
    import sys

    # five of the 44 texts (the two held-out ones included): the same code path; tokenizer and training stream in
    # 2.5 s instead of 10.9 s (measured on a 2-core machine)
    corpus_part = tmp_path / "corpus"
    corpus_part.mkdir()
    for name in ("hamlet_gut.txt", "sonnets_gut.txt", "comedy_of_errors_gut.txt", "rape_of_lucrece_gut.txt",
                 "lovers_complaint_gut.txt"):
        shutil.copy(SHAKESPEARE / name, corpus_part / name)
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        done = subprocess.run([sys.executable, str(ROOT / "tools" / "train_builtin_model.py"), "--data", str(corpus_part), "--out", str(out),
                               "--preset", "tiny", "--steps", "6", "--skip-eval", "--device", "cpu"],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        outs.append(out)
    a, b = (load_file(o / "model.safetensors") for o in outs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (outs[0] / "tokenizer.json").read_text() == (outs[1] / "tokenizer.json").read_text()
    log = json.loads((outs[0] / "training.json").read_text())["training"]
    assert log["history"][-1]["step"] == 5 and log["parameters"] > 0
