"""`first-kd distill`: train a student on a teacher's cached top-k (FIRST / KD) or on tokens alone (CE).

One straight training loop, nanoGPT style:

    examples (store records or tokenized data) -> deterministic per-epoch order -> optimizer steps
    each step: batch_size x grad_accum sequences, right-padded, body forward -> hidden states gathered
    at the target positions only -> chunked loss against the head weight -> backward -> clip -> AdamW

The loop is `_train` below; its building blocks (examples, the target-position loss, validation,
checkpoints) are first_kd.training, batching is first_kd.batching.collate, and the data loader (the epoch
order, each step's batches read by DataLoader workers, the teacher distribution computed per batch) is
first_kd.loader.

Losses (`--loss`):
  * first: forward KL to the teacher's top-k distribution *after the store's recorded temperature*
    (`first-kd calibrate` writes it). A store with no temperature record makes `first` equal to `kd`:
    we warn and proceed, so a pipeline without calibration still runs end to end.
  * kd:    the same KL against the raw (renormalised) top-k, no temperature.
  * ce:    cross-entropy on the target tokens, from `--data` (tokenized with the student's tokenizer) or
           from `--store` (its stored tokens). The same command fine-tunes a teacher.
  `--alpha` mixes CE into the KL losses: (1 - alpha) * KL + alpha * CE.

The loss is a mean over all target positions of the *accumulated* batch: every micro-batch's summed
loss is divided by the target count of the whole optimizer step, so batch b x grad_accum 2 takes the
same step as one batch of 2b (up to float rounding), and long sequences weigh more than short ones.

Trace dropping per epoch (`--trace-spec`, with --data and --loss ce): each example's Dualformer level, and the
random parts of its operations, are drawn again every epoch as a pure function of (--trace-seed, epoch, record
id), and its target is tokenized when it is read (first_kd.data.TraceTargets, first_kd.training.DataExamples);
held-out data (--val-data) keeps the epoch-0 draw, so validation losses compare across epochs. A store holds
fixed token sequences, so `--trace-spec` with a store is refused (cache fixed variants with --trace-levels).

Output directory:
    OUT/config.yaml           the run's options (a re-run with different options is refused); with --trace-spec
                              also `trace_spec_record` (the spec's name, file sha256, levels and probabilities), so
                              a resume with an edited spec file is refused too
    OUT/metrics.jsonl         one JSON line per logged step (step, loss, lr, tokens_per_s, val_* ...)
    OUT/checkpoints/step-N/   model.safetensors + trainer_state.pt (optimizer, scheduler, RNG, step);
                              written to a temp dir and renamed, only the newest complete one is kept
    OUT/model/                the trained model (safetensors) + tokenizer, for from_pretrained
    OUT/summary.json          written last: its presence means the run finished
    OUT/tensorboard/          when the tensorboard package is installed

Resume: re-running the same command after a crash (even kill -9) continues from the newest checkpoint;
the data order is a pure function of (seed, epoch) (--order), so the position is just the step number, and
on CPU the result is bitwise the same as an uninterrupted run, whatever --num-workers. The same command on a finished run is a
no-op (exit 0); other options are refused (one line naming them), and so is a finished `first` run whose
store has been calibrated again since.

--overwrite never destroys a run before its replacement exists: the new run is trained in a directory
beside OUT (`.staging-NAME`) and its files replace the old run's (other files in OUT are left alone) only
once it has finished. Until then a failure of any kind (a student or store that does not load, a full
disk, a diverging loss, a kill) leaves the old run, finished or not, as it was; the partial new run is
removed (after a kill, by the next --overwrite). A failed write (full disk, read-only directory) is one
line naming the file; complete checkpoints are kept, so the same command resumes once it is fixed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
import yaml

from first_kd.adapters import LoraOptions
from first_kd.config import option, to_dict
from first_kd.data import DataConfig, trace_spec_of
from first_kd.data.trace_spec import spec_record
from first_kd.errors import FirstKDError
from first_kd.files import clean_json, write_json_atomic
from first_kd.loader import StepBatches, StepPlan, step_loader
from first_kd.losses import StudentNorm
from first_kd.models import ModelOptions
from first_kd.outputs import (STAGING_PREFIX, clear_stale, crash_point, fsync_dir, say_done, settings_diff,
                              writable_parent)
from first_kd.temperature import describe
from first_kd.training import (DataExamples, Prefix, StoreExamples, TargetPositionLoss, TeacherTargets, checkpoint_dir,
                               clear_interrupted_saves, list_checkpoints, load_checkpoint,
                               param_groups, save_checkpoint, save_final_model, to_device, validate)

# Options that change how a run is observed or saved, not what it computes: a resumed run may change them.
RESUME_FREE_OPTIONS = ("overwrite", "save_every", "log_every", "eval_every", "keep_checkpoints", "num_workers")

# What a run writes into OUT, summary.json (the mark of a finished run) last: --overwrite replaces these only.
RUN_ENTRIES = (".model.tmp", ".adapter.tmp", "config.yaml", "metrics.jsonl", "checkpoints", "tensorboard", "adapter",
               "model", "summary.json")


@dataclass(kw_only=True)
class DistillConfig(ModelOptions, LoraOptions, DataConfig):
    student: str = option(help="student model: a local directory or a hub id (AutoModelForCausalLM)")
    out: str = option(help="run directory: model/, checkpoints/, metrics.jsonl, config.yaml")
    loss: Literal["first", "kd", "ce"] = option(
        "first", help="first: KL to the temperature-calibrated teacher top-k; kd: KL without temperature; "
                      "ce: plain fine-tuning on the target tokens")
    store: Optional[str] = option(None, help="teacher top-k store from `first-kd cache` (needed by first/kd; "
                                             "ce trains on its tokens when --data is not given)")
    alpha: float = option(0.0, help="weight of CE mixed into the KL losses: (1 - alpha) * KL + alpha * CE")
    other_bucket: bool = option(
        True, help="compare k+1 categories, the last the mass outside the teacher's top-k, so the student's "
                   "full-vocabulary mass on the top-k follows the teacher's; --no-other-bucket renormalises both "
                   "over the top-k, which leaves the student's mass on those ids free (see README)")
    student_norm: Literal["logit", "prob-softmax", "linear"] = option(
        "logit", help="student side of the KL: logit = softmax of its logits at the ids (with the bucket: its "
                      "full-vocabulary probabilities); prob-softmax = softmax(q / --student-temperature) of its "
                      "full-vocabulary probabilities q (the FIRST authors' --use_norm softmax); linear = "
                      "(q + eps) / sum")
    student_temperature: float = option(1.0, help="temperature of --student-norm prob-softmax")
    teacher_norm: Literal["auto", "logit", "prob-softmax", "linear"] = option(
        "auto", help="teacher side: auto = the store's calibrated temperature form (renormalised top-k without "
                     "one); logit / prob-softmax force that form; linear = (p + eps) / sum, no temperature")
    norm_eps: float = option(1e-6, help="eps of the linear normalisations")
    teacher_smoothing: float = option(0.0, help="'Distill w/ LS' baseline: move this fraction of the teacher's "
                                                "top-1 probability evenly to its other top-k ids")
    label_smoothing: float = option(0.0, help="label smoothing of the CE term")
    epochs: int = option(1, help="passes over the training examples (ignored when --max-steps > 0)")
    max_steps: int = option(0, help="optimizer steps to run; 0 = as many as --epochs take")
    batch_size: int = option(8, help="sequences per micro-batch (per device)")
    grad_accum: int = option(1, help="micro-batches accumulated per optimizer step")
    lr: float = option(2e-5, help="peak learning rate (AdamW)")
    weight_decay: float = option(0.0, help="AdamW weight decay (matrices only; norms and biases are not decayed)")
    warmup: float = option(0.03, help="warmup: a fraction of the steps when < 1, else a number of steps")
    schedule: Literal["cosine", "linear", "constant"] = option("cosine", help="learning-rate decay after warmup")
    max_grad_norm: float = option(1.0, help="clip the gradient norm to this; 0 = no clipping")
    save_every: int = option(500, help="optimizer steps between checkpoints (0 = no intermediate checkpoints)")
    eval_every: int = option(0, help="optimizer steps between validations (0 = only at the end)")
    val_store: Optional[str] = option(None, help="held-out teacher store for validation (loss, accuracy, ECE)")
    val_data: Optional[str] = option(None, help="held-out data file for validation (same data options as --data)")
    val_split: Optional[str] = option(None, help="split of --val-data when it holds several (default: --split)")
    val_limit: Optional[int] = option(None, help="validate on the first N held-out records only")
    seed: int = option(0, help="seed of the data order and of every random number generator")
    order: Literal["local", "random", "sequential"] = option(
        "local", help="data order of each epoch, a pure function of (--seed, epoch): local = the store's chunks "
                      "shuffled, then the sequences within each window of --order-window chunks, so a batch "
                      "decodes a few chunks, not one per sequence (a store of at most that many chunks, and --data, "
                      "are shuffled whole, as random); random = a full permutation; sequential = store order")
    order_window: int = option(8, help="chunks (read blocks) of the store shuffled together by --order local: "
                                       "larger mixes more, smaller reads fewer chunks at a time")
    group_by_length: bool = option(False, help="sort the sequences of every 16 steps by length and shuffle those "
                                               "steps, so a micro-batch holds similar lengths and pads less")
    num_workers: Optional[int] = option(
        None, help="DataLoader worker processes reading batches while the model trains; none = 2 on a GPU, 0 on "
                   "CPU (where workers take cores from training); never changes the batches")
    mixed_precision: Literal["auto", "no", "bf16"] = option(
        "auto", help="auto = bf16 autocast on a GPU that supports it, else fp32")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = option(
        "float32", help="dtype the student's weights are loaded and trained in; float32 + bf16 autocast is the "
                        "safe default, auto = pure bfloat16 on a GPU that supports it")
    gradient_checkpointing: bool = option(False, help="recompute activations in backward to save memory")
    chunk_size: int = option(1024, help="target positions per chunk of the memory-efficient loss")
    log_every: int = option(10, help="optimizer steps between lines of metrics.jsonl")
    keep_checkpoints: bool = option(False, help="keep a checkpoint of the last step (with optimizer state) "
                                                        "after finishing")
    overwrite: bool = option(False, help="discard an existing run in --out and start over")

    def validate(self) -> None:
        parent = getattr(super(), "validate", None)
        if parent is not None:
            parent()
        if not self.student:
            raise FirstKDError("give the student model: --student PATH_OR_HUB_ID")
        self.validate_lora()
        if not self.out:
            raise FirstKDError("give the run directory: --out DIR")
        if self.loss in ("first", "kd") and not self.store:
            raise FirstKDError(f"--loss {self.loss} needs --store (a teacher cache from `first-kd cache`); "
                               "for plain fine-tuning use --loss ce --data FILE")
        if self.loss == "ce" and not (self.data or self.store):
            raise FirstKDError("--loss ce needs --data FILE (or --store STORE to train on its tokens)")
        if self.val_store and self.val_data:
            raise FirstKDError("give one of --val-store and --val-data, not both")
        if self.loss in ("first", "kd") or not self.data:
            self.refuse_trace_spec(f"--loss {self.loss} here trains on --store, whose teacher top-k were cached for "
                                   "fixed token sequences", "train on --data with --loss ce, or cache fixed "
                                   "variants with `first-kd cache --trace-levels` and train on that store")
        checks = [
            (0.0 <= self.alpha <= 1.0, f"--alpha must be in [0, 1]; got {self.alpha}"),
            (0.0 <= self.label_smoothing < 1.0, f"--label-smoothing must be in [0, 1); got {self.label_smoothing}"),
            (0.0 <= self.teacher_smoothing < 1.0,
             f"--teacher-smoothing must be in [0, 1); got {self.teacher_smoothing}"),
            (self.student_temperature > 0 and math.isfinite(self.student_temperature),
             f"--student-temperature must be a finite number > 0; got {self.student_temperature}"),
            (self.norm_eps > 0 and math.isfinite(self.norm_eps), f"--norm-eps must be a finite number > 0; "
                                                                  f"got {self.norm_eps}"),
            (self.epochs >= 1 or self.max_steps > 0, f"--epochs must be >= 1; got {self.epochs}"),
            (self.max_steps >= 0, f"--max-steps must be >= 0; got {self.max_steps}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1; got {self.batch_size}"),
            (self.grad_accum >= 1, f"--grad-accum must be >= 1; got {self.grad_accum}"),
            (self.lr > 0 and math.isfinite(self.lr), f"--lr must be a finite number > 0; got {self.lr}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0; got {self.weight_decay}"),
            (self.warmup >= 0, f"--warmup must be >= 0; got {self.warmup}"),
            (self.max_grad_norm >= 0, f"--max-grad-norm must be >= 0; got {self.max_grad_norm}"),
            (self.save_every >= 0, f"--save-every must be >= 0; got {self.save_every}"),
            (self.eval_every >= 0, f"--eval-every must be >= 0; got {self.eval_every}"),
            (self.log_every >= 1, f"--log-every must be >= 1; got {self.log_every}"),
            (self.chunk_size >= 1, f"--chunk-size must be >= 1; got {self.chunk_size}"),
            (self.val_limit is None or self.val_limit >= 1, f"--val-limit must be >= 1; got {self.val_limit}"),
            (self.order_window >= 1, f"--order-window must be >= 1; got {self.order_window}"),
            (self.num_workers is None or self.num_workers >= 0,
             f"--num-workers must be >= 0 (0 = read on the training thread); got {self.num_workers}"),
        ]
        for ok, message in checks:
            if not ok:
                raise FirstKDError(message)


# ----------------------------------------------------------------------------------------------
# The command: run directory checks, then the training loop
# ----------------------------------------------------------------------------------------------


def run_distill(cfg: DistillConfig) -> int:
    """Train (or resume) the run in --out; the same command on a finished run is a no-op. With --overwrite
    on a directory holding a run, the new run is built beside it and replaces it only once finished (see
    the module docstring); a failure removes the partial new run and leaves the old one as it was."""
    out = Path(cfg.out)
    writable_parent(out)  # before the student loads: a read-only or blocked --out costs nothing
    check_run_dir(out, cfg)
    if not cfg.overwrite and (out / "summary.json").is_file():
        return _finished_already(out, cfg)
    work = staging_dir_for(out) if cfg.overwrite and holds_run(out) else out
    try:
        return _train(cfg, out, work)
    except BaseException as e:
        if work != out:
            shutil.rmtree(work, ignore_errors=True)
        if isinstance(e, OSError) and e.filename is None:  # a failed write names no file: name the run
            raise OSError(e.errno, e.strerror or str(e), str(work)) from None
        raise


def _train(cfg: DistillConfig, out: Path, work: Path) -> int:
    """The training run: everything is written into `work` (OUT itself, or the staging directory of an
    --overwrite); `out` is where the finished run ends up."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    accelerator = _accelerator(cfg.mixed_precision)
    main, device, world = accelerator.is_main_process, accelerator.device, accelerator.num_processes
    set_seed(cfg.seed)

    # --- student, examples, schedule ---------------------------------------------------------------
    model, tokenizer = load_student(cfg, device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked out anyway
    use_teacher = cfg.loss in ("first", "kd")
    train, temperature = _training_examples(cfg, tokenizer, model, use_teacher)
    val, val_teacher, val_choice_ids = _validation_examples(cfg, tokenizer, model, temperature, use_teacher)
    plan = _step_plan(cfg, len(train), world)
    steps_per_epoch, step_examples, total_steps = plan.steps_per_epoch, plan.step_examples, plan.total_steps
    loss_module, optimizer, scheduler, warmup_steps = _optimization(cfg, model, total_steps, accelerator)
    student = accelerator.unwrap_model(loss_module).model
    start_step, last_good = _start(work, out, cfg, accelerator, student, optimizer, scheduler, total_steps)
    metrics_path = work / "metrics.jsonl"
    if main:
        _say(f"{cfg.loss}: {len(train)} sequences, {steps_per_epoch} steps/epoch, {total_steps} steps of "
             f"{step_examples} sequences ({cfg.order} order), lr {cfg.lr} ({cfg.schedule}, warmup {warmup_steps}), "
             f"mixed precision {accelerator.mixed_precision}, device {device}"
             + (f", {world} processes ({accelerator.distributed_type.value})" if world > 1 else ""))
    writer = _summary_writer(work) if main else None
    params = [p for p in loss_module.parameters() if p.requires_grad]
    batches = iter(step_loader(StepBatches(train, plan, pad_id, use_teacher, accelerator.process_index, world),
                               start_step, _num_workers(cfg, device), pin_memory=torch.device(device).type == "cuda"))

    # --- the loop ----------------------------------------------------------------------------------
    bar = tqdm(total=total_steps, initial=start_step, desc=f"distill ({cfg.loss})", disable=not main,
               dynamic_ncols=True)
    window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
    last_record: dict = {}
    try:
        for step in range(start_step, total_steps):
            micro = next(batches)  # this process's micro-batches of this step (first_kd.loader)
            step_loss, grad_norm, lr = _optimizer_step(micro, accelerator, loss_module, optimizer, scheduler, params,
                                                       cfg.max_grad_norm,
                                                       (work, step, cfg.lr, last_good if work == out else None))
            done, is_last = step + 1, step + 1 == total_steps

            # A line of metrics.jsonl every --log-every steps: the mean loss and the throughput since the last.
            window_loss, window_steps = window_loss + step_loss, window_steps + 1
            window_tokens += sum(b["n_tokens"] for b in micro)
            tokens_per_s = window_tokens * world / max(time.perf_counter() - window_start, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}")
            record = {}
            if done % cfg.log_every == 0 or is_last:
                record = {"step": done, "epoch": round(done / steps_per_epoch, 4), "loss": window_loss / window_steps,
                          "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s}
                window_loss, window_steps, window_tokens = 0.0, 0, 0
            if val is not None and ((cfg.eval_every and done % cfg.eval_every == 0) or is_last):
                # On the main process only (the others wait): held-out sets are small next to training.
                metrics = _validate(cfg, student, val, val_teacher, val_choice_ids, pad_id, device) if main else {}
                record = {"step": done, "epoch": round(done / steps_per_epoch, 4), **record, **metrics}
                if main and metrics:
                    bar.write(f"step {done}: val_loss {metrics['val_loss']:.4f}, accuracy "
                              f"{metrics.get('val_accuracy', float('nan')):.4f}, ECE {metrics.get('val_ece', float('nan')):.4f}")
                accelerator.wait_for_everyone()
            if record:
                if main:
                    _log(metrics_path, writer, record)
                last_record = record

            # A checkpoint every --save-every steps. The last step is saved as OUT/model; its optimizer
            # state only when asked to keep it.
            periodic = cfg.save_every and done % cfg.save_every == 0 and not is_last
            if periodic or (is_last and cfg.keep_checkpoints):
                last_good = _checkpoint(work, done, accelerator, student, optimizer, scheduler)
            if record:  # the next window's throughput counts training only, not validation or saving
                window_start = time.perf_counter()
    finally:
        bar.close()  # also when a divergence error leaves the loop
        del batches  # its worker processes stop

    # --- output --------------------------------------------------------------------------------------
    accelerator.wait_for_everyone()
    if main:
        _finish(work, out, cfg, student, tokenizer, {"finished": True, "steps": total_steps, "loss": cfg.loss,
                "temperature": temperature, "examples": len(train), "final": last_record}, writer)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


def _step_plan(cfg: DistillConfig, n_examples: int, world: int) -> StepPlan:
    """Which examples every optimizer step reads: batch_size x grad_accum x world sequences per step."""
    step_examples = cfg.batch_size * cfg.grad_accum * world  # sequences per optimizer step, all devices
    total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * math.ceil(n_examples / step_examples)
    return StepPlan(n_examples, cfg.seed, step_examples, cfg.batch_size, total_steps, cfg.order, cfg.order_window,
                    cfg.group_by_length)


def _num_workers(cfg: DistillConfig, device) -> int:
    """--num-workers, or by default 2 on a GPU (the CPU is free to read ahead) and 0 on CPU (it trains)."""
    if cfg.num_workers is not None:
        return cfg.num_workers
    return 2 if torch.device(device).type == "cuda" else 0


def _optimizer_step(micro: list[dict], accelerator, loss_module, optimizer, scheduler, params, max_grad_norm: float,
                    where: tuple) -> tuple[float, float, float]:
    """Forward/backward over this process's micro-batches, clip, one optimizer step: (loss, grad norm, lr).
    `where` = (run dir, step, --lr, last good checkpoint) names the place in a divergence error."""
    world, device = accelerator.num_processes, accelerator.device
    # Normalise by the target count of the whole accumulated step (all processes), not per
    # micro-batch: that is what makes accumulation equal one big batch. DDP averages gradients
    # over processes, hence the factor `world`.
    n_targets = torch.tensor(sum(len(b["targets"]) for b in micro), device=device)
    total_targets = int(accelerator.reduce(n_targets, reduction="sum")) if world > 1 else int(n_targets)
    scale = world / max(total_targets, 1)

    step_loss_sum = torch.zeros((), device=device)
    for j, batch in enumerate(micro):
        batch = to_device(batch, device)
        # Gradients are all-reduced only after the last micro-batch.
        sync = accelerator.no_sync(loss_module) if j < len(micro) - 1 else contextlib.nullcontext()
        with sync:
            loss = loss_module(batch) * scale
            accelerator.backward(loss)
        step_loss_sum += loss.detach()
    # Checked before the optimizer step, so a NaN never reaches the weights (one sync per step).
    step_loss = step_loss_sum.item() / world
    if not math.isfinite(step_loss):
        raise _diverged(*where[:2], step_loss, *where[2:])
    grad_norm = float(accelerator.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf))
    if not math.isfinite(grad_norm):
        raise _diverged(*where[:2], grad_norm, *where[2:], what="gradient norm")
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if world > 1:
        step_loss = float(accelerator.reduce(torch.tensor(step_loss, device=device), reduction="sum"))
    return step_loss, grad_norm, lr


def _diverged(out: Path, step: int, value: float, lr: float, last_good: Optional[Path],
              what: str = "loss") -> FirstKDError:
    kept = (f"the last good checkpoint is {last_good} (re-running resumes from it)" if last_good is not None
            else "no checkpoint was saved yet")
    return FirstKDError(f"{what} became {value} at step {step + 1}: training stopped, {kept}; lower --lr "
                        f"(now {lr:g}) or --max-grad-norm, or check the data")


def _validate(cfg: DistillConfig, student, val, use_teacher: bool, choice_token_ids: list[int], pad_id: int,
              device) -> dict:
    """The val_* numbers of held-out examples, measured with the run's loss options."""
    return validate(student, val, pad_id, batch_size=cfg.batch_size, chunk_size=cfg.chunk_size, alpha=cfg.alpha,
                    other_bucket=cfg.other_bucket, label_smoothing=cfg.label_smoothing, use_teacher=use_teacher,
                    student_norm=student_norm(cfg),
                    choice_token_ids=choice_token_ids, device=device)


def _log(metrics_path: Path, writer, record: dict) -> None:
    """One line of metrics.jsonl (and the scalars to tensorboard when it is there)."""
    with open(metrics_path, "a") as f:
        f.write(json.dumps(record) + "\n")
    if writer is not None:
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)):
                writer.add_scalar(k, v, record["step"])


def _checkpoint(work: Path, step: int, accelerator, student, optimizer, scheduler) -> Path:
    """Save step `step`'s checkpoint (main process; the others wait) and return its path."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_checkpoint(work, step, student, optimizer, scheduler)
        crash_point(f"distill:after-checkpoint:{step}")
    accelerator.wait_for_everyone()
    return checkpoint_dir(work, step)


# ----------------------------------------------------------------------------------------------
# Setup: accelerator, student, examples, optimizer, the run directory at start and at the end
# ----------------------------------------------------------------------------------------------


def _accelerator(mixed_precision: str):
    """A fresh Accelerator (`auto` precision: bf16 autocast on a GPU that supports it, else fp32)."""
    from accelerate import Accelerator

    # accelerate keeps one process-wide state and refuses a second Accelerator with another precision;
    # a pipeline calling run_distill twice in one process (the demo, tests) must be able to. The
    # distributed part (PartialState) is kept: it is the same process group either way.
    try:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=False)
    except (ImportError, AttributeError):
        pass
    if mixed_precision == "auto":
        mixed_precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    # Sharded training is refused, not half-done: the chunked head reads the output layer's weight outside
    # the wrapped forward, and checkpoints save whole tensors; neither has been made shard-aware (and on a
    # CPU host accelerate would quietly fall back to plain data parallel).
    for name, what in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if os.environ.get(name, "").lower() in ("1", "true", "yes"):
            raise FirstKDError(f"{what} sharding is not supported by first-kd distill yet: launch with plain data "
                               "parallel (accelerate launch --multi_gpu), or fit a large student on one GPU with "
                               "--lora-r (and --load-in-4bit)")
    # cpu=True on CPU-only hosts so a multi-process launch there uses gloo instead of looking for GPUs.
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())


def load_student(cfg: DistillConfig, device):
    """Student model (in train mode) and tokenizer, with the shared one-line load errors."""
    from first_kd.models import load_model, load_tokenizer, resolve_dtype

    from first_kd.adapters import add_lora, quantization_config

    tokenizer = load_tokenizer(cfg.student, cfg.revision, cfg.trust_remote_code)
    dtype = resolve_dtype(cfg.dtype, torch.device(device))
    model = load_model(cfg.student, dtype, device, cfg.revision, cfg.trust_remote_code,
                       quantization=quantization_config(cfg.load_in_4bit, dtype, device))
    if getattr(model.config, "final_logit_softcapping", None) or getattr(model.config, "logit_scale", None):
        raise FirstKDError(f"{type(model).__name__} transforms its logits after the output head (soft-capping "
                           "or scaling), which the target-position loss does not reproduce: use another student")
    if model.get_output_embeddings() is None:
        raise FirstKDError(f"{type(model).__name__} has no output head: use a causal LM (AutoModelForCausalLM)")
    if cfg.lora_r > 0:
        model = add_lora(model, cfg, cfg.student)
    return model.train(), tokenizer


def _training_examples(cfg: DistillConfig, tokenizer, model, use_teacher: bool):
    """(training examples, the temperature record applied to the teacher: {} for none)."""
    temperature = {}
    if use_teacher or not cfg.data:
        store = _open_store(cfg.store, tokenizer, model)
        _check_sampled_options(cfg, store)
        temperature = store.temperature if cfg.loss == "first" else {}
        if cfg.loss == "first" and not temperature:
            _warn(f"store {cfg.store} has no temperature record, so --loss first equals --loss kd: run "
                  "`first-kd calibrate` on it first to distil calibrated targets (proceeding uncalibrated)")
        train = StoreExamples(store, _teacher_targets(cfg, temperature))
        if use_teacher:
            _warn_generative_store(store.attrs.get("data") or {}, cfg)
        if cfg.data:
            _warn(f"--data {cfg.data} is not used: --loss {cfg.loss} trains on the tokens of --store")
    else:
        if cfg.store:
            _say(f"--loss ce trains on --data {cfg.data}; --store {cfg.store} is not used")
        train, _ = _data_examples(cfg, tokenizer, cfg.data, cfg.split, cfg.limit, redraw=True)
        if train.trace is not None:
            levels = ", ".join(f"{n} {p:g}" for n, p in zip(train.trace.spec.level_names, train.trace.probs))
            _say(f"trace spec {train.trace.spec.name} (levels {levels}): each example's level is drawn again every "
                 "epoch; validation data keeps the epoch-0 draw")
    if len(train) == 0:
        raise FirstKDError("no training examples: check --data / --store and --limit")
    return train, temperature


def _teacher_targets(cfg: DistillConfig, temperature: dict) -> TeacherTargets:
    """The teacher distribution the options ask for, checked once against the store's temperature form."""
    targets = TeacherTargets(temperature, cfg.other_bucket, cfg.teacher_norm, cfg.norm_eps, cfg.teacher_smoothing)
    try:
        targets(torch.zeros(1, 2))
    except ValueError as e:
        raise FirstKDError(str(e)) from None
    return targets


def student_norm(cfg: DistillConfig) -> StudentNorm:
    """The student side of the KL the options ask for."""
    return StudentNorm(cfg.student_norm, cfg.student_temperature, cfg.norm_eps)


def _validation_examples(cfg: DistillConfig, tokenizer, model, temperature: dict, use_teacher: bool):
    """(held-out examples or None, whether they carry the teacher, the option-letter ids of MCQA data)."""
    if cfg.val_store:
        val_store = _open_store(cfg.val_store, tokenizer, model)
        # Validate against the same targets as training: the training store's temperature for `first`.
        val = StoreExamples(val_store, _teacher_targets(cfg, temperature))
        return (Prefix(val, cfg.val_limit) if cfg.val_limit else val), use_teacher, val_store.choice_token_ids
    if cfg.val_data:
        val, choice_ids = _data_examples(cfg, tokenizer, cfg.val_data, cfg.val_split or cfg.split, cfg.val_limit)
        return val, False, choice_ids
    return None, False, []


def _open_store(path: str, tokenizer, model):
    from first_kd.store import check_tokenizer, open_store

    store = open_store(path, sampled_ok=True)
    check_tokenizer(store, tokenizer, model_vocab_size=model.get_output_embeddings().weight.shape[0])
    return store


def _check_sampled_options(cfg: DistillConfig, store) -> None:
    """A sampled store trains toward the teacher itself over the whole vocabulary (first_kd.training.sampled_terms):
    the options that reshape a top-k (teacher / student normalisations, smoothing) have nothing to act on."""
    if not store.sampled:
        return
    changed = [flag for flag, value, default in (("--teacher-norm", cfg.teacher_norm, "auto"),
                                                 ("--student-norm", cfg.student_norm, "logit"),
                                                 ("--teacher-smoothing", cfg.teacher_smoothing, 0.0))
               if value != default]
    if changed:
        raise FirstKDError(f"{', '.join(changed)} reshape a top-k, but {store.path} is a sampled cache (its loss is the "
                           "full-vocabulary RS-KD estimate): drop them, or train on a top-k / top-p store")
    if store.temperature:
        raise FirstKDError(f"{store.path} is a sampled cache with a temperature record, which its loss cannot apply "
                           "(the draws are from the teacher at temperature 1): use --loss kd")


def _data_examples(cfg: DistillConfig, tokenizer, data: str, split: str, limit,
                   redraw: bool = False) -> tuple[DataExamples, list[int]]:
    """(examples of `data`, the option-letter ids of MCQA data). With --trace-spec the dataset holds the epoch-0
    draw; `redraw` (training) draws the target again every epoch, validation keeps the epoch-0 draw."""
    from first_kd.data import TraceTargets, prepare_dataset

    dcfg = dataclasses.replace(cfg, data=data, split=split, limit=limit)
    dataset, info = prepare_dataset(dcfg, tokenizer)
    if info.get("n_truncated"):
        _warn(f"{info['n_truncated']} of {len(dataset)} records of {data} were truncated to --max-length "
              f"{cfg.max_length}")
    choice_ids = list(info.get("choice_token_ids") or []) if info.get("format") == "mcqa" else []
    trace = TraceTargets(tokenizer, dcfg) if redraw and cfg.trace_spec else None
    return DataExamples(dataset, trace), choice_ids


def _optimization(cfg: DistillConfig, model, total_steps: int, accelerator):
    """(loss module and optimizer, both prepared by accelerate; the scheduler; the warmup steps)."""
    from transformers import get_scheduler

    warmup_steps = int(round(cfg.warmup * total_steps)) if cfg.warmup < 1 else int(cfg.warmup)
    if cfg.gradient_checkpointing:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable({"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    schedule = "constant_with_warmup" if cfg.schedule == "constant" else cfg.schedule
    # Stepped by hand once per optimizer step (accelerate's wrapper would step it once per process).
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
    loss_module = TargetPositionLoss(model, cfg.alpha, cfg.other_bucket, cfg.label_smoothing, cfg.chunk_size,
                                     student_norm(cfg))
    loss_module, optimizer = accelerator.prepare(loss_module, optimizer)
    return loss_module, optimizer, scheduler, warmup_steps


def _summary_writer(out: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(out / "tensorboard"))


def _start(work: Path, out: Path, cfg: DistillConfig, accelerator, model, optimizer, scheduler,
           total_steps: int) -> tuple[int, Optional[Path]]:
    """Make the run directory ready and resume from its newest checkpoint: (first step, that checkpoint).
    A staged --overwrite run (work != out) always starts afresh."""
    main = accelerator.is_main_process
    if main and work != out:
        clear_stale(out.resolve())  # what an earlier --overwrite left when it was killed
    accelerator.wait_for_everyone()
    work.mkdir(parents=True, exist_ok=True)
    metrics_path = work / "metrics.jsonl"
    if main:
        if not (work / "config.yaml").exists():
            (work / "config.yaml").write_text(yaml.safe_dump(run_settings(cfg), sort_keys=False))
        clear_interrupted_saves(work)  # a checkpoint save a kill interrupted
    accelerator.wait_for_everyone()
    checkpoints = list_checkpoints(work) if work == out else []
    last_good = checkpoints[-1] if checkpoints else None
    start_step = 0
    if last_good is not None:
        start_step = load_checkpoint(last_good, model, optimizer, scheduler)
        if main:
            _truncate_metrics(metrics_path, start_step)
            _say(f"resuming from {last_good} (step {start_step} of {total_steps})")
    elif main:
        metrics_path.unlink(missing_ok=True)
    return start_step, last_good


def _finish(work: Path, out: Path, cfg: DistillConfig, student, tokenizer, summary: dict, writer) -> None:
    """Main process: the final model and summary.json (last), then a staged run replaces the old one. A LoRA
    run writes OUT/adapter, and OUT/model (the merged model) with --merge-lora."""
    if cfg.lora_r > 0:
        save_final_model(work, student, tokenizer, "adapter")
        summary["adapter"] = str(out / "adapter")
        if cfg.merge_lora:
            save_final_model(work, student.merge_and_unload(), tokenizer)
    else:
        save_final_model(work, student, tokenizer)
    final = out / ("model" if cfg.lora_r == 0 or cfg.merge_lora else "adapter")
    summary = {**summary, "model": str(final)}
    write_json_atomic(work / "summary.json", clean_json(summary))
    if not cfg.keep_checkpoints:
        shutil.rmtree(work / "checkpoints", ignore_errors=True)
    if writer is not None:
        writer.close()
    if work != out:
        crash_point("distill:before-replace")
        replace_run(work, out)
    _say(f"done: {summary['steps']} steps; {final.name} in {final}")


# ----------------------------------------------------------------------------------------------
# The run directory: one run per directory, the no-op re-run, --overwrite's replacement
# ----------------------------------------------------------------------------------------------


def run_settings(cfg: DistillConfig) -> dict:
    """What OUT/config.yaml records: the options, and with --trace-spec the spec as used (its name, the sha256 of
    its file, level names and probabilities), since the option names a file whose content may change."""
    settings = to_dict(cfg)
    found = trace_spec_of(cfg)
    if found is not None:
        settings["trace_spec_record"] = spec_record(*found)
    return settings


def _comparable(cfg_dict: dict) -> dict:
    # Round-trip through YAML so tuples/lists and numbers compare the way the file stores them.
    d = yaml.safe_load(yaml.safe_dump(cfg_dict, sort_keys=True))
    return {k: v for k, v in d.items() if k not in RESUME_FREE_OPTIONS}


def check_run_dir(out: Path, cfg: DistillConfig) -> None:
    """Refuse to mix two different runs in one directory (one line naming the differences); with
    --overwrite a run of other options is fine (it is replaced), a directory of other files never is."""
    saved_path = out / "config.yaml"
    if out.exists() and not out.is_dir():
        raise FirstKDError(f"--out {out} is a file: give a directory for the run")
    if not saved_path.is_file():
        if out.exists() and any(out.iterdir()) and not (out / "checkpoints").exists():
            foreign = sorted(p.name for p in out.iterdir())[:5]
            raise FirstKDError(f"--out {out} is not empty and holds no first-kd run ({', '.join(foreign)} ...): "
                               "choose a new --out")
        return
    if cfg.overwrite:
        return
    changed = settings_diff(_comparable(yaml.safe_load(saved_path.read_text()) or {}), _comparable(run_settings(cfg)))
    if changed:
        raise FirstKDError(f"--out {out} holds a run with different options ({changed}): "
                           "use a new --out, or --overwrite to discard it")


def holds_run(out: Path) -> bool:
    return out.is_dir() and any((out / name).exists() for name in RUN_ENTRIES)


def staging_dir_for(out: Path) -> Path:
    """Where --overwrite builds the new run: beside OUT (same filesystem, so moving it in is a rename)."""
    out = out.resolve()
    return out.parent / f"{STAGING_PREFIX}{out.name}"


def replace_run(new: Path, out: Path) -> None:
    """Put the finished run built in `new` in place of the run in `out`, entry by entry (RUN_ENTRIES; any
    other file in `out` is left alone). The old summary.json goes first and the new one comes last, so
    `out` never looks finished while it holds parts of both runs."""
    (out / "summary.json").unlink(missing_ok=True)
    fsync_dir(out)
    for name in RUN_ENTRIES:
        old = out / name
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        elif old.exists() or old.is_symlink():
            old.unlink()
        if (new / name).exists():
            os.replace(new / name, old)
    fsync_dir(out)
    shutil.rmtree(new, ignore_errors=True)


def _finished_already(out: Path, cfg: DistillConfig) -> int:
    """The re-run of a finished run: a no-op, unless `first`'s store has been calibrated again since."""
    from first_kd.store import open_store

    done = json.loads((out / "summary.json").read_text())
    if cfg.loss == "first" and cfg.store:
        try:
            now = open_store(cfg.store, sampled_ok=True).temperature
        except FirstKDError:  # the store is gone: the finished run stands
            now = None
        then = done.get("temperature") or {}
        key = ("form", "value")
        if now is not None and [now.get(k) for k in key] != [then.get(k) for k in key]:
            raise FirstKDError(f"{out} holds a run trained with the temperature of {cfg.store} at the time "
                               f"({describe(then)}), which now records {describe(now)}: pass "
                               "--overwrite to train with the new one, or choose another --out")
    return say_done("distill", out, f"a finished run ({done.get('steps')} steps, model in "
                                    f"{done.get('model') or out / 'model'})")


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines a killed run logged after its last checkpoint: the resumed run logs those steps again."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            break  # a line torn by the kill, and nothing valid can follow it
    path.write_text("".join(line + "\n" for line in kept))


# ----------------------------------------------------------------------------------------------
# Messages
# ----------------------------------------------------------------------------------------------


def _say(message: str) -> None:
    print(f"first-kd distill: {message}", file=sys.stderr)


def _warn(message: str) -> None:
    print(f"first-kd distill: warning: {message}", file=sys.stderr)


def _warn_generative_store(data: dict, cfg: "DistillConfig") -> None:
    """Two ways a KL student over free-text targets can learn the wrong thing, told before training."""
    if not cfg.other_bucket and cfg.alpha == 0 and cfg.student_norm == "logit":
        # Measured on both demos: a student trained this way fits its targets renormalised, yet puts almost
        # none of its full-vocabulary mass on them (2.6% on the answer letters; stray tokens when it writes).
        _warn("--no-other-bucket: the renormalised top-k KL constrains only the teacher's top-k ids relative to "
              "each other, so the student can put its mass anywhere else; its next-token distribution is not "
              "usable as a language model (drop --no-other-bucket, or set --alpha > 0)")
    levels = data.get("trace_levels")
    if levels and any(0 < level < 1 for level in levels):
        _warn("this store holds traces with dropped steps: after a skip the teacher's top-k predicts the step it "
              "expected, not the variant's next one; train dual-mode students with --loss ce (or a CE mix)")
