"""Micro-batching of vision calls whose images differ in shape (the vision runner's ``encode_images``).

BentoML's adaptive batching stacks its inputs into one array, which images of different sizes
(Qwen2.5-VL's patches, LLaVA-NeXT's tiles) are not. This groups concurrent calls instead: every
call that arrived while the last batch ran (up to ``max_images`` images) goes into the next one,
handed to the family's ``VisionPart.encode`` as one list, which runs same-group (or, for packed
towers, all) inputs in one forward pass. No timer: a call that finds the part idle runs at once.
"""

from __future__ import annotations

import asyncio


class MicroBatcher:
    """Groups concurrent ``encode`` calls (each a list of images) into one call of ``run``."""

    def __init__(self, run, max_images: int, record=None):
        self.run = run  # list[ImageInput] -> list[ImageFeatures], blocking
        self.max_images = max_images
        self.record = record
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    async def encode(self, images: list) -> list:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._loop())
        done = asyncio.get_running_loop().create_future()
        await self._queue.put((images, done))
        return await done

    async def _loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            size = len(batch[0][0])
            while not self._queue.empty() and size < self.max_images:
                item = self._queue.get_nowait()
                batch.append(item)
                size += len(item[0])
            flat = [image for images, _ in batch for image in images]
            if self.record is not None:
                self.record(len(flat))
            try:
                out = await asyncio.to_thread(self.run, flat)
            except Exception as exc:  # every call of the batch fails with the cause
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                continue
            start = 0
            for images, done in batch:
                if not done.done():
                    done.set_result(out[start: start + len(images)])
                start += len(images)
