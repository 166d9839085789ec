"""Where a verdict's threshold comes from, in the words results and the report carry (a verdict's ``source``).

An accuracy threshold is what a control measured in the same run shows (:func:`from_control`): the baseline at a
precision deployments already accept, an FP8 (e4m3) KV cache, on the same model and inputs. An 8-bit attention backend
should lose no more than that. Where a published target exists it may stand beside the control (:func:`published`,
the larger of the two is used and named). A threshold that is a fixed parameter says so (:func:`parameter`).
"""

from __future__ import annotations

from dataclasses import dataclass

ACCEPTED_PRECISION_WORDS = "keys and values as an FP8 (e4m3) KV cache holds them"
# MLPerf Inference's accuracy targets: a submission must reach 99% (or 99.9%) of the reference model's accuracy
MLPERF_FRACTION = 0.99
MLPERF_TARGET = "MLPerf Inference's 99% of the baseline's accuracy"


@dataclass(frozen=True)
class Threshold:
    value: float
    source: str


def from_control(control: str | None, on: str, figure: str) -> str:
    """``control``: the control's name (its label's " (control)" left out); ``on``: what it was measured on;
    ``figure``: its value, with unit."""
    name = str(control).removesuffix(" (control)")
    return f"control of this run: {name} ({ACCEPTED_PRECISION_WORDS}) on {on}: {figure}"


def published(target: str, figure: str) -> str:
    return f"published target: {target}: {figure}"


def parameter(name: str, value: object, why: str = "") -> str:
    return f"parameter {name} = {value}" + (f" ({why})" if why else "")


def larger_of(control: Threshold, target: Threshold) -> Threshold:
    """The control's threshold, or the published target's where that allows more; the source names which one."""
    return control if control.value >= target.value else Threshold(target.value, f"{target.source}; more than the control "
                                                                                 f"allows ({control.source})")


def accuracy_loss(control_loss: float, baseline_accuracy: float, control: str | None, on: str, unit: str = "pp",
                  scale: float = 100.0) -> Threshold:
    """The accuracy a candidate may lose (in ``unit``, ``scale`` x a fraction): what the control lost, or MLPerf's 1% of
    the baseline's accuracy where that is more (a control that lost nothing, by chance, on a few questions)."""
    own = Threshold(max(control_loss, 0.0), from_control(control, on, f"{control_loss:+.3g} {unit} lost"))
    target_loss = (1 - MLPERF_FRACTION) * baseline_accuracy * scale
    target = Threshold(target_loss, published(f"{MLPERF_TARGET} ({baseline_accuracy * scale:.3g})", f"{target_loss:.3g} {unit}"))
    return larger_of(own, target)


def short(source: str) -> str:
    """A source in a few words, for tables: 'control sdpa-fp8kv', 'control of this run', 'published target', 'parameter'."""
    if ACCEPTED_PRECISION_WORDS in source and source.startswith("control of this run: "):
        return "control " + source.removeprefix("control of this run: ").split(" (", 1)[0]
    for prefix in ("control of this run", "published target", "parameter"):
        if source.startswith(prefix):
            return prefix
    return ""
