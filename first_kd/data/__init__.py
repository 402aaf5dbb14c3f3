"""Records in, token ids out: load a dataset, tell its layout, render prompts, tokenize with an exact
prompt/target boundary.

Two layouts are understood: "mcqa" (a question with lettered options; the target is ONE token, the gold
option's letter) and "prompt-response" (Alpaca instruction / input / output, or a plain prompt / response
pair; the target is the response tokens + eos).

The package, one concept a module, each building on the ones above it in this list:

  traces      Dualformer trace dropping: the operations on typed steps, fixed variants (--trace-levels), levels
              drawn per example and epoch (--trace-spec)
  trace_spec  the YAML trace specs of --trace-spec (configs/traces/: astar, steps)
  options     DataConfig (the --data ... options) and their checks; `unescape` for typed templates
  templates   record shapes: a raw record -> prompt text (+ gold option or response)
  records     reading --data (file, saved dataset, hub name) and telling the layout
  tokenize    prompt rendering / encoding, option-letter tokens, tokenize_records, prepare_dataset
  rationale   prompts for teacher-written rationales and the answer extractors that read them

The names below are the package's API: `from first_kd.data import DataConfig, prepare_dataset`.
"""

from first_kd.data.options import AUTO_PREFIX, DataConfig, check_template, drop_levels, trace_spec_of, unescape
from first_kd.data.records import FILE_LOADERS, FORMATS, detect_format, first_bad_json_line, load_records
from first_kd.data.templates import LETTERS
from first_kd.data.tokenize import (TraceTargets, answer_text, encode_prompts, prepare_dataset, render_prompts,
                                    tokenize_records, tokens_after)

__all__ = ["AUTO_PREFIX", "DataConfig", "check_template", "drop_levels", "trace_spec_of", "unescape",
           "FILE_LOADERS", "FORMATS", "detect_format", "first_bad_json_line", "load_records",
           "LETTERS",
           "TraceTargets", "answer_text", "encode_prompts", "prepare_dataset", "render_prompts", "tokenize_records",
           "tokens_after"]
