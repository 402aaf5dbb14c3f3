"""Tiny tokenizers and models built locally, for tests, the demo and benchmarks.

Nothing here downloads anything: the tokenizer is trained with `tokenizers` on text we are given,
and models are built from a config, saved with `save_pretrained` and meant to be re-loaded with
`from_pretrained`, so the same loading code runs as for a real hub model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, out_dir: str | Path | None = None,
                    split_digits: bool = False, pieces: str | None = None):
    """Train a byte-level BPE tokenizer on `texts`; return a transformers fast tokenizer.

    `split_digits` makes every digit its own token (as Llama and Qwen tokenizers do), which arithmetic
    tasks need: a BPE free to merge "47" into one token hides the digits the model must add.
    `pieces` (a regular expression) replaces the byte-level split (GPT-2's: words, numbers, punctuation and
    spaces apart): the text is cut into the regex's matches and the stretches between them, and no token
    spans two pieces, so a frequent piece can become one token, e.g. a coordinate pair " 3 4" (the maze
    demo's PIECES, first_kd/demo/maze.py).
    Saved to `out_dir` (tokenizer.json + config) when given.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if split_digits and pieces:
        raise ValueError("give split_digits or pieces, not both")
    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if pieces:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pieces), "isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                             if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


SENTENCEPIECE_MODELS = ("bpe", "unigram")
SENTENCEPIECE_LAYOUTS = ("legacy", "metaspace")


def train_sentencepiece_tokenizer(texts: Iterable[str], vocab_size: int = 512, out_dir: str | Path | None = None,
                                  model: str = "bpe", layout: str = "legacy", pieces: Iterable[str] = ()):
    """Train a SentencePiece-style tokenizer on `texts` (a word carries a '▁' prefix, a BOS opens every text,
    as with Llama-2); return a transformers fast tokenizer.

    model: "bpe" with byte fallback, the SentencePiece model of Llama-2, Mistral and Gemma, or "unigram" (T5,
      ALBERT). As in SentencePiece, no piece spans a space or a newline. `pieces` are added to a Unigram
      vocabulary as whole tokens (SentencePiece's user-defined symbols): a tiny corpus may not keep '▁A'.
    layout: "legacy" is the tokenizer.json of the Llama-2 / Mistral hub repos (transformers' legacy converter):
      a normalizer that prepends '▁' and turns spaces into '▁', no pre-tokenizer, so " A" on its own is
      '▁▁A', two tokens, while "Answer: A" ends in the one token '▁A'. "metaspace" is a Metaspace
      pre-tokenizer and decoder ('▁' before the first word only, no split): the layout transformers 5 gives
      Llama tokenizers, in which " A" on its own is '▁A'.
    Saved to `out_dir` when given; load it back with AutoTokenizer.from_pretrained (the real loading code).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if model not in SENTENCEPIECE_MODELS or layout not in SENTENCEPIECE_LAYOUTS:
        raise ValueError(f"model must be one of {SENTENCEPIECE_MODELS} and layout one of {SENTENCEPIECE_LAYOUTS}; "
                         f"got {model!r}, {layout!r}")
    specials, unk = list(SPECIAL_TOKENS.values()), SPECIAL_TOKENS["unk_token"]
    if model == "bpe":
        tok = Tokenizer(models.BPE(unk_token=unk, fuse_unk=True, byte_fallback=True))
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False)
    else:
        tok = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token=unk,
                                          show_progress=False)
    tok.pre_tokenizer = pre_tokenizers.Sequence([  # training only: words and newlines apart
        pre_tokenizers.Split(Regex(r"\n"), "isolated"),
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)])
    tok.train_from_iterator(list(texts), trainer=trainer)
    if model == "unigram" and pieces:
        state = json.loads(tok.to_str())["model"]
        known = {piece for piece, _ in state["vocab"]}
        best = max(score for piece, score in state["vocab"] if piece not in specials)
        vocab = [tuple(v) for v in state["vocab"]] + [(p, best) for p in dict.fromkeys(pieces) if p not in known]
        tok.model = models.Unigram(vocab, state["unk_id"], False)
    if layout == "legacy":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.pre_tokenizer = None
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    bos = SPECIAL_TOKENS["bos_token"]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def build_llama(
    out_dir: str | Path,
    tokenizer,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    vocab_size: int | None = None,
    seed: int = 0,
):
    """Build a randomly initialised Llama causal LM, save it (with the tokenizer) and return its path."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    out_dir = Path(out_dir)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def synthetic_store(path: str | Path, n_sequences: int, targets_per_sequence: int = 128, prompt_tokens: int = 32,
                    k: int = 5, vocab_size: int = 512, chunk_positions: int = 16384, seed: int = 0,
                    varied: bool = False, tokenizer=None) -> Path:
    """A complete top-k store of random tokens and random (sorted, valid) top-k rows, written unit by unit
    with first_kd.store's own writer (create_store, write_unit, mark_complete), no teacher. Memory stays
    near the token ids as one Arrow column, so stores of millions of positions fit a laptop.

    Sequence i has `prompt_tokens` prompt tokens and `targets_per_sequence` targets, or with `varied` a
    number drawn from 1 .. 2 * targets_per_sequence - 1. With a `tokenizer` the store carries its
    fingerprint (a student of that tokenizer can train on it) and its vocabulary size.
    """
    import datasets
    import numpy as np
    import pyarrow as pa

    from first_kd import store as topk_store

    rng = np.random.default_rng([seed, 0])
    n_targets = (rng.integers(1, 2 * targets_per_sequence, n_sequences) if varied
                 else np.full(n_sequences, targets_per_sequence)).astype(np.int64)
    lengths = prompt_tokens + n_targets + 1  # the last target token is predicted, never read
    fingerprint = (topk_store.tokenizer_fingerprint(tokenizer) if tokenizer is not None else
                   {"sha256": "0" * 64, "size": vocab_size, "special_token_ids": {}, "class": "Synthetic"})
    vocab_size = fingerprint["size"]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = rng.integers(0, vocab_size, int(offsets[-1]), dtype=np.int32)
    table = pa.table({
        "id": pa.array([f"s{i}" for i in range(n_sequences)]),
        "input_ids": pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(tokens)),
        "target_start": pa.array(lengths - n_targets),
        "answer_index": pa.array(np.full(n_sequences, -1, dtype=np.int64)),
        "n_choices": pa.array(np.zeros(n_sequences, dtype=np.int64)),
    })
    del tokens
    plan = topk_store.Plan(n_sequences, int(offsets[-1]), int(n_targets.sum()), k, chunk_positions)
    attrs = {"tokenizer": fingerprint, "data": {"format": "prompt-response", "source": "synthetic"},
             "max_length": int(lengths.max()), "teacher": {"name": "synthetic"}}
    group = topk_store.create_store(Path(path), datasets.Dataset(datasets.table.InMemoryTable(table)), plan, attrs,
                                    vocab_size)
    del table
    for unit in range(plan.n_units):
        lo, hi = topk_store.unit_rows(group, unit)
        unit_rng = np.random.default_rng([seed, 1, unit])
        ids = (unit_rng.integers(0, vocab_size, (hi - lo, 1)) + np.arange(k)) % vocab_size  # k distinct ids a row
        probs = -np.sort(-unit_rng.random((hi - lo, k)), axis=1)
        probs *= unit_rng.uniform(0.5, 1.0, (hi - lo, 1)) / probs.sum(axis=1, keepdims=True)  # top-k mass < 1
        topk_store.write_unit(group, unit, ids, np.log(probs))
    topk_store.mark_complete(group, {"max_token_id": vocab_size - 1})
    return Path(path)
