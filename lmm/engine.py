"""The interface every LLM backend implements (transformers on CPU/GPU, vLLM on GPU).

Serving logic takes an engine as an argument, so the runner works with either backend and
tests can drive the runner with a small engine of the same shape.
"""

from __future__ import annotations

from typing import AsyncIterator, Protocol

import numpy as np

from lmm.protocol import EngineOutput, SamplingParams


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
        image_features: np.ndarray | None,
        params: SamplingParams,
    ) -> AsyncIterator[EngineOutput]:
        """Stream one sequence. ``image_features`` [n_image_tokens, hidden] fill the prompt's
        image-token positions in order. Closing the iterator aborts the sequence."""

    def stats(self) -> dict[int, int]:
        """Histogram of decode batch sizes run so far."""

