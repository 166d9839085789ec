"""Per-layer activation drift of the candidate against the baseline, compared on the fly with hooks.

The baseline pass stores each decoder layer's attention output and hidden state on
the CPU (one run's worth); the candidate pass compares each layer as it is produced,
moving one baseline tensor at a time back to the device, and keeps only the
statistics. GPU memory therefore never holds all layers of both runs.

Two modes:

* ``compounded``: every layer runs the candidate; the drift at layer i contains the
  error of layers 0..i (does it compound?);
* ``isolated``: only layer i runs the candidate, the others the baseline; the drift of
  layer i's attention output is the error that enters at layer i alone.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch


def error_stats(base: torch.Tensor, cand: torch.Tensor) -> dict[str, float]:
    """Relative L2, cosine, max abs difference and SQNR (dB) of ``cand`` against ``base`` (float64)."""
    b = base.double().reshape(-1)
    c = cand.double().reshape(-1)
    diff = c - b
    err = float(diff.norm())
    ref = float(b.norm())
    cos = float((b @ c) / (b.norm() * c.norm()).clamp_min(1e-300))
    return {
        "rel_l2": err / ref if ref > 0 else float("nan"),
        "cosine": cos,
        "max_abs": float(diff.abs().max()) if diff.numel() else 0.0,
        "sqnr_db": 10.0 * math.log10(ref**2 / err**2) if err > 0 else float("inf"),
    }


def position_buckets(n: int, buckets: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, n, min(buckets, n) + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def decoder_layers(model: Any) -> list[Any]:
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no .model.layers: activation drift supports Llama-style decoders")
    return list(layers)


def final_norm(model: Any) -> Any:
    return getattr(getattr(model, "model", model), "norm")


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def _points(model: Any) -> list[tuple[str, int, Any]]:
    """(kind, layer, module) of every tensor compared: attention output, layer output, final norm."""
    pts = []
    for i, layer in enumerate(decoder_layers(model)):
        pts.append(("attention", i, layer.self_attn))
        pts.append(("hidden", i, layer))
    pts.append(("final", len(pts) // 2, final_norm(model)))
    return pts


@contextmanager
def _on_outputs(model: Any, callback: Any, keys: set | None = None) -> Iterator[None]:
    """Call ``callback((kind, layer), tensor)`` for every compared tensor a forward pass produces."""
    handles = []
    for kind, idx, module in _points(model):
        if keys is None or (kind, idx) in keys:
            handles.append(module.register_forward_hook(lambda _m, _i, out, key=(kind, idx): callback(key, _first(out).detach())))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture(model: Any) -> Iterator[dict[tuple[str, int], torch.Tensor]]:
    """Store every compared tensor of one forward pass on the CPU (float32)."""
    store: dict[tuple[str, int], torch.Tensor] = {}
    with _on_outputs(model, lambda key, t: store.__setitem__(key, t.float().cpu())):
        yield store


@contextmanager
def compare(model: Any, reference: dict[tuple[str, int], torch.Tensor], buckets: int, keys: set | None = None) -> Iterator[list[dict[str, Any]]]:
    """Compare each tensor against ``reference`` as it is produced; yields the growing list of records."""
    records: list[dict[str, Any]] = []

    def on_output(key: tuple[str, int], cand: torch.Tensor) -> None:
        base = reference[key].to(cand.device)  # one layer at a time on the device
        records.append({"kind": key[0], "layer": key[1], "bucket": "all", **error_stats(base, cand)})
        for lo, hi in position_buckets(cand.shape[-2], buckets):
            records.append({"kind": key[0], "layer": key[1], "bucket": f"{lo}-{hi - 1}",
                            **error_stats(base[..., lo:hi, :], cand[..., lo:hi, :])})

    with _on_outputs(model, on_output, keys):
        yield records


@torch.inference_mode()
def measure(engine: Any, baseline: str, candidate: str, ids: list[int], modes: list[str], buckets: int = 4,
            control: str | None = None) -> list[dict[str, Any]]:
    """Drift records for one prompt: per mode, kind (attention, hidden, final), layer and position bucket; with
    ``control``, the accepted-precision control in every layer too (mode ``control``)."""
    model = engine.model
    x = torch.tensor([ids], dtype=torch.long, device=engine.device)
    with engine.backend(baseline):
        with capture(model) as reference:
            model(input_ids=x, use_cache=False)
    records: list[dict[str, Any]] = []
    n_layers = len(decoder_layers(model))
    if "compounded" in modes:
        with engine.backend(candidate):
            with compare(model, reference, buckets) as recs:
                model(input_ids=x, use_cache=False)
        records += [{"mode": "compounded", **r} for r in recs]
    if control is not None:
        with engine.backend(control):
            with compare(model, reference, buckets) as recs:
                model(input_ids=x, use_cache=False)
        records += [{"mode": "control", **r} for r in recs]
    if "isolated" in modes:
        for i in range(n_layers):
            keep = {("attention", i), ("hidden", i), ("final", n_layers)}
            with engine.backend(candidate, layers={i}):
                with compare(model, reference, buckets, keys=keep) as recs:
                    model(input_ids=x, use_cache=False)
            records += [{"mode": "isolated", "candidate_layer": i, **r} for r in recs]
    reference.clear()
    return records


# --------------------------------------------------------------------------- 06_activation_drift


def measure_prompts(engine: Any, p: Any) -> list[dict[str, Any]]:
    """Drift records of every prompt of 06 (cut from ``p.text``), each record tagged with its prompt."""
    from sagecheck.data import corpus, prompts

    text = corpus.load_text(p.text)
    ps = prompts.prompt_sets(engine.tokenizer, text.text, p.n_prompts, p.tokens, 0, 0, p.seed)["short"]
    records: list[dict[str, Any]] = []
    for i, ids in enumerate(ps):
        records += [{"prompt": i, **r} for r in measure(engine, engine.baseline, engine.candidate, ids, p.modes, p.position_buckets,
                                                        control=engine.control)]
    return records


STATS = ["rel_l2", "cosine", "max_abs", "sqnr_db"]


def per_layer(df: Any, modes: list[str]) -> Any:
    """Per layer, mean over prompts: compounded drift, and the isolated drift of each layer's own attention."""
    import pandas as pd

    main = df[df.bucket == "all"].groupby(["mode", "kind", "layer"], as_index=False)[STATS].mean()
    if "isolated" not in modes:
        return main
    iso = df[(df["mode"] == "isolated") & (df.bucket == "all") & (df.candidate_layer == df.layer)]
    iso = iso.groupby(["kind", "layer"], as_index=False)[STATS].mean()
    iso.insert(0, "mode", "isolated (own layer)")
    return pd.concat([main[main["mode"] != "isolated"], iso], ignore_index=True)


def by_position(df: Any) -> Any:
    """Hidden-state relative L2 per layer and position bucket (the first mode measured), buckets in order."""
    buckets = df[(df["mode"] == df["mode"].iloc[0]) & (df.kind == "hidden") & (df.bucket != "all")]
    table = buckets.groupby(["layer", "bucket"], as_index=False)["rel_l2"].mean().pivot(index="layer", columns="bucket",
                                                                                          values="rel_l2")
    return table[sorted(table.columns, key=lambda b: int(b.split("-")[0]))]


def final_hidden(df: Any, mode: str) -> dict[str, float]:
    """The final hidden state's drift in ``mode``, worst prompt (nan where the mode was not measured)."""
    final = df[(df.kind == "final") & (df.bucket == "all") & (df["mode"] == mode)]
    if final.empty:
        return {"rel_l2_max": float("nan"), "cosine_min": float("nan"), "sqnr_db_min": float("nan")}
    return {"rel_l2_max": float(final.rel_l2.max()), "cosine_min": float(final.cosine.min()),
            "sqnr_db_min": float(final.sqnr_db.min())}


def record(results: Any, df: Any, records: list[dict[str, Any]], n_layers: int, p: Any, control: str | None = None) -> None:
    """06's results and verdicts: the final hidden state of the compounded mode (else the isolated one), worst prompt,
    against the accepted-precision control's in every layer (worst prompt) on the same prompts."""
    from sagecheck.thresholds import from_control

    mode = "compounded" if "compounded" in p.modes else "isolated"
    cand, ctrl = final_hidden(df, mode), final_hidden(df, "control")
    results.metric("final_hidden", cand)
    results.metric("control", {"implementation": control, **ctrl})
    results.metric("layers", n_layers)
    results.table("drift", records)
    on = f"the same {p.n_prompts} prompts (worst prompt)"
    results.verdict("drift.final_cosine", "accuracy", f"final hidden state: cosine (worst prompt, {mode})", cand["cosine_min"],
                    ">=", ctrl["cosine_min"], source=from_control(control, on, f"{ctrl['cosine_min']:.6g}"))
    results.verdict("drift.final_rel_l2", "accuracy", f"final hidden state: relative L2 (worst prompt, {mode})",
                    cand["rel_l2_max"], "<=", ctrl["rel_l2_max"], source=from_control(control, on, f"{ctrl['rel_l2_max']:.4g}"))
