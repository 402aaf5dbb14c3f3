"""Top-p (variable-k) and sampled (RS-KD) stores: `first-kd cache --top-p P` and `--sample N` end to end.

Each store is checked against a direct full forward of the teacher (which ids a row must hold, and their
log-probs), round-trips through `read` (padding as id -1 / log-prob -inf), passes `verify`, resumes after a
kill to the arrays of an uninterrupted pass, and is refused where it does not belong.
"""

import json

import numpy as np
import pytest
import torch
import zarr

from first_kd.cli import main
from first_kd.errors import FirstKDError
from first_kd.store import DamagedStore, PAD_ID, open_store, verify

from helpers import build_peaked_model, pr_records, run_cli, small_cache_args, write_jsonl


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny Llama with a scaled head: peaked enough that ranks are not float noise, flat enough that a
    top-p 0.9 row keeps anywhere from one id to the cap of 8 and a sample draws several distinct ids."""
    path = build_peaked_model(tmp_path_factory.mktemp("teacher") / "model", tiny_tokenizer, hidden_size=64,
                              num_layers=2)
    return str(path)


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "pr.jsonl", pr_records(30))


def full_logprobs(teacher_dir, rec):
    """The teacher's fp32 log-softmax at the record's target positions, by a plain full forward."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(rec["input_ids"])[None]).logits[0].float()
    return torch.log_softmax(logits, -1)[torch.from_numpy(rec["target_positions"])].double()


def arrays(path):
    return {name: arr[:] for name, arr in zarr.open_group(str(path), mode="r").arrays()}


def assert_same_arrays(a, b):
    got, want = arrays(a), arrays(b)
    assert got.keys() == want.keys()
    for name in got:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.fixture(scope="module")
def top_p_store(tmp_path_factory, teacher_dir, data_file):
    out = tmp_path_factory.mktemp("tp") / "tp.zarr"
    assert main(small_cache_args(teacher_dir, data_file, out, "--top-p", "0.9", "--k", "8")) == 0
    return out


@pytest.fixture(scope="module")
def sampled_store(tmp_path_factory, teacher_dir, data_file):
    out = tmp_path_factory.mktemp("sp") / "sp.zarr"
    assert main(small_cache_args(teacher_dir, data_file, out, "--sample", "16", "--sample-seed", "3")) == 0
    return out


def test_top_p_rows_are_the_smallest_prefix_reaching_p(top_p_store, teacher_dir):
    store = open_store(top_p_store)
    assert store.selection == {"kind": "top-p", "p": 0.9, "k": 8}
    counts = []
    for i in range(len(store)):
        rec = store.read(i)
        full = full_logprobs(teacher_dir, rec)
        values, ids = torch.topk(full, 8, dim=-1)
        mass = values.exp().cumsum(-1)
        for row in range(len(rec["target_positions"])):
            # smallest j with mass >= p, or 8; one below-the-threshold rounding is allowed at a near tie
            want = int((mass[row] < 0.9).sum()) + 1 if bool(mass[row, -1] >= 0.9) else 8
            n = int(np.isfinite(rec["topk_logprobs"][row]).sum())
            assert abs(n - want) <= 1 and (n == want or abs(float(mass[row, min(n, want) - 1]) - 0.9) < 1e-4)
            np.testing.assert_array_equal(rec["topk_ids"][row, :n], ids[row, :n].numpy())
            np.testing.assert_allclose(rec["topk_logprobs"][row, :n], values[row, :n].numpy(), rtol=2 ** -10,
                                       atol=1e-4)
            assert (rec["topk_ids"][row, n:] == PAD_ID).all() and (rec["topk_logprobs"][row, n:] == -np.inf).all()
            counts.append(n)
    assert min(counts) < max(counts)  # the fixture's teacher gives rows of several lengths (not a vacuous test)
    summary = verify(top_p_store)
    assert summary["selection"]["kind"] == "top-p"
    assert summary["mean_ids_per_position"] == pytest.approx(np.mean(counts))
    np.testing.assert_array_equal(zarr.open_group(str(top_p_store))["topk_count"][:], counts)


def test_sampled_rows_are_distinct_draws_with_counts_and_exact_logprobs(sampled_store, teacher_dir):
    store = open_store(sampled_store, sampled_ok=True)
    assert store.selection["kind"] == "sampled" and store.selection["n"] == 16 and store.k == 16
    distinct = []
    for i in range(len(store)):
        rec = store.read(i)
        full = full_logprobs(teacher_dir, rec)
        for row in range(len(rec["target_positions"])):
            real = rec["topk_ids"][row] != PAD_ID
            n = int(real.sum())
            assert real[:n].all() and not real[n:].any()  # padding last
            ids = rec["topk_ids"][row, :n]
            assert len(set(ids.tolist())) == n
            assert rec["sample_counts"][row].sum() == 16 and (rec["sample_counts"][row, :n] >= 1).all()
            assert (rec["sample_counts"][row, n:] == 0).all()
            np.testing.assert_allclose(rec["topk_logprobs"][row, :n], full[row, ids].numpy(), rtol=2 ** -10,
                                       atol=1e-4)
            assert (np.diff(rec["topk_logprobs"][row, :n]) <= 0).all()
            distinct.append(n)
    assert max(distinct) > 1
    assert verify(sampled_store)["mean_ids_per_position"] == pytest.approx(np.mean(distinct))


def test_sampled_draws_follow_the_teacher(tmp_path, teacher_dir, tiny_tokenizer):
    """Many draws at one position: the share of each id is its teacher probability (within 5 standard errors)."""
    data = write_jsonl(tmp_path / "one.jsonl", [{"id": "a", "prompt": "the cat", "response": "sat"}])
    out = tmp_path / "s.zarr"
    assert main(small_cache_args(teacher_dir, data, out, "--sample", "255")) == 0
    rec = open_store(out, sampled_ok=True).read(0)
    full = full_logprobs(teacher_dir, rec)[0].exp()
    real = rec["topk_ids"][0] != PAD_ID
    share = rec["sample_counts"][0, real] / 255.0
    p = full[rec["topk_ids"][0, real]].numpy()
    assert np.all(np.abs(share - p) <= 5 * np.sqrt(p * (1 - p) / 255.0) + 1e-9)


def test_same_seed_same_draws_other_seed_other_draws(tmp_path, teacher_dir, data_file, sampled_store):
    again = tmp_path / "again.zarr"
    assert main(small_cache_args(teacher_dir, data_file, again, "--sample", "16", "--sample-seed", "3")) == 0
    assert_same_arrays(again, sampled_store)
    other = tmp_path / "other.zarr"
    assert main(small_cache_args(teacher_dir, data_file, other, "--sample", "16", "--sample-seed", "4")) == 0
    assert not np.array_equal(arrays(other)["sample_counts"], arrays(sampled_store)["sample_counts"])


@pytest.mark.parametrize("kind", ["top-p", "sampled"])
def test_resume_after_kill_equals_uninterrupted(tmp_path, teacher_dir, data_file, top_p_store, sampled_store, kind):
    extra = ["--top-p", "0.9", "--k", "8"] if kind == "top-p" else ["--sample", "16", "--sample-seed", "3"]
    args = small_cache_args(teacher_dir, data_file, tmp_path / "s.zarr", *extra)
    killed = run_cli(args, env={"FIRST_KD_CRASH_AT": "unit-rows:1"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run_cli(args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same_arrays(tmp_path / "s.zarr", top_p_store if kind == "top-p" else sampled_store)
    # the same command again is a no-op; another selection on the finished store is refused, naming it
    assert run_cli(args).returncode == 0
    other = run_cli(small_cache_args(teacher_dir, data_file, tmp_path / "s.zarr", "--k", "8"))
    assert other.returncode != 0 and "selection" in other.stderr and "--overwrite" in other.stderr


def test_readers_of_the_top_k_refuse_a_sampled_store(sampled_store, capsys):
    with pytest.raises(FirstKDError, match="sampled cache.*--top-p"):
        open_store(sampled_store)
    assert main(["calibrate", "--store", str(sampled_store), "--val-store", str(sampled_store)]) != 0
    assert "sampled cache" in capsys.readouterr().err
    assert main(["inspect", str(sampled_store)]) == 0
    assert "sampled 16 draws" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["count", "padding-id", "gap"])
def test_verify_finds_broken_ragged_rows(tmp_path, top_p_store, sampled_store, damage):
    import shutil

    path = tmp_path / "d.zarr"
    shutil.copytree(sampled_store if damage == "count" else top_p_store, path)
    group = zarr.open_group(str(path), mode="r+")
    lp = group["topk_logprobs"][:]
    row = int(np.flatnonzero(np.isinf(lp[:, 1]))[0])  # a row with padding from column 1
    if damage == "count":
        counts = group["sample_counts"][:]
        counts[row, 0] += 1
        group["sample_counts"][:] = counts
    elif damage == "padding-id":
        ids = group["topk_ids"][:]
        ids[row, 1] = 3
        group["topk_ids"][:] = ids
    else:  # a real column after padding
        lp[row, 2] = -1.0
        group["topk_logprobs"][:] = lp
    with pytest.raises(DamagedStore):
        verify(path)


def test_bad_selection_options_are_one_line(tmp_path, teacher_dir, data_file, capsys):
    for extra, message in [(["--top-p", "1.5"], "--top-p must be in"), (["--sample", "300"], "--sample must be"),
                           (["--top-p", "0.9", "--sample", "4"], "choose one"),
                           (["--sample", "4", "--engine", "vllm"], "hf engine only")]:
        assert main(small_cache_args(teacher_dir, data_file, tmp_path / "x.zarr", *extra)) != 0
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "x.zarr").exists()
    json.dumps(extra)


# ---------------------------------------------------------------------------------------------------
# Training on them: the batch the trainer builds gives the loss an independent oracle computes
# ---------------------------------------------------------------------------------------------------


def student_batch(store_path, teacher_dir, n=6):
    """A training batch of the store's first n sequences, its student (the teacher's weights) and full logits."""
    from transformers import AutoModelForCausalLM

    from first_kd.batching import collate
    from first_kd.training import StoreExamples, TeacherTargets

    store = open_store(store_path, sampled_ok=True)
    examples = StoreExamples(store, TeacherTargets({}, other_bucket=True))
    batch = collate([examples[i] for i in range(n)], 0, True, examples.targets)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float64).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return batch, model, logits.flatten(0, 1)[batch["rows"]]


def test_training_loss_on_a_sampled_store_is_the_count_weighted_estimate(sampled_store, teacher_dir):
    from first_kd.training import TargetPositionLoss

    batch, model, logits = student_batch(sampled_store, teacher_dir)
    logq = torch.log_softmax(logits, -1)
    want = 0.0
    for row in range(logits.shape[0]):
        real = batch["teacher_ids"][row] >= 0
        ids, c = batch["teacher_ids"][row, real], batch["teacher_counts"][row, real].double()
        lp = batch["teacher_logprobs"][row, real].double()
        want += float((c / 16 * (lp - logq[row, ids])).sum())  # every weight c p / (n q) with q = p
    got = TargetPositionLoss(model, 0.0, True, 0.0, chunk_size=7)(batch)
    assert float(got.detach()) == pytest.approx(want, rel=1e-6, abs=1e-6)
    # --alpha mixes the targets' CE in: (1 - alpha) * estimate + alpha * CE
    ce = float(-logq.gather(1, batch["targets"][:, None]).sum())
    mixed = TargetPositionLoss(model, 0.25, True, 0.0, chunk_size=7)(batch)
    assert float(mixed.detach()) == pytest.approx(0.75 * want + 0.25 * ce, rel=1e-6, abs=1e-6)


def test_training_loss_on_a_top_p_store_is_the_kl_over_each_rows_own_ids(top_p_store, teacher_dir):
    from first_kd.training import TargetPositionLoss

    batch, model, logits = student_batch(top_p_store, teacher_dir)
    assert "teacher_counts" not in batch
    logq = torch.log_softmax(logits, -1)
    want = 0.0
    for row in range(logits.shape[0]):
        real = batch["teacher_ids"][row] >= 0
        ids = batch["teacher_ids"][row, real]
        p = batch["teacher_probs"][row, :-1][real].double()
        rest = batch["teacher_probs"][row, -1].double()
        q_rest = 1 - logq[row, ids].exp().sum()
        want += float((p * (p.log() - logq[row, ids])).sum() + torch.xlogy(rest, rest) - rest * q_rest.log())
    got = TargetPositionLoss(model, 0.0, True, 0.0, chunk_size=5)(batch)
    assert float(got.detach()) == pytest.approx(want, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("kind", ["top-p", "sampled"])
def test_distill_trains_on_the_store(tmp_path, top_p_store, sampled_store, teacher_dir, kind):
    store = top_p_store if kind == "top-p" else sampled_store
    out = tmp_path / "run"
    args = ["distill", "--student", teacher_dir, "--store", str(store), "--val-store", str(store), "--loss", "kd",
            "--out", str(out), "--max-steps", "3", "--batch-size", "4", "--save-every", "0", "--eval-every", "3"]
    assert main(args) == 0
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    assert all(np.isfinite(x["loss"]) for x in lines if "loss" in x)
    assert any(np.isfinite(x.get("val_loss", np.nan)) for x in lines)
    assert (out / "model" / "config.json").is_file()
    assert main(args) == 0  # the same command on the finished run: a no-op


def test_top_k_options_on_a_sampled_store_are_refused(tmp_path, sampled_store, teacher_dir, capsys):
    assert main(["distill", "--student", teacher_dir, "--store", str(sampled_store), "--loss", "kd",
                 "--teacher-norm", "linear", "--out", str(tmp_path / "r"), "--max-steps", "1"]) != 0
    err = capsys.readouterr().err.strip()
    assert "--teacher-norm" in err and "sampled cache" in err and len(err.splitlines()) == 1


def test_every_top_k_reader_reads_a_top_p_store(tmp_path, teacher_dir, data_file, top_p_store, capsys):
    """calibrate, evaluate --store and inspect on top-p stores: padded rows work, and a top-p store whose rows are
    all full (p = 1 is never reached below the cap) gives exactly what the top-k store of the same k does."""
    val_data = write_jsonl(tmp_path / "val.jsonl", pr_records(20, seed=1))
    stores = {}
    for name, extra in (("topk", ["--k", "8"]), ("full", ["--top-p", "1.0", "--k", "8"]),
                        ("p09", ["--top-p", "0.9", "--k", "8"])):
        stores[name] = tmp_path / f"train-{name}.zarr"
        shutil_copy(top_p_store if name == "p09" else None, stores[name])
        if name != "p09":
            assert main(small_cache_args(teacher_dir, data_file, stores[name], *extra)) == 0
        val = tmp_path / f"val-{name}.zarr"
        assert main(small_cache_args(teacher_dir, val_data, val, *extra)) == 0
        assert main(["calibrate", "--store", str(stores[name]), "--val-store", str(val), "--form", "logit",
                     "--objective", "ece"]) == 0  # an untrained teacher: few targets in its top-k, so not NLL
        assert main(["evaluate", "--store", str(stores[name]), "--out", str(tmp_path / f"eval-{name}")]) == 0
        assert main(["inspect", str(stores[name])]) == 0
    capsys.readouterr()
    fits = {name: open_store(path).temperature for name, path in stores.items()}
    assert fits["full"]["value"] == fits["topk"]["value"] and 0 < fits["p09"]["value"] < 100
    metrics = {name: json.loads((tmp_path / f"eval-{name}" / "metrics.json").read_text()) for name in stores}
    summary = {name: m.get("summary", m) for name, m in metrics.items()}
    for key in ("accuracy", "ece", "nll"):
        assert summary["full"][key] == summary["topk"][key]
        value = summary["p09"][key]
        # NLL is over the positions whose target the rows hold: none may, for this untrained teacher (then None)
        assert (key == "nll" and value is None) or np.isfinite(value)


def shutil_copy(src, dst):
    if src is not None:
        import shutil

        shutil.copytree(src, dst)
