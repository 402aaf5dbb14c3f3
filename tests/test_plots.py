"""Reliability diagrams: valid PNGs, the right panels, and bars that show the table they were given."""

from __future__ import annotations

import json

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.patches import Rectangle

from first_kd import metrics as M
from first_kd import plots as P
from helpers import PNG_MAGIC


def _model(seed, sharpen):
    """Outcomes ~ Bernoulli(p); the model reports p ** sharpen (< 1: over-confident, 1: calibrated)."""
    rng = np.random.default_rng(seed)
    p = rng.beta(4, 2, size=2000)
    correct = rng.random(2000) < p
    conf = p**sharpen
    return conf, correct


def _bars(ax):
    return [p for p in ax.patches if isinstance(p, Rectangle)]


def test_diagram_draws_the_table():
    conf, correct = _model(0, 0.35)
    table = M.calibration_bins(conf, correct)
    fig = P.reliability_diagram(table, "over-confident")
    ax_bars, ax_hist = fig.axes
    nonempty = table["count"] > 0
    # one accuracy bar + one gap bar per non-empty bin; one histogram bar per bin
    assert len(_bars(ax_bars)) == 2 * nonempty.sum()
    assert len(_bars(ax_hist)) == len(table["count"])
    accuracy_bars = _bars(ax_bars)[: nonempty.sum()]
    np.testing.assert_allclose([b.get_height() for b in accuracy_bars], table["accuracy"][nonempty])
    gap_bars = _bars(ax_bars)[nonempty.sum():]
    # over-confident: every gap bar runs from the accuracy up to the mean confidence
    np.testing.assert_allclose([b.get_y() + b.get_height() for b in gap_bars], table["mean_confidence"][nonempty])
    np.testing.assert_allclose([b.get_height() for b in _bars(ax_hist)], table["count"])
    # diagonal, title with ECE and accuracy, labels, legend
    assert any(np.allclose(line.get_xdata(), [0, 1]) and np.allclose(line.get_ydata(), [0, 1]) for line in ax_bars.lines)
    ece = M.expected_calibration_error(conf, correct)
    assert f"ECE = {ece:.3f}" in ax_bars.get_title() and f"accuracy = {correct.mean():.3f}" in ax_bars.get_title()
    assert ax_hist.get_xlabel() == "Confidence" and ax_bars.get_ylabel() == "Accuracy"
    labels = [t.get_text() for t in ax_bars.get_legend().get_texts()]
    assert {"Accuracy", "Perfect calibration", "Gap to mean confidence"} <= set(labels)
    plt.close(fig)


def test_save_single_and_comparison_write_pngs(tmp_path):
    over = M.calibration_bins(*_model(1, 0.35))
    calibrated = M.calibration_bins(*_model(1, 1.0))
    one = P.save_reliability_diagram(over, tmp_path / "one.png", "teacher raw")
    both = P.save_reliability_comparison(
        [("teacher raw", over, None), ("teacher + temperature", calibrated, {"ece": 0.0123, "accuracy": 0.5})],
        tmp_path / "sub" / "both.png",
    )
    for path in (one, both):
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000
    # side-by-side: wider than tall, single: roughly as tall as wide
    width_one = int.from_bytes(one.read_bytes()[16:20], "big")
    width_both = int.from_bytes(both.read_bytes()[16:20], "big")
    assert width_both > 1.8 * width_one


def test_comparison_figure_panels_share_axes_and_use_summary():
    tables = [M.calibration_bins(*_model(s, e)) for s, e in ((2, 0.35), (2, 1.0), (2, 2.5))]
    fig = P.reliability_figure([(f"m{i}", t, {"ece": 0.5 + i, "accuracy": 0.25}) for i, t in enumerate(tables)])
    assert len(fig.axes) == 6  # bars + histogram per panel
    bars = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title().splitlines()[0] for ax in bars] == ["m0", "m1", "m2"]
    assert "ECE = 2.500" in bars[2].get_title() and "accuracy = 0.250" in bars[2].get_title()
    bars[0].set_ylim(0, 0.5)
    assert bars[2].get_ylim() == (0, 0.5)  # shared
    plt.close(fig)


def test_accepts_json_table_and_summary_with_bins(tmp_path):
    conf, correct = _model(3, 0.5)
    table = M.calibration_bins(conf, correct, n_bins=15)  # 15 bins leaves empty ones (NaN -> None)
    as_json = json.loads(json.dumps(M.bins_to_json(table)))
    assert None in as_json["accuracy"]
    fig = P.reliability_diagram(as_json, "from json")
    assert f"ECE = {M.ece_from_bins(table):.3f}" in fig.axes[0].get_title()
    plt.close(fig)
    path = P.save_reliability_diagram({"bins": as_json, "ece": 0.321, "accuracy": 0.6}, tmp_path / "m.png", "m")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_bad_input():
    with pytest.raises(ValueError, match="bins table"):
        P.reliability_diagram({"count": [1]}, "x")
    with pytest.raises(ValueError, match="at least one panel"):
        P.reliability_figure([])
    table = M.calibration_bins([0.5], [1])
    fig, ax = plt.subplots()
    with pytest.raises(ValueError, match="both"):
        P.reliability_diagram(table, "x", ax_bars=ax)
    plt.close(fig)


@pytest.mark.parametrize("title", [r"cost $5 and $6", r"$\frac{$", "a_b^c $x^$"])
def test_titles_are_shown_as_typed(tmp_path, title):
    # A label with dollar signs is not math: it is drawn as typed (and "$x^$" used to fail to draw at all).
    table = M.calibration_bins(*_model(2, 0.5))
    fig = P.reliability_diagram(table, title)
    fig.canvas.draw()
    assert fig.axes[0].get_title().splitlines()[0].replace("\\$", "$") == title
    plt.close(fig)
    path = P.save_reliability_diagram(table, tmp_path / "t.png", title)
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_a_failed_save_names_the_file_and_closes_the_figure(tmp_path, monkeypatch):
    import errno

    table = M.calibration_bins(*_model(3, 0.5))
    open_before = len(plt.get_fignums())

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(plt.Figure, "savefig", full_disk)
    with pytest.raises(OSError) as e:
        P.save_reliability_diagram(table, tmp_path / "x.png", "t")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "x.png")
    assert len(plt.get_fignums()) == open_before
