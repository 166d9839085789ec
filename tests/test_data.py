"""Text sources: the shipped held-out text, local files and folders, hub data sets through `datasets`, prompt sets."""

from __future__ import annotations

import pytest

from sagecheck import models
from sagecheck.data import corpus, prompts


def test_builtin_heldout_is_shipped_in_the_package():
    t = corpus.builtin_heldout()
    assert "HAMLET" in t.text[:200] and "SONNETS" in t.text.upper()
    assert t.n_bytes > 250_000 and t.n_words > 40_000


def test_local_file_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("one two\nthree")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("four")
    assert corpus.load_text(str(tmp_path / "a.txt")).n_words == 3
    folder = corpus.load_text(str(tmp_path))
    assert folder.text == "one two\nthree\n\nfour" and "2 text files" in folder.description
    with pytest.raises(FileNotFoundError):
        corpus.load_text(str(tmp_path / "missing.txt"))


@pytest.mark.parametrize("name, repo, config, column, joined", [
    ("wikitext", "Salesforce/wikitext", "wikitext-2-raw-v1", "text", "a\n\nb"),
    ("ptb", "ptb-text-only/ptb_text_only", None, "sentence", "a\nb"),
])
def test_hub_data_sets_go_through_datasets(monkeypatch, name, repo, config, column, joined):
    seen = {}

    def fake_load_dataset(path, cfg=None, split=None):
        seen.update(path=path, config=cfg, split=split)
        return {column: ["a", "b"]}

    import datasets

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    t = corpus.load_text(name)
    assert seen == {"path": repo, "config": config, "split": "test"}
    assert t.text == joined


def test_prompt_sets_have_the_asked_lengths():
    tok = models.load_tokenizer(models.resolve("builtin"))
    sets = prompts.prompt_sets(tok, corpus.builtin_heldout().text, 3, 100, 2, 2048)
    assert [len(p) for p in sets["short"]] == [100] * 3 and [len(p) for p in sets["long"]] == [2048] * 2
    assert all(p[0] == tok.bos_token_id for p in sets["short"] + sets["long"])
    assert len({tuple(p) for p in sets["short"]}) == 3
    with pytest.raises(ValueError, match="does not fit"):
        prompts.cut_prompts(list(range(50)), 1, 100)


def test_the_seed_chooses_the_prompts():
    """`seed` seeds the prompts, as its help says: another seed, other prompts of the same lengths inside the text;
    seed 0 the text's own start (the embedded default's prompts)."""
    tok = models.load_tokenizer(models.resolve("builtin"))
    text = corpus.builtin_heldout().text
    zero, again, one = (prompts.prompt_sets(tok, text, 4, 100, 2, 2048, seed) for seed in (0, 0, 1))
    ids = prompts.encode(tok, text)
    assert zero == again and zero["short"][0][1:] == ids[:99]
    assert zero["short"] != one["short"] and zero["long"] != one["long"]
    assert [len(p) for p in one["short"]] == [100] * 4 and [len(p) for p in one["long"]] == [2048] * 2
    body = [p[1:] for p in one["short"] + one["long"]]
    assert all(any(ids[i:i + len(b)] == b for i in range(len(ids) - len(b) + 1)) for b in body[:2])
