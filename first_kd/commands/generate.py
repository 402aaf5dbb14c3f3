"""The teacher writes rationales (`first-kd generate`): sample D continuations per question, read the
final answer out of each, write one jsonl line per sample.

Work is cut into fixed *units* of `batch_size` questions (unit u = questions [u*B, (u+1)*B)), one
`model.generate` call each, seeded with a seed derived from (seed, u) only. A unit's samples therefore
depend on nothing but the unit, so a run killed and re-run with the same command continues where it
stopped and ends with exactly the file an uninterrupted run writes (on the same hardware).

Files: lines go to OUT.partial (each unit appended with one write + fsync) next to OUT.partial.json,
the settings that define the output; a re-run compares them, keeps the complete units and drops a torn
tail. The last step writes OUT.meta.json (settings, counts, the sha256 of the lines) and renames
OUT.partial to OUT, so OUT exists only when whole. The same command on a finished OUT is a no-op (exit 0);
other settings are refused; a file at OUT (or OUT.meta.json) that generate did not write is never
replaced. With --overwrite the old OUT stays until the new one replaces it, so a failure (full disk, kill)
loses nothing finished.

Length: a prompt and its rationale must fit --max-length tokens and the teacher's positions. A prompt
that leaves no room is refused (naming the record), as cache/distill/evaluate refuse it; otherwise a
rationale stops where the limit is reached (finished=false), as their targets are truncated.

Sampling is fully defined by this command's options: temperature and top-p only (first_kd.decoding). The
teacher's own generation_config (vendor top_k, repetition penalties, ...) is not used, except for its eos ids.

Perturbation (System-2 distillation's consistency check): with --perturb shuffle-options, each MCQA
question also gets `perturb_samples` samples on prompts whose options are shuffled; their answers are
mapped back to the original option letters, so they vote with the unperturbed samples. With --perturb
swap-answers (pairwise judging: a program whose answers are verdicts, e.g. bsm), the extra samples see the
two judged answers swapped, and their verdict is mapped back (A <-> B, tie stays; the verdict as written is
kept in `answer_as_shown`).

Programs (--program NAME_OR_FILE, first_kd.programs): each sample runs the program's stages in order. Within
a unit, stage by stage, each stage is one batched call over all the unit's rows (fan-out items included),
seeded by programs.stage_seed(seed, unit, stage), so a unit's records still depend on the unit only and
resume stays exact; the program file's sha256 and the records' own digest are part of the settings a resume
compares. A program record adds `program`, `stages` (stage -> text, or a list of texts for a fan-out stage),
`stage_prompts` (the same, the prompts shown) and `final` (the text the extractor read); its `prompt` is the
program's student prompt and its `rationale` the program's response (what filter turns into training data).
A program's own extractor (when it has one) reads the final output; --extractor still reads gold answers given
as worked solutions (hashes: GSM8K's "#### N"). Stop strings cut a stage's decoded text, the same way with
either engine (vLLM runs without a tokenizer, so it cannot stop on strings itself); generation still runs to
eos or the budget, and those tokens count in n_tokens. A stage prompt that leaves no room within --max-length
gets an empty text (finished=false) instead of stopping the run, since it is known only once the earlier
stages have run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch
from tqdm.auto import tqdm

from first_kd import __version__
from first_kd.config import option
from first_kd.data import LETTERS, encode_prompts, load_records
from first_kd.data.templates import option_lines
from first_kd.engines.options import EngineOptions
from first_kd.errors import FirstKDError
from first_kd.decoding import generate_texts
from first_kd.files import file_sha256, write_json_atomic
from first_kd.models import ModelOptions, model_positions, stop_token_ids
from first_kd import programs
from first_kd.outputs import crash_point, exclusive_lock, say_done, settings_diff, writable_parent
from first_kd.data.rationale import (Question, RationaleConfig, compile_extractor, extract_answer, load_questions,
                                mcqa_prompt, with_cue)


MIN_TEMPERATURE = 0.01


@dataclass
class GenerateConfig(ModelOptions, EngineOptions, RationaleConfig):
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
    program: Optional[str] = option(
        None, help="a prompt program (System-2 prompting in stages): a built-in name (cot, rar-1step, rar-2step, "
                   "s2a, bsm) or a YAML file (configs/programs/ holds the built-in ones to copy)")
    perturb: Literal["none", "shuffle-options", "swap-answers"] = option(
        "none", help="also sample on perturbed prompts: shuffle-options shows the MCQA options in a "
                     "seeded random order (answers are mapped back to the original letters); swap-answers "
                     "swaps answer_a and answer_b of pairwise records (--program with verdicts; the verdict is "
                     "mapped back)")
    perturb_samples: int = option(1, help="extra samples per question on perturbed prompts, each with its "
                                          "own order (with --perturb)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", help="teacher weights dtype; auto = bfloat16 on a GPU that supports it, else float32")
    overwrite: bool = option(False, help="replace an existing --out (and any unfinished run of it)")

    def validate(self) -> None:
        super().validate()
        self.validate_engine()
        if not self.teacher:
            raise FirstKDError("missing --teacher (a hub id or a local model directory)")
        self.require_data()
        if not self.out:
            raise FirstKDError("missing --out (the jsonl file to write, e.g. gen/train.jsonl)")
        if Path(self.out).suffix.lower() != ".jsonl":
            raise FirstKDError(f"--out {self.out}: the output is JSON lines; give it a .jsonl name")
        if Path(self.data).exists() and Path(self.out).resolve() == Path(self.data).resolve():
            raise FirstKDError("--out is the --data file: choose another --out")
        for name in ("samples", "max_new_tokens", "batch_size", "perturb_samples"):
            if getattr(self, name) < 1:
                raise FirstKDError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        # NaN compares false with everything, so every range check names finiteness first.
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise FirstKDError(f"--temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise FirstKDError(f"--temperature {self.temperature} is too small to sample with (logits / T "
                               f"overflow below {MIN_TEMPERATURE}): use 0 for greedy decoding")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise FirstKDError(f"--top-p must be a number in (0, 1] (1 = off), got {self.top_p}")
        if self.temperature == 0 and self.samples > 1:
            raise FirstKDError(f"--samples {self.samples} with --temperature 0: greedy decoding writes the same "
                               "rationale every time; set --temperature > 0 (e.g. 0.7) or --samples 1")
        if self.temperature == 0 and self.top_p != 1:
            raise FirstKDError("--top-p applies to sampling only; set --temperature > 0 or drop --top-p")
        if self.perturb == "none" and self.perturb_samples != 1:
            raise FirstKDError("--perturb-samples needs --perturb shuffle-options or swap-answers")
        if self.perturb == "swap-answers" and not self.program:
            raise FirstKDError("--perturb swap-answers judges pairs: it needs a --program whose answers are "
                               "verdicts (e.g. --program bsm)")
        if self.program:
            defaults = {f.name: f.default for f in dataclasses.fields(RationaleConfig)}
            for name in ("cue", "qa_template"):
                if getattr(self, name) != defaults[name]:
                    flag = "--" + name.replace("_", "-")
                    raise FirstKDError(f"{flag} is not used with --program (its templates write every prompt): "
                                       f"drop {flag}, or edit a copy of the program")


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
    swapped: bool = False


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
        elif cfg.perturb == "swap-answers":
            rows += [_Sample(i, s, q.prompt, swapped=True)
                     for s in range(cfg.samples, cfg.samples + cfg.perturb_samples)]
    return rows


def stop_ids(model, tokenizer) -> set[int]:
    """The ids that end a rationale (`first_kd.models.stop_token_ids`); a FirstKDError when there is none."""
    ids = set(stop_token_ids(model, tokenizer))
    if not ids:
        raise FirstKDError("the teacher's tokenizer has no eos token, so a rationale could never end: use a "
                           "tokenizer with an eos token")
    return ids


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
# Programs (first_kd.programs): stages run unit by unit, each stage one batched call


def _load_program(cfg: GenerateConfig, ds) -> programs.Program:
    """The --program, checked against the data and the other options (one-line FirstKDErrors)."""
    program = programs.load_program(cfg.program)
    columns = list(ds.column_names)
    programs.check_fields(program, columns)
    named = {n for stage in program.stages for n in programs.template_fields(stage.template, program.path)}
    if cfg.perturb == "shuffle-options" and "options" not in named:
        raise FirstKDError(f"--perturb shuffle-options shuffles {{options}}, which no stage of program "
                           f"{program.path} shows: add {{options}} to a template (a copy of the program) or drop "
                           f"--perturb")
    if cfg.perturb == "swap-answers":
        if not {"answer_a", "answer_b"} <= named:
            raise FirstKDError(f"--perturb swap-answers swaps {{answer_a}} and {{answer_b}}, which program "
                               f"{program.path} does not show: name both in a template or drop --perturb")
        if program.answers != "verdict":
            raise FirstKDError(f"--perturb swap-answers maps verdicts back, but program {program.path} has "
                               f"answers: text; use a program with answers: verdict (e.g. bsm)")
        missing = [name for name in ("answer_a", "answer_b") if name not in columns]
        if missing:
            raise FirstKDError(f"--perturb swap-answers needs pairwise records (question, answer_a, answer_b); "
                               f"this data lacks {', '.join(missing)}")
    return program


def _records_fingerprint(ds) -> str:
    """sha256 of every field of every record (a program's templates may name any of them)."""
    h = hashlib.sha256()
    for values in ds:
        h.update(json.dumps(values, ensure_ascii=False, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()


def row_fields(values: dict, question: Question, row: _Sample, cfg: RationaleConfig) -> dict:
    """What a program's templates read for one row: the record's fields, {question}, {options} (in the order
    shown) and, in a swapped row, answer_a and answer_b swapped."""
    fields = dict(values)
    fields["question"] = _question_text(values, cfg)
    if question.options is None:
        fields["options"] = ""
    else:
        order = row.option_order or list(range(len(question.options)))
        fields["options"] = option_lines([question.options[i] for i in order])
    if row.swapped:
        fields["answer_a"], fields["answer_b"] = values["answer_b"], values["answer_a"]
    return fields


class ProgramRunner:
    """`unit_records(unit)`: the records of one unit of a program run. Stage by stage, one `write` call over the
    unit's rows, seeded with programs.stage_seed(seed, unit, stage); `short` counts the stage prompts with less
    room than their budget within `limit` ("less room") or none at all ("no room": empty text)."""

    def __init__(self, cfg: GenerateConfig, program: programs.Program, inputs, tokenizer, limit: int, write,
                 extractor):
        self.cfg, self.program, self.tokenizer, self.limit = cfg, program, tokenizer, limit
        self.ds, self.questions = inputs
        self.write, self.extractor = write, extractor
        self.short = {"less room": 0, "no room": 0}

    def stage_texts(self, unit: int, call: programs.StageCall) -> list:
        cfg, stage = self.cfg, call.stage
        temperature = cfg.temperature if stage.temperature is None else stage.temperature
        top_p = 1.0 if temperature == 0 else (cfg.top_p if stage.top_p is None else stage.top_p)
        budget = stage.max_new_tokens or cfg.max_new_tokens
        lengths = [len(ids) for ids in encode_prompts(self.tokenizer, call.prompts, cfg.chat_template)]
        rooms = [min(budget, self.limit - n) for n in lengths]
        self.short["less room"] += sum(0 < r < budget for r in rooms)
        self.short["no room"] += sum(r < 1 for r in rooms)
        results: list = [("", 0, False)] * len(rooms)
        live = [i for i, r in enumerate(rooms) if r >= 1]
        if live:
            texts = self.write([call.prompts[i] for i in live], [rooms[i] for i in live],
                               programs.stage_seed(cfg.seed, unit, stage.name), temperature, top_p)
            for i, result in zip(live, texts):
                results[i] = result
        return results

    def unit_records(self, unit: int) -> list[dict]:
        rows = _unit_samples(unit, self.questions, self.ds, self.cfg)
        fields = [row_fields(self.ds[r.question], self.questions[r.question], r, self.cfg) for r in rows]
        results = programs.run_rows(self.program, fields, lambda call: self.stage_texts(unit, call))
        return [self.record(row, result) for row, result in zip(rows, results)]

    def record(self, row: _Sample, result: programs.RowResult) -> dict:
        q = self.questions[row.question]
        answer = extract_answer(result.final, self.extractor)
        if self.program.answers == "verdict":
            answer = programs.normalize_verdict(answer)
        rec = {"id": q.id, "sample": row.sample, "prompt": result.prompt, "rationale": result.response,
               "answer": answer, "gold": q.gold, "perturbed": row.option_order is not None or row.swapped,
               "n_tokens": result.n_tokens, "finished": result.finished, "program": self.program.name,
               "final": result.final, "stages": result.stages, "stage_prompts": result.prompts}
        if row.option_order is not None:
            rec["answer"] = unshuffle_letter(answer, row.option_order)
            rec["option_order"] = row.option_order
        if row.swapped:
            rec["answer"], rec["answer_as_shown"], rec["swapped"] = programs.swap_verdict(answer), answer, True
        return rec


# ----------------------------------------------------------------------------------------------
# Length: prompt + rationale within --max-length and the teacher's positions


def length_limit(max_length: int, positions: Optional[int]) -> tuple[int, str, str]:
    """(tokens a prompt and its rationale may take together, what sets that limit, how to make room)."""
    if positions is not None and positions < max_length:
        return positions, f"the teacher's {positions} positions", "shorten the prompt or use a teacher with more positions"
    return max_length, f"--max-length {max_length}", "raise --max-length or shorten the prompt"


def plan_budgets(questions: list[Question], ds, cfg: GenerateConfig, tokenizer, n_units: int,
                 positions: Optional[int]) -> tuple[list[list[int]], int]:
    """Per unit, per row (as `_unit_samples` orders them), the most tokens the row may generate:
    --max-new-tokens, or less when the prompt leaves less room within `length_limit`. Returns (budgets,
    rows whose budget is below --max-new-tokens). A prompt leaving no room at all is a FirstKDError naming
    the record, checked for every unit before anything is generated."""
    limit, what, fix = length_limit(cfg.max_length, positions)
    budgets, short = [], 0
    for unit in range(n_units):
        rows = _unit_samples(unit, questions, ds, cfg)
        unique = list(dict.fromkeys(r.prompt for r in rows))
        lengths = dict(zip(unique, map(len, encode_prompts(tokenizer, unique, cfg.chat_template))))
        unit_budgets = []
        for row in rows:
            room = limit - lengths[row.prompt]
            if room < 1:
                shown = "" if row.option_order is None else f" with shuffled options (sample {row.sample})"
                raise FirstKDError(f"record {row.question} (id {questions[row.question].id}): prompt{shown} is "
                                   f"{lengths[row.prompt]} tokens, leaving nothing of {what} for the rationale; "
                                   f"{fix}")
            unit_budgets.append(min(cfg.max_new_tokens, room))
            short += room < cfg.max_new_tokens
        budgets.append(unit_budgets)
    return budgets, short


# ----------------------------------------------------------------------------------------------
# Files and resume


def _paths(out: str) -> dict[str, Path]:
    out_path = Path(out)
    partial = out_path.with_name(out_path.name + ".partial")
    return {"out": out_path, "partial": partial, "sidecar": partial.with_name(partial.name + ".json"),
            "meta": out_path.with_suffix(".meta.json")}


def _questions_fingerprint(questions: list[Question]) -> str:
    """sha256 of exactly what the teacher is asked and what its answers are compared with."""
    h = hashlib.sha256()
    for q in questions:
        h.update(json.dumps([q.id, q.prompt, q.gold, q.options], ensure_ascii=False).encode())
        h.update(b"\x00")
    return h.hexdigest()


def _settings(cfg: GenerateConfig, questions: list[Question], dtype: torch.dtype, tokenizer,
              engine: Optional[dict]) -> dict:
    """What defines the output: a resume must find exactly these. `engine`: the vLLM record (name, version,
    the settings that shape the numbers); None for hf, whose outputs carry no engine key."""
    from first_kd.store import tokenizer_fingerprint

    extra = {} if engine is None else {"engine": {key: engine.get(key) for key in ("name", "version", "settings")}}
    return {**extra,"teacher": cfg.teacher, "revision": cfg.revision, "dtype": str(dtype).replace("torch.", ""),
            "tokenizer": tokenizer_fingerprint(tokenizer)["sha256"], "n_questions": len(questions),
            "questions": _questions_fingerprint(questions), "chat_template": cfg.chat_template,
            "extractor": cfg.extractor, "samples": cfg.samples, "temperature": cfg.temperature, "top_p": cfg.top_p,
            "max_new_tokens": cfg.max_new_tokens, "max_length": cfg.max_length, "batch_size": cfg.batch_size,
            "seed": cfg.seed,
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
    """Units already written by an earlier run with the same settings; 0 (and no unfinished run left) when
    starting afresh. A finished OUT and its meta are left in place: the new run replaces them at the end."""
    sidecar, partial = paths["sidecar"], paths["partial"]
    if sidecar.is_file() and partial.is_file() and not overwrite:
        try:
            old = json.loads(sidecar.read_text()).get("settings", {})
        except ValueError:
            old = None  # a torn sidecar: the run it described never wrote a unit after it
        if old is not None:
            diff = settings_diff(old, settings)
            if diff:
                raise FirstKDError(f"{partial} holds an unfinished run with other settings ({diff}): re-run with "
                                   f"the original options to resume it, or pass --overwrite to start over")
            data = partial.read_bytes()
            done, keep = _complete_prefix(data, expected)
            if keep < len(data):  # a torn tail: cut it off in place (needs no free space, unlike a copy)
                with open(partial, "r+b") as f:
                    f.truncate(keep)
                    f.flush()
                    os.fsync(f.fileno())
            if done:
                print(f"first-kd generate: resuming {out}: {done} of {len(expected)} unit(s) already written")
            return done
    for p in (partial, sidecar, partial.with_name(partial.name + ".tmp")):
        p.unlink(missing_ok=True)
    return 0


def _append(f, records: list[dict], unit: int) -> None:
    payload = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in records).encode()
    if os.environ.get("FIRST_KD_CRASH_AT") == f"generate:torn-unit-write:{unit}":
        payload = payload[: len(payload) // 2]  # testing: a write cut short by a crash
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
        crash_point(f"generate:torn-unit-write:{unit}")
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


GENERATE_SETTINGS = ("teacher", "questions", "samples", "temperature", "max_new_tokens", "seed")


def read_generate_meta(path: Path) -> Optional[dict]:
    """The contents of OUT.meta.json as `first-kd generate` writes it, or None when `path` is missing or is
    not such a file."""
    try:
        meta = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    settings = meta.get("settings") if isinstance(meta, dict) else None
    if not isinstance(settings, dict) or not all(k in settings for k in GENERATE_SETTINGS):
        return None
    return meta if str(meta.get("created_by", "")).startswith("first-kd") else None


def _refuse_directory(out: Path) -> None:
    if out.is_dir():
        raise FirstKDError(f"--out {out} is a directory: give the .jsonl file to write, e.g. {out / 'gen.jsonl'}")


def _finished_meta(paths: dict[str, Path]) -> Optional[dict]:
    """The meta of the generate output at OUT (None when OUT does not exist). OUT or OUT.meta.json being
    something generate did not write is a FirstKDError, with or without --overwrite: it is never replaced."""
    out, meta_path = paths["out"], paths["meta"]
    _refuse_directory(out)
    if not out.exists() and not meta_path.exists():
        return None
    meta = read_generate_meta(meta_path)
    if meta is None:
        found = out if out.exists() else meta_path
        raise FirstKDError(f"{found} exists but is not a `first-kd generate` output (no {meta_path.name} written "
                           f"by generate beside it), so generate will not replace it: move it away or choose "
                           f"another --out")
    return meta if out.is_file() else None


def _already_done(paths: dict[str, Path], meta: Optional[dict], settings: dict, overwrite: bool) -> bool:
    """Whether OUT is finished with exactly `settings`, so this run is a no-op. A finished OUT made with
    other settings, or changed since, is refused unless --overwrite (or an unfinished run of this output,
    left by a killed --overwrite run, is there to resume: `_resume` checks its settings)."""
    if meta is None or overwrite:
        return False
    out = paths["out"]
    diff = settings_diff(meta["settings"], settings)
    intact = meta.get("output_sha256") in (None, file_sha256(out))
    if not diff and intact:
        return True
    if paths["partial"].is_file() and paths["sidecar"].is_file():
        return False
    if diff:
        raise FirstKDError(f"{out} holds rationales generated with other settings ({diff}): pass --overwrite to "
                           f"replace it, or choose another --out")
    raise FirstKDError(f"{out} was changed after generate wrote it (its sha256 is not the one in "
                       f"{paths['meta'].name}): pass --overwrite to generate it again, or choose another --out")


def _teacher_positions(cfg: GenerateConfig) -> Optional[int]:
    """The teacher's positions from its config, read before the weights are loaded (None when unreadable:
    loading the model then reports the problem)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(cfg.teacher, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except Exception:
        return None
    return model_positions(config)


# ----------------------------------------------------------------------------------------------
# The command


def run_generate(cfg: GenerateConfig) -> int:
    paths = _paths(cfg.out)
    _refuse_directory(paths["out"])
    writable_parent(paths["out"])
    with exclusive_lock(paths["out"], "generate"):
        return _run_locked(cfg, paths)


def _load_inputs(cfg: GenerateConfig):
    """(records, questions, tokenizer, device, dtype): what the settings are made of, without the weights."""
    from first_kd.models import load_tokenizer, resolve_dtype

    ds = load_records(cfg)
    questions = load_questions(ds, cfg)
    if cfg.perturb == "shuffle-options" and any(q.options is None for q in questions):
        raise FirstKDError("--perturb shuffle-options needs multiple-choice data (question + choices fields); "
                           "this data has none: drop --perturb or set --question-field/--choices-field")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(cfg.teacher, cfg.revision, cfg.trust_remote_code)
    if cfg.chat_template and not getattr(tokenizer, "chat_template", None):
        raise FirstKDError("--chat-template is set but this tokenizer has no chat template; "
                           "drop --chat-template or use a chat model's tokenizer")
    return ds, questions, tokenizer, device, resolve_dtype(cfg.dtype, device)


def _vllm_settings(cfg: GenerateConfig, dtype: torch.dtype, positions: Optional[int]) -> Optional[dict]:
    """vllm.LLM's settings for this run (None with the hf engine). Nothing is started."""
    if cfg.engine != "vllm":
        return None
    from first_kd.engines import vllm as vllm_engine

    return vllm_engine.engine_settings(cfg, cfg.teacher, cfg.revision, cfg.trust_remote_code,
                                       str(dtype).replace("torch.", ""), length_limit(cfg.max_length, positions)[0], 1)


@contextlib.contextmanager
def _open_writer(cfg: GenerateConfig, tokenizer, device, dtype, engine_settings: Optional[dict]):
    """`write(prompts, budgets, seed, temperature, top_p) -> [(text, n_tokens, finished)]` with the chosen
    engine. A call's randomness comes from `seed` only (unit_seed(seed, unit), or a program stage's
    stage_seed): hf seeds torch with it, vLLM derives one seed per request from it."""
    from first_kd.models import generation_config, load_model

    if engine_settings is not None:
        from first_kd.engines import vllm as vllm_engine

        eos_ids = stop_ids(generation_config(cfg.teacher, cfg.revision), tokenizer)
        with vllm_engine.started_engine(engine_settings) as llm:
            yield lambda prompts, budgets, seed, temperature, top_p: vllm_engine.generate_texts(
                llm, tokenizer, prompts, eos_ids, budgets, temperature, top_p, cfg.chat_template, seed)
        return
    model = load_model(cfg.teacher, dtype, device, cfg.revision, cfg.trust_remote_code, cfg.device_map)
    eos_ids = stop_ids(model, tokenizer)  # read before decoding sets the model's generation_config aside

    def write(prompts, budgets, seed, temperature, top_p):
        torch.manual_seed(seed)  # seeds CUDA too
        with torch.inference_mode():
            return generate_texts(model, tokenizer, prompts, eos_ids, budgets, temperature, top_p,
                                  cfg.chat_template)

    yield write


def _run_locked(cfg: GenerateConfig, paths: dict[str, Path]) -> int:
    meta = _finished_meta(paths)
    ds, questions, tokenizer, device, dtype = _load_inputs(cfg)
    program = _load_program(cfg, ds) if cfg.program else None
    if program is not None and program.answers == "verdict":
        questions = [dataclasses.replace(q, gold=programs.normalize_verdict(q.gold)) for q in questions]
    extractor = compile_extractor(program.extractor if program is not None and program.extractor else cfg.extractor)
    positions = _teacher_positions(cfg)
    engine_settings = _vllm_settings(cfg, dtype, positions)
    engine = None
    if engine_settings is not None:
        from first_kd.engines.vllm import engine_record

        engine = engine_record(engine_settings)
    settings = _settings(cfg, questions, dtype, tokenizer, engine)
    if program is not None:
        settings["program"] = {"name": program.name, "sha256": program.sha256}
        settings["records"] = _records_fingerprint(ds)
    if _already_done(paths, meta, settings, cfg.overwrite):
        return say_done("generate", cfg.out, "rationales")
    n_units = -(-len(questions) // cfg.batch_size)
    if program is None:
        budgets, short = plan_budgets(questions, ds, cfg, tokenizer, n_units, positions)
    with _open_writer(cfg, tokenizer, device, dtype, engine_settings) as write:
        if program is None:
            def unit_records(unit):
                rows = _unit_samples(unit, questions, ds, cfg)
                results = write([r.prompt for r in rows], budgets[unit], unit_seed(cfg.seed, unit), cfg.temperature,
                                cfg.top_p)
                return _records(rows, results, questions, extractor)
            short = {"less room": short}
        else:
            runner = ProgramRunner(cfg, program, (ds, questions), tokenizer, length_limit(cfg.max_length, positions)[0],
                                   write, extractor)
            unit_records, short = runner.unit_records, runner.short
        _write_units(cfg, paths, questions, settings, (n_units, short, positions), unit_records)
    return 0


def _write_units(cfg: GenerateConfig, paths: dict[str, Path], questions: list[Question], settings: dict, room,
                 unit_records) -> None:
    """Every unit not yet in OUT.partial, appended unit by unit (`unit_records(unit)`: a unit's records), then
    OUT finished. room: (units, {"less room": rows with less than --max-new-tokens, and for a program "no room":
    stage prompts that left none; a program's runner counts them while it runs}, the teacher's positions)."""
    n_units, short, positions = room
    per_question = cfg.samples + (cfg.perturb_samples if cfg.perturb != "none" else 0)
    expected = [[(questions[i].id, s) for i in _unit_questions(u, len(questions), cfg.batch_size)
                 for s in range(per_question)] for u in range(n_units)]  # the (id, sample) lines of each unit
    started, started_at = time.perf_counter(), dt.datetime.now(dt.timezone.utc)
    first_unit = _resume(paths, settings, expected, cfg.out, cfg.overwrite)
    if first_unit == 0:
        write_json_atomic(paths["sidecar"], {"settings": settings, "data": {"source": cfg.data, "split": cfg.split},
                                             "created_by": f"first-kd {__version__}"}, sort_keys=True)
        paths["partial"].write_bytes(b"")
    crash_point("generate:planned")

    bar = tqdm(total=len(questions), initial=min(first_unit * cfg.batch_size, len(questions)), unit="q",
               desc=f"generating x{per_question}", dynamic_ncols=True)
    try:
        with open(paths["partial"], "ab") as f:
            for unit in range(first_unit, n_units):
                _append(f, unit_records(unit), unit)
                crash_point(f"generate:after-unit-write:{unit}")
                bar.update(len(expected[unit]) // per_question)
    except OSError as e:  # a full disk: the CLI says so on one line, naming the file; a re-run resumes
        e.filename = e.filename or str(paths["partial"])
        raise
    finally:
        bar.close()  # before any error line, so that it stands on a line of its own
    what = length_limit(cfg.max_length, positions)[1]
    if short["less room"]:
        print(f"first-kd generate: note: {short['less room']:,} {'stage prompt' if cfg.program else 'sample'}(s) "
              f"have less room than {'their budget' if cfg.program else f'--max-new-tokens {cfg.max_new_tokens}'} "
              f"within {what}; their {'texts' if cfg.program else 'rationales'} stop there (finished=false when "
              f"cut)", file=sys.stderr)
    if short.get("no room"):
        print(f"first-kd generate: note: {short['no room']:,} stage prompt(s) leave no room within {what}: their "
              f"text is empty (finished=false); raise --max-length or shorten the templates", file=sys.stderr)
    run = {"resumed_units": first_unit, "samples_with_less_room": short["less room"],
           "started_at": started_at.isoformat(timespec="seconds")}
    if "no room" in short:
        run["stage_prompts_without_room"] = short["no room"]
    _finish(cfg, paths, settings, run, started)


def _finish(cfg: GenerateConfig, paths: dict[str, Path], settings: dict, run: dict, started: float) -> None:
    """Meta file, then OUT put in place (replacing a finished one only now), then the summary line."""
    counts = summarize(paths["partial"])
    seconds = time.perf_counter() - started
    write_json_atomic(paths["meta"], {
        "settings": settings, "data": {"source": cfg.data, "split": cfg.split}, "counts": counts,
        "output_sha256": file_sha256(paths["partial"]), "config": dataclasses.asdict(cfg), **run,
        "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds_this_run": round(seconds, 3), "created_by": f"first-kd {__version__}"}, sort_keys=True)
    crash_point("generate:before-rename")
    os.replace(paths["partial"], paths["out"])
    paths["sidecar"].unlink(missing_ok=True)

    n = counts["samples"]
    line = (f"first-kd generate: wrote {cfg.out}: {counts['questions']:,} questions, {n:,} samples "
            f"({counts['perturbed_samples']:,} perturbed), answers extracted {counts['answers_extracted']:,}"
            f" ({counts['answers_extracted'] / max(n, 1):.1%})")
    if counts["samples_with_gold"]:
        line += f", accuracy vs gold {counts['correct']:,}/{counts['samples_with_gold']:,} ({counts['accuracy']:.1%})"
    print(line + f", finished {counts['finished'] / max(n, 1):.1%}, {seconds:.1f} s")
