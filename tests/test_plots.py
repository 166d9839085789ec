"""The report's figures read right at a glance: colours by role, one readable text colour, no hidden series, legends
that name each encoding once, no stub colour bars (issue: figures that read right at a glance)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from sagecheck import plots  # noqa: E402
from sagecheck.metrics import throughput as T  # noqa: E402


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def _sweep():
    rows = [{"implementation": impl, "batch": b, "input_length": n, "status": "ok", "prefill_tok_s": 1000.0 * b + n + k}
            for k, impl in enumerate(("sdpa", "sage")) for b in (1, 2) for n in (64, 128)]
    return T.Sweep(rows, "sdpa", "sage", [64, 128], [1, 2], "CPU, float32, candidate sage", "CPU, float32")


def test_prefill_curves_are_coloured_by_role_whatever_the_batch():
    xs, ys, roles = T.prefill_curves(_sweep())
    assert roles == {"sdpa, batch 1": "baseline", "sdpa, batch 2": "baseline", "sage, batch 1": "candidate",
                     "sage, batch 2": "candidate"}
    fig = plots.lines(xs, ys, "input length", "tokens/s", "Prefill throughput\nCPU, float32", colors=plots.role_colors(roles))
    colours = {line.get_label(): matplotlib.colors.to_hex(line.get_color()) for line in fig.axes[0].get_lines()}
    assert {colours["sdpa, batch 1"], colours["sdpa, batch 2"]} == {plots.BASE_COLOR}
    assert {colours["sage, batch 1"], colours["sage, batch 2"]} == {plots.CAND_COLOR}
    # the two batch sizes of one role stay apart by their line style
    styles = {line.get_label(): line.get_linestyle() for line in fig.axes[0].get_lines()}
    assert styles["sdpa, batch 1"] != styles["sdpa, batch 2"] and styles["sage, batch 1"] != styles["sage, batch 2"]
    # the title: what is compared, then where it ran on a line of its own (not the run's description over 3 lines)
    assert fig._suptitle.get_text() == "Prefill throughput\nCPU, float32"


def test_speedup_map_titles_name_what_is_compared_and_where_on_two_lines():
    s = _sweep()
    for r in s.rows:
        if r["implementation"] == "sage":
            r["prefill_speedup"] = 0.9
    ((key, title),) = T.speedup_maps(s)
    assert key == "prefill_speedup" and title == "prefill speedup (sage / sdpa)\nCPU, float32"


def test_heatmap_cells_share_one_text_colour_and_its_colour_bar_is_not_a_stub():
    fig = plots.heatmap([[0.62, 0.65], [0.77, 0.70]], [1, 2], [64, 128], "prefill speedup", "input length", "batch size",
                        min_span=0.1)
    colours = {matplotlib.colors.to_hex(t.get_color()) for t in fig.axes[0].texts}
    assert colours == {plots.HEATMAP_TEXT}  # near-equal neighbours never differ in text colour
    fig.canvas.draw()
    bar_px = fig.axes[1].get_window_extent().height
    assert bar_px >= 120, bar_px  # it was ~40 px for two rows


def test_equal_series_are_set_apart_so_none_hides_another():
    same = {"sdpa": [1.0] * 5, "sage": [1.0] * 5, "control": [1.0] * 5}
    x = [128, 256, 512, 1024, 2048]
    fig = plots.lines({k: x for k in same}, same, "context length (tokens)", "passkey accuracy", "t", ylim=(0, 1.05),
                      dodge=0.06)
    drawn = [tuple(line.get_xdata()) for line in fig.axes[0].get_lines()]
    assert len(set(drawn)) == 3  # three distinct x positions per length: every series visible
    for xs in drawn:  # each stays within a tenth of an octave of its length
        assert all(abs(a / b - 1) < 0.08 for a, b in zip(xs, x))
    assert "set slightly apart" in fig.axes[0].get_xlabel()


def test_a_one_point_series_beside_longer_ones_is_its_marker_alone():
    fig = plots.lines({"a": [1, 2, 4], "b": [4]}, {"a": [1.0, 2.0, 3.0], "b": [2.5]}, "x", "y", "t")
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert lines["b (one point)"].get_linestyle() == "None" and lines["a"].get_linestyle() == "-"


def test_every_shape_figure_names_each_encoding_once_in_a_readable_font():
    rows = [{"shape": f"{dt}-{d}-{kind}-{n}-{c}", "dtype": dt, "head_dim": d, "kind": kind, "n_k": n, "causal": c,
             "err": 0.0 if n == 1 else 0.01 * d / 64}
            for dt in ("float16", "bfloat16") for d in (64, 128) for kind in ("prefill", "decode", "chunk")
            for n in (1, 128, 1024) for c in (False, True)]
    fig = plots.error_by_shape(rows, "err", "rel. L2", "t", threshold=0.05, flagged={rows[5]["shape"]})
    legend = fig.legends[0]
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels == ["d=64", "d=128", "prefill", "decode", "chunk", "float16 (filled)", "bfloat16 (hollow)", "flagged",
                      "threshold 0.05"]
    assert min(t.get_fontsize() for t in legend.get_texts()) >= 8
    (note,) = [t for t in fig.texts if "exactly 0" in t.get_text()]
    assert note.get_fontsize() >= 8 and note.get_text().startswith("24 shapes")


def test_the_drift_figure_ticks_whole_layers_only():
    records = [{"mode": mode, "kind": kind, "bucket": "all", "layer": layer, "candidate_layer": layer, "rel_l2": 0.01 * (layer + 1)}
               for mode in ("compounded", "isolated", "control") for kind in ("attention", "hidden") for layer in range(4)]
    fig = plots.drift_by_layer(records, "rel_l2", "t", control="sdpa-fp8kv")
    fig.canvas.draw()
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
