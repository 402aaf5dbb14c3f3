"""Figures: reliability diagrams (per-bin accuracy against confidence, with the confidence histogram
beneath), and the coverage figure of a top-k store (`coverage_figure`, at the end).

Input is the bins table of `first_kd.metrics.calibration_bins` (or `CalibrationAccumulator.bins()`),
as numpy arrays or as the JSON lists of `metrics.bins_to_json`. Each panel is two axes sharing x:

  * top: blue bars of accuracy per bin, red hatched bars for the gap between accuracy and the
    bin's mean confidence (above the blue bar when over-confident, inside it when under-confident),
    and the dashed diagonal of perfect calibration;
  * bottom: how many samples fall in each bin, with dashed lines at the overall accuracy and mean
    confidence (their distance is the over/under-confidence of the model as a whole).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display, safe on servers and in CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from first_kd import coverage, metrics  # noqa: E402
from first_kd.files import name_errors  # noqa: E402

ACCURACY_COLOR = "#4C72B0"
GAP_COLOR = "#C44E52"
HIST_COLOR = "#8C8C8C"


def _as_table(bins: Any) -> dict:
    """numpy bins table from numpy arrays or JSON lists; rejects anything else with a clear message."""
    if not isinstance(bins, dict) or any(k not in bins for k in metrics.BIN_KEYS):
        raise ValueError(f"expected a bins table with keys {list(metrics.BIN_KEYS)} (see metrics.calibration_bins)")
    if any(isinstance(bins[k], (list, tuple)) for k in metrics.BIN_KEYS):
        return metrics.bins_from_json(bins)
    return {k: np.asarray(bins[k]) for k in metrics.BIN_KEYS}


def _overall(table: dict) -> tuple[float, float]:
    """(accuracy, mean confidence) of all samples, recovered from the per-bin means and counts."""
    count = table["count"].astype(float)
    nonempty = count > 0
    total = count.sum()
    acc = float(np.sum(count[nonempty] * table["accuracy"][nonempty]) / total)
    conf = float(np.sum(count[nonempty] * table["mean_confidence"][nonempty]) / total)
    return acc, conf


def _new_panel_axes(n_panels: int, panel_size=(4.2, 4.8)):
    fig = plt.figure(figsize=(panel_size[0] * n_panels, panel_size[1]), layout="constrained")
    grid = fig.add_gridspec(2, n_panels, height_ratios=(3, 1))
    ax_bars, ax_hist = [], []
    for i in range(n_panels):
        share_bars = ax_bars[0] if ax_bars else None
        bars = fig.add_subplot(grid[0, i], sharex=share_bars, sharey=share_bars)
        hist = fig.add_subplot(grid[1, i], sharex=bars, sharey=ax_hist[0] if ax_hist else None)
        ax_bars.append(bars)
        ax_hist.append(hist)
    return fig, ax_bars, ax_hist


def plain_text(text) -> str:
    """`text` shown as typed: matplotlib reads a pair of `$` as math (a label with `$x^$` would fail to draw)."""
    return str(text).replace("$", r"\$")


def reliability_diagram(
    bins_table: Any,
    title: str,
    ax_bars=None,
    ax_hist=None,
    ece: Optional[float] = None,
    accuracy: Optional[float] = None,
    legend: bool = True,
):
    """Draw one reliability diagram; returns the matplotlib Figure.

    Args:
        bins_table: {"lower","upper","count","mean_confidence","accuracy"} per bin.
        title: panel title, shown as typed (no math); ECE and accuracy are appended on a second line.
        ax_bars, ax_hist: axes to draw into (both or neither); a new figure when None.
        ece, accuracy: shown in the title; computed from the table when None (exact for ECE, since
            the table holds the per-bin means and counts).
        legend: draw the legend on the bars axis.
    """
    table = _as_table(bins_table)
    if (ax_bars is None) != (ax_hist is None):
        raise ValueError("pass both ax_bars and ax_hist, or neither")
    if table["count"].sum() <= 0:
        raise ValueError("the bins table holds no samples: nothing to plot")
    if ax_bars is None:
        _, (ax_bars,), (ax_hist,) = _new_panel_axes(1)
    overall_acc, overall_conf = _overall(table)
    ece = metrics.ece_from_bins(table) if ece is None else float(ece)
    accuracy = overall_acc if accuracy is None else float(accuracy)

    lower, upper = table["lower"], table["upper"]
    width = upper - lower
    nonempty = table["count"] > 0
    acc = np.where(nonempty, table["accuracy"], 0.0)
    conf = np.where(nonempty, table["mean_confidence"], 0.0)

    ax_bars.bar(lower[nonempty], acc[nonempty], width=width[nonempty], align="edge",
                color=ACCURACY_COLOR, edgecolor="black", linewidth=0.6, label="Accuracy", zorder=2)
    gap_bottom = np.minimum(acc, conf)
    gap_height = np.abs(conf - acc)
    ax_bars.bar(lower[nonempty], gap_height[nonempty], bottom=gap_bottom[nonempty], width=width[nonempty],
                align="edge", color=GAP_COLOR, alpha=0.35, edgecolor=GAP_COLOR, hatch="//",
                linewidth=0.6, label="Gap to mean confidence", zorder=3)
    ax_bars.plot([0, 1], [0, 1], linestyle="--", color="black", linewidth=1.0, label="Perfect calibration", zorder=4)
    ax_bars.set_xlim(0, 1)
    ax_bars.set_ylim(0, 1)
    ax_bars.set_ylabel("Accuracy")
    ax_bars.set_aspect("auto")
    ax_bars.grid(True, linestyle=":", linewidth=0.5, zorder=0)
    ax_bars.tick_params(labelbottom=False)
    ax_bars.set_title(f"{plain_text(title)}\nECE = {ece:.3f}   accuracy = {accuracy:.3f}", fontsize=10)
    if legend:
        ax_bars.legend(loc="upper left", fontsize=8, framealpha=0.9)

    ax_hist.bar(lower, table["count"], width=width, align="edge", color=HIST_COLOR, edgecolor="black",
                linewidth=0.6, zorder=2)
    ax_hist.axvline(overall_acc, color=ACCURACY_COLOR, linestyle="--", linewidth=1.2, label=f"accuracy {overall_acc:.2f}")
    ax_hist.axvline(overall_conf, color=GAP_COLOR, linestyle="--", linewidth=1.2, label=f"mean conf. {overall_conf:.2f}")
    ax_hist.set_xlim(0, 1)
    ax_hist.set_xlabel("Confidence")
    ax_hist.set_ylabel("Count")
    ax_hist.grid(True, axis="y", linestyle=":", linewidth=0.5, zorder=0)
    if legend:
        ax_hist.legend(loc="upper left", fontsize=7, framealpha=0.9)
    return ax_bars.figure


def _split(summary_or_bins: Any) -> tuple[dict, Optional[dict]]:
    """(bins table, summary or None) from a bins table or a mapping holding one under "bins"."""
    if isinstance(summary_or_bins, dict) and "bins" in summary_or_bins:
        return summary_or_bins["bins"], summary_or_bins
    return summary_or_bins, None


def reliability_figure(panels: Sequence[tuple[str, Any, Optional[dict]]]):
    """Side-by-side reliability diagrams with shared axes; returns the Figure (2 axes per panel).

    panels: (title, bins_table, summary or None); ECE / accuracy in the titles come from the summary
    ("ece", "accuracy") when given, else from the table."""
    if not panels:
        raise ValueError("reliability_figure needs at least one panel")
    fig, ax_bars, ax_hist = _new_panel_axes(len(panels))
    for i, (title, table, summary) in enumerate(panels):
        summary = summary or {}
        reliability_diagram(table, title, ax_bars[i], ax_hist[i],
                            ece=summary.get("ece"), accuracy=summary.get("accuracy"), legend=(i == 0))
        if i > 0:  # shared axes: the first panel's labels speak for the row
            ax_bars[i].set_ylabel("")
            ax_hist[i].set_ylabel("")
            ax_bars[i].tick_params(labelleft=False)
            ax_hist[i].tick_params(labelleft=False)
            ax_hist[i].legend(loc="upper left", fontsize=7, framealpha=0.9)
    return fig


def _save(fig, path) -> Path:
    path = Path(path)
    try:
        with name_errors(path):  # a failed write (full disk) names no file: say which one
            path.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, format="png", dpi=120)
    finally:
        plt.close(fig)  # also when the disk is full: a long-lived process must not keep the figure
    return path


def save_reliability_diagram(summary_or_bins: Any, path, title: str) -> Path:
    """Write one model's reliability diagram as a PNG at `path`; returns the path.

    summary_or_bins: a bins table, or a mapping with the table under "bins" (and optionally "ece",
    "accuracy" for the title, as in a metrics.json that stores both)."""
    table, summary = _split(summary_or_bins)
    return _save(reliability_figure([(title, table, summary)]), path)


def save_reliability_comparison(panels: Sequence[tuple[str, Any, Optional[dict]]], path) -> Path:
    """Write side-by-side reliability diagrams (e.g. teacher raw vs calibrated, student ce vs FIRST)
    with shared axes as one PNG; panels are (title, bins_table, summary or None). Returns the path."""
    return _save(reliability_figure(panels), path)


# ----------------------------------------------------------------------------------------------
# Coverage of a top-k store (first_kd.coverage)
# ----------------------------------------------------------------------------------------------

BAND_COLOR = "#4C72B0"
TARGET_COLOR = "#C44E52"


def _mass_histogram(ax, summary: dict, target: float) -> None:
    edges = np.asarray(summary["histogram"]["edges"], dtype=float)
    counts = np.asarray(summary["histogram"]["counts"], dtype=float)
    share = counts / max(counts.sum(), 1.0)
    ax.bar(edges[:-1], share, width=np.diff(edges), align="edge", color=HIST_COLOR, edgecolor="black",
           linewidth=0.6, zorder=2)
    q = summary["quantiles"]
    ax.axvline(summary["mean"], color=BAND_COLOR, linewidth=1.4, label=f"mean {summary['mean']:.3f}")
    ax.axvline(q["p10"], color=BAND_COLOR, linestyle="--", linewidth=1.2, label=f"p10 {q['p10']:.3f}")
    ax.axvline(target, color=TARGET_COLOR, linestyle=":", linewidth=1.4, label=f"target {target:g}")
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"top-{summary['k']} mass of a position")
    ax.set_ylabel("share of positions")
    ax.grid(True, axis="y", linestyle=":", linewidth=0.5, zorder=0)
    ax.legend(loc="upper left", fontsize=8, framealpha=0.9)
    ax.set_title(f"top-{summary['k']} mass, {summary['n_positions']:,} positions", fontsize=10)


def _mass_curve(ax, probe: dict, target: float, store_k: int) -> None:
    q = {name: np.asarray(values, dtype=float) for name, values in probe["quantiles"].items()}
    j = np.arange(1, probe["k"] + 1)
    ax.fill_between(j, q["p10"], q["p90"], color=BAND_COLOR, alpha=0.15, step="mid", label="p10-p90")
    ax.fill_between(j, q["p25"], q["p75"], color=BAND_COLOR, alpha=0.3, step="mid", label="p25-p75")
    ax.step(j, probe["mean"], where="mid", color=BAND_COLOR, linewidth=1.6, label="mean")
    ax.step(j, q["p1"], where="mid", color=BAND_COLOR, linestyle=":", linewidth=1.0, label="p1")
    ax.axhline(target, color=TARGET_COLOR, linestyle=":", linewidth=1.4, label=f"target {target:g}")
    ax.axvline(store_k, color="black", linestyle="--", linewidth=1.0, label=f"store k = {store_k}")
    hint = coverage.suggest_k(probe, target)
    for key, marker in (("k_mean", "o"), ("k_p10", "s")):
        if hint[key]:
            stat = probe["mean"] if key == "k_mean" else q["p10"]
            ax.plot([hint[key]], [stat[hint[key] - 1]], marker=marker, color=TARGET_COLOR, linestyle="none",
                    label=f"{'mean' if key == 'k_mean' else 'p10'} reaches it: k = {hint[key]}")
    if probe["k"] >= 50:
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))  # 1, 10, 100 rather than 10^0 ...
    ax.set_xlim(0.8, probe["k"] + 0.5)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("j (tokens kept)")
    ax.set_ylabel("top-j mass")
    ax.grid(True, linestyle=":", linewidth=0.5, zorder=0)
    # below the axes: the bands cover the whole plot whatever the teacher, so no corner is free
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize=7, framealpha=0.9)
    ax.set_title(f"probe: top-j mass, j = 1..{probe['k']}, {probe['n_positions']:,} positions", fontsize=10)


def coverage_figure(summary: dict, probe: Optional[dict] = None, target: float = 0.95, title: str = ""):
    """The coverage of a top-k store; returns the Figure.

    Args:
        summary: a `coverage` summary (first_kd.coverage.MassAccumulator.summary): its histogram of top-k
            mass is the left panel, with the mean, p10 and `target` marked.
        probe: a `coverage_probe` record (first_kd.coverage.mass_curve plus its settings) or None: when
            given, the right panel is the mean top-j mass for j = 1..K with p10-p90 and p25-p75 bands,
            the target, the store's k and the smallest k whose mean (and p10) reaches the target.
        title: the figure's title (shown as typed), e.g. the store's path.
    """
    fig, axes = plt.subplots(1, 2 if probe else 1, figsize=(9.5 if probe else 5, 4.2), layout="constrained",
                             squeeze=False)
    _mass_histogram(axes[0, 0], summary, target)
    if probe:
        _mass_curve(axes[0, 1], probe, target, summary["k"])
    if title:
        fig.suptitle(plain_text(title), fontsize=10)
    return fig


def save_coverage_figure(summary: dict, path, probe: Optional[dict] = None, target: float = 0.95,
                         title: str = "") -> Path:
    """Write `coverage_figure` as a PNG at `path`; returns the path."""
    return _save(coverage_figure(summary, probe, target, title), path)
