"""Tiny random-weight checkpoints of the served model families, built offline."""
