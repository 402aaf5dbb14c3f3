"""Teacher engines: what runs the teacher for `first-kd cache`.

The cache command plans the store, hands an engine one *unit* of work at a time and writes what comes
back; it never runs a model itself. An engine must provide, for a unit:

  * input: the unit's token sequences (1-D int64 arrays, in store order) and, for each, the target
    positions t of that sequence whose rows fall in the unit (the logits at t predict token t + 1);
  * output: the unit's rows in that order, sequence after sequence: the top-k token ids [n, k] (int64,
    by decreasing probability) and their log-probabilities [n, k] (float32), taken from the
    **full-vocabulary log-softmax at temperature 1** (no temperature, no renormalisation over the k:
    the store keeps raw log-probs, and calibration is applied when reading).

A unit's rows must depend on the unit only (never on the process count or on what ran before), so that
a resumed or multi-process pass is array-equal to a single one.

Engines:
  * first_kd.engines.hf: a transformers causal LM (the default), on one device or spread with device_map="auto".
  * first_kd.engines.vllm: vLLM (tensor / pipeline parallel, several nodes); it also samples rationales.
Options shared by the commands that pick an engine: first_kd.engines.options.EngineOptions.
"""
