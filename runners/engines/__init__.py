"""LLM engine backends behind ``lmm.engine.Engine``; heavy imports happen on construction."""

from __future__ import annotations

from typing import Callable

from lmm.config import LMMConfig
from lmm.engine import Engine, EngineObserver


def make_engine(config: LMMConfig, model_path: str,
                on_batch: Callable[[int], None] | None = None,
                metrics: EngineObserver | None = None) -> Engine:
    """The engine ``config.llm.backend`` names, given exactly the settings it uses."""
    llm = config.llm
    common = dict(
        device=config.llm_device(), dtype=config.dtype, max_num_seqs=llm.max_num_seqs,
        max_model_len=llm.max_model_len, max_waiting=llm.max_waiting,
        torch_threads=config.torch_threads, on_batch=on_batch, metrics=metrics,
    )
    if llm.backend == "vllm":
        from runners.engines.vllm_engine import VLLMEngine

        return VLLMEngine(model_path, **common, **llm.vllm_args())
    if llm.backend == "transformers":
        from runners.engines.transformers_engine import TransformersEngine

        return TransformersEngine(model_path, **common, **llm.placement())
    raise ValueError(f"unknown LLM backend {llm.backend!r}; choose vllm or transformers")
