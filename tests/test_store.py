"""The store format on its own: round trip, verification, damage detection, tokenizer fingerprints.

These build stores directly from arrays (no teacher), so each property is checked in isolation;
tests/test_cache.py covers the teacher pass that fills them.
"""

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from first_kd import store as S
from first_kd.errors import FirstKDError
from first_kd.temperature import teacher_distribution

VOCAB = 100
K = 5


def make_rows(n=40, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        length = int(rng.integers(4, 25))
        start = int(rng.integers(1, length))
        rows.append({"id": f"ex-{i}", "input_ids": rng.integers(0, VOCAB, length).tolist(),
                     "target_start": start, "answer_index": -1, "n_choices": 0})
    return rows


def fake_teacher_rows(n, seed=1):
    """Sorted top-k log-probs of random full-vocabulary distributions, and their ids."""
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet(np.full(VOCAB, 0.3), size=n)
    ids = np.argsort(-probs, axis=1)[:, :K]
    logprobs = np.log(np.take_along_axis(probs, ids, axis=1))
    return ids, logprobs.astype(np.float32)


def build(path, rows, chunk_positions=32, complete=True):
    lengths = np.array([len(r["input_ids"]) for r in rows])
    starts = np.array([r["target_start"] for r in rows])
    plan = S.Plan(len(rows), int(lengths.sum()), int((lengths - starts).sum()), K, chunk_positions)
    attrs = {"tokenizer": {"sha256": "0" * 64, "size": VOCAB, "special_token_ids": {}, "class": "Fake"},
             "data": {"format": "prompt-response"}, "max_length": 64, "teacher": {"name": "fake"}}
    group = S.create_store(path, datasets.Dataset.from_list(rows), plan, attrs, VOCAB)
    ids, logprobs = fake_teacher_rows(plan.n_positions)
    for unit in range(plan.n_units):
        lo, hi = S.unit_rows(group, unit)
        S.write_unit(group, unit, ids[lo:hi], logprobs[lo:hi])
    if complete:
        S.mark_complete(group, {"max_token_id": VOCAB - 1})
    return ids, logprobs


def test_round_trip_every_sequence(tmp_path):
    rows = make_rows()
    ids, logprobs = build(tmp_path / "s.zarr", rows)
    store = S.open_store(tmp_path / "s.zarr")
    assert len(store) == len(rows)
    row = 0
    for i, r in enumerate(rows):
        got = store[i]
        n = len(r["input_ids"]) - r["target_start"]
        assert got["id"] == r["id"]
        np.testing.assert_array_equal(got["input_ids"], r["input_ids"])
        # logits at position t predict token t+1: the first target token is predicted from target_start-1
        np.testing.assert_array_equal(got["target_positions"], np.arange(r["target_start"] - 1, len(r["input_ids"]) - 1))
        np.testing.assert_array_equal(got["topk_ids"], ids[row: row + n])
        # fp16 storage: relative error of a log-prob is at most 2^-11
        np.testing.assert_allclose(got["topk_logprobs"], logprobs[row: row + n], rtol=2 ** -11, atol=1e-6)
        row += n
    assert row == store.n_positions


def test_reader_applies_recorded_temperature(tmp_path):
    build(tmp_path / "s.zarr", make_rows())
    plain = S.open_store(tmp_path / "s.zarr")[0]
    expected_plain = np.exp(plain["topk_logprobs"]) / np.exp(plain["topk_logprobs"]).sum(1, keepdims=True)
    np.testing.assert_allclose(plain["teacher_probs"], expected_plain, rtol=1e-5)

    S.set_temperature(tmp_path / "s.zarr", {"form": "prob", "value": 0.5})
    store = S.open_store(tmp_path / "s.zarr")
    got = store.get(0, other_bucket=True)
    p = np.exp(got["topk_logprobs"].astype(np.float64))
    # softmax(p / c) over the top-k, scaled to the top-k's own mass; the rest keeps the teacher's mass.
    rest = 1 - p.sum(1, keepdims=True)
    tempered = np.exp(p / 0.5) / np.exp(p / 0.5).sum(1, keepdims=True)
    expected = np.concatenate([tempered * (1 - rest), rest], axis=1)
    np.testing.assert_allclose(got["teacher_probs"], expected, rtol=1e-5)
    # temperature=False ignores the record (the `kd` baseline)
    np.testing.assert_allclose(store.get(0, temperature=False)["teacher_probs"], expected_plain, rtol=1e-5)


def test_logit_temperature_one_is_renormalised_topk():
    logprobs = torch.log(torch.tensor([[0.5, 0.2, 0.1]]))
    np.testing.assert_allclose(teacher_distribution(logprobs, "logit", 1.0).numpy(), [[0.625, 0.25, 0.125]], rtol=1e-6)
    np.testing.assert_allclose(teacher_distribution(logprobs, None, 1.0, other_bucket=True).numpy(),
                               [[0.5, 0.2, 0.1, 0.2]], rtol=1e-5)


def test_incomplete_store_refused_with_resume_hint(tmp_path):
    build(tmp_path / "s.zarr", make_rows(), complete=False)
    with pytest.raises(FirstKDError, match="incomplete.*resume"):
        S.open_store(tmp_path / "s.zarr")
    summary = S.verify(tmp_path / "s.zarr")
    assert summary["complete"] is False


def _chunk_files(path, array):
    return sorted(p for p in (Path(path) / array / "c").rglob("*") if p.is_file())


@pytest.mark.parametrize("array", ["topk_logprobs", "topk_ids", "input_ids"])
def test_deleted_chunk_is_damage(tmp_path, array):
    build(tmp_path / "s.zarr", make_rows())
    _chunk_files(tmp_path / "s.zarr", array)[0].unlink()
    with pytest.raises(S.DamagedStore, match="missing"):
        S.verify(tmp_path / "s.zarr")
    with pytest.raises(FirstKDError, match="damaged"):
        S.open_store(tmp_path / "s.zarr")


@pytest.mark.parametrize("array", ["topk_logprobs", "topk_ids", "target_positions"])
def test_truncated_chunk_is_damage(tmp_path, array):
    build(tmp_path / "s.zarr", make_rows())
    chunk = _chunk_files(tmp_path / "s.zarr", array)[-1]
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    with pytest.raises(S.DamagedStore):
        S.verify(tmp_path / "s.zarr")


def test_verify_catches_bad_values(tmp_path):
    import zarr

    build(tmp_path / "s.zarr", make_rows())
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r+")
    lp = group["topk_logprobs"][:]
    lp[3, 0] = 0.5  # a probability above 1
    group["topk_logprobs"][:] = lp
    with pytest.raises(S.DamagedStore, match="> 0"):
        S.verify(tmp_path / "s.zarr")


def test_inspect_json_keys(tmp_path, capsys):
    from first_kd.cli import main

    _, logprobs = build(tmp_path / "s.zarr", make_rows())
    assert main(["inspect", str(tmp_path / "s.zarr"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    for key in ("n_sequences", "n_positions", "k", "vocab_size", "bytes_on_disk", "bytes_per_position",
                "mean_topk_mass", "topk_mass_p10", "complete", "temperature"):
        assert key in summary
    assert summary["complete"] is True and summary["k"] == K
    # the teacher's mean top-k mass over the positions it was given (stored at fp16 precision)
    assert summary["mean_topk_mass"] == pytest.approx(np.exp(logprobs.astype(np.float64)).sum(1).mean(), rel=1e-3)


def test_inspect_damaged_exits_nonzero_one_line(tmp_path, capsys):
    from first_kd.cli import main

    build(tmp_path / "s.zarr", make_rows())
    _chunk_files(tmp_path / "s.zarr", "topk_ids")[0].unlink()
    assert main(["inspect", str(tmp_path / "s.zarr")]) != 0
    err = capsys.readouterr().err.strip()
    assert "damaged" in err and len(err.splitlines()) == 1


def test_overwrite_never_deletes_foreign_folder(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    with pytest.raises(FirstKDError, match="not a first-kd store"):
        S.remove_store(foreign)
    assert (foreign / "notes.txt").read_text() == "precious"


def test_compact_dtypes():
    assert S.compact_uint(255) == "uint8"
    assert S.compact_uint(50256) == "uint16"
    assert S.compact_uint(65536) == "uint32"


class TinyTok:
    """Just enough of a tokenizer for fingerprinting."""

    def __init__(self, vocab, bos=0, eos=1, unk=None):
        self._vocab = vocab
        self.bos_token_id, self.eos_token_id, self.unk_token_id = bos, eos, unk

    def get_vocab(self):
        return dict(self._vocab)


def test_tokenizer_fingerprint_check():
    base = {f"t{i}": i for i in range(50)}
    teacher = TinyTok(base)
    attrs = {"tokenizer": S.tokenizer_fingerprint(teacher), "max_token_id": 49}
    S.check_tokenizer(attrs, TinyTok(base), model_vocab_size=64)  # same tokenizer, padded model vocab: fine
    S.check_tokenizer(attrs, TinyTok({**base, "extra": 50}))  # tokens appended after the teacher's: fine
    swapped = dict(base, t3=4, t4=3)
    with pytest.raises(FirstKDError, match="does not match"):
        S.check_tokenizer(attrs, TinyTok(swapped))
    with pytest.raises(FirstKDError, match="does not match"):
        S.check_tokenizer(attrs, TinyTok({f"t{i}": i for i in range(40)}))
    with pytest.raises(FirstKDError, match="eos_token"):
        S.check_tokenizer(attrs, TinyTok(base, eos=2))
    with pytest.raises(FirstKDError, match="output logits"):
        S.check_tokenizer(attrs, TinyTok(base), model_vocab_size=40)
