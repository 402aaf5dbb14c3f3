"""`first-kd demo`: the whole pipeline on tiny models and data built locally, one module per suite.

Every step is a public command run through the CLI entry (first_kd.cli.main), never imported directly.
"""
