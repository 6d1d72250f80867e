"""Image-feature cache of the API service: an image seen before skips the vision runner.

Chat clients resend the whole conversation every turn, images included, so the same pixels come
back again and again. The key is a hash of one image's preprocessed pixel values (after resize,
crop and normalization: two files that preprocess to the same pixels share an entry), and the
value is exactly what the vision runner returned for it, so a hit answers as the runner would
have. Entries are bounded by their bytes (``images.feature_cache_bytes``; 0 turns the cache
off) and evicted least recently used first.

Families whose images differ in shape (Qwen2.5-VL, LLaVA-NeXT, ...) are cached the same way
per image (``features_per_image``): the key hashes every array of the image's ``ImageInput``
(names, shapes, dtypes and bytes), the value is its ``ImageFeatures`` (features and meta).

A request's images are looked up one by one: only the missing ones go to the runner, in one
call. Concurrent requests that miss on the same image are coalesced: the first encodes it and
the others wait for its result (if that call fails or is cancelled, each waiter encodes the
image itself). Counts: ``hits`` are images answered without sending them to the runner (cached,
already being encoded, or repeated in the same request), ``misses`` images sent to it.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from typing import Awaitable, Callable

import numpy as np

Encode = Callable[[np.ndarray], Awaitable[np.ndarray]]
INLINE_HASH_BYTES = 256 * 1024  # smaller requests are hashed on the event loop


def image_key(pixels: np.ndarray) -> bytes:
    """Content hash of one image's pixel values, with their shape and dtype."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(f"{pixels.dtype.str}{pixels.shape}".encode())
    digest.update(np.ascontiguousarray(pixels).data)
    return digest.digest()


def input_key(image) -> bytes:
    """Content hash of one ``lmm.families.ImageInput``: each array's name, shape, dtype, bytes."""
    digest = hashlib.blake2b(digest_size=20)
    for name in sorted(image.arrays):
        array = np.asarray(image.arrays[name])
        digest.update(f"{name}|{array.dtype.str}{array.shape}|".encode())
        digest.update(np.ascontiguousarray(array).data)
    return digest.digest()


def _nbytes(value) -> int:
    if isinstance(value, np.ndarray):
        return value.nbytes
    return value.embeds.nbytes + sum(np.asarray(m).nbytes for m in value.meta.values())


def _frozen(array) -> np.ndarray:
    stored = np.array(array, copy=True)  # not a view into a whole batch's buffer
    stored.flags.writeable = False
    return stored


class FeatureCache:
    """LRU of per-image features, at most ``max_bytes`` of feature arrays."""

    def __init__(self, max_bytes: int, on_hits: Callable[[int], None] | None = None,
                 on_misses: Callable[[int], None] | None = None):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = 0
        self._entries: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._pending: dict[bytes, asyncio.Future] = {}
        self._on_hits, self._on_misses = on_hits, on_misses

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: bytes) -> bool:
        return key in self._entries

    # -- the LRU ---------------------------------------------------------------------------
    def get(self, key: bytes) -> np.ndarray | None:
        found = self._entries.get(key)
        if found is not None:
            self._entries.move_to_end(key)
        return found

    def put(self, key: bytes, features: np.ndarray) -> None:
        """Store one image's features (a read-only copy), evicting the least recently used
        entries until it fits; an entry larger than the whole cache is not stored."""
        size = _nbytes(features)
        if size > self.max_bytes:
            return
        if key in self._entries:
            self.bytes -= _nbytes(self._entries.pop(key))
        while self.bytes + size > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= _nbytes(evicted)
        if isinstance(features, np.ndarray):
            stored = _frozen(features)
        else:  # ImageFeatures
            stored = type(features)(_frozen(features.embeds),
                                    {k: _frozen(v) for k, v in features.meta.items()})
        self._entries[key] = stored
        self.bytes += size

    # -- a request's images ----------------------------------------------------------------
    async def features(self, pixel_values: np.ndarray, encode: Encode) -> np.ndarray:
        """``encode(pixel_values)``'s answer, [images, tokens, hidden], with only the images
        not cached (nor being encoded by another request) sent to ``encode``."""
        if pixel_values.nbytes <= INLINE_HASH_BYTES:
            keys = [image_key(p) for p in pixel_values]
        else:  # milliseconds per 336 px image: off the event loop (hashlib releases the GIL)
            keys = await asyncio.to_thread(lambda: [image_key(p) for p in pixel_values])
        found = await self._lookup(keys, lambda idx: pixel_values[idx], encode)
        return np.stack([found[key] for key in keys])

    async def features_per_image(self, images: list, encode) -> list:
        """``encode(images)``'s answer (one ``ImageFeatures`` per ``ImageInput``), with only the
        images not cached (nor being encoded by another request) sent to ``encode``."""
        size = sum(np.asarray(a).nbytes for im in images for a in im.arrays.values())
        if size <= INLINE_HASH_BYTES:
            keys = [input_key(im) for im in images]
        else:
            keys = await asyncio.to_thread(lambda: [input_key(im) for im in images])
        found = await self._lookup(keys, lambda idx: [images[i] for i in idx], encode)
        return [found[key] for key in keys]

    async def _lookup(self, keys: list[bytes], take, encode) -> dict:
        """key -> features for every key; ``take(indices)`` the inputs at those indices."""
        found: dict[bytes, np.ndarray] = {}
        waits: dict[bytes, asyncio.Future] = {}
        mine: list[int] = []  # first index of each key this call encodes
        owned: dict[bytes, asyncio.Future] = {}
        for i, key in enumerate(keys):
            if key in found or key in waits or key in owned:
                continue
            hit = self.get(key)
            if hit is not None:
                found[key] = hit
            elif key in self._pending:
                waits[key] = self._pending[key]
            else:
                owned[key] = self._pending[key] = asyncio.get_running_loop().create_future()
                mine.append(i)
        self._count(hits=len(keys) - len(mine) - len(waits), misses=len(mine))
        if mine:
            found.update(await self._encode_own(take, keys, mine, owned, encode))
        missing = []
        for key, future in waits.items():
            result = await asyncio.shield(future)
            if result is None:  # its encoder failed or was cancelled: encode it here
                missing.append(key)
            else:
                found[key] = result
        self._count(hits=len(waits) - len(missing), misses=0)
        if missing:
            first = [keys.index(key) for key in missing]
            again = await self._lookup(missing, lambda idx: take([first[i] for i in idx]),
                                       encode)
            found.update(again)
        return found

    async def _encode_own(self, take, keys, mine, owned, encode) -> dict:
        try:
            out = await encode(take(mine))
            if isinstance(out, np.ndarray) or not isinstance(out, list):
                out = np.asarray(out)
            if len(out) != len(mine):
                raise ValueError(f"the vision runner returned {len(out)} feature blocks for "
                                 f"{len(mine)} images")
        except BaseException:
            for key, future in owned.items():
                self._pending.pop(key, None)
                future.set_result(None)  # waiters encode it themselves
            raise
        result = {}
        for i, features in zip(mine, out):
            key = keys[i]
            self.put(key, features)
            result[key] = features
            self._pending.pop(key, None)
            owned[key].set_result(features)
        return result

    def _count(self, hits: int, misses: int) -> None:
        self.hits += hits
        self.misses += misses
        if hits and self._on_hits is not None:
            self._on_hits(hits)
        if misses and self._on_misses is not None:
            self._on_misses(misses)
