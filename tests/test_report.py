"""`first-kd report`: the table holds the runs' numbers, report.json matches them, the figure is a real
PNG with one panel per run; and the whole pipeline cache -> calibrate -> evaluate -> report on a tiny model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from first_kd import metrics as M
from first_kd.commands import report as R
from first_kd.cli import main
from first_kd.store import open_store
from helpers import PNG_MAGIC, build_letter_sure_model, file_bytes, write_mcqa


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


REPORT_MCQA = dict(question_words=6, id_format="q{seed}-{i}")  # six-word questions, ids unique across files


def test_cache_calibrate_evaluate_report(tmp_path, tiny_tokenizer):
    # A teacher that is sure of a random letter: heavily over-confident.
    model_dir = build_letter_sure_model(tmp_path / "teacher", tiny_tokenizer)
    train, val = tmp_path / "train.zarr", tmp_path / "val.zarr"
    for data, store in ((write_mcqa(tmp_path / "train.jsonl", 16, 0, **REPORT_MCQA), train),
                        (write_mcqa(tmp_path / "val.jsonl", 60, 1, **REPORT_MCQA), val)):
        assert main(["cache", "--teacher", str(model_dir), "--data", str(data), "--out", str(store)]) == 0
    assert main(["calibrate", "--store", str(train), "--val-store", str(val)]) == 0
    record = open_store(train).temperature
    assert record["form"] == "prob" and record["ece_after"] < record["ece_before"]
    assert main(["evaluate", "--store", str(val), "--out", str(tmp_path / "raw"), "--no-temperature"]) == 0
    assert main(["evaluate", "--store", str(val), "--out", str(tmp_path / "cal")]) == 0
    assert main(["report", f"{tmp_path / 'raw'},{tmp_path / 'cal'}", "--out", str(tmp_path / "report")]) == 0

    report = json.loads((tmp_path / "report" / "report.json").read_text())
    raw, cal = report["models"]["val teacher raw"], report["models"][f"val teacher prob c={record['value']:.4g}"]
    assert raw["temperature"] is None and cal["temperature"] == record
    assert list(report["temperature"].values()) == [record]
    # same teacher, same argmax: the temperature only moves confidences, and here it lowers ECE
    assert cal["accuracy"] == raw["accuracy"]
    assert cal["mean_confidence"] < raw["mean_confidence"] and cal["ece"] < raw["ece"]
    md = (tmp_path / "report" / "report.md").read_text()
    assert re.search(rf"\| val teacher raw \| store \| raw \| [*]*{raw['accuracy']:.4f}", md)
    assert f"{record['ece_before']:.4f} → {record['ece_after']:.4f}" in md
    assert (tmp_path / "report" / "reliability.png").read_bytes()[:8] == PNG_MAGIC
    # The full-vocabulary scoring is reported beside the option-renormalised one, a row per run.
    full = raw["full_vocabulary"]
    assert "## Full-vocabulary confidence" in md
    assert (f"| val teacher raw | {full['accuracy']:.4f} | {full['ece']:.4f} | {full['brier']:.4f} | "
            f"{full['nll']:.4f} | {full['mean_confidence']:.4f} | {full['mean_options_mass']:.4f} |") in md
    # A letter's full probability is its renormalised one times the mass on the options (<= 1).
    assert 0 < full["mean_options_mass"] <= 1 and full["mean_confidence"] <= raw["mean_confidence"] + 1e-12
    assert full["accuracy"] == raw["accuracy"]  # the same answer: the most probable option


# ----------------------------------------------------------------------------------------------
# the output: same command twice, failed writes, user text escaped


def test_same_command_twice_is_a_no_op_until_something_changes(tmp_path, capsys):
    fake_run(tmp_path / "a", "a", sharpen=0.5, seed=0)
    fake_run(tmp_path / "b", "b", sharpen=1.0, seed=1)
    out = tmp_path / "report"
    args = ["report", f"{tmp_path / 'a'},{tmp_path / 'b'}", "--out", str(out), "--title", "T"]
    assert main(args) == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    capsys.readouterr()
    assert main(args) == 0
    assert "nothing to do" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps

    def rebuilt() -> bool:
        capsys.readouterr()
        assert main(args) == 0
        return "nothing to do" not in capsys.readouterr().err

    with open(out / "report.md", "a") as f:  # what the demo does after its report step
        f.write("\n## Appended\n")
    assert rebuilt() and "## Appended" not in (out / "report.md").read_text()
    assert not rebuilt()
    fake_run(tmp_path / "b2", "b", sharpen=0.2, seed=1)  # b evaluated again: other numbers
    (tmp_path / "b" / "metrics.json").write_bytes((tmp_path / "b2" / "metrics.json").read_bytes())
    assert rebuilt()
    args[-1] = "Other title"
    assert rebuilt() and (out / "report.md").read_text().startswith("# Other title")
    assert sorted(p.name for p in out.iterdir()) == ["reliability.png", "report.json", "report.md"]  # no scratch


def test_a_failed_write_keeps_the_previous_report(tmp_path, capsys, monkeypatch):
    import errno

    from first_kd import plots

    fake_run(tmp_path / "a", "a", sharpen=0.5)
    out = tmp_path / "report"
    assert main(["report", str(tmp_path / "a"), "--out", str(out)]) == 0
    before = file_bytes(out)

    def full_disk(panels, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(plots, "save_reliability_comparison", full_disk)
    capsys.readouterr()
    assert main(["report", str(tmp_path / "a"), "--out", str(out), "--title", "new"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left" in err and "reliability.png" in err, err
    assert file_bytes(out) == before and [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_unusable_out_is_one_line(tmp_path, capsys):
    import os

    fake_run(tmp_path / "a", "a", sharpen=0.5)
    a_file = tmp_path / "existing.txt"
    a_file.write_text("mine")
    if os.geteuid() == 0:  # root ignores permission bits (CI runs tests as root): /sys takes no new entries
        read_only = Path("/sys/first-kd-test-unwritable/report")
    else:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o555)
        read_only = tmp_path / "ro" / "report"
    cases = [(a_file, "is a file"), (a_file / "report", str(a_file)), (read_only, str(read_only.parent))]
    for out, message in cases:
        assert main(["report", str(tmp_path / "a"), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err
    assert a_file.read_text() == "mine"


HOSTILE = ["<script>alert(1)</script>", "![x](http://host/i.png)", "[click](javascript:alert(1))",
           "**loud** _em_ `code` ~~gone~~ $x^2$ &lt;b&gt;", "a|b\nc"]


def test_user_text_is_escaped_in_report_md(tmp_path):
    runs = []
    for i, label in enumerate(HOSTILE):
        run = tmp_path / f"run ({i}) [x]"  # a path with a space and brackets
        fake_run(run, label, sharpen=0.5, seed=i, n=100, temperature=RECORD if i == 0 else None)
        data = json.loads((run / "metrics.json").read_text())
        data.update(model="<img src=http://host/m.png>", data="`d`.jsonl|x", split="<b>train</b>")
        (run / "metrics.json").write_text(json.dumps(data))
        runs.append(run)
    title = "# <img src=x onerror=alert(1)> report *"
    R.build_report(runs, tmp_path / "r", title=title)
    md = (tmp_path / "r" / "report.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("| ")][1: 1 + len(HOSTILE)]
    assert len(table) == len(HOSTILE) and all(line.endswith(" 100 |") for line in table)  # one line per run
    for line, label in zip(table, HOSTILE):  # every character Markdown would act on is escaped
        cell = line[2: line.index(" | store |" if " | store |" in line else " | model |")]
        assert re.sub(r"\\(.)", r"\1", cell) == " ".join(label.splitlines())
        assert not re.search(r"(?<!\\)[<>\[\]*`~$&|]", cell), cell

    markdown_it = pytest.importorskip("markdown_it")
    html = markdown_it.MarkdownIt("commonmark").enable("table").render(md)  # raw HTML allowed, as on GitHub
    assert "<script" not in html and "<img src=\"http://host" not in html and "<img src=x" not in html
    assert 'href="javascript' not in html and "<strong>loud" not in html and "<em>em" not in html
    assert html.count("<h1>") == 1 and "&lt;img src=x onerror=alert(1)&gt; report *</h1>" in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "![x](http://host/i.png)" in html
    assert 'href="../run%20%280%29%20%5Bx%5D/metrics.json"' in html  # links to the runs still work
    assert html.count("<tr>") == len(HOSTILE) + 1 + 2  # metrics table rows + header, temperature table
