"""Tiny random-weight checkpoints of each model family, built offline from their config classes.

``<family>.build(out_dir, seed)`` writes a directory that ``AutoProcessor``,
``AutoModelForImageTextToText`` and vLLM load as they would the real checkpoint.
"""
