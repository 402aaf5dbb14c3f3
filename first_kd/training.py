"""The building blocks of a training run on a teacher's cached top-k (or on tokens alone).

`first-kd distill` (first_kd/commands/distill.py) is the loop that puts these together; each piece here
does one job and knows nothing of options, run directories or processes:

    examples      StoreExamples (a teacher store as read, with the teacher distribution to compute per
                  batch: TeacherTargets), DataExamples (tokenized records from first_kd.data; with --trace-spec
                  a target drawn again every epoch), Prefix (the first n of either); batched by
                  first_kd.batching.collate, read in training order by first_kd.loader, which asks each
                  collection for `example(i, epoch)`; `[i]` is the fixed form (epoch 0), what validation reads
    the model     target_hidden (hidden states at the target positions only, never [B, S, V] logits),
                  TargetPositionLoss (student + chunked loss as one module), param_groups (AdamW decay)
    validation    validate: held-out loss, accuracy and calibration
    checkpoints   list_checkpoints / save_checkpoint / load_checkpoint (model, optimizer, scheduler, RNG),
                  written to a temp dir and renamed so only complete ones count; save_final_model

An example is one dict per sequence: input_ids int64 [L], target_positions int64 [n] (logits at t predict
input_ids[t+1]), for store examples topk_ids int64 [n, k] + topk_logprobs float32 [n, k] as cached (the
collection's `targets` turns a batch's log-probs into teacher_probs [N, k or k+1] in one call), and
answer_index / n_choices for multiple-choice data (-1 / 0 otherwise).
"""

from __future__ import annotations

import dataclasses
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from first_kd.adapters import is_peft, trainable_state
from first_kd.batching import collate
from first_kd.errors import FirstKDError
from first_kd.losses import (IGNORE_INDEX, LOGIT_NORM, StudentNorm, chunked_distillation_loss, chunked_sampled_kd_loss,
                             distillation_loss, sampled_kd_loss)
from first_kd.metrics import MODEL_SUMMARY_KEYS, CalibrationAccumulator
from first_kd.models import last_hidden_states
from first_kd.outputs import fsync_dir
from first_kd.scoring import options_from_logits
from first_kd.temperature import teacher_target

CHECKPOINT_PREFIX = "step-"  # checkpoints/step-00000042/
TMP_PREFIX = ".tmp-"  # checkpoints/.tmp-step-00000042/: a save in progress (or killed), never a checkpoint


# ----------------------------------------------------------------------------------------------
# Examples
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TeacherTargets:
    """How a store's cached top-k log-probs become the distribution the student learns
    (first_kd.temperature.teacher_target): the temperature record ({} = none), the other bucket, the
    teacher-side normalisation and the "Distill w/ LS" smoothing."""

    temperature: dict
    other_bucket: bool = True
    norm: str = "auto"
    eps: float = 1e-6
    smoothing: float = 0.0

    def __call__(self, topk_logprobs: torch.Tensor) -> torch.Tensor:
        """[n, k] log-probs -> [n, k] (or [n, k+1] with the bucket) fp32 probabilities."""
        return teacher_target(topk_logprobs, self.temperature, self.other_bucket, self.norm, self.eps,
                              self.smoothing)


class StoreExamples:
    """A teacher store as training examples. An example holds the cached top-k log-probs; `targets` makes
    them the teacher distribution, once per batch (first_kd.batching.collate), not once per example: a
    softmax over a handful of rows costs its call overhead, times the examples of a run."""

    def __init__(self, store, targets: TeacherTargets):
        self.store = store
        self.targets = targets

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> dict:
        rec = self.store.read(int(i))
        example = {
            "input_ids": rec["input_ids"],
            "target_positions": rec["target_positions"],
            "topk_ids": rec["topk_ids"],
            "topk_logprobs": rec["topk_logprobs"],
            "answer_index": int(rec.get("answer_index", -1)),
            "n_choices": int(rec.get("n_choices", 0)),
        }
        if "sample_counts" in rec:  # a sampled store: its loss is built by `sampled_terms`
            example["sample_counts"] = rec["sample_counts"]
        return example

    def example(self, i: int, epoch: int) -> dict:
        """Example i as read in `epoch`: a store's sequences are fixed, so `self[i]`."""
        return self[i]

    def lengths(self) -> np.ndarray:
        """Tokens of every example."""
        return self.store.sequence_lengths()

    def read_blocks(self) -> np.ndarray:
        """The store's read block of every example (first_kd.store.TopKStore.read_blocks)."""
        return self.store.read_blocks()

    def keep_chunks(self, n: int) -> None:
        """Let the store keep at least n decoded chunks per array (what an order reading n at a time needs)."""
        self.store.set_chunk_cache(max(16, n))


class DataExamples:
    """Tokenized records from first_kd.data: the targets are input_ids[target_start:].

    With `trace` (first_kd.data.TraceTargets, --trace-spec; the dataset then holds each record's epoch-0 draw
    and its response as written), `example(i, epoch)` draws the target of that epoch again: the prompt ids are
    the dataset's, the target a pure function of (trace seed, epoch, record id), so a resumed run, a DataLoader
    worker or another process gets the same one. `[i]` is the dataset row as it is (the epoch-0 draw)."""

    targets = None  # no teacher

    def __init__(self, dataset, trace=None):
        self.dataset, self.trace = dataset, trace

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        return self._example(self.dataset[int(i)], None)

    def example(self, i: int, epoch: int) -> dict:
        """Example i as trained on in `epoch`: with a trace spec, its target drawn for that epoch; else `self[i]`."""
        row = self.dataset[int(i)]
        if self.trace is None:
            return self._example(row, None)
        start = int(row["target_start"])
        return self._example(row, self.trace.input_ids(row["input_ids"][:start], row["id"], row["response"], epoch))

    def _example(self, row: dict, input_ids) -> dict:
        ids = np.asarray(row["input_ids"] if input_ids is None else input_ids, dtype=np.int64)
        return {
            "input_ids": ids,
            "target_positions": np.arange(int(row["target_start"]) - 1, len(ids) - 1, dtype=np.int64),
            "topk_ids": None,
            "teacher_probs": None,
            "answer_index": int(row.get("answer_index", -1)),
            "n_choices": int(row.get("n_choices", 0)),
        }

    def lengths(self) -> np.ndarray:
        """Tokens of every example (from the Arrow column, no Python lists; with a trace spec, of the epoch-0
        draw, so --group-by-length groups by the same lengths every epoch)."""
        import pyarrow.compute as pc

        column = self.dataset.select_columns(["input_ids"]).with_format("arrow")[:]["input_ids"]
        return pc.list_value_length(column).to_numpy().astype(np.int64)

    def read_blocks(self) -> None:
        """None: the records are in memory, so there is no read order to keep local."""
        return None


class Prefix:
    """The first n examples of a collection (all of them when it holds fewer)."""

    def __init__(self, examples, n: int):
        self.examples, self.n = examples, min(n, len(examples))
        self.targets = getattr(examples, "targets", None)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.examples[i]

    def example(self, i: int, epoch: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.examples.example(i, epoch)


# ----------------------------------------------------------------------------------------------
# The model: hidden states at target positions only, loss against the output head
# ----------------------------------------------------------------------------------------------


def target_hidden(model, batch: dict) -> torch.Tensor:
    """Last hidden states at the batch's target positions: [N, H]. Never builds [B, S, V] logits."""
    hidden = last_hidden_states(model, batch["input_ids"], batch["attention_mask"])
    return hidden.flatten(0, 1).index_select(0, batch["rows"])


def sampled_terms(batch: dict, rows: slice = slice(None)) -> dict:
    """The sampled-loss arguments of a batch from a sampled store (rows `rows`): the teacher's own draws at
    temperature 1 are both the target and the proposal, so every importance weight is exactly 1 and the loss
    is the count-weighted CE minus the draws' estimate of the teacher's entropy (first_kd.losses.sampled_kd_loss).
    Padding columns (count 0) get log-prob 0 instead of -inf, which they never use."""
    counts = batch["teacher_counts"][rows]
    logprobs = batch["teacher_logprobs"][rows].masked_fill(counts == 0, 0.0)
    return {"sample_ids": batch["teacher_ids"][rows], "sample_counts": counts, "target_logprobs": logprobs,
            "proposal_logprobs": logprobs, "mask": batch["targets"][rows] != IGNORE_INDEX}


class TargetPositionLoss(torch.nn.Module):
    """The student plus its loss as one module, so DDP and accelerate's autocast wrap the whole
    forward (body, gather and loss) rather than only the causal LM's own forward, which we bypass."""

    def __init__(self, model, alpha: float, other_bucket: bool, label_smoothing: float, chunk_size: int,
                 student_norm: StudentNorm = LOGIT_NORM):
        super().__init__()
        self.model = model
        self.alpha, self.other_bucket = alpha, other_bucket
        self.label_smoothing, self.chunk_size = label_smoothing, chunk_size
        self.student_norm = student_norm

    def forward(self, batch: dict) -> torch.Tensor:
        """Summed (not averaged) loss over the batch's target positions: a scalar."""
        hidden = target_hidden(self.model, batch)
        head = self.model.get_output_embeddings()
        if batch.get("teacher_counts") is not None:  # a sampled store: the unbiased RS-KD loss, CE mixed in
            loss = chunked_sampled_kd_loss(hidden, head.weight, **sampled_terms(batch), chunk_size=self.chunk_size,
                                           reduction="sum", head_bias=getattr(head, "bias", None))
            if self.alpha == 0.0:
                return loss
            ce = chunked_distillation_loss(hidden, head.weight, batch["targets"], label_smoothing=self.label_smoothing,
                                           chunk_size=self.chunk_size, reduction="sum",
                                           head_bias=getattr(head, "bias", None))
            return (1.0 - self.alpha) * loss + self.alpha * ce
        return chunked_distillation_loss(
            hidden, head.weight, batch["targets"],
            teacher_ids=batch["teacher_ids"], teacher_probs=batch["teacher_probs"],
            alpha=self.alpha, other_bucket=self.other_bucket, label_smoothing=self.label_smoothing,
            chunk_size=self.chunk_size, reduction="sum", head_bias=getattr(head, "bias", None),
            student_norm=self.student_norm,
        )


def to_device(batch: dict, device) -> dict:
    """A collated batch with its tensors on `device` (other values as they are)."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def param_groups(model, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: decay matrices (embeddings, projections) only; decaying norm gains and
    biases only hurts (nanoGPT)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def validate(model, examples, pad_id: int, *, batch_size: int, chunk_size: int, alpha: float, other_bucket: bool,
             label_smoothing: float, use_teacher: bool, choice_token_ids: list[int], device,
             student_norm: StudentNorm = LOGIT_NORM) -> dict:
    """Loss, accuracy and calibration on held-out examples: {"val_loss", "val_ce", "val_KEY" for each of
    metrics.MODEL_SUMMARY_KEYS, "val_level"}.

    val_loss is the training objective (alpha, other_bucket, label_smoothing) when the held-out set has
    the teacher (a store), else CE; val_ce is always the CE of the target tokens. Multiple-choice data
    (choice_token_ids given): accuracy / ECE at the answer position with the probabilities renormalised
    over the option letters of each item (val_level "answer"). Otherwise token-level: top-1 over the whole
    vocabulary at every target position (val_level "token").
    """
    was_training = model.training
    model.eval()
    head = model.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    acc = CalibrationAccumulator()
    mcqa = bool(choice_token_ids)
    choice_ids = torch.tensor(choice_token_ids, dtype=torch.long, device=device) if mcqa else None
    loss_sum = ce_sum = 0.0
    n_rows = 0
    for start in range(0, len(examples), batch_size):
        batch = collate([examples[i] for i in range(start, min(start + batch_size, len(examples)))],
                        pad_id, use_teacher, getattr(examples, "targets", None))
        batch = to_device(batch, device)
        hidden = target_hidden(model, batch)  # [N, H]
        for lo in range(0, hidden.shape[0], chunk_size):
            sl = slice(lo, lo + chunk_size)
            logits = torch.nn.functional.linear(hidden[sl], weight, bias).float()  # [c, V]
            targets = batch["targets"][sl]
            if use_teacher and batch.get("teacher_counts") is not None:  # a sampled store: the RS-KD estimate
                loss_sum += (1.0 - alpha) * float(sampled_kd_loss(logits, **sampled_terms(batch, sl), reduction="sum"))
                loss_sum += alpha * float(distillation_loss(logits, targets, label_smoothing=label_smoothing,
                                                            reduction="sum")) if alpha else 0.0
            else:
                loss_sum += float(distillation_loss(
                    logits, targets,
                    teacher_ids=batch["teacher_ids"][sl] if use_teacher else None,
                    teacher_probs=batch["teacher_probs"][sl] if use_teacher else None,
                    alpha=alpha, other_bucket=other_bucket, label_smoothing=label_smoothing, reduction="sum",
                    student_norm=student_norm))
            ce_sum += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            if not mcqa:
                probs = torch.softmax(logits, dim=-1)
                conf, pred = probs.max(dim=-1)
                acc.update_confidence(conf.cpu().numpy(), (pred == targets).cpu().numpy(),
                                      probs.gather(1, targets[:, None])[:, 0].cpu().numpy())
        n_rows += hidden.shape[0]
        if mcqa:
            answer_hidden = hidden.index_select(0, batch["first_row"])  # [B, H]
            logits = torch.nn.functional.linear(answer_hidden, weight[choice_ids],
                                                None if bias is None else bias[choice_ids]).float()  # [B, C]
            probs = options_from_logits(logits, batch["n_choices"].clamp(min=1, max=len(choice_token_ids)))
            acc.update(probs.cpu().numpy(), batch["answer_index"].cpu().numpy())
    if was_training:
        model.train()
    summary = acc.compute()
    result = {"val_loss": loss_sum / max(n_rows, 1), "val_ce": ce_sum / max(n_rows, 1)}
    for key in MODEL_SUMMARY_KEYS:
        if key in summary:
            result[f"val_{key}"] = summary[key]
    result["val_level"] = "answer" if mcqa else "token"
    return result


# ----------------------------------------------------------------------------------------------
# Checkpoints and the final model
# ----------------------------------------------------------------------------------------------


def checkpoint_dir(out: Path, step: int) -> Path:
    """Where step `step`'s checkpoint of the run in `out` lives (once complete)."""
    return out / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:08d}"


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a temp dir of an interrupted save is never one of them)."""
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and (p / "trainer_state.pt").is_file() and (p / "model.safetensors").is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def clear_interrupted_saves(out: Path) -> None:
    """Remove the temp dirs of checkpoint saves a kill interrupted."""
    root = out / "checkpoints"
    for stale in root.glob(f"{TMP_PREFIX}*") if root.is_dir() else []:
        shutil.rmtree(stale, ignore_errors=True)


def save_checkpoint(out: Path, step: int, model, optimizer, scheduler) -> Path:
    """Write step N's checkpoint atomically: fill a temp dir, fsync, rename, then drop older ones."""
    from safetensors.torch import save_file, save_model

    final = checkpoint_dir(out, step)
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{TMP_PREFIX}{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if is_peft(model):  # a LoRA student: the adapters are all that trains (the base is read from --student)
            save_file({name: t.contiguous() for name, t in trainable_state(model).items()},
                      str(tmp / "model.safetensors"))
        else:
            save_model(model, str(tmp / "model.safetensors"))  # handles tied weights (shared tensors)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": _rng_state()}, tmp / "trainer_state.pt")
        for f in tmp.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)  # give the space back; the previous checkpoint stays
        raise _write_failed(tmp, e) from None
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    fsync_dir(root)
    for old in list_checkpoints(out):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model, optimizer, scheduler) -> int:
    """Restore model, optimizer, scheduler and RNG from a checkpoint; return its step."""
    from safetensors.torch import load_file, load_model

    try:
        if is_peft(model):
            saved = load_file(str(path / "model.safetensors"))
            missing = set(trainable_state(model)) - set(saved)
            if missing:
                raise ValueError(f"{len(missing)} adapter tensor(s) missing, e.g. {sorted(missing)[0]}")
            model.load_state_dict(saved, strict=False)
        else:
            load_model(model, str(path / "model.safetensors"))
        # Our own file (optimizer state and RNG tuples are not plain tensors), so a full unpickle.
        state = torch.load(path / "trainer_state.pt", map_location="cpu", weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except Exception as e:
        raise FirstKDError(f"checkpoint {path} cannot be loaded ({type(e).__name__}: {e}); delete it to resume "
                           "from an older one, or start over with --overwrite") from None
    _set_rng_state(state["rng"])
    return int(state["step"])


def save_final_model(out: Path, model, tokenizer, name: str = "model") -> Path:
    """save_pretrained into out/.NAME.tmp, then swap it in as out/NAME, so it is never half written (a
    LoRA student's save_pretrained writes its adapters only: NAME is then "adapter")."""
    tmp, final = out / f".{name}.tmp", out / name
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _write_failed(tmp, e) from None
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_failed(path: Path, error: Exception) -> Exception:
    """The error to raise when writing `path` failed. torch and safetensors report a full disk as a
    RuntimeError / SafetensorError, not an OSError: both become one line naming the file."""
    if isinstance(error, OSError):
        return error
    reason = (str(error).strip().splitlines() or [type(error).__name__])[-1][:200]
    return FirstKDError(f"could not write {path} ({reason}): free disk space or make the directory writable, then "
                        "re-run the same command (complete checkpoints and finished outputs were left as they were)")
