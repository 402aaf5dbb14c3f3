"""Choosing the teacher-written rationales worth training on: the algorithms of `first-kd filter`.

The records are `first-kd generate`'s lines (dicts: id, sample, prompt, rationale, answer, gold, perturbed,
finished ...). Two filters, both pure functions of the records returning (kept records, report):

  finetune_cot        labelled data (Fine-tune-CoT, Ho et al. 2023): keep a sample when its extracted
                      answer equals the gold answer; several distinct rationales per question may be
                      kept ("diverse reasoning").
  self_consistency    unlabelled data (System-2 distillation, Yu et al. 2024): the majority answer of a
                      question's samples is its pseudo-label; keep the question when the majority's
                      share of the samples reaches `threshold`, and optionally only when every sample
                      on shuffled options (generate --perturb shuffle-options) gives that answer too.
                      Kept samples are those agreeing with the majority.

Rules shared by both:
  * Perturbed samples are never training rationales: their rationale argues about shuffled option
    letters while their `answer` was mapped back to the original letter, so response and label would
    disagree. finetune_cot ignores them; self_consistency uses them only as the perturbation check.
    Either way they are counted under "perturbed sample".
  * Duplicates: rationales equal after collapsing whitespace count once (the lowest sample index
    stays). A sample that hit max_new_tokens (`finished` false) is not kept as a rationale (it would
    teach the student to stop mid-thought) but still votes; `drop_unfinished=False` keeps it, which
    `first-kd filter` does in final-answer-only mode where the rationale is not trained on.
  * `max_per_question` (0 = no cap) caps the rationales per question. When more qualify, the most
    diverse are chosen: greedy farthest-first by Jaccard distance of the rationales' word sets
    (lower-cased \\w+ words), starting from the lowest sample index, ties to the lower index, so the
    choice is deterministic. Kept samples are returned in sample order.
  * Every input record is either kept or counted under exactly one drop reason, and likewise every
    question, so the report's counts add up. Records of a question that self_consistency drops carry
    the question's reason.

`to_training_records` turns kept records into the prompt/response records `cache` and `distill` read.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Iterable, Optional

from first_kd.errors import FirstKDError

DEFAULT_ANSWER_TEMPLATE = " The answer is {answer}."
_WORD = re.compile(r"\w+")
# Agreement is a ratio of small counts compared with a typed decimal: 3/5 against 0.6 must pass.
_EPS = 1e-9


# ----------------------------------------------------------------------------------------------
# Helpers (pure)


def _squash(text: str) -> str:
    """A rationale with runs of whitespace collapsed: the key for exact-duplicate detection."""
    return " ".join(text.split())


def _words(text: str) -> frozenset[str]:
    return frozenset(_WORD.findall(text.lower()))


def jaccard_distance(a: frozenset, b: frozenset) -> float:
    """1 - |a & b| / |a | b|; two empty sets are identical (distance 0)."""
    union = len(a | b)
    return 0.0 if union == 0 else 1.0 - len(a & b) / union


def choose_diverse(rationales: list[str], k: int) -> list[int]:
    """Indices of `k` of `rationales` picked greedily farthest-first by Jaccard word-set distance.

    Starts from index 0 (callers pass rationales in sample order), then repeatedly adds the rationale
    whose smallest distance to the ones chosen is largest; ties go to the lower index. Returns the
    chosen indices sorted; all of them when k <= 0 or k >= len(rationales).
    """
    n = len(rationales)
    if k <= 0 or k >= n:
        return list(range(n))
    words = [_words(r) for r in rationales]
    chosen = [0]
    nearest = [jaccard_distance(words[0], w) for w in words]  # distance to the closest chosen one
    while len(chosen) < k:
        best = max((i for i in range(n) if i not in chosen), key=lambda i: (nearest[i], -i))
        chosen.append(best)
        nearest = [min(d, jaccard_distance(words[best], w)) for d, w in zip(nearest, words)]
    return sorted(chosen)


def majority(answers: Iterable[Optional[str]]) -> tuple[Optional[str], int, bool]:
    """(most frequent non-None answer, its votes, whether another answer has as many votes).

    A None answer votes for nothing. With no answers at all: (None, 0, False). On a tie the answer
    seen first is returned (so a caller that must pick one, e.g. pseudo-label accuracy, is
    deterministic) and the flag says it was a tie.
    """
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None, 0, False
    ranked = counts.most_common()  # equal counts keep first-seen order
    top, votes = ranked[0]
    return top, votes, len(ranked) > 1 and ranked[1][1] == votes


def _group(records: list[dict]) -> dict[str, list[dict]]:
    """Records by question id, questions in order of first appearance, samples sorted by index."""
    by_question: dict[str, list[dict]] = {}
    seen: set[tuple[str, int]] = set()
    for r in records:
        key = (str(r["id"]), int(r["sample"]))
        if key in seen:
            raise ValueError(f"question {key[0]} has sample {key[1]} twice; each (id, sample) must be unique")
        seen.add(key)
        by_question.setdefault(key[0], []).append(r)
    for samples in by_question.values():
        samples.sort(key=lambda r: int(r["sample"]))
    return by_question


def _gold_of(samples: list[dict]) -> Optional[str]:
    return next((r["gold"] for r in samples if r.get("gold") is not None), None)


def _pick_rationales(candidates: list[dict], drop_unfinished: bool, max_per_question: int,
                     drop: dict[str, int]) -> list[dict]:
    """The rationales kept among `candidates` (already answer-checked, in sample order); the others
    are counted in `drop` under unfinished / duplicate / over-cap."""
    distinct, keys = [], set()
    for r in candidates:
        if drop_unfinished and not r.get("finished", True):
            drop["unfinished rationale"] += 1
            continue
        key = _squash(r["rationale"])
        if key in keys:
            drop["duplicate rationale"] += 1
            continue
        keys.add(key)
        distinct.append(r)
    chosen = choose_diverse([r["rationale"] for r in distinct], max_per_question)
    drop["over max per question"] += len(distinct) - len(chosen)
    return [distinct[i] for i in chosen]


def _report(method: str, records: list[dict], by_question: dict, kept: list[dict],
            drop_records: Counter, drop_questions: Counter) -> dict:
    kept_questions = len({str(r["id"]) for r in kept})

    def ranked(counts: Counter) -> dict:
        return {k: n for k, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if n}

    report = {
        "method": method,
        "questions_in": len(by_question),
        "questions_kept": kept_questions,
        "records_in": len(records),
        "records_kept": len(kept),
        "dropped_records": ranked(drop_records),
        "dropped_questions": ranked(drop_questions),
    }
    # Internal consistency: every record and every question is accounted for exactly once.
    assert report["records_kept"] + sum(drop_records.values()) == report["records_in"], report
    assert report["questions_kept"] + sum(drop_questions.values()) == report["questions_in"], report
    return report


# ----------------------------------------------------------------------------------------------
# The filters (pure)


def finetune_cot(records: list[dict], max_per_question: int = 0, *,
                 drop_unfinished: bool = True) -> tuple[list[dict], dict]:
    """Fine-tune-CoT: keep samples whose extracted answer equals the gold answer.

    Args:
        records: generate records (dicts with id, sample, rationale, answer, gold, perturbed, finished).
        max_per_question: most rationales kept per question, diverse ones first; 0 = all distinct.
        drop_unfinished: drop samples that hit max_new_tokens (see the module docstring).
    Returns:
        (kept records in question order then sample order, report). Record drop reasons, checked in
        this order: "perturbed sample", "no gold answer", "no answer extracted", "wrong answer",
        "unfinished rationale", "duplicate rationale", "over max per question". A question with no
        kept sample is dropped as "no gold answer", "no unperturbed samples", "no answer extracted"
        (no sample had one), "no correct answer" or "unfinished rationale".
    """
    if max_per_question < 0:
        raise ValueError(f"max_per_question must be >= 0 (0 = no cap); got {max_per_question}")
    by_question = _group(records)
    kept: list[dict] = []
    drop_records: Counter = Counter()
    drop_questions: Counter = Counter()
    for samples in by_question.values():
        plain = [r for r in samples if not r["perturbed"]]
        drop_records["perturbed sample"] += len(samples) - len(plain)
        gold = _gold_of(samples)
        if gold is None:
            drop_records["no gold answer"] += len(plain)
            drop_questions["no gold answer"] += 1
            continue
        answered = [r for r in plain if r["answer"] is not None]
        correct = [r for r in answered if r["answer"] == gold]
        drop_records["no answer extracted"] += len(plain) - len(answered)
        drop_records["wrong answer"] += len(answered) - len(correct)
        chosen = _pick_rationales(correct, drop_unfinished, max_per_question, drop_records)
        if chosen:
            kept.extend(chosen)
        elif not plain:
            drop_questions["no unperturbed samples"] += 1
        elif not answered:
            drop_questions["no answer extracted"] += 1
        elif not correct:
            drop_questions["no correct answer"] += 1
        else:
            drop_questions["unfinished rationale"] += 1
    return kept, _report("finetune-cot", records, by_question, kept, drop_records, drop_questions)


def self_consistency(records: list[dict], threshold: float = 0.6, max_per_question: int = 0,
                     perturbation: bool = False, *, drop_unfinished: bool = True) -> tuple[list[dict], dict]:
    """System-2 distillation's unsupervised filter: majority vote with an agreement threshold.

    Per question, over its unperturbed samples: majority = the most frequent extracted answer (a
    sample without an answer votes for nothing), agreement = majority votes / unperturbed samples.
    Question checks, in order (the first failing one is the question's drop reason, and the reason of
    all its unperturbed records): "no unperturbed samples", "no answer extracted" (no sample has one),
    "tied majority" (another answer has as many votes), "below threshold" (agreement < threshold),
    and with `perturbation`: "no perturbed sample" (this question has none to check) and "changed
    under perturbation" (some perturbed sample did not give the majority answer, None included).
    A kept question keeps its unperturbed samples that give the majority answer, subject to the
    unfinished / duplicate / cap rules; the others count as "no answer extracted" or "disagrees with
    majority". A question whose agreeing samples are all unfinished is dropped as "unfinished
    rationale". Perturbed samples always count as "perturbed sample".

    Returns:
        (kept records, their "answer" being the majority i.e. the pseudo-label; report). When some
        question has a gold answer the report has "pseudo_labels": accuracy of the majority answer
        against gold over the kept questions ("accuracy_kept", "n_kept") and over every question with
        at least one answer, no threshold, ties to the first-seen answer ("accuracy_all", "n_all");
        accuracies are None over zero questions.
    Raises:
        FirstKDError: `perturbation` is set but no record is perturbed.
    """
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1]; got {threshold}")
    if max_per_question < 0:
        raise ValueError(f"max_per_question must be >= 0 (0 = no cap); got {max_per_question}")
    if perturbation and not any(r["perturbed"] for r in records):
        raise FirstKDError("--perturbation needs perturbed samples but the input has none: generate with "
                           "--perturb shuffle-options (MCQA data) or swap-answers (pairwise verdicts), or drop "
                           "--perturbation")
    by_question = _group(records)
    kept: list[dict] = []
    drop_records: Counter = Counter()
    drop_questions: Counter = Counter()
    hits_kept = n_kept = hits_all = n_all = 0
    any_gold = False
    for samples in by_question.values():
        plain = [r for r in samples if not r["perturbed"]]
        perturbed = [r for r in samples if r["perturbed"]]
        drop_records["perturbed sample"] += len(perturbed)
        top, votes, tied = majority(r["answer"] for r in plain)
        gold = _gold_of(samples)
        any_gold = any_gold or gold is not None
        if top is not None and gold is not None:
            n_all += 1
            hits_all += top == gold

        if not plain:
            reason = "no unperturbed samples"
        elif top is None:
            reason = "no answer extracted"
        elif tied:
            reason = "tied majority"
        elif votes / len(plain) < threshold - _EPS:
            reason = "below threshold"
        elif perturbation and not perturbed:
            reason = "no perturbed sample"
        elif perturbation and any(r["answer"] != top for r in perturbed):
            reason = "changed under perturbation"
        else:
            reason = None
        if reason is not None:
            drop_records[reason] += len(plain)
            drop_questions[reason] += 1
            continue

        agreeing = [r for r in plain if r["answer"] == top]
        unanswered = sum(r["answer"] is None for r in plain)
        drop_records["no answer extracted"] += unanswered
        drop_records["disagrees with majority"] += len(plain) - len(agreeing) - unanswered
        chosen = _pick_rationales(agreeing, drop_unfinished, max_per_question, drop_records)
        if not chosen:
            drop_questions["unfinished rationale"] += 1
            continue
        kept.extend({**r, "answer": top} for r in chosen)
        if gold is not None:
            n_kept += 1
            hits_kept += top == gold

    report = _report("self-consistency", records, by_question, kept, drop_records, drop_questions)
    if any_gold:
        report["pseudo_labels"] = {
            "accuracy_kept": hits_kept / n_kept if n_kept else None, "n_kept": n_kept,
            "accuracy_all": hits_all / n_all if n_all else None, "n_all": n_all,
        }
    return kept, report


def strip_cue(prompt: str, cue: str) -> Optional[str]:
    """`prompt` without the reasoning cue `rationale.with_cue` appended, or None when it does not end
    with it. with_cue joins with one space unless the prompt already ended in whitespace; that one
    space is taken off again (a prompt that ended in a space loses it: the two cannot be told apart)."""
    if not cue or not prompt.endswith(cue):
        return None
    head = prompt[: len(prompt) - len(cue)]
    return head[:-1] if head.endswith(" ") else head


def to_training_records(kept: list[dict], final_answer_only: bool = False,
                        answer_template: str = DEFAULT_ANSWER_TEMPLATE, cue: str = "") -> list[dict]:
    """Kept generate records -> prompt/response records for `cache` / `distill`.

    Rationale mode: one record per kept sample, id f"{question_id}#{sample}", response = the rationale.
    Final-answer-only mode: one record per question (its first kept sample's prompt), id = the
    question id, response = answer_template.format(answer=...); with `cue`, the reasoning cue is taken
    off the end of the prompt (System-2 distillation trains the direct answer without the System-2
    prompt); a prompt that does not end with it stays as it is.
    """
    out: list[dict] = []
    seen: set[str] = set()
    for r in kept:
        qid = str(r["id"])
        if final_answer_only:
            if qid in seen:
                continue
            seen.add(qid)
            prompt = strip_cue(r["prompt"], cue) if cue else None
            out.append({"id": qid, "question_id": qid, "prompt": r["prompt"] if prompt is None else prompt,
                        "response": answer_template.format(answer=r["answer"]),
                        "answer": r["answer"], "gold": r.get("gold")})
        else:
            out.append({"id": f"{qid}#{int(r['sample'])}", "question_id": qid, "prompt": r["prompt"],
                        "response": r["rationale"], "answer": r["answer"], "gold": r.get("gold")})
    return out
