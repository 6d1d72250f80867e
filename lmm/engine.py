"""The interface every LLM backend implements (vLLM on GPU or CPU, transformers as reference).

Serving logic takes an engine as an argument, so the runner works with either backend and
tests can drive the runner with a small engine of the same shape.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Callable, Protocol

import numpy as np

from lmm.protocol import EngineOutput, SamplingParams
from lmm.transfer import wire_dtype


class Engine(Protocol):
    """A continuous-batching generator of token ids."""

    async def start(self) -> None:
        """Load weights and start the scheduling loop."""

    async def shutdown(self) -> None:
        """Stop the loop and release device memory."""

    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        image_features,
        params: SamplingParams,
    ) -> AsyncIterator[EngineOutput]:
        """Stream one sequence. ``image_features``: the prompt's images in order, a list of
        ``lmm.families.ImageFeatures`` (features and meta per image), or the stacked
        [n_images, tokens, hidden] array of a same-size family (None: none); the model's family
        (``lmm.families``) puts them at the prompt's placeholders. Closing the iterator aborts the sequence. A request the
        engine refuses (too long, features of the wrong shape) raises ValueError; one it cannot
        queue (``max_waiting`` sequences already wait for a batch slot) raises EngineOverloaded,
        both before anything is yielded. A sequence the engine failed (its step raised, the
        engine died) ends with an output whose ``error`` names the cause."""

    def healthy(self) -> bool:
        """False once the engine cannot serve (its loop or process died)."""

    def running(self) -> int:
        """Sequences in the engine now (running or waiting for a batch slot)."""

    def waiting(self) -> int:
        """Sequences admitted by ``generate`` beyond ``max_num_seqs``: waiting for a slot."""

    async def fault_next_step(self, exc: Exception, steps: int = 1) -> None:
        """Test only: make the engine's next ``steps`` model steps raise ``exc``."""

    def stats(self) -> dict[int, int]:
        """Histogram of decode batch sizes run so far."""


class EngineObserver(Protocol):
    """What an engine reports as it runs (``lmm.metrics.EngineMetrics`` on /metrics)."""

    def queued(self, seconds: float) -> None:
        """A sequence waited ``seconds`` before it was first scheduled."""

    def state(self, running: int, waiting: int, kv_cache_usage: float | None = None) -> None:
        """Sequences in the batch, sequences waiting for a slot, KV-cache use (0 to 1)."""


class _Unobserved:
    def queued(self, seconds: float) -> None:
        pass

    def state(self, running: int, waiting: int, kv_cache_usage: float | None = None) -> None:
        pass


UNOBSERVED: EngineObserver = _Unobserved()


class EngineOverloaded(Exception):
    """The engine's wait queue is full (``llm.max_waiting``): refused before it starts."""


# Engine steps that may fail in a row before the engine calls itself unhealthy (the runner's
# /readyz turns 503 and its watchdog restarts the worker) rather than fail every request.
MAX_CONSECUTIVE_FAULTS = 3


def fault_message(exc: BaseException) -> str:
    """``EngineOutput.error`` for a sequence that ``exc`` failed: the cause's class first."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class Admission:
    """Sequences in an engine's ``generate`` calls, bounded by ``max_num_seqs`` running plus
    ``max_waiting`` waiting for a batch slot (None: unbounded).

    Counted where the engine is called, from ``enter`` (after validation) to ``leave`` (the
    stream closed), so both backends count the same way: whatever runs beyond ``max_num_seqs``
    is waiting.
    """

    def __init__(self, max_num_seqs: int, max_waiting: int | None):
        self.max_num_seqs = max_num_seqs
        self.max_waiting = max_waiting
        self.in_flight = 0
        self._lock = threading.Lock()

    def waiting(self) -> int:
        return max(0, self.in_flight - self.max_num_seqs)

    def enter(self) -> None:
        with self._lock:
            if self.max_waiting is not None and self.waiting() >= self.max_waiting:
                raise EngineOverloaded(
                    f"{self.waiting()} sequences already wait for one of the engine's "
                    f"{self.max_num_seqs} batch slots (llm.max_waiting {self.max_waiting}); "
                    "retry shortly"
                )
            self.in_flight += 1

    def leave(self) -> None:
        with self._lock:
            self.in_flight -= 1


class StepFaults:
    """Failed engine steps in a row, and the test-only injection of the next ones."""

    def __init__(self, limit: int = MAX_CONSECUTIVE_FAULTS):
        self.limit = limit
        self.consecutive = 0
        self._inject: list[Exception] = []
        self._lock = threading.Lock()

    def inject(self, exc: Exception, steps: int = 1) -> None:
        with self._lock:
            self._inject += [exc] * steps

    def check(self) -> None:
        """Called inside each step: raises an injected fault, once per step."""
        if self._inject:
            with self._lock:
                exc = self._inject.pop(0) if self._inject else None
            if exc is not None:
                raise exc

    def succeeded(self) -> None:
        self.consecutive = 0

    def failed(self) -> bool:
        """Count a failed step; True once ``limit`` failed in a row (the engine is broken)."""
        self.consecutive += 1
        return self.consecutive >= self.limit


class BatchSizes:
    """Histogram of decode batch sizes an engine ran, passed on to a metric as they happen."""

    def __init__(self, on_batch: Callable[[int], None] | None = None):
        self.counts: Counter[int] = Counter()
        self.on_batch = on_batch

    def record(self, size: int) -> None:
        self.counts[size] += 1
        if self.on_batch is not None:
            self.on_batch(size)

    def histogram(self) -> dict[int, int]:
        return dict(self.counts)


@dataclass(frozen=True)
class GenerationInfo:
    image_token_id: int | None
    hidden_size: int
    eos_ids: frozenset[int]


def read_generation_info(model_path: str | Path) -> GenerationInfo:
    """What request validation needs from a checkpoint, read from its JSON files (no weights)."""
    path = Path(model_path)
    config = json.loads((path / "config.json").read_text())
    text = config.get("text_config", config)
    eos = config.get("eos_token_id", text.get("eos_token_id"))
    generation = path / "generation_config.json"
    if generation.exists():
        eos = json.loads(generation.read_text()).get("eos_token_id", eos)
    eos_ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
    image_token = config.get("image_token_id", config.get("image_token_index"))
    return GenerationInfo(image_token, int(text["hidden_size"]), frozenset(eos_ids))


def check_adapter_name(params: SamplingParams, adapters) -> None:
    """``params.adapter`` is one the engine serves (ValueError: client fault)."""
    if params.adapter is not None and params.adapter not in adapters:
        served = ", ".join(map(repr, adapters)) or "none"
        raise ValueError(f"adapter {params.adapter!r} is not served by this LLM engine "
                         f"(adapters: {served})")


def validate_request(prompt_ids: list[int], images, params: SamplingParams,
                     image_token_id: int | None, hidden_size: int, max_model_len: int,
                     takes_images: bool = True) -> list:
    """The checks every engine makes before it accepts a sequence (ValueError: client fault).

    ``images``: the request's ``ImageFeatures`` in prompt order, or the stacked
    ``[images, tokens, hidden]`` array of a fixed-size family (None or empty: none). Each
    image's features are 2-D, of the model's width, in a wire dtype; the prompt's image tokens
    are as many as their rows together (a family checks its own layout beyond that). Returns
    the images as a list of ``ImageFeatures``."""
    from lmm.families import as_image_features

    features = as_image_features(images)
    if features and not takes_images:
        raise ValueError("this model takes no images (a text-only LLM): send the request "
                         "without images")
    for i, f in enumerate(features):
        if f.embeds.ndim != 2:
            raise ValueError(f"image {i}: features must be [tokens, hidden], got "
                             f"{f.embeds.shape}")
        wire_dtype(f.embeds)  # float32, float16 or bfloat16 bits (lmm.transfer)
        if f.embeds.shape[-1] != hidden_size:
            raise ValueError(f"image features have width {f.embeds.shape[-1]}, not {hidden_size}")
    n_image_tokens = sum(1 for t in prompt_ids if t == image_token_id) if image_token_id is not None else 0
    n_features = sum(f.embeds.shape[0] for f in features)
    if n_image_tokens != n_features:
        raise ValueError(
            f"prompt has {n_image_tokens} image tokens but {n_features} feature rows were sent"
            + (f" ({', '.join(str(f.embeds.shape[0]) for f in features)} per image)"
               if len(features) > 1 else "")
        )
    if len(prompt_ids) + params.max_tokens > max_model_len:
        raise ValueError(
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
            f"max_model_len {max_model_len}"
        )
    return features
