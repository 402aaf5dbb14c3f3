"""The teacher writes rationales (`first-kd generate`): sample D continuations per question, read the
final answer out of each, write one jsonl line per sample.

Work is cut into fixed *units* of `batch_size` questions (unit u = questions [u*B, (u+1)*B)), one
`model.generate` call each, seeded with a seed derived from (seed, u) only. A unit's samples therefore
depend on nothing but the unit, so a run killed and re-run with the same command continues where it
stopped and ends with exactly the file an uninterrupted run writes (on the same hardware).

Files: lines go to OUT.partial (each unit appended with one write + fsync) next to OUT.partial.json,
the settings that define the output; a re-run compares them, keeps the complete units and drops a torn
tail. The last step writes OUT.meta.json and renames OUT.partial to OUT, so OUT exists only when whole.

Sampling is fully defined by this command's options: temperature and top-p only. The teacher's own
generation_config (vendor top_k, repetition penalties, ...) is not used, except for its eos ids.

Perturbation (System-2 distillation's consistency check): with --perturb shuffle-options, each MCQA
question also gets `perturb_samples` samples on prompts whose options are shuffled; their answers are
mapped back to the original option letters, so they vote with the unperturbed samples.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch
from tqdm.auto import tqdm

from first_kd import __version__
from first_kd.config import option
from first_kd.data import LETTERS, encode_prompts, load_records
from first_kd.errors import FirstKDError
from first_kd.files import write_text_atomic
from first_kd.models import stop_token_ids
from first_kd.rationale import (Question, RationaleConfig, compile_extractor, extract_answer, load_questions,
                                mcqa_prompt, with_cue)


@dataclass
class GenerateConfig(RationaleConfig):
    teacher: Optional[str] = option(None, help="teacher causal LM that writes the rationales: hub id or local path")
    out: Optional[str] = option(None, help="jsonl file to write, one line per sample (e.g. gen/train.jsonl)")
    samples: int = option(1, help="rationales sampled per question (several need --temperature > 0)")
    temperature: float = option(0.0, help="sampling temperature; 0 = greedy decoding")
    top_p: float = option(1.0, help="nucleus sampling: keep the smallest set of tokens with this much "
                                    "probability (1 = off; sampling only)")
    max_new_tokens: int = option(256, help="longest rationale in tokens (eos included); longer ones are cut "
                                           "and marked finished=false")
    batch_size: int = option(8, help="questions per generate call; also the unit of resume (keep it the "
                                     "same to resume)")
    seed: int = option(0, help="sampling seed (each unit of batch-size questions derives its own from it)")
    perturb: Literal["none", "shuffle-options"] = option(
        "none", help="also sample on perturbed prompts: shuffle-options shows the MCQA options in a "
                     "seeded random order (answers are mapped back to the original letters)")
    perturb_samples: int = option(1, help="extra samples per question on shuffled options, each with its "
                                          "own order (with --perturb)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", help="teacher weights dtype; auto = bfloat16 on a GPU that supports it, else float32")
    revision: Optional[str] = option(None, help="teacher revision (branch, tag or commit) when loading from a hub")
    trust_remote_code: bool = option(False, help="allow model code from the hub (only for teachers you trust)")
    overwrite: bool = option(False, help="replace an existing --out (and any unfinished run of it)")

    def validate(self) -> None:
        super().validate()
        if not self.teacher:
            raise FirstKDError("missing --teacher (a hub id or a local model directory)")
        if not self.data:
            raise FirstKDError("missing --data (a jsonl/json/parquet/csv file, a save_to_disk dir or a hub dataset)")
        if not self.out:
            raise FirstKDError("missing --out (the jsonl file to write, e.g. gen/train.jsonl)")
        if Path(self.out).suffix.lower() != ".jsonl":
            raise FirstKDError(f"--out {self.out}: the output is JSON lines; give it a .jsonl name")
        if Path(self.data).exists() and Path(self.out).resolve() == Path(self.data).resolve():
            raise FirstKDError("--out is the --data file: choose another --out")
        for name in ("samples", "max_new_tokens", "batch_size", "perturb_samples"):
            if getattr(self, name) < 1:
                raise FirstKDError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.temperature < 0:
            raise FirstKDError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise FirstKDError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.temperature == 0 and self.samples > 1:
            raise FirstKDError(f"--samples {self.samples} with --temperature 0: greedy decoding writes the same "
                               "rationale every time; set --temperature > 0 (e.g. 0.7) or --samples 1")
        if self.temperature == 0 and self.top_p != 1:
            raise FirstKDError("--top-p applies to sampling only; set --temperature > 0 or drop --top-p")
        if self.perturb == "none" and self.perturb_samples != 1:
            raise FirstKDError("--perturb-samples needs --perturb shuffle-options")


# ----------------------------------------------------------------------------------------------
# Perturbation (pure)


def shuffle_options(options: Sequence, rng: random.Random) -> list[int]:
    """A random display order: order[j] = original index of the option shown in position j."""
    order = list(range(len(options)))
    rng.shuffle(order)
    return order


def unshuffle_letter(letter: Optional[str], order: Sequence[int]) -> Optional[str]:
    """The original option letter of `letter` as shown under `order`; None when `letter` is not one of the
    shown letters (no answer, or not an option letter), since it then names no option."""
    if letter is None or len(letter) != 1 or letter.upper() not in LETTERS[:len(order)]:
        return None
    return LETTERS[order[LETTERS.index(letter.upper())]]


def _perturb_rng(seed: int, question_id: str, sample: int) -> random.Random:
    # Keyed by the question, not by position, so a question's orders do not depend on the data order.
    return random.Random(f"{seed}:{question_id}:{sample}")


def _question_text(values: dict, cfg: RationaleConfig) -> str:
    question = values[cfg.question_field]
    if isinstance(question, dict) and "stem" in question:  # OpenBookQA / original ARC nesting, as data.py
        question = question["stem"]
    return str(question)


def perturbed_prompt(values: dict, question: Question, order: Sequence[int], cfg: RationaleConfig) -> str:
    """The prompt of MCQA record `values` with its options shown in `order` (cue included)."""
    shown = [question.options[i] for i in order]
    return with_cue(mcqa_prompt(_question_text(values, cfg), shown, cfg.template, extra=values), cfg.cue)


# ----------------------------------------------------------------------------------------------
# Generation


@dataclass
class _Sample:
    """One row of a generate call: which question, which sample, the prompt shown."""

    question: int
    sample: int
    prompt: str
    option_order: Optional[list[int]] = None


def unit_seed(seed: int, unit: int) -> int:
    """Seed of unit `unit`: a hash, so units' random streams are unrelated however seeds are chosen."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{unit}".encode()).digest()[:8], "little") >> 1


def _unit_questions(unit: int, n_questions: int, batch_size: int) -> range:
    return range(unit * batch_size, min((unit + 1) * batch_size, n_questions))


def _unit_samples(unit: int, questions: list[Question], ds, cfg: GenerateConfig) -> list[_Sample]:
    rows = []
    for i in _unit_questions(unit, len(questions), cfg.batch_size):
        q = questions[i]
        rows += [_Sample(i, s, q.prompt) for s in range(cfg.samples)]
        if cfg.perturb == "shuffle-options":
            values = ds[i]
            for s in range(cfg.samples, cfg.samples + cfg.perturb_samples):
                order = shuffle_options(q.options, _perturb_rng(cfg.seed, q.id, s))
                rows.append(_Sample(i, s, perturbed_prompt(values, q, order, cfg), order))
    return rows


def decode_generated(ids: Sequence[int], eos_ids: set[int], tokenizer) -> tuple[str, int, bool]:
    """(rationale text, tokens generated incl. eos, finished) of one row of generated ids.

    The row is cut after its first eos (generate pads finished rows); the text skips special tokens,
    keeps leading whitespace (it is appended to the prompt at cache time) and drops trailing whitespace.
    """
    ids = list(ids)
    end = next((j for j, t in enumerate(ids) if t in eos_ids), None)
    kept = ids if end is None else ids[:end]
    text = tokenizer.decode(kept, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return text.rstrip(), len(ids) if end is None else end + 1, end is not None


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set(stop_token_ids(model, tokenizer))
    if not ids:
        raise FirstKDError("the teacher's tokenizer has no eos token, so a rationale could never end: use a "
                           "tokenizer with an eos token")
    return ids


def generate_batch(model, tokenizer, prompts: list[str], cfg: GenerateConfig, eos_ids: set[int]):
    """Continuations of `prompts` (one generate call): a list of (text, n_tokens, finished).

    Prompts are tokenized by data.encode_prompts, as every command tokenizes them, and left-padded, so every
    row's continuation starts at the same column.
    """
    from transformers import GenerationConfig

    tokenizer.padding_side = "left"
    enc = tokenizer.pad({"input_ids": encode_prompts(tokenizer, prompts, cfg.chat_template)}, padding=True,
                        return_tensors="pt")
    device = next(model.parameters()).device
    sampling = dict(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0) \
        if cfg.temperature > 0 else dict(do_sample=False)
    gen_config = GenerationConfig(max_new_tokens=cfg.max_new_tokens, num_beams=1, eos_token_id=sorted(eos_ids),
                                  pad_token_id=tokenizer.pad_token_id, **sampling)
    out = model.generate(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                         generation_config=gen_config)
    new = out[:, enc["input_ids"].shape[1]:].tolist()
    return [decode_generated(row, eos_ids, tokenizer) for row in new]


def _records(rows: list[_Sample], results, questions: list[Question], extractor) -> list[dict]:
    records = []
    for row, (text, n_tokens, finished) in zip(rows, results):
        q = questions[row.question]
        answer = extract_answer(text, extractor)
        rec = {"id": q.id, "sample": row.sample, "prompt": row.prompt, "rationale": text, "answer": answer,
               "gold": q.gold, "perturbed": row.option_order is not None, "n_tokens": n_tokens,
               "finished": finished}
        if row.option_order is not None:
            rec["answer"] = unshuffle_letter(answer, row.option_order)
            rec["option_order"] = row.option_order
        records.append(rec)
    return records


# ----------------------------------------------------------------------------------------------
# Files and resume


def _crash_point(name: str) -> None:
    """Testing hook (as in teacher.py): FIRST_KD_CRASH_AT=name makes the process SIGKILL itself here."""
    if os.environ.get("FIRST_KD_CRASH_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _paths(out: str) -> dict[str, Path]:
    out_path = Path(out)
    partial = out_path.with_name(out_path.name + ".partial")
    return {"out": out_path, "partial": partial, "sidecar": partial.with_name(partial.name + ".json"),
            "meta": out_path.with_suffix(".meta.json")}


def _write_json_atomic(path: Path, payload: dict) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def _questions_fingerprint(questions: list[Question]) -> str:
    """sha256 of exactly what the teacher is asked and what its answers are compared with."""
    h = hashlib.sha256()
    for q in questions:
        h.update(json.dumps([q.id, q.prompt, q.gold, q.options], ensure_ascii=False).encode())
        h.update(b"\x00")
    return h.hexdigest()


def _settings(cfg: GenerateConfig, questions: list[Question], dtype: torch.dtype, tokenizer) -> dict:
    """What defines the output: a resume must find exactly these."""
    from first_kd.store import tokenizer_fingerprint

    return {"teacher": cfg.teacher, "revision": cfg.revision, "dtype": str(dtype).replace("torch.", ""),
            "tokenizer": tokenizer_fingerprint(tokenizer)["sha256"], "n_questions": len(questions),
            "questions": _questions_fingerprint(questions), "chat_template": cfg.chat_template,
            "extractor": cfg.extractor, "samples": cfg.samples, "temperature": cfg.temperature, "top_p": cfg.top_p,
            "max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size, "seed": cfg.seed,
            "perturb": cfg.perturb, "perturb_samples": cfg.perturb_samples if cfg.perturb != "none" else 0}


def _complete_prefix(data: bytes, expected: list[list[tuple[str, int]]]) -> tuple[int, int]:
    """(units, bytes) of the longest prefix of `data` made of whole units, each unit u holding exactly the
    lines keyed (id, sample) as in expected[u], in order. A torn line or a partly written unit ends it."""
    pos, done = 0, 0
    for keys in expected:
        cursor = pos
        for key in keys:
            end = data.find(b"\n", cursor)
            if end < 0:
                return done, pos
            try:
                rec = json.loads(data[cursor:end])
            except ValueError:
                return done, pos
            if not isinstance(rec, dict) or (rec.get("id"), rec.get("sample")) != key:
                return done, pos
            cursor = end + 1
        pos, done = cursor, done + 1
    return done, pos


def _resume(paths: dict[str, Path], settings: dict, expected: list[list[tuple[str, int]]], out: str,
            overwrite: bool) -> int:
    """Units already written by an earlier run with the same settings; 0 (and nothing of an earlier run
    left) when starting afresh."""
    sidecar, partial = paths["sidecar"], paths["partial"]
    if sidecar.is_file() and partial.is_file() and not overwrite:
        try:
            old = json.loads(sidecar.read_text()).get("settings", {})
        except ValueError:
            old = None  # a torn sidecar: the run it described never wrote a unit after it
        if old is not None:
            diff = next((k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)), None)
            if diff:
                raise FirstKDError(f"{partial} holds an unfinished run with other settings ({diff} was "
                                   f"{old.get(diff)!r}, now {settings.get(diff)!r}): re-run with the original "
                                   f"options to resume it, or pass --overwrite to start over")
            data = partial.read_bytes()
            done, keep = _complete_prefix(data, expected)
            if keep < len(data):  # a torn tail: rewrite the whole units only, atomically
                tmp = partial.with_name(partial.name + ".tmp")
                with open(tmp, "wb") as f:
                    f.write(data[:keep])
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, partial)
            if done:
                print(f"first-kd generate: resuming {out}: {done} of {len(expected)} unit(s) already written")
            return done
    for p in paths.values():
        p.unlink(missing_ok=True)
    return 0


def _append(f, records: list[dict], unit: int) -> None:
    payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode()
    if os.environ.get("FIRST_KD_CRASH_AT") == f"generate:torn-unit-write:{unit}":
        payload = payload[: len(payload) // 2]  # testing: a write cut short by a crash
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
        _crash_point(f"generate:torn-unit-write:{unit}")
    f.write(payload)
    f.flush()
    os.fsync(f.fileno())


def summarize(path: Path) -> dict:
    """Counts of a generate output file (what the summary line and the meta file report)."""
    n = answered = with_gold = correct = finished = perturbed = tokens = 0
    ids = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            ids.add(rec["id"])
            n += 1
            answered += rec["answer"] is not None
            finished += bool(rec["finished"])
            perturbed += bool(rec["perturbed"])
            tokens += rec["n_tokens"]
            if rec["gold"] is not None:
                with_gold += 1
                correct += rec["answer"] == rec["gold"]
    return {"questions": len(ids), "samples": n, "perturbed_samples": perturbed, "answers_extracted": answered,
            "samples_with_gold": with_gold, "correct": correct,
            "accuracy": correct / with_gold if with_gold else None, "finished": finished,
            "mean_tokens": tokens / n if n else 0.0}


def _check_out(paths: dict[str, Path], overwrite: bool) -> None:
    """Refuse a finished output before loading the teacher."""
    if paths["out"].exists() and not overwrite:
        raise FirstKDError(f"{paths['out']} is already complete; use --overwrite to replace it (or choose "
                           "another --out)")


# ----------------------------------------------------------------------------------------------
# The command


def run_generate(cfg: GenerateConfig) -> int:
    from transformers import GenerationConfig

    from first_kd.models import load_model, load_tokenizer, resolve_dtype

    paths = _paths(cfg.out)
    _check_out(paths, cfg.overwrite)
    ds = load_records(cfg)
    questions = load_questions(ds, cfg)
    if cfg.perturb == "shuffle-options" and any(q.options is None for q in questions):
        raise FirstKDError("--perturb shuffle-options needs multiple-choice data (question + choices fields); "
                           "this data has none: drop --perturb or set --question-field/--choices-field")
    extractor = compile_extractor(cfg.extractor)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = resolve_dtype(cfg.dtype, device)
    tokenizer = load_tokenizer(cfg.teacher, cfg.revision, cfg.trust_remote_code)
    if cfg.chat_template and not getattr(tokenizer, "chat_template", None):
        raise FirstKDError("--chat-template is set but this tokenizer has no chat template; "
                           "drop --chat-template or use a chat model's tokenizer")
    model = load_model(cfg.teacher, dtype, device, cfg.revision, cfg.trust_remote_code)
    eos_ids = _eos_ids(model, tokenizer)
    # generate() fills every option we leave unset from the model's generation_config (a vendor's top_k,
    # repetition penalty ...); a blank one makes this command's options the whole sampling definition.
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=sorted(eos_ids),
                                               pad_token_id=tokenizer.pad_token_id)

    per_question = cfg.samples + (cfg.perturb_samples if cfg.perturb != "none" else 0)
    n_units = -(-len(questions) // cfg.batch_size)
    expected = [[(questions[i].id, s) for i in _unit_questions(u, len(questions), cfg.batch_size)
                 for s in range(per_question)] for u in range(n_units)]  # the (id, sample) lines of each unit
    settings = _settings(cfg, questions, dtype, tokenizer)
    started, started_at = time.perf_counter(), dt.datetime.now(dt.timezone.utc)
    paths["out"].parent.mkdir(parents=True, exist_ok=True)
    first_unit = _resume(paths, settings, expected, cfg.out, cfg.overwrite)
    if first_unit == 0:
        _write_json_atomic(paths["sidecar"], {"settings": settings, "data": {"source": cfg.data, "split": cfg.split},
                                              "created_by": f"first-kd {__version__}"})
        paths["partial"].write_bytes(b"")
    _crash_point("generate:planned")

    bar = tqdm(total=len(questions), initial=min(first_unit * cfg.batch_size, len(questions)), unit="q",
               desc=f"generating x{per_question}", dynamic_ncols=True)
    with open(paths["partial"], "ab") as f, torch.inference_mode():
        for unit in range(first_unit, n_units):
            rows = _unit_samples(unit, questions, ds, cfg)
            torch.manual_seed(unit_seed(cfg.seed, unit))  # seeds CUDA too
            results = generate_batch(model, tokenizer, [r.prompt for r in rows], cfg, eos_ids)
            _append(f, _records(rows, results, questions, extractor), unit)
            _crash_point(f"generate:after-unit-write:{unit}")
            bar.update(len(expected[unit]) // per_question)
    bar.close()

    counts = summarize(paths["partial"])
    seconds = time.perf_counter() - started
    _write_json_atomic(paths["meta"], {
        "settings": settings, "data": {"source": cfg.data, "split": cfg.split}, "counts": counts,
        "config": dataclasses.asdict(cfg), "resumed_units": first_unit,
        "started_at": started_at.isoformat(timespec="seconds"),
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds_this_run": round(seconds, 3), "created_by": f"first-kd {__version__}"})
    _crash_point("generate:before-rename")
    os.replace(paths["partial"], paths["out"])
    paths["sidecar"].unlink(missing_ok=True)

    n = counts["samples"]
    line = (f"first-kd generate: wrote {cfg.out}: {counts['questions']:,} questions, {n:,} samples "
            f"({counts['perturbed_samples']:,} perturbed), answers extracted {counts['answers_extracted']:,}"
            f" ({counts['answers_extracted'] / max(n, 1):.1%})")
    if counts["samples_with_gold"]:
        line += f", accuracy vs gold {counts['correct']:,}/{counts['samples_with_gold']:,} ({counts['accuracy']:.1%})"
    print(line + f", finished {counts['finished'] / max(n, 1):.1%}, {seconds:.1f} s")
    return 0
