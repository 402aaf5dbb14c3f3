"""The training data loader: which examples each optimizer step reads, and reading them off the training thread.

`first-kd distill` asks for one thing per optimizer step: this process's micro-batches of that step.

    the epoch order   `epoch_order(n, seed, epoch, order, blocks, window)`, a pure function of its arguments:
                        random      a full permutation of the n examples (`epoch_permutation`);
                        local       the store's read blocks (first_kd.store.TopKStore.read_blocks) shuffled,
                                    then the examples within each window of `window` consecutive blocks of
                                    that order shuffled, so the batches of a window decode its few chunks once
                                    instead of a chunk per example. Every example still comes once per epoch;
                                    a store of at most `window` blocks (and in-memory --data) is shuffled
                                    whole, which is exactly the random order;
                        sequential  store order, every epoch.
                      `group_by_length` then sorts each group of LENGTH_GROUP_STEPS steps' examples by length
                      and shuffles whole steps within the group, so micro-batches pad little.
    a step's examples `StepPlan` + `StepBatches.step_indices(step)`: the step's slice of its epoch's order, and
                      of that this process's share (every world-th example), as the loop always cut it.
    the batches       `StepBatches`, a map-style Dataset: item s is the list of this process's collated
                      micro-batches of step s, the teacher distribution (temperature applied) computed once
                      per micro-batch (first_kd.batching.collate with the examples' `targets`).
    the loader        `step_loader`: torch.utils.data.DataLoader(batch_size=None, sampler=range(start, total))
                      with worker processes, pinned memory on a GPU and its own seed generator (the global
                      torch RNG, saved in checkpoints, is never drawn from).

Item s depends on (examples, plan, s, process) alone, so a resumed run starts the sampler at its step and
reads exactly the batches an uninterrupted run reads from there, and the number of workers (each computes
the same epoch orders) never changes a batch.

Examples are what first_kd.training provides (StoreExamples, DataExamples): `len`, `example(i, epoch)` (example
i as read in that epoch: a --trace-spec target is drawn again every epoch; collections without it are read with
`[i]`), `targets` (the teacher distribution's callable, or None), `lengths()` and `read_blocks()` (None: in
memory, no blocks).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np
import torch

from first_kd.batching import collate

ORDERS = ("local", "random", "sequential")
DEFAULT_WINDOW = 8  # blocks per window of the local order
LENGTH_GROUP_STEPS = 16  # optimizer steps whose examples --group-by-length sorts together


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The random order of n examples in `epoch`: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def local_permutation(blocks: np.ndarray, seed: int, epoch: int, window: int = DEFAULT_WINDOW) -> np.ndarray:
    """The local order of `epoch`: blocks shuffled, then the examples within each window of `window` blocks
    of that order shuffled. `blocks` [n] is each example's read block. A pure function of its arguments;
    with `window` or fewer blocks in all it is `epoch_permutation(n, seed, epoch)`."""
    blocks = np.asarray(blocks)
    n = len(blocks)
    unique, block_of = np.unique(blocks, return_inverse=True)
    if len(unique) <= window:
        return epoch_permutation(n, seed, epoch)
    rng = np.random.default_rng([seed, epoch])
    place = np.empty(len(unique), dtype=np.int64)
    place[rng.permutation(len(unique))] = np.arange(len(unique))  # where each block comes in the epoch
    window_of = place[block_of.reshape(-1)] // window
    # Sorted by window, and within a window by a random permutation: a uniform shuffle of the window's examples.
    return np.lexsort((rng.permutation(n), window_of))


def epoch_order(n: int, seed: int, epoch: int, order: str = "local", blocks: Optional[np.ndarray] = None,
                window: int = DEFAULT_WINDOW) -> np.ndarray:
    """The examples of `epoch` in the order they are read (see the module docstring): int64 [n]."""
    if order == "sequential":
        return np.arange(n)
    if order == "random" or blocks is None:
        return epoch_permutation(n, seed, epoch)
    if order == "local":
        return local_permutation(blocks, seed, epoch, window)
    raise ValueError(f"unknown order {order!r}: use one of {ORDERS}")


def group_by_length(order: np.ndarray, lengths: np.ndarray, step_examples: int, seed: int, epoch: int,
                    group_steps: int = LENGTH_GROUP_STEPS) -> np.ndarray:
    """`order` with each group of `group_steps` steps' examples sorted by length, longest first, and the
    group's whole steps then shuffled (seeded by (seed, epoch)), so a step's micro-batches hold similar
    lengths and long and short steps still alternate. Step boundaries are unchanged; a last, partial step
    of the epoch stays last."""
    out = np.array(order, copy=True)
    rng = np.random.default_rng([seed, epoch, 1])
    size = step_examples * group_steps
    for lo in range(0, len(out), size):
        part = out[lo: lo + size]
        part = part[np.argsort(-lengths[part], kind="stable")]
        full = len(part) // step_examples
        steps = part[: full * step_examples].reshape(full, step_examples)[rng.permutation(full)]
        out[lo: lo + len(part)] = np.concatenate([steps.reshape(-1), part[full * step_examples:]])
    return out


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """What fixes the examples of every optimizer step (not the number of processes reading them, nor workers)."""

    n_examples: int
    seed: int
    step_examples: int  # sequences per optimizer step, all processes: batch_size x grad_accum x world
    batch_size: int  # sequences per micro-batch
    total_steps: int
    order: str = "local"
    window: int = DEFAULT_WINDOW
    group_by_length: bool = False

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_examples / self.step_examples)


class StepBatches(torch.utils.data.Dataset):
    """Item `step` is process `process_index`'s micro-batches of that optimizer step (collated dicts, see
    first_kd.batching.collate): a map-style Dataset a DataLoader reads in worker processes."""

    def __init__(self, examples, plan: StepPlan, pad_id: int, use_teacher: bool, process_index: int = 0,
                 world: int = 1):
        if plan.n_examples != len(examples):
            raise ValueError(f"the plan is for {plan.n_examples} examples, not {len(examples)}")
        self.examples, self.plan = examples, plan
        self.pad_id, self.use_teacher = pad_id, use_teacher
        self.process_index, self.world = process_index, world
        self.blocks = examples.read_blocks() if plan.order == "local" else None
        self.lengths = np.asarray(examples.lengths()) if plan.group_by_length else None
        self._cached: tuple[int, Optional[np.ndarray]] = (-1, None)
        if self.blocks is not None and hasattr(examples, "keep_chunks"):
            # A window's blocks can spill into the next chunk of each array: keep both in the LRU.
            examples.keep_chunks(2 * plan.window + 2)

    def __len__(self) -> int:
        return self.plan.total_steps

    def epoch_order(self, epoch: int) -> np.ndarray:
        """All examples of `epoch` in order (the same in every process and worker)."""
        if self._cached[0] != epoch:
            p = self.plan
            order = epoch_order(p.n_examples, p.seed, epoch, p.order, self.blocks, p.window)
            if self.lengths is not None:
                order = group_by_length(order, self.lengths, p.step_examples, p.seed, epoch)
            self._cached = (epoch, order)
        return self._cached[1]

    def step_indices(self, step: int) -> np.ndarray:
        """This process's examples of optimizer step `step`: every world-th of the step's slice of the order."""
        epoch, index = divmod(step, self.plan.steps_per_epoch)
        size = self.plan.step_examples
        return self.epoch_order(epoch)[index * size:][:size][self.process_index::self.world]

    def __getitem__(self, step: int) -> list[dict]:
        if not 0 <= step < len(self):
            raise IndexError(step)
        mine, b = self.step_indices(int(step)), self.plan.batch_size
        epoch = int(step) // self.plan.steps_per_epoch
        fetch = getattr(self.examples, "example", None)
        read = (lambda i: fetch(int(i), epoch)) if fetch is not None else (lambda i: self.examples[i])
        targets = getattr(self.examples, "targets", None)
        return [collate([read(i) for i in mine[j: j + b]], self.pad_id, self.use_teacher, targets)
                for j in range(0, len(mine), b)]


def as_is(item):
    """The DataLoader's collate_fn: StepBatches items are already batches."""
    return item


def step_loader(batches: StepBatches, start_step: int = 0, num_workers: int = 0, pin_memory: bool = False,
                prefetch_steps: int = 2) -> torch.utils.data.DataLoader:
    """A DataLoader yielding `batches[s]` for s = start_step .. len(batches) - 1, in order: read by
    `num_workers` processes (0 = on the calling thread), each keeping `prefetch_steps` steps ready; tensors
    in pinned memory when `pin_memory` (a GPU run), so the copy to the device can overlap compute."""
    workers = dict(num_workers=num_workers)
    if num_workers > 0:
        workers.update(prefetch_factor=prefetch_steps, persistent_workers=True)
    return torch.utils.data.DataLoader(
        batches, batch_size=None, sampler=range(start_step, len(batches)), collate_fn=as_is,
        pin_memory=pin_memory, generator=torch.Generator().manual_seed(0), **workers)
