"""Continuous-batching engine on Hugging Face transformers (CPU, or CUDA without vLLM).

One scheduler thread owns the model. Each iteration it admits waiting sequences (prefilled
together, left-padded), merges their KV cache into the running batch, and decodes one token
for every running sequence in a single forward pass. Sequences join and leave between steps,
so a request never waits for another to finish, and each keeps its own sampling parameters.

Backpressure: beyond ``max_num_seqs`` running, at most ``max_waiting`` sequences wait for a slot;
``generate`` refuses the next with EngineOverloaded. Faults: a step that raises (a bad tensor,
out of memory) fails the sequences of that step only, each with a last output naming the cause;
the loop goes on with the next. ``MAX_CONSECUTIVE_FAULTS`` failed steps in a row stop it, so
``healthy()`` is False and the runner restarts its worker instead of failing every request.

LoRA adapters (``adapters``: served name -> PEFT directory) are loaded through PEFT onto the
decoder, all at once. Every forward pass of a step that holds an adapter's sequence names each
row's adapter (PEFT's mixed-adapter batches, ``"__base__"`` for the base model), so sequences
of different adapters and of the base model share one batch, prefill and decode alike; a step of
base rows only runs the base weights, with no adapter active.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import numpy as np

from lmm.device import resolve_device_dtype
from lmm.engine import (
    UNOBSERVED,
    Admission,
    BatchSizes,
    EngineObserver,
    StepFaults,
    check_adapter_name,
    fault_message,
    validate_request,
)
from lmm.protocol import EngineOutput, SamplingParams

logger = logging.getLogger(__name__)


# Temperatures below this sample greedily (vLLM's threshold, so both engines agree).
SAMPLING_EPS = 1e-5
# PEFT's name for "no adapter" in a mixed-adapter batch.
BASE_ROW = "__base__"


@dataclass(eq=False)
class _Sequence:
    request_id: str
    prompt_ids: list[int]
    images: list  # lmm.families.ImageFeatures in prompt order (wire arrays)
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    generator: object = None  # torch.Generator when seeded
    queued_at: float = 0.0  # time.perf_counter() when it entered the inbox
    output_ids: list[int] = field(default_factory=list)
    length: int = 0  # tokens in the KV cache that belong to this sequence
    offset: int = 0  # position of the next token minus ``length`` (Qwen's M-RoPE delta)
    aborted: bool = False
    done: bool = False

    def send(self, item: EngineOutput) -> None:
        self.loop.call_soon_threadsafe(self.out.put_nowait, item)

    def fail(self, error: str) -> None:
        """End the sequence with ``error`` (the cause); its stream reports it."""
        if not self.done:
            self.done = True
            self.send(EngineOutput(error=error, finish_reason="abort",
                                   prompt_tokens=len(self.prompt_ids),
                                   completion_tokens=len(self.output_ids)))


class TransformersEngine:
    def __init__(
        self,
        model_path: str,
        device: str = "auto",
        dtype: str = "auto",
        max_num_seqs: int = 32,
        max_model_len: int = 2048,
        torch_threads: int = 0,
        on_batch: Callable[[int], None] | None = None,
        max_waiting: int | None = None,
        metrics: EngineObserver | None = None,
        device_map: str | dict | None = None,
        max_memory: dict | None = None,
        offload_folder: str | None = None,
        adapters: dict[str, str] | None = None,
    ):
        self.model_path = model_path
        self.adapters = dict(adapters or {})  # served name -> PEFT LoRA directory
        self._lora = None  # PEFT's LoraModel over the decoder, once adapters are loaded
        self._lora_layers: list = []  # its LoRA layers
        self.adapter_steps = 0  # forward passes that ran adapter rows (with base rows or not)
        self.mixed_steps = 0  # ... of those, passes that also ran base or other adapters' rows
        self.device_name, self.dtype_name = device, dtype
        # Several devices (accelerate): a strategy or module -> device; lmm.loading places it.
        self.device_map, self.max_memory, self.offload_folder = device_map, max_memory, offload_folder
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.torch_threads = torch_threads
        self.batch_sizes = BatchSizes(on_batch)
        self._inbox: queue.Queue[_Sequence] = queue.Queue()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._running = 0  # sequences in the batch, as of the last step
        self._admission = Admission(max_num_seqs, max_waiting)
        self._faults = StepFaults()
        self._dead: str | None = None  # why the loop stopped serving, once it has
        self.metrics = metrics or UNOBSERVED

    # -- lifecycle -----------------------------------------------------------------------
    def load(self) -> None:
        import torch

        from lmm.families import family_for

        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        self.device, self.dtype = resolve_device_dtype(
            self.device_name, self.dtype_name, self.device_map)
        # Only the language model is read from the checkpoint (the family's LanguagePart): the
        # vision part lives in the vision runner and is never materialised here.
        self.family = family_for(self.model_path)
        placement = {k: v for k, v in (("device_map", self.device_map),
                                       ("max_memory", self.max_memory),
                                       ("offload_folder", self.offload_folder)) if v is not None}
        if placement and self.family.name not in ("llava", "text"):
            raise ValueError(f"llm.device_map is not supported for the {self.family.name} "
                             "family; place it on one device (device: ...)")
        part = self.family.language(self.model_path, self.device, self.dtype, **placement)
        self.part = part
        self.device = getattr(part, "device", self.device)  # where the embeddings run
        self.model = getattr(part, "model", None)
        self.image_token_id = part.image_token_id
        self.takes_images = self.family.takes_images
        self.embed = part.embed
        self.decoder = part.decoder
        self.lm_head = part.lm_head
        self.text_config = part.text_config
        self.position_dims = 1  # 3 once a prefill shows M-RoPE positions
        generation = getattr(part, "generation_config", None)
        if generation is None:  # the checkpoint's generation_config.json, else config.json
            from lmm.engine import read_generation_info

            eos = sorted(read_generation_info(self.model_path).eos_ids)
        else:
            eos = generation.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self.hidden_size = self.text_config.hidden_size
        self._load_adapters(self.decoder)

    def _load_adapters(self, decoder) -> None:
        """PEFT LoRA layers for every served adapter, in place on ``decoder`` (the loaded
        language model), none of them active: each forward names its rows' adapters."""
        if not self.adapters:
            return
        import torch
        from peft import PeftModel

        # The adapters' weights are named from the whole LLaVA model (model.language_model.*):
        # a root that holds the decoder at that path takes them as they are.
        root = torch.nn.Module()
        root.model = torch.nn.Module()
        root.model.language_model = decoder
        (first, path), *rest = self.adapters.items()
        peft_model = PeftModel.from_pretrained(root, path, adapter_name=first,
                                               torch_device=str(self.device))
        for name, path in rest:
            peft_model.load_adapter(path, adapter_name=name, torch_device=str(self.device))
        self._lora = peft_model.base_model
        self._lora.set_adapter([])  # rows without an adapter name run the base weights
        from peft.tuners.lora import LoraLayer

        self._lora_layers = [m for m in decoder.modules() if isinstance(m, LoraLayer)]
        decoder.eval()
        logger.info("LoRA adapters loaded onto the decoder: %s", ", ".join(self.adapters))

    async def start(self) -> None:
        await asyncio.to_thread(self.load)
        self._thread = threading.Thread(target=self._loop, name="lmm-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)

    def stats(self) -> dict[int, int]:
        return self.batch_sizes.histogram()

    def healthy(self) -> bool:
        return self._dead is None and self._thread is not None and self._thread.is_alive()

    def running(self) -> int:
        return self._running + self._inbox.qsize()

    def waiting(self) -> int:
        return self._admission.waiting()

    async def fault_next_step(self, exc: Exception, steps: int = 1) -> None:
        """Test only: the next ``steps`` steps that run sequences raise ``exc`` inside their
        forward pass, as a real fault would."""
        self._faults.inject(exc, steps)

    # -- request side --------------------------------------------------------------------
    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        image_features: np.ndarray | None,
        params: SamplingParams,
    ) -> AsyncIterator[EngineOutput]:
        import torch

        images = validate_request(prompt_token_ids, image_features, params,
                                  self.image_token_id, self.hidden_size, self.max_model_len,
                                  self.takes_images)
        check_adapter_name(params, self.adapters)
        seq = _Sequence(
            request_id, list(prompt_token_ids), images, params,
            asyncio.get_running_loop(), asyncio.Queue(),
        )
        if params.seed is not None:
            seq.generator = torch.Generator().manual_seed(params.seed)
        self._admission.enter()  # EngineOverloaded when max_waiting already wait
        try:
            seq.queued_at = time.perf_counter()
            self._inbox.put(seq)
            if self._dead is not None:  # the loop has stopped: nothing would run it
                self._drain_inbox(self._dead)
            while True:
                item = await seq.out.get()
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            seq.aborted = True  # no-op when finished; frees the slot when the client went away
            self._admission.leave()

    # -- scheduler thread ----------------------------------------------------------------
    def _loop(self) -> None:
        import torch

        running: list[_Sequence] = []
        cache = mask = None
        while not self._stopping.is_set():
            new: list[_Sequence] = []
            try:
                new = self._admit(block=not running, room=self.max_num_seqs - len(running))
                if not new and not running:
                    self.metrics.state(0, self._inbox.qsize(), 0.0)
                    continue
                with torch.inference_mode():
                    self._faults.check()  # test only: an injected fault, as if the forward raised
                    # Every running row gets one token per iteration: the rows already running
                    # from a decode step, the newly admitted ones from their prefill.
                    parts = []
                    if running:
                        logits, cache, mask = self._decode(running, cache, mask)
                        parts.append(logits)
                    if new:
                        logits, new_cache, new_mask = self._prefill(new)
                        cache, mask = self._merge(cache, mask, new_cache, new_mask)
                        running = running + new
                        self._running = len(running)  # before any of them sees its output
                        parts.append(logits)
                    self.batch_sizes.record(len(running))
                    self._sample_and_emit(running, torch.cat(parts, 0))
                keep = [i for i, s in enumerate(running) if not (s.done or s.aborted)]
                if len(keep) != len(running):
                    running = [running[i] for i in keep]
                    cache, mask = self._select(cache, mask, keep)
                self._running = len(running)
                self._report(running, mask)
                self._faults.succeeded()
            except Exception as exc:  # a failed step fails its own sequences only
                step = running + [s for s in new if s not in running]
                logger.exception("engine step failed; failing its %d sequences", len(step))
                for seq in step:
                    seq.fail(fault_message(exc))
                running, cache, mask = [], None, None
                self._running = 0
                self._report(running, mask)
                if self._faults.failed():
                    self._dead = (
                        f"EngineUnhealthy: {self._faults.consecutive} engine steps failed in a "
                        f"row, the last with {fault_message(exc)}"
                    )
                    logger.error("%s; the engine stops serving", self._dead)
                    break
        # Stopped or broken: nothing runs the sequences still here; end each with the reason.
        reason = self._dead or "EngineShutdown: the engine was shut down"
        for seq in running:
            seq.fail(reason)
        self._running = 0
        self._drain_inbox(reason)
        self.metrics.state(0, 0, 0.0)

    def _report(self, running: list[_Sequence], mask) -> None:
        """Sequences in the batch and waiting in the inbox, and the KV cache the batch holds:
        its rows x positions (padding included: it is allocated) over the most it may hold."""
        held = 0 if mask is None else mask.numel()
        self.metrics.state(len(running), self._inbox.qsize(),
                           held / (self.max_num_seqs * self.max_model_len))

    def _drain_inbox(self, reason: str) -> None:
        while True:
            try:
                self._inbox.get_nowait().fail(reason)
            except queue.Empty:
                return

    def _admit(self, block: bool, room: int) -> list[_Sequence]:
        new: list[_Sequence] = []
        while len(new) < room:
            try:
                seq = self._inbox.get(timeout=0.05) if block and not new else self._inbox.get_nowait()
            except queue.Empty:
                break
            if not seq.aborted:
                self.metrics.queued(time.perf_counter() - seq.queued_at)
                new.append(seq)
        return new

    def _embed(self, seq: _Sequence):
        """[L, hidden] embeddings and [P, L] positions of one prompt (the family's own)."""
        import torch

        ids = torch.tensor(seq.prompt_ids, device=self.device)
        # features go to the model's device, then its dtype (a no-op when sent in it)
        embeds = self.part.inputs_embeds(ids, seq.images)
        positions, seq.offset = self.part.positions(ids, seq.images)
        return embeds, positions

    def _prefill(self, seqs: list[_Sequence]):
        import torch
        from transformers import DynamicCache

        longest = max(len(s.prompt_ids) for s in seqs)
        hidden = self.embed.weight.shape[1]
        embeds = torch.zeros(len(seqs), longest, hidden, device=self.device, dtype=self.embed.weight.dtype)
        mask = torch.zeros(len(seqs), longest, dtype=torch.long, device=self.device)
        ids = torch.zeros(len(seqs), longest, dtype=torch.long, device=self.device)
        positions = None
        for row, seq in enumerate(seqs):
            n = len(seq.prompt_ids)
            row_embeds, row_positions = self._embed(seq)
            if positions is None:
                positions = torch.zeros(row_positions.shape[0], len(seqs), longest,
                                        dtype=torch.long, device=self.device)
            embeds[row, longest - n :] = row_embeds
            positions[:, row, longest - n :] = row_positions.to(self.device)
            mask[row, longest - n :] = 1
            ids[row, longest - n :] = torch.tensor(seq.prompt_ids, device=self.device)
            seq.length = n
        self.position_dims = positions.shape[0]
        cache = DynamicCache(config=self.text_config)
        with self._row_adapters(seqs):
            out = self.decoder(
                inputs_embeds=embeds, attention_mask=self.part.attention(mask, ids),
                position_ids=positions[0] if self.position_dims == 1 else positions,
                past_key_values=cache, use_cache=True,
            )
        logits = self.lm_head(out.last_hidden_state[:, -1, :]).float()
        return logits, out.past_key_values, mask

    def _decode(self, seqs: list[_Sequence], cache, mask):
        import torch

        last = torch.tensor([[s.output_ids[-1]] for s in seqs], device=self.device)
        mask = torch.cat([mask, torch.ones(len(seqs), 1, dtype=mask.dtype, device=self.device)], 1)
        positions = torch.tensor([[s.length + s.offset] for s in seqs], device=self.device)
        if self.position_dims > 1:  # M-RoPE: the three axes advance together in decode
            positions = positions[None].expand(self.position_dims, len(seqs), 1)
        with self._row_adapters(seqs):
            out = self.decoder(
                inputs_embeds=self.embed(last), attention_mask=mask, position_ids=positions,
                past_key_values=cache, use_cache=True,
            )
        for s in seqs:
            s.length += 1
        return self.lm_head(out.last_hidden_state[:, -1, :]).float(), out.past_key_values, mask

    def _row_adapters(self, seqs: list[_Sequence]):
        """The context of one forward pass over ``seqs``: each row's LoRA adapter (PEFT's
        mixed-adapter batch), or nothing when no row has one (the base weights alone)."""
        names = [s.params.adapter or BASE_ROW for s in seqs]
        kinds = set(names)
        if self._lora is None or kinds == {BASE_ROW}:
            return contextlib.nullcontext()
        self.adapter_steps += 1
        self.mixed_steps += len(kinds) > 1
        return self._adapter_names(names)

    @contextlib.contextmanager
    def _adapter_names(self, names: list[str]):
        """PEFT's mixed-batch hook (what ``LoraModel._enable_peft_forward_hooks`` registers: it
        passes ``adapter_names`` to every LoRA layer's forward), on the layers found at load and
        removed in ``finally``: PEFT's own context leaves its hooks in place when the forward
        raises, and the engine goes on after a failed step. The names are checked in
        ``generate``."""
        from peft.tuners.lora.model import _adapter_names_pre_forward_hook

        hook = functools.partial(_adapter_names_pre_forward_hook, adapter_names=names)
        handles = [m.register_forward_pre_hook(hook, with_kwargs=True)
                   for m in self._lora_layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _merge(self, cache, mask, new_cache, new_mask):
        """Stack the running batch and the newly prefilled rows, left-padding the shorter."""
        import torch
        import torch.nn.functional as F

        if cache is None:
            return new_cache, new_mask
        width = max(mask.shape[1], new_mask.shape[1])

        def pad(t, n):  # left-pad the sequence axis (-2 for K/V, -1 for the mask)
            return t if n == 0 else F.pad(t, (0, 0, n, 0)) if t.dim() == 4 else F.pad(t, (n, 0))

        a, b = width - mask.shape[1], width - new_mask.shape[1]
        for old, new in zip(cache.layers, new_cache.layers):
            old.keys = torch.cat([pad(old.keys, a), pad(new.keys, b)], 0)
            old.values = torch.cat([pad(old.values, a), pad(new.values, b)], 0)
        return cache, torch.cat([pad(mask, a), pad(new_mask, b)], 0)

    def _select(self, cache, mask, keep: list[int]):
        """Drop finished rows, then the leading columns that are padding in every row."""
        import torch

        if not keep:
            return None, None
        index = torch.tensor(keep, device=self.device)
        mask = mask[index]
        lead = int((mask.cumsum(-1) == 0).sum(-1).min())
        for layer in cache.layers:
            layer.keys = layer.keys[index, :, lead:]
            layer.values = layer.values[index, :, lead:]
        return cache, mask[:, lead:]

    def _sample_and_emit(self, seqs: list[_Sequence], logits) -> None:
        for row, seq in enumerate(seqs):
            if seq.aborted:
                continue
            try:
                token = self._sample(seq, logits[row])
            except Exception as exc:  # this sequence's own parameters: fail it, not the step
                logger.exception("sampling failed for one sequence")
                seq.fail(f"{type(exc).__name__}: {exc}")
                continue
            seq.output_ids.append(token)
            p = seq.params
            finish = None
            emitted = [token]
            if not p.ignore_eos and token in self.eos_ids or token in p.stop_token_ids:
                finish, emitted = "stop", []  # the end token is counted, never shown
            elif len(seq.output_ids) >= p.max_tokens or seq.length + 1 >= self.max_model_len:
                finish = "length"
            seq.done = finish is not None
            seq.send(EngineOutput(
                token_ids=emitted, finish_reason=finish,
                prompt_tokens=len(seq.prompt_ids), completion_tokens=len(seq.output_ids),
            ))

    @staticmethod
    def _sample(seq: _Sequence, logits) -> int:
        import torch

        p = seq.params
        logits = logits.float()
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.prompt_ids + seq.output_ids)), device=logits.device)
            picked = logits[seen]
            logits = logits.clone()
            logits[seen] = torch.where(
                picked < 0, picked * p.repetition_penalty, picked / p.repetition_penalty
            )
        # Extreme but valid parameters (a penalty or temperature near 0) overflow float32: keep
        # the logits finite, so that they still order the tokens and softmax stays defined.
        big = torch.finfo(logits.dtype).max / 4
        logits = torch.nan_to_num(logits, nan=-big, posinf=big, neginf=-big)
        if p.temperature < SAMPLING_EPS:  # as vLLM: below this, sampling is greedy
            return int(torch.argmax(logits))
        logits = (logits / p.temperature).clamp(-big, big)
        if p.top_k:
            kth = torch.topk(logits, min(p.top_k, logits.shape[-1])).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            drop = cumulative - sorted_logits.softmax(-1) >= p.top_p  # keep the first over p
            drop[0] = False  # the most likely token always stays (top_p may round to 0)
            logits = logits.clone()
            logits[order[drop]] = float("-inf")
        probs = logits.softmax(-1).cpu()
        if not torch.isfinite(probs).all() or float(probs.sum()) <= 0:
            return int(torch.argmax(logits))
        return int(torch.multinomial(probs, 1, generator=seq.generator))
