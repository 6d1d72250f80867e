"""Load one part of a LLaVA checkpoint: the vision side or the language model, nothing else.

Each runner needs half of the model: the vision runner the tower and projector, the LLM runner
the language model (embeddings, decoder layers, norm, lm_head). The model is built on the meta
device (accelerate's ``init_empty_weights``: no memory), the other part is dropped, and only this
part's tensors are read from the checkpoint's safetensors files (memory-mapped, one tensor at a
time, cast to the configured dtype on the way), straight onto their device. Peak memory is then
about the part's bytes, never the whole model's.

Keys are read in both layouts in use: transformers 5 ``save_pretrained`` (``model.language_model.*``,
``model.vision_tower.*``, ``model.multi_modal_projector.*``, ``lm_head.*``), which are the model's
own parameter names, and the llava-1.5 hub layout (``language_model.model.*``,
``language_model.lm_head.*``, ``vision_tower.*``, ``multi_modal_projector.*``), renamed to them.

The language part can be spread over devices (accelerate's big-model inference): ``device_map``
``auto``/``balanced``/``sequential`` (with ``max_memory`` per device) is worked out on the meta
model, or given explicitly as module -> device, where ``cpu`` and ``disk`` offload (weights kept
in RAM or in ``offload_folder`` and brought to the execution device per forward) are accepted
too. Tensors still go one by one to their device (disk ones straight to the offload folder);
``dispatch_model`` then adds the hooks that move activations between devices.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

logger = logging.getLogger(__name__)

Part = Literal["vision", "language"]
# Top-level modules of each part, by the model's own (transformers 5) parameter names.
PARTS: dict[str, tuple[str, ...]] = {
    "vision": ("model.vision_tower", "model.multi_modal_projector"),
    "language": ("model.language_model", "lm_head"),
}
# llava-1.5 hub layout -> transformers 5 names (transformers' own conversion for "llava").
LEGACY_PREFIXES = (
    ("language_model.lm_head.", "lm_head."),
    ("language_model.model.", "model.language_model."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "sequential")
REMAP_BYTES = 64 * 2**20  # see _read


class CheckpointError(ValueError):
    """The checkpoint does not hold the part as the model's config describes it."""


def canonical_key(key: str) -> str:
    """A checkpoint key in the model's own naming (llava-1.5 keys renamed, others as they are)."""
    if key.startswith(("model.", "lm_head.")):
        return key
    for old, new in LEGACY_PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def part_of(name: str) -> str | None:
    for part, roots in PARTS.items():
        if any(name == root or name.startswith(root + ".") for root in roots):
            return part
    return None


@dataclass(frozen=True)
class CheckpointIndex:
    """Where each tensor of a safetensors checkpoint lives: model key -> (file, stored key)."""

    files: dict[str, tuple[Path, str]]

    @classmethod
    def read(cls, model_path: str | Path) -> CheckpointIndex:
        root = Path(model_path)
        index = root / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            stored = {key: root / name for key, name in weight_map.items()}
        elif (root / "model.safetensors").is_file():
            from safetensors import safe_open

            with safe_open(root / "model.safetensors", framework="pt") as f:
                stored = {key: root / "model.safetensors" for key in f.keys()}  # noqa: SIM118
        else:
            raise CheckpointError(
                f"{root}: no model.safetensors or model.safetensors.index.json; save the model "
                "with save_pretrained (safetensors) first"
            )
        files: dict[str, tuple[Path, str]] = {}
        for key, path in stored.items():
            name = canonical_key(key)
            if name in files:
                raise CheckpointError(f"{root}: {key} and {files[name][1]} are the same tensor")
            files[name] = (path, key)
        return cls(files)

    def keys(self, part: str) -> list[str]:
        return [name for name in self.files if part_of(name) == part]

    def numel(self, part: str) -> int:
        """Elements of the part's tensors as stored (read from the headers, no data)."""
        from safetensors import safe_open

        total = 0
        by_file: dict[Path, list[str]] = {}
        for name in self.keys(part):
            path, key = self.files[name]
            by_file.setdefault(path, []).append(key)
        for path, keys in by_file.items():
            with safe_open(path, framework="pt") as f:
                for key in keys:
                    n = 1
                    for dim in f.get_slice(key).get_shape():
                        n *= dim
                    total += n
        return total


def checkpoint_numel(model_path: str | Path) -> dict[str, int]:
    """Elements per part as the checkpoint stores them: ``{"vision": n, "language": n}``."""
    index = CheckpointIndex.read(model_path)
    return {part: index.numel(part) for part in PARTS}


def parameter_numel(model) -> dict[str, int]:
    """Elements of the parameters a loaded module holds, per part (tied ones once; offloaded,
    meta-device parameters count too: their weights are on disk or in RAM, in use)."""
    counts = {part: 0 for part in PARTS} | {"other": 0}
    for name, param in model.named_parameters():  # shared parameters are listed once
        counts[part_of(name) or "other"] += param.numel()
    return counts


def _align(index: CheckpointIndex, stored: set[str], wanted: set[str]) -> CheckpointIndex:
    """Keys one wrapper level off the model's names, renamed to them: a tower that is saved as
    its full model class (CLIP's ``vision_tower.vision_model.*``) but built without the wrapper
    (``model.vision_tower.embeddings.*`` in transformers 5), as transformers renames them."""
    files = dict(index.files)
    for name in stored - wanted:
        for root in (r for roots in PARTS.values() for r in roots):
            if not name.startswith(root + "."):
                continue
            _, _, rest = name[len(root) + 1:].partition(".")
            candidate = f"{root}.{rest}"
            if rest and candidate in wanted and candidate not in files:
                files[candidate] = files.pop(name)
    return CheckpointIndex(files)


def _read(index: CheckpointIndex, by_file: dict[Path, list[str]]):
    """(name, tensor) for each name, memory-mapped from its file. The mapping is reopened every
    ``REMAP_BYTES``: the pages a cast or a copy to a GPU has read stay resident while their file
    is mapped, and the part would otherwise cost its bytes twice (as stored and as loaded)."""
    from safetensors import safe_open

    for path, names in by_file.items():
        start = 0
        while start < len(names):
            read = 0
            with safe_open(path, framework="pt", device="cpu") as f:
                while start < len(names) and read < REMAP_BYTES:
                    name = names[start]
                    tensor = f.get_tensor(index.files[name][1])
                    read += tensor.numel() * tensor.element_size()
                    start += 1
                    yield name, tensor
                    del tensor


def _empty_model(model_path: str | Path, dtype):
    """The whole model's modules, on the meta device (buffers real: they are computed)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForImageTextToText, GenerationConfig

    config = AutoConfig.from_pretrained(model_path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    if (Path(model_path) / "generation_config.json").is_file():  # as from_pretrained reads it
        model.generation_config = GenerationConfig.from_pretrained(model_path)
    return model


def _drop(model, roots: tuple[str, ...]) -> None:
    for root in roots:
        owner_name, _, attr = root.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        setattr(owner, attr, None)


def _device_for(name: str, device_map: dict[str, str]) -> str:
    """The device of the longest device_map entry that contains ``name``."""
    best, device = -1, None
    for module, dev in device_map.items():
        inside = module == "" or name == module or name.startswith(module + ".")
        if inside and len(module) > best:
            best, device = len(module), dev
    if device is None:
        raise ValueError(f"device_map places no module holding {name}; add it (or a parent)")
    return device


def _covered(name: str, device_map: dict[str, str]) -> bool:
    return any(m == "" or name == m or name.startswith(m + ".") for m in device_map)


def _main_device(placement: dict[str, str], wanted: set[str]) -> str:
    """Where inputs enter: the embeddings' device (the first tensor's, for a part without
    them), or the first GPU of the map when they are offloaded, else the CPU."""
    embed = _device_for(next((n for n in sorted(wanted) if "embed_tokens" in n), min(wanted)),
                        placement)
    gpus = [d for d in placement.values() if d not in ("cpu", "disk")]
    return embed if embed not in ("cpu", "disk") else (gpus[0] if gpus else "cpu")


def _normalize_device(device) -> str:
    import torch

    if isinstance(device, int):
        return f"cuda:{device}"
    if device in ("cpu", "disk"):
        return device
    return str(torch.device(device))


def infer_device_map(model, device_map: str, max_memory: dict | None, dtype) -> dict[str, str]:
    """``auto``/``balanced``/``sequential`` -> module -> device, worked out on the meta model."""
    from accelerate.utils import get_balanced_memory, get_max_memory, infer_auto_device_map

    no_split = model._no_split_modules
    if device_map == "sequential":
        memory = get_max_memory(max_memory)
    else:
        memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                     dtype=dtype)
    return infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split,
                                 dtype=dtype)


def load_part(
    model_path: str | Path,
    part: Part,
    dtype,
    device="cpu",
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | Path | None = None,
):
    """The LLaVA model with only ``part`` materialised (the other part's modules are None).

    ``device`` places the whole part; ``device_map`` (language part) spreads it instead.
    Raises CheckpointError when the checkpoint lacks a tensor of the part or holds one the
    model has no place for.
    """
    import torch
    from accelerate.utils import offload_weight, save_offload_index, set_module_tensor_to_device

    if part not in PARTS:
        raise ValueError(f"part must be one of {', '.join(PARTS)}, not {part!r}")
    model = _empty_model(model_path, dtype)
    quantized = getattr(model.config, "quantization_config", None)
    if part == "language" and quantized:
        method = quantized.get("quant_method", "?") if isinstance(quantized, dict) else quantized
        raise CheckpointError(
            f"{model_path}: a quantized checkpoint ({method}); serve its language model with "
            "llm.backend: vllm (llm.quantization), which has the kernels for it")
    tied = model.get_expanded_tied_weights_keys(all_submodels=True)  # target -> source
    _drop(model, tuple(root for other, roots in PARTS.items() if other != part for root in roots))
    index = CheckpointIndex.read(model_path)

    wanted = {name for name in model.state_dict() if part_of(name) == part}
    strays = [name for name in index.files if part_of(name) is None]
    stored = set(index.keys(part))
    index = _align(index, stored, wanted)
    stored = set(index.keys(part))
    # A tied pair needs one of its two tensors stored; the other is the same parameter.
    ties = {t: s for t, s in tied.items() if t in wanted and s in wanted}
    for target, source in list(ties.items()):
        if target in stored and source not in stored:
            ties[source] = target
            del ties[target]
    missing = sorted(wanted - stored - {t for t, s in ties.items() if s in stored})
    unexpected = sorted(stored - wanted)
    if missing or unexpected or strays:
        details = []
        if missing:
            details.append(f"missing {len(missing)}: {', '.join(missing[:5])}")
        if unexpected:
            details.append(f"unexpected {len(unexpected)}: {', '.join(unexpected[:5])}")
        if strays:
            details.append(f"in no part {len(strays)}: {', '.join(strays[:5])}")
        raise CheckpointError(
            f"{model_path}: the checkpoint does not match the {part} part of its config.json "
            f"({'; '.join(details)}); save it with transformers' save_pretrained, or in the "
            "llava-1.5 layout (language_model.*, vision_tower.*, multi_modal_projector.*)"
        )

    placement: dict[str, str] | None = None
    if device_map is not None:
        if isinstance(device_map, str):
            if device_map not in DEVICE_MAP_STRATEGIES:
                raise ValueError(f"device_map must be one of {', '.join(DEVICE_MAP_STRATEGIES)} "
                                 "or a module -> device mapping")
            placement = infer_device_map(model, device_map, max_memory, dtype)
        else:
            placement = {module: _normalize_device(dev) for module, dev in device_map.items()}
        placement = {m: d for m, d in placement.items() if part_of(m) == part or m == ""}
        for name in wanted:
            _device_for(name, placement)  # every tensor of the part has a device
        main = _main_device(placement, wanted)
        # Computed buffers (rotary tables) are in no checkpoint and may be in no entry of an
        # explicit map: they run where the inputs enter, or they would stay on the CPU.
        for name, _ in model.named_buffers():
            if part_of(name) == part and not _covered(name, placement):
                placement[name.rpartition(".")[0]] = main
    offload_dir = None
    offload_index: dict = {}
    if placement and "disk" in placement.values():
        if offload_folder is None:
            raise ValueError("device_map offloads to disk: set offload_folder")
        Path(offload_folder).mkdir(parents=True, exist_ok=True)
        offload_dir = tempfile.mkdtemp(prefix="lmm-offload-", dir=offload_folder)

    by_file: dict[Path, list[str]] = {}
    for name in sorted(stored):
        by_file.setdefault(index.files[name][0], []).append(name)
    for name, tensor in _read(index, by_file):
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        target = device if placement is None else _device_for(name, placement)
        if target == "disk":
            offload_index = offload_weight(tensor, name, offload_dir, offload_index)
        else:
            set_module_tensor_to_device(model, name, target, value=tensor)
        del tensor
    for target, source in ties.items():
        owner_name, _, attr = target.rpartition(".")
        setattr(model.get_submodule(owner_name), attr, model.get_parameter(source))
    if offload_dir is not None:
        save_offload_index(offload_index, offload_dir)

    if placement is not None:
        from accelerate import dispatch_model

        dispatch_model(model, placement, main_device=main, offload_dir=offload_dir,
                       skip_keys=getattr(model, "_skip_keys_device_placement", None))
        model.hf_device_map = placement
        model.lmm_input_device = torch.device(main)
    else:
        model.to(device)  # the computed buffers; the parameters are there already
        model.lmm_input_device = torch.device(device)
    return model.eval()
