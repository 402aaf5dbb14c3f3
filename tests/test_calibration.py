"""Teacher temperature fitting: pure fitting functions against known truths, then `first-kd calibrate` on
stores built from arrays (no model), checking what it writes, where, and what it refuses."""

from __future__ import annotations

import contextlib
import errno
import json
import time
import warnings
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from first_kd import calibration as C
from first_kd import store as S
from first_kd.commands import calibrate as calibrate_command
from first_kd.cli import main
from first_kd.errors import FirstKDError
from helpers import read_only_dir, run_cli

T_TRUE = 2.5


def overconfident_teacher(n, vocab, k, t_true=T_TRUE, scale=1.5, seed=0):
    """Targets drawn from softmax(z); the teacher reports log_softmax(t_true * z), i.e. it is over-confident
    by exactly `t_true`. Returns (topk_ids [n, k] sorted by decreasing prob, topk_logprobs [n, k], targets [n])."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, scale, size=(n, vocab))
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    targets = (p.cumsum(axis=1) > rng.random((n, 1))).argmax(axis=1)
    reported = torch.log_softmax(torch.from_numpy(t_true * z), dim=-1).numpy()
    ids = np.argsort(-reported, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(reported, ids, axis=1).astype(np.float32), targets


def make_store(path, ids, logprobs, targets, *, per_seq=50, fmt="prompt-response", fingerprint="held-out",
               teacher="fake-teacher", tokenizer_sha="0" * 64, vocab=None, weights=None):
    """A complete store whose positions hold the given top-k rows, with target tokens `targets`.

    Sequence s is [0] + its `per_seq` targets with target_start 1, so position j predicts targets[j]."""
    n, k = ids.shape
    vocab = vocab or int(max(ids.max(), targets.max())) + 1
    rows = [{"id": f"s{s}", "input_ids": [0] + targets[lo: lo + per_seq].tolist(), "target_start": 1,
             "answer_index": 0 if fmt == "mcqa" else -1, "n_choices": 4 if fmt == "mcqa" else 0}
            for s, lo in enumerate(range(0, n, per_seq))]
    plan = S.Plan(len(rows), sum(len(r["input_ids"]) for r in rows), n, k, chunk_positions=4096)
    attrs = {"tokenizer": {"sha256": tokenizer_sha, "size": vocab, "special_token_ids": {}, "class": "Fake"},
             "data": {"format": fmt, "fingerprint": fingerprint, "source": f"{fingerprint}.jsonl", "split": "x",
                      "choice_token_ids": [1, 2, 3, 4] if fmt == "mcqa" else [],
                      "choice_labels": list("ABCD") if fmt == "mcqa" else []},
             "max_length": per_seq + 1, "teacher": {"name": teacher, "revision": None, "weights": weights}}
    group = S.create_store(path, datasets.Dataset.from_list(rows), plan, attrs, vocab)
    for unit in range(plan.n_units):
        lo, hi = S.unit_rows(group, unit)
        S.write_unit(group, unit, ids[lo:hi], logprobs[lo:hi])
    S.mark_complete(group, {"max_token_id": vocab - 1})
    return path


@pytest.fixture(scope="module")
def full_vocab():
    """k = V = 8: the top-k is the whole distribution, so the true temperature is identifiable exactly."""
    return overconfident_teacher(8000, vocab=8, k=8, seed=0)


@pytest.fixture
def pair(tmp_path, full_vocab):
    """(train store, held-out store): same teacher and tokenizer, different data."""
    ids, lp, y = full_vocab
    train_ids, train_lp, train_y = overconfident_teacher(500, vocab=8, k=8, seed=1)
    weights = {"method": "safetensors-sampled-v1", "sha256": "f" * 64}
    train = make_store(tmp_path / "train.zarr", train_ids, train_lp, train_y, fingerprint="train", weights=weights)
    val = make_store(tmp_path / "val.zarr", ids, lp, y, fingerprint="held-out", weights=weights)
    return train, val


def numpy_ece(conf, correct, n_bins=10):
    """Independent ECE: bins (lo, hi], a confidence of 0 in the first bin."""
    total = 0.0
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        inside = (conf > lo) & (conf <= hi) if b else (conf <= hi)
        if inside.any():
            total += inside.sum() * abs(correct[inside].mean() - conf[inside].mean())
    return total / len(conf)


# ----------------------------------------------------------------------------------------------
# pure functions


def test_target_rank():
    ids = np.array([[5, 3, 9], [1, 2, 4], [7, 8, 6]])
    np.testing.assert_array_equal(C.target_rank(ids, np.array([9, 1, 0])), [2, 0, -1])


def test_top_label_matches_a_numpy_oracle():
    ids, lp, y = overconfident_teacher(3000, vocab=20, k=5, seed=3)
    ranks = C.target_rank(ids, y)
    assert 0 < (ranks == -1).sum() < len(ranks)  # some targets fall outside the top-5
    for form, value in ((None, 1.0), ("logit", 1.7), ("prob", 0.3)):
        x = lp.astype(np.float64) / (value if form == "logit" else 1.0)
        if form == "prob":
            x = np.exp(lp.astype(np.float64)) / value
        q = np.exp(x - x.max(axis=1, keepdims=True))
        q /= q.sum(axis=1, keepdims=True)
        conf, correct = q.max(axis=1), (ranks == 0).astype(float)  # rows are sorted: top-1 is column 0
        stats = C.top_label(lp, ranks, form, value)
        np.testing.assert_allclose(stats["confidence"], conf, rtol=1e-5)
        np.testing.assert_array_equal(stats["correct"], correct)
        assert C.top_label_ece(lp, ranks, form, value) == pytest.approx(numpy_ece(conf, correct), abs=1e-5)
        inside = ranks >= 0
        nll = -np.log(q[inside, ranks[inside]]).mean()
        assert C.conditional_nll(lp, ranks, form, value) == pytest.approx(nll, rel=1e-5)


def test_logit_nll_fit_recovers_the_true_temperature(full_vocab):
    ids, lp, y = full_vocab
    fit = C.fit_temperature(lp, C.target_rank(ids, y), "logit")
    assert fit.objective == "nll"
    assert fit.value == pytest.approx(T_TRUE, rel=0.05)


def test_logit_fit_with_a_partial_top_k_still_recovers_the_temperature():
    # V = 30, k = 5: a third of the targets fall outside the top-k. The NLL restricted to targets inside
    # it is the exact conditional likelihood, so the estimate stays consistent (see calibration docstring).
    ids, lp, y = overconfident_teacher(12000, vocab=30, k=5, scale=2.0, seed=4)
    ranks = C.target_rank(ids, y)
    assert 0.15 < (ranks == -1).mean() < 0.6
    assert C.fit_temperature(lp, ranks, "logit").value == pytest.approx(T_TRUE, rel=0.05)


def test_logit_ece_grid_holds_one_and_lands_near_the_truth(full_vocab):
    ids, lp, y = full_vocab
    assert 1.0 in C.logit_grid().tolist()
    fit = C.fit_temperature(lp, C.target_rank(ids, y), "logit", "ece")
    assert fit.value == pytest.approx(T_TRUE, rel=0.15)  # ECE is a noisier objective than NLL
    assert fit.score == min(fit.tried.values())


def test_prob_fit_searches_the_documented_grid_and_lowers_ece(full_vocab):
    ids, lp, y = full_vocab
    ranks = C.target_rank(ids, y)
    fit = C.fit_temperature(lp, ranks, "prob")
    coarse = [round(0.1 * i, 10) for i in range(1, 11)]
    best_coarse = min(coarse, key=lambda c: (fit.tried[c], -c))
    fine = {round(best_coarse + 0.02 * j, 10) for j in range(-5, 6)}
    # exactly the coarse grid plus steps of 0.02 within +-0.1 of its best, inside (0, 1]
    assert set(fit.tried) == set(coarse) | {c for c in fine if 0 < c <= 1}
    assert fit.value in fit.tried and fit.tried[fit.value] == min(fit.tried.values())
    assert fit.objective == "ece"
    before = C.top_label_ece(lp, ranks)
    assert fit.score < 0.5 * before  # the over-confident teacher is much better calibrated after
    assert fit.score == pytest.approx(C.top_label_ece(lp, ranks, "prob", fit.value))


def test_grid_ties_go_to_the_larger_value():
    assert C.grid_best({0.3: 0.1, 0.5: 0.1, 0.4: 0.2}) == 0.5
    assert C.prob_fine_grid(0.1) == (0.02, 0.04, 0.06, 0.08, 0.1, 0.12, 0.14, 0.16, 0.18, 0.2)
    assert C.prob_fine_grid(1.0)[-1] == 1.0 and len(C.prob_fine_grid(1.0)) == 6


def test_nll_is_undefined_when_no_target_is_in_the_top_k():
    lp = np.log(np.full((4, 2), 0.25, dtype=np.float32))
    with pytest.raises(ValueError, match="top-k"):
        C.conditional_nll(lp, np.full(4, -1))


# ----------------------------------------------------------------------------------------------
# the command


def test_calibrate_writes_the_record_to_both_stores(pair, capsys):
    train, val = pair
    assert main(["calibrate", "--store", str(train), "--val-store", str(val), "--form", "logit"]) == 0
    out = capsys.readouterr().out
    record = S.open_store(train).temperature
    assert record == S.open_store(val).temperature
    assert {"form", "value", "objective", "fitted_on", "ece_before", "ece_after", "nll_before", "nll_after",
            "n_positions", "n_bins", "other_bucket", "fitted_at"} <= set(record)
    assert record["form"] == "logit" and record["objective"] == "nll" and record["other_bucket"] is False
    assert record["value"] == pytest.approx(T_TRUE, rel=0.05)
    assert record["fitted_on"]["fingerprint"] == "held-out" and record["fitted_on"]["path"] == str(val)
    assert record["n_positions"] == 8000 and record["n_bins"] == 10 and record["level"] == "token"
    assert record["ece_after"] <= record["ece_before"] and record["nll_after"] <= record["nll_before"]
    # the numbers are those of the held-out positions only
    ids, lp, y = overconfident_teacher(8000, vocab=8, k=8, seed=0)
    ranks = C.target_rank(ids, y)
    assert record["ece_before"] == pytest.approx(C.top_label_ece(lp, ranks), abs=1e-4)
    assert f"{record['value']:.4g}" in out and "before" in out and "after" in out
    json.dumps(record)  # attributes are plain JSON


def test_refit_replaces_the_record(pair):
    train, val = pair
    assert main(["calibrate", "--store", str(train), "--val-store", str(val), "--form", "logit"]) == 0
    assert main(["calibrate", "--store", str(train), "--val-store", str(val), "--form", "prob"]) == 0
    for path in (train, val):
        record = S.open_store(path).temperature
        assert record["form"] == "prob" and record["objective"] == "ece"
        assert 0 < record["value"] <= 1 and record["ece_after"] < record["ece_before"]
    # the reader applies the new record
    got = S.open_store(train).get(0)
    expected = torch.softmax(torch.exp(torch.from_numpy(got["topk_logprobs"])) / record["value"], dim=-1)
    np.testing.assert_allclose(got["teacher_probs"], expected.numpy(), rtol=1e-5)


def test_multiple_choice_store_is_calibrated_at_the_answer_position(tmp_path):
    ids, lp, y = overconfident_teacher(1500, vocab=8, k=5, seed=5)
    train = make_store(tmp_path / "t.zarr", ids[:300], lp[:300], y[:300], per_seq=1, fmt="mcqa", fingerprint="a")
    val = make_store(tmp_path / "v.zarr", ids[300:], lp[300:], y[300:], per_seq=1, fmt="mcqa", fingerprint="b")
    assert main(["calibrate", "--store", str(train), "--val-store", str(val)]) == 0
    record = S.open_store(train).temperature
    assert record["level"] == "answer" and record["n_positions"] == 1200
    assert record["ece_after"] < record["ece_before"]


def _error_line(capsys):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_refuses_to_fit_on_the_training_data(pair, tmp_path, capsys):
    train, _ = pair
    assert main(["calibrate", "--store", str(train), "--val-store", str(train)]) == 2
    assert "training split" in _error_line(capsys)
    ids, lp, y = overconfident_teacher(100, vocab=8, k=8, seed=9)
    same_data = make_store(tmp_path / "copy.zarr", ids, lp, y, fingerprint="train")
    assert main(["calibrate", "--store", str(train), "--val-store", str(same_data)]) == 2
    assert "training split" in _error_line(capsys)
    assert S.open_store(train).temperature == {}  # nothing was written


@pytest.mark.parametrize("change, message", [
    ({"teacher": "other-teacher"}, "different teachers"),
    ({"tokenizer_sha": "1" * 64}, "different tokenizers"),
    ({"fmt": "mcqa"}, "same kind"),
])
def test_refuses_mismatched_stores(pair, tmp_path, capsys, change, message):
    train, _ = pair
    ids, lp, y = overconfident_teacher(100, vocab=8, k=8, seed=9)
    other = make_store(tmp_path / "other.zarr", ids, lp, y, fingerprint="held-out-2", **change)
    assert main(["calibrate", "--store", str(train), "--val-store", str(other)]) == 2
    assert message in _error_line(capsys)


def test_refuses_other_k_and_missing_val_store(pair, tmp_path, capsys):
    train, _ = pair
    ids, lp, y = overconfident_teacher(100, vocab=8, k=5, seed=9)
    other = make_store(tmp_path / "k5.zarr", ids, lp, y, fingerprint="held-out-2", vocab=8)
    assert main(["calibrate", "--store", str(train), "--val-store", str(other)]) == 2
    assert "top-8" in _error_line(capsys)
    assert main(["calibrate", "--store", str(train)]) == 2
    assert "--val-store" in _error_line(capsys)
    with pytest.raises(FirstKDError, match="not found"):
        calibrate_command.run_calibrate(
            calibrate_command.CalibrateConfig(store=str(train), val_store=str(tmp_path / "nope.zarr")))


def test_summary_flags_a_fit_at_the_edge_of_its_range_and_a_worse_ece():
    record = {"form": "prob", "value": 1.0, "objective": "ece", "ece_before": 0.10, "ece_after": 0.12,
              "nll_before": 1.0, "nll_after": None, "n_positions": 10, "n_nll_positions": 0, "level": "answer"}
    text = calibrate_command.summary_text(record, "train.zarr", "val.zarr")
    assert "edge of the coarse grid" in text and "does not lower ECE" in text and "n/a" in text
    record.update(value=0.62, ece_after=0.05)
    text = calibrate_command.summary_text(record, "train.zarr", "val.zarr")
    assert "c = 0.62" in text and "note" not in text and len(text.splitlines()) <= 8


# ----------------------------------------------------------------------------------------------
# the command under faults: re-runs, kills, damage, full disks, read-only directories


def error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.strip() and "%|" not in line]


def attrs_bytes(*stores) -> list[bytes]:
    return [(Path(s) / "zarr.json").read_bytes() for s in stores]


def stray_files(*stores) -> list[str]:
    """Files a killed or failed write could leave in or beside a store (zarr's *.partial, our *.tmp)."""
    found = []
    for s in stores:
        s = Path(s)
        found += [str(p) for p in s.rglob("*.partial")] + [str(p) for p in s.parent.glob(f".{s.name}*.tmp")]
    return found


def calibrate_args(train, val, *extra):
    return ["calibrate", "--store", str(train), "--val-store", str(val), *extra]


def test_same_calibration_twice_is_a_no_op(pair, capsys):
    train, val = pair
    assert main(calibrate_args(train, val, "--form", "logit")) == 0
    before = attrs_bytes(train, val)
    capsys.readouterr()
    assert main(calibrate_args(train, val, "--form", "logit")) == 0
    assert "nothing to do" in _error_line(capsys)
    assert attrs_bytes(train, val) == before  # neither store was written
    # other settings are a new fit, recorded in both stores under one new fit id
    assert main(calibrate_args(train, val, "--form", "logit", "--n-bins", "15")) == 0
    t, v = S.open_store(train).temperature, S.open_store(val).temperature
    assert t == v and t["n_bins"] == 15 and t["fit_id"] != json.loads(before[0])["attributes"]["temperature"]["fit_id"]


def test_same_calibration_is_a_no_op_when_the_held_out_store_is_shared(pair, tmp_path, capsys):
    """The README's pipeline calibrates the training and the test store against one held-out store."""
    train, val = pair
    ids, lp, y = overconfident_teacher(200, vocab=8, k=8, seed=11)
    test = make_store(tmp_path / "test.zarr", ids, lp, y, fingerprint="test",
                      weights={"method": "safetensors-sampled-v1", "sha256": "f" * 64})
    assert main(calibrate_args(train, val)) == 0
    assert main(calibrate_args(test, val)) == 0  # the held-out store now holds the test store's fit
    before = attrs_bytes(train, val, test)
    capsys.readouterr()
    for store in (train, test):
        assert main(calibrate_args(store, val)) == 0
        assert "nothing to do" in _error_line(capsys)
    assert attrs_bytes(train, val, test) == before
    # a fit with other settings against the shared store makes the training store's fit a new one again
    assert main(calibrate_args(test, val, "--form", "logit")) == 0
    assert main(calibrate_args(train, val)) == 0
    assert "nothing to do" not in capsys.readouterr().err
    assert S.open_store(train).temperature == S.open_store(val).temperature


def test_kill_between_the_two_writes_is_detected_and_repaired(pair, tmp_path):
    train, val = pair
    killed = run_cli(calibrate_args(train, val), env={"FIRST_KD_CRASH_AT": "calibrate-val-written"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    fit = S.open_store(val).temperature  # the held-out store holds the new fit, the training store not yet
    assert fit["fit_id"] and not zarr_attrs(train)["temperature"]
    # every reader of the training store's temperature names the problem and the fix
    for read in (lambda: S.open_store(train).temperature, lambda: S.open_store(train).get(0)):
        with pytest.raises(FirstKDError, match=r"half-written calibration.*re-run `first-kd calibrate"):
            read()
    inspect = run_cli(["inspect", str(train)])
    assert inspect.returncode == 1 and "half-written calibration" in error_lines(inspect.stderr)[-1]
    evaluate = run_cli(["evaluate", "--store", str(train), "--out", str(tmp_path / "eval")])
    assert evaluate.returncode == 2 and "half-written calibration" in error_lines(evaluate.stderr)[-1]
    assert stray_files(train, val) == []
    # the same command finishes the interrupted fit: both stores hold it, nothing is refitted
    repaired = run_cli(calibrate_args(train, val))
    assert repaired.returncode == 0 and "finishing the interrupted calibration" in repaired.stderr
    assert S.open_store(train).temperature == S.open_store(val).temperature == fit
    assert run_cli(["inspect", str(train)]).returncode == 0


def zarr_attrs(store) -> dict:
    return json.loads((Path(store) / "zarr.json").read_text())["attributes"]


@pytest.mark.parametrize("crash_at", ["attrs-before-replace", "calibrate-pending"])
def test_kill_inside_a_write_leaves_no_stray_file_and_the_rerun_finishes(pair, crash_at):
    train, val = pair
    assert run_cli(calibrate_args(train, val), env={"FIRST_KD_CRASH_AT": crash_at}).returncode == -9
    assert not any(p.name.endswith(".partial") for s in (train, val) for p in Path(s).rglob("*"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # zarr warns about any foreign file in a store
        S.open_store(train), S.open_store(val)
    assert run_cli(calibrate_args(train, val)).returncode == 0
    assert S.open_store(train).temperature["fit_id"] == S.open_store(val).temperature["fit_id"]
    assert stray_files(train, val) == []  # a staging file beside a store is replaced by the next write


def _truncate_a_chunk(store, array="topk_logprobs"):
    chunk = sorted(p for p in (Path(store) / array / "c").rglob("*") if p.is_file())[0]
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])


@pytest.mark.parametrize("damaged", ["val", "train"])
def test_damaged_store_is_one_line_and_nothing_is_written(pair, capsys, damaged):
    train, val = pair
    _truncate_a_chunk(val if damaged == "val" else train)
    before = attrs_bytes(train, val)
    assert main(calibrate_args(train, val)) == 2
    line = _error_line(capsys)
    assert "damaged" in line and str(val if damaged == "val" else train) in line and "--overwrite" in line
    assert attrs_bytes(train, val) == before


def test_n_bins_is_bounded(pair, capsys):
    train, val = pair
    started = time.perf_counter()
    assert main(calibrate_args(train, val, "--n-bins", "100000000")) == 2
    assert "--n-bins" in _error_line(capsys) and time.perf_counter() - started < 5
    assert zarr_attrs(train)["temperature"] == {}


def test_teacher_weights_decide_not_names(tmp_path, capsys):
    ids, lp, y = overconfident_teacher(300, vocab=8, k=8, seed=2)
    weights = {"method": "safetensors-sampled-v1", "sha256": "a" * 64}
    train = make_store(tmp_path / "t.zarr", ids[:100], lp[:100], y[:100], fingerprint="t", teacher="teacher",
                       weights=weights)
    other = make_store(tmp_path / "o.zarr", ids[100:], lp[100:], y[100:], fingerprint="v", teacher="teacher",
                       weights=dict(weights, sha256="b" * 64))
    assert main(calibrate_args(train, other)) == 2
    assert "different weights" in _error_line(capsys)
    # the same weights loaded under another name are the same teacher
    same = make_store(tmp_path / "s.zarr", ids[100:], lp[100:], y[100:], fingerprint="v",
                      teacher="/abs/path/to/teacher", weights=weights)
    assert main(calibrate_args(train, same)) == 0
    assert "note" not in capsys.readouterr().err
    # a store from before weights were recorded: the name decides, and the output says so
    old = make_store(tmp_path / "old.zarr", ids[100:], lp[100:], y[100:], fingerprint="w", teacher="teacher")
    assert main(calibrate_args(train, old)) == 0
    assert "matched by name" in capsys.readouterr().err


def test_full_disk_is_one_line_and_both_stores_stay_as_they_were(pair):
    train, val = pair
    assert main(calibrate_args(train, val)) == 0  # a finished fit, which the failed re-fit must not lose
    before = attrs_bytes(train, val)
    result = run_cli(calibrate_args(train, val, "--form", "logit"), limit_bytes=1024)
    lines = error_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1 and "EFBIG" in lines[0] and str(train) in lines[0]
    assert attrs_bytes(train, val) == before and stray_files(train, val) == []
    assert S.open_store(train).temperature["form"] == "prob"


def test_disk_full_between_the_two_writes_keeps_the_pair_from_silently_disagreeing(pair, capsys, monkeypatch):
    train, val = pair

    def no_space(path, record):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(S, "set_temperature", no_space)
    assert main(calibrate_args(train, val)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "ENOSPC" in err.splitlines()[-1]
    with pytest.raises(FirstKDError, match="half-written"):
        S.open_store(train).temperature
    monkeypatch.undo()
    assert main(calibrate_args(train, val)) == 0
    assert S.open_store(train).temperature == S.open_store(val).temperature


def test_read_only_directory_is_one_line_and_nothing_is_written(pair):
    train, val = pair
    before = attrs_bytes(train, val)
    with contextlib.ExitStack() as stack:
        for path in (train, val, Path(train).parent):  # the stores and the directory that holds them
            stack.enter_context(read_only_dir(Path(path)))
        result = run_cli(calibrate_args(train, val))
    lines = error_lines(result.stderr)
    assert result.returncode == 2 and len(lines) == 1 and str(Path(train).parent) in lines[0]
    assert attrs_bytes(train, val) == before


def test_a_second_calibrate_on_the_same_store_is_refused_while_one_runs(pair, capsys):
    from first_kd.outputs import exclusive_lock

    train, val = pair
    with exclusive_lock(Path(train).resolve(), "calibrate"):
        assert main(calibrate_args(train, val)) == 2
    assert "another `first-kd calibrate`" in _error_line(capsys)
    assert zarr_attrs(train)["temperature"] == {}
