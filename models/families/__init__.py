"""Tiny random-weight checkpoints of each model family, built offline from config classes."""
