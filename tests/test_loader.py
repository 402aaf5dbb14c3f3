"""The training data loader (first_kd.loader) on synthetic stores written with first_kd.store's own writer.

What is checked, and against what:
  * each epoch's order is a permutation of all examples, a pure function of (seed, epoch) (recomputed in a
    fresh loader, in any epoch order), and the local order keeps every block's examples inside a stretch
    of at most `window` blocks;
  * the batches are the same (array-equal tensors) read by 0 or 2 worker processes, from every process of
    a data-parallel run (their shares partition each step), and after resuming at a step;
  * the local order decodes each chunk about once per epoch, the random order about one per sequence
    (counted by the store's reader);
  * the teacher distribution computed once per batch equals the old one computed per example;
  * --group-by-length keeps epochs whole and pads less;
  * distill: --num-workers 2 and a resume (with another --num-workers) train exactly the weights of a
    plain run; the new options' one-line errors.
"""

from __future__ import annotations

import json
import pickle
import typing

import numpy as np
import pytest
import torch

import first_kd.training as training_mod
from first_kd.commands.distill import DistillConfig, run_distill
from first_kd.errors import FirstKDError
from first_kd.loader import (ORDERS, StepBatches, StepPlan, epoch_order, epoch_permutation, group_by_length,
                             local_permutation, step_loader)
from first_kd.store import open_store
from first_kd.tiny import synthetic_store
from first_kd.training import StoreExamples, TeacherTargets

PAD = 0


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: one torch thread for the module


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    """~1,200 sequences of 1..11 targets in 64-row chunks: about 110 read blocks."""
    path = tmp_path_factory.mktemp("loader") / "s.zarr"
    return synthetic_store(path, 1200, targets_per_sequence=6, prompt_tokens=3, chunk_positions=64, varied=True,
                           seed=1)


def _examples(store_path, targets=None) -> StoreExamples:
    return StoreExamples(open_store(store_path), targets or TeacherTargets({"form": "prob", "value": 0.5}))


def _plan(n, **kw) -> StepPlan:
    values = dict(n_examples=n, seed=3, step_examples=24, batch_size=8, total_steps=0, order="local", window=4)
    values.update(kw)
    if not values["total_steps"]:  # two and a half epochs, the last step of each epoch partial
        values["total_steps"] = int(2.5 * -(-n // values["step_examples"]))
    return StepPlan(**values)


def _read(batches: StepBatches, start: int = 0, workers: int = 0) -> list[list[dict]]:
    return list(step_loader(batches, start, workers))


def _assert_same(a: list[list[dict]], b: list[list[dict]]) -> None:
    assert len(a) == len(b)
    for step_a, step_b in zip(a, b):
        assert len(step_a) == len(step_b)
        for x, y in zip(step_a, step_b):
            assert x.keys() == y.keys()
            for key in x:
                if isinstance(x[key], torch.Tensor):
                    assert torch.equal(x[key], y[key]), key
                else:
                    assert x[key] == y[key], key


# ----------------------------------------------------------------------------------------------
# The epoch order
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ORDERS)
def test_each_epoch_is_a_permutation_fixed_by_seed_and_epoch(store_path, order):
    examples = _examples(store_path)
    n = len(examples)

    def fresh(seed):
        return StepBatches(examples, _plan(n, order=order, seed=seed), PAD, True)

    orders = {(seed, epoch): fresh(seed).epoch_order(epoch).copy() for seed in (3, 4) for epoch in (0, 1, 2)}
    for got in orders.values():
        np.testing.assert_array_equal(np.sort(got), np.arange(n))
    # One loader asked for the epochs in another order gives what fresh loaders gave for each.
    walked = fresh(3)
    for epoch in (2, 0, 1, 2):
        np.testing.assert_array_equal(walked.epoch_order(epoch), orders[(3, epoch)])
    distinct = {tuple(o) for o in orders.values()}
    assert len(distinct) == (1 if order == "sequential" else len(orders))
    if order == "sequential":
        np.testing.assert_array_equal(orders[(3, 0)], np.arange(n))


def test_local_order_keeps_blocks_together_and_is_random_for_small_stores(store_path):
    blocks = open_store(store_path).read_blocks()
    n, window = len(blocks), 4
    assert blocks[-1] + 1 > 50  # the fixture has many blocks
    order = local_permutation(blocks, seed=0, epoch=0, window=window)
    np.testing.assert_array_equal(np.sort(order), np.arange(n))
    block_at = blocks[order]  # the block of the example read at each place
    for b in np.unique(blocks):
        places = np.flatnonzero(block_at == b)
        # Between a block's first and last example only its window's blocks are read.
        assert len(np.unique(block_at[places[0]: places[-1] + 1])) <= window
    # Not a walk through the store: the first examples read are not from its first blocks.
    assert block_at[:20].max() >= window
    # At most `window` blocks in all: the whole epoch is one window, which is exactly the random order.
    few = np.repeat(np.arange(3), 10)
    np.testing.assert_array_equal(local_permutation(few, 5, 2, window=3), epoch_permutation(30, 5, 2))
    np.testing.assert_array_equal(epoch_order(30, 5, 2, "local", blocks=None), epoch_permutation(30, 5, 2))
    with pytest.raises(ValueError, match="unknown order"):
        epoch_order(30, 5, 2, "shuffled", blocks=few)


def test_group_by_length_keeps_the_epoch_and_sorts_within_steps(store_path):
    examples = _examples(store_path)
    lengths = examples.lengths()
    n, step = len(examples), 24
    base = epoch_permutation(n, 0, 0)
    grouped = group_by_length(base, lengths, step, seed=0, epoch=0, group_steps=4)
    np.testing.assert_array_equal(np.sort(grouped), np.arange(n))
    for lo in range(0, n, step):  # every step's examples come longest first
        assert np.all(np.diff(lengths[grouped[lo: lo + step]]) <= 0)
    # Each group of 4 steps holds the same examples as before, only regrouped.
    for lo in range(0, n, 4 * step):
        assert set(grouped[lo: lo + 4 * step]) == set(base[lo: lo + 4 * step])

    def padding(plan):
        batches = StepBatches(examples, plan, PAD, True)
        return sum(b["input_ids"].numel() - b["n_tokens"] for s in range(plan.steps_per_epoch) for b in batches[s])

    assert padding(_plan(n, group_by_length=True)) < 0.5 * padding(_plan(n))


# ----------------------------------------------------------------------------------------------
# The batches: workers, resume, processes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [dict(order="local", group_by_length=True), dict(order="random")])
def test_same_batches_with_0_and_2_workers_and_after_resume(store_path, kw):
    examples = _examples(store_path)
    plan = _plan(len(examples), total_steps=-(-len(examples) // 24) + 8, **kw)  # into the second epoch
    batches = StepBatches(examples, plan, PAD, True)
    plain = _read(batches)
    assert len(plain) == plan.total_steps > plan.steps_per_epoch
    _assert_same(_read(batches, workers=2), plain)
    # Resumed in the middle of the second epoch, with workers: the steps an uninterrupted run reads from there.
    start = plan.steps_per_epoch + 3
    _assert_same(_read(StepBatches(_examples(store_path), plan, PAD, True), start, workers=2), plain[start:])
    # A worker started by `spawn` (macOS) gets the dataset pickled: the same batches.
    _assert_same([pickle.loads(pickle.dumps(batches))[s] for s in range(start, start + 3)], plain[start: start + 3])


def test_processes_share_each_step_without_overlap(store_path):
    examples = _examples(store_path)
    plan = _plan(len(examples))
    one = StepBatches(examples, plan, PAD, True)
    two = [StepBatches(examples, plan, PAD, True, process_index=p, world=2) for p in (0, 1)]
    for step in (0, 5, plan.steps_per_epoch - 1, plan.steps_per_epoch + 2):
        shares = [b.step_indices(step) for b in two]
        assert not set(shares[0]) & set(shares[1])
        assert sorted(np.concatenate(shares)) == sorted(one.step_indices(step))
        for batches, share in zip(two, shares):  # each process's share, in micro-batches of at most batch_size
            sizes = [len(b["first_row"]) for b in batches[step]]
            assert sum(sizes) == len(share) and max(sizes) <= plan.batch_size


def test_local_order_decodes_each_chunk_about_once(store_path):
    store = open_store(store_path)
    n_chunks = sum(-(-store.group[name].shape[0] // store.group[name].chunks[0])
                   for name in ("input_ids", "target_positions", "topk_ids", "topk_logprobs"))
    decodes = {}
    for order in ("local", "random"):
        examples = _examples(store_path)
        plan = _plan(len(examples), order=order, step_examples=8, batch_size=8)
        batches = StepBatches(examples, plan, PAD, True)
        for step in range(plan.steps_per_epoch):  # one epoch
            batches[step]
        decodes[order] = examples.store.chunk_decodes
    # Local: each chunk once for its own block, and at most once more for the last sequence of the block
    # before it, which spills into it from another window (about 1 sequence in 10 here, 1 in 128 for the
    # 128-target sequences of benchmarks/bench_loader.py).
    assert decodes["local"] <= 2 * n_chunks, (decodes, n_chunks)
    # Random: about two chunks (ids, log-probs) per sequence; the chunk LRU holds 16 of ~110.
    assert decodes["random"] >= 1.5 * len(store), decodes
    assert decodes["random"] >= 4 * decodes["local"], decodes


# ----------------------------------------------------------------------------------------------
# The teacher distribution, per batch
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("targets", [
    TeacherTargets({}),
    TeacherTargets({"form": "prob", "value": 0.4}),
    TeacherTargets({"form": "logit", "value": 1.7}, other_bucket=False),
    TeacherTargets({}, norm="linear", eps=1e-3),
    TeacherTargets({"form": "prob", "value": 0.7}, smoothing=0.1),
], ids=["raw", "prob", "logit-no-bucket", "linear", "smoothed"])
def test_per_batch_teacher_targets_equal_the_per_example_ones(store_path, targets):
    examples = _examples(store_path, targets)
    plan = _plan(len(examples))
    batches = StepBatches(examples, plan, PAD, True)
    store = open_store(store_path)
    for step in (0, 7):
        for batch, idx in zip(batches[step], np.split(batches.step_indices(step), [8, 16])):
            # The old reader: each example's own distribution from the store's record, concatenated.
            per_example = torch.cat([targets(torch.from_numpy(store.get(int(i), temperature=False)["topk_logprobs"]))
                                     for i in idx])
            torch.testing.assert_close(batch["teacher_probs"], per_example, rtol=0, atol=1e-7)
            ids = np.concatenate([store.get(int(i))["topk_ids"] for i in idx])
            np.testing.assert_array_equal(batch["teacher_ids"].numpy(), ids)
            assert batch["teacher_probs"].shape[1] == 5 + targets.other_bucket
            torch.testing.assert_close(batch["teacher_probs"].sum(1), torch.ones(len(ids)), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# distill: workers, resume, options
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def student_world(tmp_path_factory, tiny_tokenizer):
    from first_kd.tiny import build_llama

    root = tmp_path_factory.mktemp("loader_distill")
    store = synthetic_store(root / "train.zarr", 160, targets_per_sequence=4, prompt_tokens=3, chunk_positions=32,
                            varied=True, seed=2, tokenizer=tiny_tokenizer)
    student = build_llama(root / "student", tiny_tokenizer, hidden_size=32, num_layers=1, seed=0)
    return {"store": store, "student": student}


def _distill(w, out, **kw) -> DistillConfig:
    values = dict(student=str(w["student"]), out=str(out), loss="kd", store=str(w["store"]), max_steps=8,
                  batch_size=4, grad_accum=2, lr=3e-3, warmup=0, log_every=1, save_every=2, seed=0, order="local",
                  order_window=2, group_by_length=True, num_workers=0)
    values.update(kw)
    return DistillConfig(**values)


def _final(out):
    from safetensors.torch import load_file

    weights = load_file(str(out / "model" / "model.safetensors"))
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return weights, losses


@pytest.mark.slow
def test_distill_with_workers_and_after_resume_equals_a_plain_run(student_world, tmp_path, monkeypatch):
    assert run_distill(_distill(student_world, tmp_path / "plain")) == 0
    assert run_distill(_distill(student_world, tmp_path / "workers", num_workers=2)) == 0
    want_w, want_l = _final(tmp_path / "plain")
    got_w, got_l = _final(tmp_path / "workers")
    assert got_l == want_l and all(torch.equal(got_w[k], want_w[k]) for k in want_w)

    # Stopped by an error in step 6 (two micro-batches a step: loss call 11), resumed from step 4's
    # checkpoint with another --num-workers (which a resumed run may change).
    real_loss, calls = training_mod.chunked_distillation_loss, {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 11:
            raise RuntimeError("interrupted")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(training_mod, "chunked_distillation_loss", failing)
    with pytest.raises(RuntimeError, match="interrupted"):
        run_distill(_distill(student_world, tmp_path / "resumed", num_workers=2))
    monkeypatch.setattr(training_mod, "chunked_distillation_loss", real_loss)
    assert [p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()] == ["step-00000004"]
    assert run_distill(_distill(student_world, tmp_path / "resumed", num_workers=1)) == 0
    got_w, got_l = _final(tmp_path / "resumed")
    assert got_l == want_l and all(torch.equal(got_w[k], want_w[k]) for k in want_w)


def test_loader_options_are_checked_in_one_line():
    assert set(typing.get_args(typing.get_type_hints(DistillConfig)["order"])) == set(ORDERS)
    for kw, needle in [(dict(order_window=0), "--order-window"), (dict(num_workers=-1), "--num-workers")]:
        with pytest.raises(FirstKDError) as e:
            DistillConfig(student="s", out="o", loss="kd", store="x.zarr", **kw).validate()
        assert needle in str(e.value) and "\n" not in str(e.value)
