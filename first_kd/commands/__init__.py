"""The commands of `first-kd`, one module each (`first-kd X` lives in first_kd/commands/X.py).

A command reads its typed config, calls the library below it and writes its output through
first_kd.outputs (same-settings no-op, staged replacement, locks). A command never imports another one.
"""
