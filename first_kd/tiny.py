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
                    split_digits: bool = False):
    """Train a byte-level BPE tokenizer on `texts`; return a transformers fast tokenizer.

    `split_digits` makes every digit its own token (as Llama and Qwen tokenizers do), which arithmetic
    tasks need: a BPE free to merge "47" into one token hides the digits the model must add.
    Saved to `out_dir` (tokenizer.json + config) when given.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
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
