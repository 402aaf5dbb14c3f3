"""`first-kd report`: the table holds the runs' numbers, report.json matches them, the figure is a real
PNG with one panel per run; and the whole pipeline cache -> calibrate -> evaluate -> report on a tiny model."""

from __future__ import annotations

import json
import random
import re

import matplotlib.image
import numpy as np
import pytest

from conftest import build_letter_sure_model
from first_kd import metrics as M
from first_kd import report as R
from first_kd.cli import main
from first_kd.store import open_store

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
WORDS = "cat dog bird tree house river stone cloud apple water light paper music table green".split()


def fake_run(directory, label, sharpen, seed=0, n=800, temperature=None):
    """An evaluate output dir from synthetic two-class predictions: outcomes ~ Bernoulli(p), reported p**sharpen."""
    rng = np.random.default_rng(seed)
    p = rng.beta(4, 2, size=n)
    conf = p ** sharpen
    probs = np.stack([conf, 1 - conf], axis=1)
    labels = np.where(rng.random(n) < p, 0, 1)
    summary = M.calibration_summary(probs, labels)
    stats = M.top_label_statistics(probs, labels)
    summary["bins"] = M.bins_to_json(M.calibration_bins(stats["confidence"], stats["correct"]))
    summary.update(label=label, source="store" if temperature else "model", model=f"models/{label}", data="d.jsonl",
                   split="validation", level="answer", temperature=temperature, nll_scope="all")
    directory.mkdir(parents=True)
    (directory / "metrics.json").write_text(json.dumps(summary))  # all a report reads
    return json.loads((directory / "metrics.json").read_text())


RECORD = {"form": "prob", "value": 0.62, "objective": "ece", "fitted_on": {"path": "cache/val.zarr"},
          "ece_before": 0.2512, "ece_after": 0.0311, "nll_before": 1.25, "nll_after": 1.02, "n_positions": 1221}


def table_rows(markdown: str) -> dict:
    """{first cell: [cells]} of the first markdown table."""
    lines = [x for x in markdown.splitlines() if x.startswith("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != len(lines[0].strip("|").split("|")):
            break
        rows[cells[0]] = cells
    return rows


def test_report_of_two_runs(tmp_path):
    over = fake_run(tmp_path / "runs" / "a", "student ce", sharpen=0.3, seed=0)
    calibrated = fake_run(tmp_path / "runs" / "b", "student first", sharpen=1.0, seed=1, temperature=RECORD)
    out = tmp_path / "report"
    assert main(["report", f"{tmp_path / 'runs' / 'a'},{tmp_path / 'runs' / 'b'}", "--out", str(out),
                 "--title", "Tiny test"]) == 0
    md = (out / "report.md").read_text()
    assert md.startswith("# Tiny test")
    rows = table_rows(md)
    assert list(rows) == ["student ce", "student first"]
    header = [c.strip() for c in md.splitlines()[2].strip("|").split("|")]
    for label, run in (("student ce", over), ("student first", calibrated)):
        cells = dict(zip(header, (c.replace("*", "").replace("†", "").strip() for c in rows[label])))
        for key, title in (("accuracy", "Accuracy"), ("ece", "ECE"), ("mce", "MCE"), ("brier", "Brier"),
                           ("nll", "NLL"), ("mean_confidence", "Mean conf.")):
            assert cells[title] == f"{run[key]:.4f}", (label, key)
        assert cells["n"] == "800"
    # the better-calibrated run's ECE is the bold one
    assert calibrated["ece"] < over["ece"]
    assert f"**{calibrated['ece']:.4f}**" in rows["student first"]
    # temperature section, figure with a relative link, links to the runs
    assert "## Teacher temperature" in md and "0.2512 → 0.0311" in md and "`cache/val.zarr`" in md
    assert "![Reliability diagrams](reliability.png)" in md
    assert "(../runs/a/metrics.json)" in md and "(../runs/b/reliability.png)" in md

    report = json.loads((out / "report.json").read_text())
    assert list(report["models"]) == ["student ce", "student first"]
    for label, run in (("student ce", over), ("student first", calibrated)):
        got = report["models"][label]
        assert all(got[k] == run[k] for k in run if k != "bins") and "bins" not in got
    assert report["temperature"] == {"student first": RECORD}

    png = out / "reliability.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    height, width, _ = matplotlib.image.imread(str(png)).shape
    assert width > 1.6 * height  # two panels side by side


def test_labels_override_and_duplicates(tmp_path):
    for name in ("a", "b", "c"):
        fake_run(tmp_path / name, "same", sharpen=0.5, seed=ord(name))
    report = R.build_report([tmp_path / "a", tmp_path / "b" / "metrics.json"], tmp_path / "r1")
    assert list(report["models"]) == ["same", "same (2)"]
    report = R.build_report([tmp_path / "a", tmp_path / "c"], tmp_path / "r2", labels=["x", "y|z"])
    assert list(report["models"]) == ["x", "y|z"]
    assert "| y\\|z |" in (tmp_path / "r2" / "report.md").read_text()  # a pipe cannot break the table


def test_many_runs_are_split_over_figures(tmp_path):
    dirs = [tmp_path / f"run{i}" for i in range(7)]
    for i, d in enumerate(dirs):
        fake_run(d, f"run {i}", sharpen=0.3 + 0.1 * i, seed=i, n=200)
    report = R.build_report(dirs, tmp_path / "r")
    assert report["figures"] == ["reliability.png", "reliability-2.png"]
    md = (tmp_path / "r" / "report.md").read_text()
    assert "(reliability-2.png)" in md and len(table_rows(md)) == 7
    # 4 + 3 panels: the second figure is narrower by one panel
    widths = [matplotlib.image.imread(str(tmp_path / "r" / f)).shape[1] for f in report["figures"]]
    assert widths[0] / widths[1] == pytest.approx(4 / 3, rel=0.05)


@pytest.mark.parametrize("n, sizes", [(1, [1]), (6, [6]), (7, [4, 3]), (13, [5, 4, 4])])
def test_figure_groups_are_balanced_and_cover_every_run(n, sizes):
    groups = R.figure_groups(n)
    assert [len(g) for g in groups] == sizes
    assert [i for g in groups for i in g] == list(range(n))


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    fake_run(tmp_path / "a", "a", sharpen=0.5)
    (tmp_path / "empty").mkdir()
    cases = [
        ([str(tmp_path / "empty"), "--out", str(tmp_path / "r")], "no metrics.json"),
        ([str(tmp_path / "a"), "--out", str(tmp_path / "r"), "--labels", "x,y"], "one label per run"),
        (["--out", str(tmp_path / "r")], "no runs given"),
        ([str(tmp_path / "a")], "--out"),
    ]
    for args, message in cases:
        assert main(["report", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err


# ----------------------------------------------------------------------------------------------
# end to end


def write_mcqa(path, n, seed):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            k = rng.randint(3, 5)
            f.write(json.dumps({"id": f"q{seed}-{i}", "question": " ".join(rng.choices(WORDS, k=6)) + "?",
                                "choices": [" ".join(rng.choices(WORDS, k=2)) for _ in range(k)],
                                "answer": "ABCDE"[rng.randrange(k)]}) + "\n")
    return path


def test_cache_calibrate_evaluate_report(tmp_path, tiny_tokenizer):
    # A teacher that is sure of a random letter: heavily over-confident.
    model_dir = build_letter_sure_model(tmp_path / "teacher", tiny_tokenizer)
    train, val = tmp_path / "train.zarr", tmp_path / "val.zarr"
    for data, store in ((write_mcqa(tmp_path / "train.jsonl", 16, 0), train),
                        (write_mcqa(tmp_path / "val.jsonl", 60, 1), val)):
        assert main(["cache", "--teacher", str(model_dir), "--data", str(data), "--out", str(store)]) == 0
    assert main(["calibrate", "--store", str(train), "--val-store", str(val)]) == 0
    record = open_store(train).temperature
    assert record["form"] == "prob" and record["ece_after"] < record["ece_before"]
    assert main(["evaluate", "--store", str(val), "--out", str(tmp_path / "raw"), "--no-temperature"]) == 0
    assert main(["evaluate", "--store", str(val), "--out", str(tmp_path / "cal")]) == 0
    assert main(["report", f"{tmp_path / 'raw'},{tmp_path / 'cal'}", "--out", str(tmp_path / "report")]) == 0

    report = json.loads((tmp_path / "report" / "report.json").read_text())
    raw, cal = report["models"]["val teacher raw"], report["models"][f"val teacher prob c={record['value']:.3g}"]
    assert raw["temperature"] is None and cal["temperature"] == record
    assert list(report["temperature"].values()) == [record]
    # same teacher, same argmax: the temperature only moves confidences, and here it lowers ECE
    assert cal["accuracy"] == raw["accuracy"]
    assert cal["mean_confidence"] < raw["mean_confidence"] and cal["ece"] < raw["ece"]
    md = (tmp_path / "report" / "report.md").read_text()
    assert re.search(rf"\| val teacher raw \| store \| none \| [*]*{raw['accuracy']:.4f}", md)
    assert f"{record['ece_before']:.4f} → {record['ece_after']:.4f}" in md
    assert (tmp_path / "report" / "reliability.png").read_bytes()[:8] == PNG_MAGIC
