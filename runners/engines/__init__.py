"""LLM engine backends behind ``lmm.engine.Engine``; heavy imports happen on construction."""

from __future__ import annotations

from lmm.engine import Engine


def make_engine(backend: str, model_path: str, **kwargs) -> Engine:
    if backend == "transformers":
        from runners.engines.transformers_engine import TransformersEngine

        return TransformersEngine(model_path, **kwargs)
    raise ValueError(f"unknown LLM backend {backend!r}; this build ships 'transformers'")
