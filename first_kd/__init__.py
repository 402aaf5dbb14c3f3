"""first-kd: calibrated top-k logit distillation of causal language models (FIRST)."""

__version__ = "0.1.0"
