"""Train the built-in reference model: a small Llama on public-domain text and passkey tasks.

    python tools/train_builtin_model.py --data ../shared/data/shakespeare --out /tmp/model            # shipped recipe (GPU)
    python tools/train_builtin_model.py --data ../shared/data/shakespeare --out /tmp/tiny --preset tiny  # minutes on a CPU

Steps: a byte-level BPE tokenizer (digits split one by one, so that numbers are copied
token by token) trained on the training split; a ``LlamaForCausalLM`` with RoPE and
grouped-query attention; AdamW on a mix of natural-text windows and synthetic passkey
prompts (:mod:`sagecheck.data.passkey`) whose lengths grow from 256 tokens to the
maximum during the first part of training. The answer tokens of a passkey prompt carry
an extra loss term. Then the weights are saved in fp16, reloaded, and evaluated:
held-out perplexity (Hamlet + the Sonnets, never seen in training), a unigram model's
perplexity on the same text, and passkey accuracy by length; a model card is written.

Deterministic for a seed on CPU; on a GPU, up to the nondeterminism of its kernels.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

HELDOUT = ("hamlet_gut.txt", "sonnets_gut.txt")
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]


@dataclass
class Recipe:
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 768
    layers: int = 4
    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 64
    rope_theta: float = 100_000.0
    max_len: int = 8192
    min_len: int = 256
    steps: int = 4400
    tokens_per_step: int = 65_536
    lr: float = 1.5e-3
    warmup: int = 100
    weight_decay: float = 0.1
    passkey_fraction: float = 0.5
    answer_weight: float = 4.0
    # retrieval is learned first on short, mostly-passkey batches; then the maximum length grows
    retrieval_warmup_fraction: float = 0.2
    retrieval_warmup_max_len: int = 512
    retrieval_warmup_passkey_fraction: float = 0.9
    curriculum_fraction: float = 0.6  # the maximum length reaches max_len after this part of training
    seed: int = 0
    eval_window: int = 1024
    eval_stride: int = 512
    eval_passkey_lengths: list[int] = field(default_factory=lambda: [256, 512, 1024, 2048, 4096, 8192])
    eval_passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    eval_passkey_trials: int = 8  # per length and depth


PRESETS = {
    "ship": Recipe(),
    "tiny": Recipe(
        vocab_size=1024, hidden_size=64, intermediate_size=192, layers=2, heads=4, kv_heads=2, head_dim=16,
        max_len=512, min_len=128, steps=200, tokens_per_step=4096, lr=3e-3, warmup=20, retrieval_warmup_max_len=256,
        eval_window=256, eval_stride=128, eval_passkey_lengths=[128, 256, 512], eval_passkey_depths=[0.0, 0.5, 1.0],
        eval_passkey_trials=4,
    ),
}


# --------------------------------------------------------------------------- data


def read_split(data_dir: Path) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts) in a fixed order."""
    files = sorted(data_dir.glob("*.txt"))
    if not files:
        raise FileNotFoundError(f"no .txt files in {data_dir}")
    train = [f.read_text(encoding="utf-8") for f in files if f.name not in HELDOUT]
    held = [(data_dir / name).read_text(encoding="utf-8") for name in HELDOUT]
    return train, held


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """Byte-level BPE with single-digit pre-tokenization; ``<s>`` is added in front of every text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from sagecheck.data import passkey

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    templates = [passkey.INTRO, passkey.FILLER * 4, passkey.NEEDLE.format(key="12345"), passkey.QUESTION] * 50
    tok.train_from_iterator(texts + templates, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", model_max_length=1_000_000
    )


def build_model(recipe: Recipe, tokenizer: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads,
        num_key_value_heads=recipe.kv_heads,
        head_dim=recipe.head_dim,
        max_position_embeddings=recipe.max_len,
        rope_theta=recipe.rope_theta,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


class Sampler:
    """Training sequences: natural-text windows and passkey prompts, from one seeded generator."""

    def __init__(self, recipe: Recipe, tokenizer: Any, stream: np.ndarray) -> None:
        self.recipe = recipe
        self.tokenizer = tokenizer
        self.stream = stream
        self.rng = random.Random(recipe.seed)
        self.bos = tokenizer.bos_token_id
        self.eos = tokenizer.eos_token_id

    def in_retrieval_warmup(self, step: int) -> bool:
        return step < int(self.recipe.steps * self.recipe.retrieval_warmup_fraction)

    def max_len_at(self, step: int) -> int:
        """retrieval_warmup_max_len during the warm-up, then growing geometrically to max_len."""
        r = self.recipe
        start = int(r.steps * r.retrieval_warmup_fraction)
        end = max(start + 1, int(r.steps * r.curriculum_fraction))
        lo = min(r.max_len, max(r.min_len, r.retrieval_warmup_max_len))
        if step < start:
            return lo
        frac = min(1.0, (step - start + 1) / (end - start))
        return int(round(2 ** (math.log2(lo) + frac * (math.log2(r.max_len) - math.log2(lo)))))

    def length_at(self, step: int) -> int:
        """Log-uniform between min_len and the curriculum's current maximum, a multiple of 64."""
        hi = max(self.recipe.min_len, self.max_len_at(step))
        x = 2 ** self.rng.uniform(math.log2(self.recipe.min_len), math.log2(hi))
        return max(self.recipe.min_len, min(hi, int(x) // 64 * 64))

    def text_window(self, length: int) -> tuple[list[int], list[int]]:
        start = self.rng.randrange(0, len(self.stream) - length)
        ids = [self.bos] + self.stream[start : start + length - 1].tolist()
        return ids, []

    def passkey(self, length: int) -> tuple[list[int], list[int]]:
        from sagecheck.data import passkey
        from sagecheck.data.prompts import encode

        key = str(self.rng.randint(10**4, 10**5 - 1))
        answer = encode(self.tokenizer, " " + key)
        trial = passkey.make_prompt(self.tokenizer, length - len(answer) - 1, self.rng.random(), key)
        ids = trial.input_ids + answer + [self.eos]
        answer_positions = list(range(len(trial.input_ids), len(trial.input_ids) + len(answer)))
        return ids, answer_positions

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input ids [b, n], answer mask [b, n]): b sequences of one length, about tokens_per_step tokens."""
        length = self.length_at(step)
        rows = max(1, self.recipe.tokens_per_step // length)
        fraction = self.recipe.retrieval_warmup_passkey_fraction if self.in_retrieval_warmup(step) else self.recipe.passkey_fraction
        ids, answers = [], []
        for _ in range(rows):
            seq, ans = self.passkey(length) if self.rng.random() < fraction else self.text_window(length)
            ids.append(seq)
            mask = [0] * length
            for p in ans:
                mask[p] = 1
            answers.append(mask)
        return torch.tensor(ids), torch.tensor(answers, dtype=torch.bool)


# --------------------------------------------------------------------------- training


def lr_at(step: int, recipe: Recipe) -> float:
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(recipe: Recipe, data_dir: Path, out: Path, device: torch.device, log_every: int = 50) -> dict[str, Any]:
    random.seed(recipe.seed)
    np.random.seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    train_texts, _ = read_split(data_dir)
    t0 = time.time()
    tokenizer = train_tokenizer(train_texts, recipe.vocab_size)
    stream = np.concatenate([np.array(tokenizer(t).input_ids[1:] + [tokenizer.eos_token_id], dtype=np.int32) for t in train_texts])
    print(f"tokenizer: {len(tokenizer)} tokens, training stream {len(stream):,} tokens ({time.time() - t0:.1f} s)", flush=True)

    model = build_model(recipe, tokenizer).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    sampler = Sampler(recipe, tokenizer, stream)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    history = []
    t_start = time.time()
    tokens_seen = 0
    model.train()
    for step in range(recipe.steps):
        ids, answer_mask = sampler.batch(step)
        ids, answer_mask = ids.to(device), answer_mask.to(device)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe)
        with autocast:
            logits = model(input_ids=ids, use_cache=False).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]
        lm_loss = nll.mean()
        target_answer = answer_mask[:, 1:]
        answer_loss = nll[target_answer].mean() if bool(target_answer.any()) else torch.zeros((), device=device)
        loss = lm_loss + recipe.answer_weight * answer_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        tokens_seen += ids.numel()
        if step % log_every == 0 or step == recipe.steps - 1:
            rec = {
                "step": step, "length": ids.shape[1], "batch": ids.shape[0], "loss": round(loss.item(), 4),
                "lm_loss": round(lm_loss.item(), 4), "answer_loss": round(answer_loss.item(), 4),
                "lr": round(lr_at(step, recipe), 6), "elapsed_s": round(time.time() - t_start, 1),
            }
            history.append(rec)
            print(json.dumps(rec), flush=True)
    train_time = time.time() - t_start

    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.config.dtype = "float16"
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    final = history[-1]
    summary = {
        "recipe": asdict(recipe),
        "parameters": n_params,
        "tokens_seen": tokens_seen,
        "train_time_s": round(train_time, 1),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "final_loss": final["loss"],
        "final_lm_loss": final["lm_loss"],
        "final_answer_loss": final["answer_loss"],
        "history": history,
        "train_stream_tokens": int(len(stream)),
    }
    return summary


# --------------------------------------------------------------------------- evaluation


def unigram_perplexity(tokenizer: Any, train_texts: list[str], held_ids: list[int]) -> float:
    """Perplexity of an add-one-smoothed unigram model fitted on the training split."""
    counts = Counter()
    for t in train_texts:
        counts.update(tokenizer(t).input_ids[1:])
    total = sum(counts.values()) + len(tokenizer)
    nll = -sum(math.log((counts[i] + 1) / total) for i in held_ids)
    return math.exp(nll / len(held_ids))


def evaluate(model_dir: Path, data_dir: Path, recipe: Recipe, device: torch.device) -> dict[str, Any]:
    """Held-out perplexity (float32, sdpa), unigram perplexity, passkey accuracy by length (greedy)."""
    from sagecheck import models
    from sagecheck.data import corpus, passkey
    from sagecheck.data.prompts import encode
    from sagecheck.engines.hf import HFEngine
    from sagecheck.metrics import perplexity as ppl

    source = models.ModelSource("pretrained", str(model_dir))
    tokenizer = models.load_tokenizer(source)
    model = models.load_model(source, device, torch.float32, "sagecheck-sdpa")
    engine = HFEngine(model, tokenizer, device, torch.float32)
    held = corpus.builtin_heldout()
    ids = tokenizer(held.text).input_ids
    windows = ppl.sliding_windows(len(ids), recipe.eval_window, recipe.eval_stride)
    with engine.backend("sdpa") as b:
        scores = ppl.score_windows(ids, windows, b.token_logprobs)
        trials = passkey.make_trials(tokenizer, recipe.eval_passkey_lengths, recipe.eval_passkey_depths, recipe.eval_passkey_trials, seed=1234)
        by_length: dict[int, list[bool]] = {}
        for t in trials:
            gen = b.generate([t.input_ids], max_new_tokens=passkey.KEY_DIGITS + 2)[0]
            by_length.setdefault(t.length, []).append(passkey.is_correct(t, tokenizer.decode(gen)))
    train_texts, _ = read_split(data_dir)
    return {
        "heldout_tokens": len(ids),
        "heldout_perplexity": scores.perplexity,
        "heldout_words": held.n_words,
        "heldout_word_perplexity": scores.word_perplexity(held.n_words),
        "heldout_bits_per_byte": scores.bits_per_byte(held.n_bytes),
        "unigram_perplexity": unigram_perplexity(tokenizer, train_texts, encode(tokenizer, held.text)),
        "eval_window": recipe.eval_window,
        "eval_stride": recipe.eval_stride,
        "passkey_accuracy": {str(k): sum(v) / len(v) for k, v in sorted(by_length.items())},
        "passkey_trials_per_length": {str(k): len(v) for k, v in sorted(by_length.items())},
        "passkey_device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }


CARD = """# {name}

The built-in reference model of sagecheck: a small Llama-architecture causal language model
(RoPE, grouped-query attention), trained by `python tools/train_builtin_model.py` on
public-domain text and on synthetic passkey-retrieval prompts. It lets every notebook give
meaningful numbers on a laptop CPU, with no download. It is not a general-purpose model.

| | |
|---|---|
| architecture | `LlamaForCausalLM`, {layers} layers, hidden {hidden}, {heads} query heads / {kv_heads} KV heads of dim {head_dim}, MLP {inter}, tied embeddings |
| parameters | {params:,} (weights stored in fp16, {weights_mb:.1f} MB) |
| context | {max_len} tokens, RoPE theta {rope_theta:g} |
| tokenizer | byte-level BPE, {vocab} tokens, digits split one by one, `<s>` added in front of every text |
| training data | 42 works of Shakespeare and Milton's two long poems (the `shakespeare` 0.6 package's Gutenberg texts, public domain; {stream:,} tokens), every work except *Hamlet* and the *Sonnets*; mixed with {pk:.0%} synthetic passkey prompts (`sagecheck.data.passkey`) |
| training | {steps} steps of about {tps:,} tokens; the first {rw:.0%} of steps on sequences of {min_len} to {rw_len} tokens, {rw_pk:.0%} of them passkey prompts (retrieval is learned there); then lengths up to {max_len} (log-uniform, the maximum growing until {curr:.0%} of steps); passkey answer tokens weighted {aw:g}x more; AdamW lr {lr:g} with warm-up and cosine decay, bf16 autocast; {train_time:.0f} s on {device}; seed {seed} |
| final training loss | {final_loss:.3f} (language-model part {final_lm:.3f} nats/token, passkey answer part {final_ans:.3f}) |

## Evaluation (baseline attention: SDPA, float32)

Held-out text: *Hamlet* + the *Sonnets* as shipped in `sagecheck/data/text` ({held_tokens:,} tokens).
Sliding windows of {window} tokens, stride {stride} (`sagecheck.metrics.perplexity`).

| measure | value |
|---|---|
| held-out token perplexity | **{ppl:.3f}** |
| held-out word perplexity (lm-evaluation-harness definition) | {wppl:.2f} |
| held-out bits per byte | {bpb:.4f} |
| unigram model (add-one, fitted on the training split) on the same tokens | {uni:.1f} |

Passkey retrieval (greedy, exact 5-digit match), {trials} trials per length at depths
{depths}, measured on {pk_device}:

| length (tokens) | {len_head} |
|---|{len_sep}|
| accuracy | {acc_row} |

## Retrain

```
python tools/train_builtin_model.py --data path/to/shakespeare --out lib/sagecheck/models/{name}
```

(`--preset tiny` trains a toy version on a CPU in minutes; the shipped model used the
default `ship` preset on a GPU.) The training log is in `training.json` beside this card.
"""


def write_card(out: Path, summary: dict[str, Any], evaluation: dict[str, Any]) -> None:
    r = summary["recipe"]
    acc = evaluation["passkey_accuracy"]
    weights = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    text = CARD.format(
        name=out.name, layers=r["layers"], hidden=r["hidden_size"], heads=r["heads"], kv_heads=r["kv_heads"],
        head_dim=r["head_dim"], inter=r["intermediate_size"], params=summary["parameters"], weights_mb=weights / 1e6,
        max_len=r["max_len"], rope_theta=r["rope_theta"], vocab=r["vocab_size"], stream=summary["train_stream_tokens"],
        pk=r["passkey_fraction"], steps=r["steps"], tps=r["tokens_per_step"], min_len=r["min_len"],
        curr=r["curriculum_fraction"], lr=r["lr"], rw=r["retrieval_warmup_fraction"], rw_len=r["retrieval_warmup_max_len"],
        rw_pk=r["retrieval_warmup_passkey_fraction"], aw=1 + r["answer_weight"], train_time=summary["train_time_s"], device=summary["device"],
        seed=r["seed"], final_loss=summary["final_loss"], final_lm=summary["final_lm_loss"],
        final_ans=summary["final_answer_loss"], held_tokens=evaluation["heldout_tokens"],
        window=evaluation["eval_window"], stride=evaluation["eval_stride"], ppl=evaluation["heldout_perplexity"],
        wppl=evaluation["heldout_word_perplexity"], bpb=evaluation["heldout_bits_per_byte"],
        uni=evaluation["unigram_perplexity"], trials=next(iter(evaluation["passkey_trials_per_length"].values())),
        depths=", ".join(f"{d:g}" for d in r["eval_passkey_depths"]), pk_device=evaluation["passkey_device"],
        len_head=" | ".join(acc), len_sep="|".join("---" for _ in acc), acc_row=" | ".join(f"{v:.1%}" for v in acc.values()),
    )
    (out / "README.md").write_text(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python tools/train_builtin_model.py", description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="folder of training texts (the shakespeare corpus)")
    ap.add_argument("--out", required=True, help="output folder (weights, tokenizer, card)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="ship")
    ap.add_argument("--steps", type=int, help="override the preset's number of steps")
    ap.add_argument("--seed", type=int)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a recipe field, e.g. --set lr=1e-3")
    ap.add_argument("--eval-only", action="store_true", help="evaluate an existing --out folder and rewrite its card")
    ap.add_argument("--skip-eval", action="store_true", help="train and save only (no evaluation, no card)")
    args = ap.parse_args(argv)
    from dataclasses import replace

    from sagecheck import runtime

    recipe = PRESETS[args.preset]
    if args.steps is not None:
        recipe = replace(recipe, steps=args.steps)
    if args.seed is not None:
        recipe = replace(recipe, seed=args.seed)
    for item in args.set:
        key, _, raw = item.partition("=")
        if key not in Recipe.__dataclass_fields__:
            ap.error(f"--set: unknown recipe field {key!r}")
        recipe = replace(recipe, **{key: type(getattr(recipe, key))(json.loads(raw))})
    device = runtime.resolve_device(args.device)
    out, data = Path(args.out), Path(args.data)
    log_path = out / "training.json"
    if args.eval_only:
        summary = json.loads(log_path.read_text())["training"]
    else:
        summary = train(recipe, data, out, device)
    if args.skip_eval:
        log_path.write_text(json.dumps({"training": summary}, indent=1))
        return 0
    evaluation = evaluate(out, data, Recipe(**summary["recipe"]), device)
    print(json.dumps(evaluation, indent=1), flush=True)
    log_path.write_text(json.dumps({"training": summary, "evaluation": evaluation}, indent=1))
    write_card(out, summary, evaluation)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
