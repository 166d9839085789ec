"""The figures of the report. Each function draws one figure and returns it.

seaborn's theme for every figure (:func:`seaborn.set_theme`, applied when this module is imported: white grid,
the "deep" palette, baseline blue and candidate orange), ``seaborn.heatmap`` for the annotated maps (it picks a
readable text colour for each cell). The intervals drawn (paired bootstrap, Wilson, A/A bands, percentiles) are
computed and tested in the library and drawn from those numbers; no figure computes statistics of its own.
A figure whose data is one point is shown as a table instead (:func:`lines`).
"""

from __future__ import annotations

import textwrap
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import patheffects
import seaborn as sns

sns.set_theme(context="notebook", style="whitegrid", palette="deep", rc={
    "axes.spines.top": False, "axes.spines.right": False, "grid.alpha": 0.5, "axes.titlesize": 10, "axes.labelsize": 9,
    "xtick.labelsize": 8, "ytick.labelsize": 8, "legend.fontsize": 8, "legend.frameon": False, "figure.dpi": 100,
    "savefig.dpi": 100})
PALETTE = sns.color_palette("deep").as_hex()
BASE_COLOR, CAND_COLOR = PALETTE[0], PALETTE[1]
CONTROL_COLOR = PALETTE[7]  # the accepted-precision control (grey): the yardstick, neither baseline nor candidate
# overlapping series stay visible: each its own line style and marker
STYLES = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D")]
HEATMAP_TEXT = "#1a1a1a"


ROLE_COLORS = {"baseline": BASE_COLOR, "candidate": CAND_COLOR, "control": CONTROL_COLOR}


def role_colors(roles: dict[str, str]) -> dict[str, str]:
    """Series label -> colour, from each series' role (baseline blue, candidate orange, control grey)."""
    return {label: ROLE_COLORS[role] for label, role in roles.items()}


def _finish(fig: Any, title: str) -> Any:
    """The title, wrapped to the figure's width (a long title must not set the figure's width or be cut); a second
    part after a newline (where it ran) starts its own line."""
    chars = max(30, int(fig.get_figwidth() * 11))
    fig.suptitle("\n".join(line for part in title.split("\n") for line in textwrap.wrap(part, chars)), fontsize=11)
    fig.tight_layout()
    return fig


def kl_by_position(series: dict[str, np.ndarray], title: str, smooth: int = 16, colors: dict[str, str] | None = None) -> Any:
    """KL(baseline || candidate) against token position, one line per prompt (running mean over ``smooth``); ``colors``
    by series where given (the candidate orange, the control grey)."""
    fig, ax = plt.subplots(figsize=(9, 3.4))
    for label, kl in series.items():
        kl = np.asarray(kl, dtype=float)
        if smooth > 1 and kl.size > smooth:
            kernel = np.ones(smooth) / smooth
            y = np.convolve(kl, kernel, mode="valid")
            x = np.arange(y.size) + smooth // 2
        else:
            x, y = np.arange(kl.size), kl
        ax.plot(x, np.maximum(y, 1e-12), lw=1, label=label, **({"color": colors[label]} if colors and label in colors else {}))
    ax.set_yscale("log")
    ax.set_xlabel("token position")
    ax.set_ylabel(f"KL (nats), mean of {smooth}")
    if len(series) <= 8:
        ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)
    return _finish(fig, title)


def cdf(series: dict[str, np.ndarray], xlabel: str, title: str, threshold: float | None = None,
        threshold_label: str | None = None, control: str | None = None) -> Any:
    """Empirical cumulative distributions (log x) with an optional threshold line; the series named ``control`` (the
    accepted-precision control) grey and dashed, the others in the candidate's colour, each its own style."""
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    others = [label for label in series if label != control]
    for i, (label, values) in enumerate(series.items()):
        v = np.sort(np.maximum(np.asarray(values, dtype=float), 1e-12))
        if label == control:
            ax.plot(v, np.arange(1, v.size + 1) / v.size, label=label, color=CONTROL_COLOR, ls="--")
        else:
            ls = STYLES[others.index(label) % len(STYLES)][0]
            ax.plot(v, np.arange(1, v.size + 1) / v.size, label=label, color=CAND_COLOR, ls=ls)
    if threshold is not None and np.isfinite(threshold):
        ax.axvline(threshold, color="k", ls=":", lw=1, label=threshold_label or f"threshold {threshold:g}")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fraction of positions")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _finish(fig, title)


def bars_with_ci(labels: list[str], values: list[float], lows: list[float], highs: list[float], ylabel: str, title: str,
                 bound: float | None = None, bound_label: str = "allowed", controls: tuple[str, ...] = ()) -> Any:
    """Each label's value as a dot with its interval (an exact 0 with the interval [0, 0] stays visible, which a bar of
    height 0 would not), the allowed band ±``bound`` shaded, the line at 0; the labels in ``controls`` (the
    accepted-precision control) grey squares, the others the candidate's orange dots."""
    fig, ax = plt.subplots(figsize=(9, 1.4 + 0.5 * len(labels)))  # wide enough for the legend beside the axes
    y = np.arange(len(labels))
    err = np.abs(np.array([np.subtract(values, lows), np.subtract(highs, values)]))
    if bound is not None and np.isfinite(bound):
        ax.axvspan(-bound, bound, color=PALETTE[2], alpha=0.12, lw=0, label=f"{bound_label}: ±{bound:.3g}")
    ax.axvline(0, color="grey", lw=0.8)
    for role, (fmt, color) in (("candidate", ("o", CAND_COLOR)), ("control", ("s", CONTROL_COLOR))):
        rows = [i for i, label in enumerate(labels) if (label in controls) == (role == "control")]
        if rows:
            ax.errorbar(np.asarray(values)[rows], y[rows], xerr=err[:, rows], fmt=fmt, color=color, ecolor="k", capsize=4,
                        ms=7, label=f"{'control' if role == 'control' else 'value'}, 95% interval")
    span = max([abs(v) for v in (*lows, *highs, *values) if np.isfinite(v)]
               + [bound if bound is not None and np.isfinite(bound) else 0, 1e-9]) * 1.15
    ax.set_xlim(-span, span)
    ax.set_yticks(y, labels)
    ax.set_ylim(-0.6, len(labels) - 0.4)
    ax.set_xlabel(ylabel)
    # beside the axes: inside, it would cover a dot at the edge of the band (the control's, often)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=7)
    return _finish(fig, title)


def drift_by_layer(records: list[dict[str, Any]], metric: str, title: str, control: str | None = None) -> Any:
    """``metric`` per layer: attention output and hidden state, compounded and isolated, in the candidate's colour; the
    accepted-precision control (mode ``control``, compounded) grey, labelled ``control``. Whole layers on the axis."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
    modes = (("compounded", "-o", CAND_COLOR, "compounded"), ("isolated", "--s", CAND_COLOR, "isolated"),
             ("control", ":^", CONTROL_COLOR, f"{control or 'control'}, compounded"))
    for ax, kind in zip(axes, ("attention", "hidden")):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for mode, style, color, label in modes:
            rows = [r for r in records if r["mode"] == mode and r["kind"] == kind and r["bucket"] == "all"]
            if mode == "isolated":
                rows = [r for r in rows if r.get("candidate_layer") == r["layer"]]
            if not rows:
                continue
            by_layer: dict[int, list[float]] = {}
            for r in rows:
                v = r[metric]
                if v is not None and np.isfinite(v):
                    by_layer.setdefault(r["layer"], []).append(v)
            xs = sorted(by_layer)
            ax.plot(xs, [np.mean(by_layer[x]) for x in xs], style, ms=3, color=color, label=label)
        ax.set_title(f"{kind} output", fontsize=10)
        ax.set_xlabel("decoder layer")
        ax.grid(alpha=0.3)
        if metric in ("rel_l2", "max_abs"):
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    axes[0].set_ylabel(metric)
    return _finish(fig, title)


def grid(records: list[dict[str, Any]], key: str, rows: list[Any], cols: list[Any], row_key: str = "batch",
         col_key: str = "input_length") -> np.ndarray:
    """``record[key]`` laid out as a ``[len(rows), len(cols)]`` matrix for :func:`heatmap` (NaN where missing)."""
    matrix = np.full((len(rows), len(cols)), np.nan)
    for r in records:
        if r.get(row_key) in rows and r.get(col_key) in cols and r.get(key) is not None:
            matrix[rows.index(r[row_key]), cols.index(r[col_key])] = r[key]
    return matrix


def heatmap(matrix: np.ndarray, rows: list[Any], cols: list[Any], title: str, xlabel: str, ylabel: str, fmt: str = "{:.2f}",
            center: float | None = 1.0, min_span: float = 0.0, notes: np.ndarray | None = None) -> Any:
    """``seaborn.heatmap`` with each cell's value written in it, in one dark colour with a light halo. Cells coloured
    around ``center`` (red below, green above); ``min_span``: the colour scale covers at least center ± min_span, so that
    a map whose cells all lie within 1% of the centre does not paint that 1% as deep red and green. Without a centre,
    one sequential scale. Empty cells read "n/a". ``notes``: text under each cell's value (a matrix laid out as
    ``matrix``), where not empty."""
    data = np.asarray(matrix, dtype=float)
    text = np.array([["n/a" if not np.isfinite(v) else fmt.format(v) for v in row] for row in data], dtype=object).reshape(data.shape)
    two_lines = notes is not None and any(str(n) for n in np.asarray(notes).flat)
    if two_lines:
        for (i, j), note in np.ndenumerate(np.asarray(notes, dtype=object)):
            if note and np.isfinite(data[i, j]):
                text[i, j] = f"{text[i, j]}\n{note}"
    longest = max(len(line) for t in text.flat for line in str(t).split("\n"))
    width = min(11.0, max(6.0, 1.6 + 0.75 * len(cols) + 0.08 * longest * len(cols)))
    # at least 2.6 in high: with one or two rows the colour bar would be a stub of ~40 px; two lines a cell need more
    fig, ax = plt.subplots(figsize=(width, max(2.6, 1.3 + (0.62 if two_lines else 0.42) * len(rows))))
    finite = data[np.isfinite(data)]
    kw: dict[str, Any] = {"cmap": "rocket_r"}
    if center is not None and finite.size:
        span = max(abs(finite.max() - center), abs(center - finite.min()), min_span, 1e-9)
        kw = {"cmap": "RdYlGn", "center": center, "vmin": center - span, "vmax": center + span}
    # one text colour for every cell, dark with a light halo: readable on light and dark cells alike, where seaborn's
    # per-cell choice (by the cell's luminance) flips between near-equal neighbours
    halo = [patheffects.withStroke(linewidth=2.2, foreground="white", alpha=0.8)]
    sns.heatmap(np.ma.masked_invalid(data), annot=text, fmt="", ax=ax, linewidths=0.5, linecolor="white",
                cbar_kws={"shrink": 1.0 if len(rows) < 4 else 0.8},
                annot_kws={"fontsize": 8, "color": HEATMAP_TEXT, "path_effects": halo}, xticklabels=[str(c) for c in cols],
                yticklabels=[str(r) for r in rows], **kw)
    for (i, j), v in np.ndenumerate(data):  # masked cells get no annotation from seaborn: write n/a
        if not np.isfinite(v):
            ax.text(j + 0.5, i + 0.5, "n/a", ha="center", va="center", fontsize=8, color="#555555")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="y", rotation=0)
    return _finish(fig, title)


def lines(xs: dict[str, list[float]], ys: dict[str, list[float]], xlabel: str, ylabel: str, title: str, logx: bool = True,
          logy: bool = False, yerr: dict[str, tuple[list[float], list[float]]] | None = None,
          ylim: tuple[float, float] | None = None, colors: dict[str, str] | None = None, dodge: float = 0.0,
          marks: dict[str, float] | None = None) -> Any:
    """One line per series, each its own style and marker (equal series stay visible one over the other); ``ylim``
    fixes the y axis (an accuracy from 0 to 1, not zoomed onto a one-point dip). ``dodge``: series set apart sideways
    by this fraction of an octave each (log x) or of the x spacing, so that series with equal values (an accuracy of
    1 everywhere) do not hide one another; the x label says so. A series of one point is drawn as its marker alone.
    Where no series has two points there is no line to draw: the values are shown as a table instead (and None
    returned). ``marks``: vertical dotted lines at these x values, each with its label in the legend."""
    if all(len(v) < 2 for v in ys.values()):
        from IPython.display import display

        from sagecheck import show

        rows = [{"series": label, xlabel: x, ylabel: y} for label in ys for x, y in zip(xs[label], ys[label])]
        display(show.table(rows, caption=f"{title} (one point each: a table, not a figure)"))
        return None
    fig, ax = plt.subplots(figsize=(7, 3.6))
    spacing = min((float(np.diff(sorted(set(v))).min()) for v in xs.values() if len(set(v)) > 1), default=1.0)
    for k, label in enumerate(ys):
        style, marker = STYLES[k % len(STYLES)]
        color = colors[label] if colors and label in colors else PALETTE[k % len(PALETTE)]
        offset = dodge * (k - (len(ys) - 1) / 2)
        x = [v * 2 ** offset if logx else v + offset * spacing for v in xs[label]]
        if yerr and label in yerr:
            lo, hi = yerr[label]
            ax.fill_between(x, lo, hi, alpha=0.2, color=color)
        one = len(x) == 1
        ax.plot(x, ys[label], linestyle="none" if one else style, marker=marker, ms=5 if k == 0 else 4, lw=2.2 if k == 0 else 1.4,
                color=color, label=f"{label} (one point)" if one else label, alpha=0.9)
    for label, x in (marks or {}).items():
        ax.axvline(x, linestyle=":", color="#444444", lw=1.2, label=label)
    if dodge:
        xlabel += " (series set slightly apart to stay visible)"
    if logx:
        ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log", nonpositive="mask")  # an exact 0 is left out, not drawn as a cliff to the axis' floor
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if len(ys) + len(marks or {}) > 4:  # a long legend inside the axes covers lines: beside them (as the bar chart's)
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    else:
        ax.legend(fontsize=8)
    return _finish(fig, title)


KIND_MARKERS = {"prefill": "o", "decode": "^", "chunk": "D"}


def error_by_shape(rows: list[dict[str, Any]], field: str, ylabel: str, title: str, threshold: float | None = None,
                   flagged: set[str] | None = None) -> Any:
    """``row[field]`` of every shape against its key length: one panel per mask (full, causal); colour per head dim,
    marker per ``row["kind"]`` (prefill, decode, chunk), filled for float16 and hollow for bfloat16, so that the legend
    names each of the three once instead of every combination; flagged shapes ringed in red. Exact zeros are drawn
    at the bottom of the axis and counted under the figure."""
    from matplotlib.lines import Line2D

    flagged = flagged or set()
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharey=True)
    dims = sorted({r["head_dim"] for r in rows})
    dim_color = {d: PALETTE[i % len(PALETTE)] for i, d in enumerate(dims)}
    dtypes = sorted({r["dtype"] for r in rows}, key=lambda t: (t != "float16", t))
    hollow = {t: i > 0 for i, t in enumerate(dtypes)}  # the first (float16 where run) filled, the others hollow
    kinds = [k for k in KIND_MARKERS if any(r["kind"] == k for r in rows)]
    values = [r[field] for r in rows if r.get(field) is not None and np.isfinite(r[field]) and r[field] > 0]
    floor = (min(values) / 3) if values else 1e-6
    for ax, causal in zip(axes, (False, True)):
        for d in dims:
            for dtype in dtypes:
                for kind in kinds:
                    sel = [r for r in rows if r["causal"] == causal and r["head_dim"] == d and r["dtype"] == dtype
                           and r["kind"] == kind and r.get(field) is not None and np.isfinite(r[field])]
                    if not sel:
                        continue
                    color = dim_color[d]
                    ax.scatter([r["n_k"] for r in sel], [max(r[field], floor) for r in sel], marker=KIND_MARKERS[kind],
                               s=34, facecolors="none" if hollow[dtype] else color, edgecolors=color, linewidths=1.2,
                               alpha=0.85)
        ring = [r for r in rows if r["causal"] == causal and r["shape"] in flagged and r.get(field) is not None]
        if ring:
            ax.scatter([r["n_k"] for r in ring], [max(r[field], floor) for r in ring], s=130, facecolors="none",
                       edgecolors="#b3261e", linewidths=1.5)
        if threshold is not None:
            ax.axhline(threshold, color="k", ls="--", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("key length n_k")
        ax.set_title("causal" if causal else "full (non-causal)")
    axes[0].set_ylabel(ylabel)

    def mark(**kw: Any) -> Any:
        return Line2D([], [], ls="none", **kw)

    handles = [mark(marker="s", color=dim_color[d], ms=7, label=f"d={d}") for d in dims]
    handles += [mark(marker=KIND_MARKERS[k], color="#444444", ms=7, label=k) for k in kinds]
    handles += [mark(marker="o", ms=7, markeredgecolor="#444444", markerfacecolor="none" if hollow[t] else "#444444",
                     label=f"{t} ({'hollow' if hollow[t] else 'filled'})") for t in dtypes]
    if flagged:
        handles.append(mark(marker="o", ms=11, markerfacecolor="none", markeredgecolor="#b3261e", label="flagged"))
    if threshold is not None:
        handles.append(Line2D([], [], color="k", ls="--", lw=1, label=f"threshold {threshold:g}"))
    fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=9)
    zeros = sum(1 for r in rows if r.get(field) == 0)
    if zeros:
        fig.text(0.01, 0.01, f"{zeros} shapes with error exactly 0 drawn at {floor:.1e}", fontsize=9, color="#333333")
    return _finish(fig, title)


def accuracy_by_task(tasks: list[str], accuracy: dict[str, list[float]], intervals: dict[str, list[tuple[float, float]]],
                     reference: list[float | None], title: str) -> Any:
    """Accuracy per task and backend (bars, with each backend's 95% interval) beside the task's reference level
    (chance for multiple choice, always-the-commonest-answer for generation), drawn as a dashed line."""
    fig, ax = plt.subplots(figsize=(max(5.0, 1.8 * len(tasks) + 2), 3.4))
    width = 0.8 / max(len(accuracy), 1)
    x = np.arange(len(tasks))
    for k, (label, values) in enumerate(accuracy.items()):
        pos = x - 0.4 + width * (k + 0.5)
        lo = [v - a for v, (a, _) in zip(values, intervals[label])]
        hi = [b - v for v, (_, b) in zip(values, intervals[label])]
        ax.bar(pos, values, width=width * 0.95, color=PALETTE[k % len(PALETTE)], alpha=0.85, label=label)
        ax.errorbar(pos, values, yerr=[lo, hi], fmt="none", ecolor="k", capsize=3, lw=1)
    labelled = False
    for i, ref in enumerate(reference):
        if ref is not None:
            ax.hlines(ref, i - 0.45, i + 0.45, colors="k", linestyles="--", lw=1, label=None if labelled else "reference level")
            labelled = True
    ax.set_xticks(x, tasks)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper right")
    return _finish(fig, title)


RUN_DASHES = {"sdpa": (4, 2)}  # in the comparison: the baseline kernel dashed, every other implementation solid


def _panel_label(head_dim: int, causal: bool) -> str:
    return f"head dim {head_dim}, {'causal' if causal else 'full'}"


def kernel_by_run(points: list[dict[str, Any]], runs: list[str], value: str, ylabel: str, title: str,
                  reference: float | None = None) -> Any:
    """The comparison's kernel timings as seaborn facets: a panel per head dim and mask, x the sequence length, a colour
    per run (GPU), a line style per implementation. ``points`` are matched points (every run measured each)."""
    import pandas as pd

    frame = pd.DataFrame([{"panel": _panel_label(p["head_dim"], p["causal"]), "sequence length": p["seq_len"], "run": run,
                           "implementation": p["implementation"], ylabel: p["runs"][run][value]}
                          for p in points for run in runs if p["runs"][run].get(value) is not None])
    panels = [_panel_label(*key) for key in sorted({(p["head_dim"], p["causal"]) for p in points})]
    impls = sorted(set(frame["implementation"]))
    g = sns.relplot(data=frame, x="sequence length", y=ylabel, hue="run", hue_order=runs, style="implementation",
                    style_order=impls, dashes={i: RUN_DASHES.get(i, "") for i in impls}, markers=True, col="panel",
                    col_order=panels, kind="line", errorbar=None, palette=PALETTE[:len(runs)], height=3.0,
                    aspect=min(1.3, 10.0 / (3.0 * len(panels))), facet_kws={"sharey": True})
    g.set_titles(col_template="{col_name}")
    for ax in g.axes.flat:
        ax.set_xscale("log", base=2)
    if reference is not None:
        g.refline(y=reference, color="black", lw=0.8, linestyle="-")
    sns.move_legend(g, "upper left", bbox_to_anchor=(1.0, 0.9), frameon=False)
    return _finish(g.figure, title)


def _interval_line(data: Any, color: Any = None, label: str | None = None, **_: Any) -> None:
    """One run's speedups in a facet, with its p10-p90 interval (points without an interval get none)."""
    data = data.sort_values("input length")
    y = data["speedup"].to_numpy()
    lo = data["p10"].fillna(data["speedup"]).to_numpy()
    hi = data["p90"].fillna(data["speedup"]).to_numpy()
    plt.gca().errorbar(data["input length"], y, yerr=[np.maximum(0.0, y - lo), np.maximum(0.0, hi - y)], fmt="-o", ms=3,
                       capsize=2, color=color, label=label)


def speedup_by_run(points: list[dict[str, Any]], runs: list[str], phases: tuple[str, ...], title: str) -> Any:
    """The comparison's serving speedups as seaborn facets: a row per phase, a panel per batch size, x the input length,
    a colour per run with its p10-p90 interval, the line at 1 (as fast as the baseline)."""
    import pandas as pd

    frame = pd.DataFrame([{"phase": phase, "batch": p["batch"], "input length": p["input_length"], "run": run,
                           "speedup": p["runs"][run][f"{phase}_speedup"], "p10": p["runs"][run].get(f"{phase}_speedup_p10"),
                           "p90": p["runs"][run].get(f"{phase}_speedup_p90")}
                          for phase in phases for p in points for run in runs if p["runs"][run].get(f"{phase}_speedup") is not None])
    batches = sorted({p["batch"] for p in points})
    g = sns.FacetGrid(frame, row="phase", row_order=list(phases), col="batch", col_order=batches, hue="run", hue_order=runs,
                      palette=PALETTE[:len(runs)], height=2.6, aspect=min(1.3, 10.0 / (2.6 * len(batches))), sharex=True,
                      margin_titles=True)
    g.map_dataframe(_interval_line)
    g.refline(y=1.0, color="black", lw=0.8, linestyle="-")
    for ax in g.axes.flat:
        ax.set_xscale("log", base=2)
    g.set_titles(row_template="{row_name}", col_template="batch {col_name}")
    g.set_axis_labels("input length", "speedup")
    g.add_legend(title="run")
    sns.move_legend(g, "upper left", bbox_to_anchor=(1.0, 0.9), frameon=False, title_fontsize=9)  # beside the row titles, not over them
    return _finish(g.figure, title)
