"""Text for the notebooks: the shipped held-out text, WikiText-2 and PTB from the hub, or local files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

TEXT_DIR = Path(__file__).with_name("text")
HELDOUT_FILES = ("hamlet.txt", "sonnets.txt")

# hub data sets: (repository, configuration, split, text column, separator)
HUB_DATASETS = {
    "wikitext": ("Salesforce/wikitext", "wikitext-2-raw-v1", "test", "text", ""),
    "ptb": ("ptb-text-only/ptb_text_only", None, "test", "sentence", "\n"),
}


@dataclass(frozen=True)
class Text:
    name: str
    text: str
    description: str

    @property
    def n_bytes(self) -> int:
        return len(self.text.encode("utf-8"))

    @property
    def n_words(self) -> int:
        """Words as lm-evaluation-harness counts them: whitespace-separated pieces."""
        import re

        return len(re.split(r"\s+", self.text))


def builtin_heldout() -> Text:
    parts = [(TEXT_DIR / name).read_text(encoding="utf-8") for name in HELDOUT_FILES]
    return Text("builtin", "\n\n".join(p.strip("\n") for p in parts), "Hamlet + the Sonnets (held out from the built-in model's training)")


def load_hub_dataset(name: str) -> Text:
    """WikiText-2 (raw) or PTB test split through ``datasets``, joined as the Hugging Face perplexity guide does."""
    repo, config, split, column, sep = HUB_DATASETS[name]
    import datasets

    ds = datasets.load_dataset(repo, config, split=split)
    if name == "wikitext":
        text = "\n\n".join(ds[column])
    else:
        text = sep.join(ds[column])
    return Text(name, text, f"{repo}{'/' + config if config else ''} ({split} split)")


def load_local(path: str | Path) -> Text:
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.txt") if f.is_file())
        if not files:
            raise FileNotFoundError(f"no .txt files in {p}")
        text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace").strip("\n") for f in files)
        return Text(str(p), text, f"{len(files)} text files under {p}")
    if not p.is_file():
        raise FileNotFoundError(f"text not found: {p}")
    return Text(str(p), p.read_text(encoding="utf-8", errors="replace"), f"local file {p}")


def load_text(source: str) -> Text:
    """``builtin``, ``wikitext``, ``ptb``, or a local file or folder of ``.txt`` files."""
    if source == "builtin":
        return builtin_heldout()
    if source in HUB_DATASETS:
        return load_hub_dataset(source)
    return load_local(source)
