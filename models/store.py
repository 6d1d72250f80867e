"""Put a ``save_pretrained`` directory into the BentoML model store as a versioned entry.

The version is derived from the weights' content hash, so rebuilding identical weights finds
the existing entry instead of piling up duplicates, and a Bento pins exactly what it serves.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import bentoml
from bentoml.exceptions import NotFound

logger = logging.getLogger(__name__)


def content_hash(directory: Path) -> str:
    """sha256 over every file's relative path and bytes, in a stable order."""
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(directory)).encode())
        digest.update(b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def architecture(directory: Path) -> str:
    config = directory / "config.json"
    if not config.exists():
        return ""
    return ",".join(json.loads(config.read_text()).get("architectures", []))


def save_to_store(name: str, directory: Path, labels: dict[str, str],
                  metadata: dict | None = None, version_salt: str = "") -> bentoml.Model:
    """Store ``directory`` as ``name:<hash>``; an identical entry already there is reused.

    ``version_salt`` enters the version too (an adapter's base model tag, say)."""
    weights_hash = content_hash(directory)
    version = (hashlib.sha256(f"{weights_hash}\0{version_salt}".encode()).hexdigest()
               if version_salt else weights_hash)
    tag = f"{name}:{version[:16]}"
    try:
        model = bentoml.models.get(tag)
        logger.info("%s is already in the store (same weights)", tag)
    except NotFound:
        meta = {"architecture": architecture(directory), "weights_sha256": weights_hash,
                **(metadata or {})}
        with bentoml.models.create(tag, labels=labels, metadata=meta) as model:
            shutil.copytree(directory, model.path, dirs_exist_ok=True)
        logger.info("saved %s (%s)", tag, meta["architecture"])
        model = bentoml.models.get(tag)
    # `name:latest` must mean what was built last, also when an older entry was reused.
    (Path(model.path).parent / "latest").write_text(model.tag.version)
    return model


# --- LoRA adapters -----------------------------------------------------------------------------

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


class AdapterError(ValueError):
    """The directory is not a PEFT LoRA adapter, or not one for the given base model."""


@dataclass
class AdapterInfo:
    rank: int
    alpha: float | int
    target_modules: str | list[str]
    # adapted module path -> (in_features, out_features), from the LoRA A and B shapes
    modules: dict[str, tuple[int, int]]
    base_class: str
    peft_version: str

    @property
    def module_kinds(self) -> list[str]:
        return sorted({m.rsplit(".", 1)[-1] for m in self.modules})


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors header (no tensor is read)."""
    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 0 < size < 100_000_000:
            raise AdapterError(f"{path} is not a safetensors file")
        try:
            header = json.loads(f.read(size))
        except ValueError as exc:
            raise AdapterError(f"{path} is not a safetensors file ({exc})") from exc
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def inspect_adapter(directory: Path) -> AdapterInfo:
    """Read a PEFT LoRA directory (``save_pretrained`` output); AdapterError says what's wrong."""
    directory = Path(directory)
    usage = (f"a PEFT LoRA adapter directory holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} "
             "(PeftModel.save_pretrained writes both)")
    if not directory.is_dir():
        raise AdapterError(f"{directory} is not a directory: {usage}")
    config_path, weights_path = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    if not config_path.is_file():
        raise AdapterError(f"{directory} has no {ADAPTER_CONFIG}, so it is not a PEFT adapter: "
                           f"{usage}")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as exc:
        raise AdapterError(f"{config_path} is not valid JSON ({exc})") from exc
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        kind = config.get("peft_type") if isinstance(config, dict) else None
        raise AdapterError(f"{directory} is a PEFT {kind} adapter, not LoRA (peft_type must be "
                           "LORA); only LoRA adapters can be served")
    if not weights_path.is_file():
        hint = (" (adapter_model.bin found: save it again with safe_serialization=True)"
                if (directory / "adapter_model.bin").exists() else "")
        raise AdapterError(f"{directory} has no {ADAPTER_WEIGHTS}{hint}: {usage}")
    pairs: dict[str, dict[str, list[int]]] = {}
    for key, shape in safetensors_shapes(weights_path).items():
        match = _LORA_KEY.match(key)
        if match and len(shape) == 2:
            pairs.setdefault(match["module"], {})[match["which"]] = shape
    if not pairs:
        raise AdapterError(f"{weights_path} holds no LoRA weights (*.lora_A.weight, "
                           "*.lora_B.weight)")
    modules = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{weights_path}: {module} has lora_{''.join(ab)} without its pair")
        modules[module.removeprefix("base_model.model.")] = (ab["A"][1], ab["B"][0])
    return AdapterInfo(
        rank=int(config.get("r", 0)), alpha=config.get("lora_alpha", 0),
        target_modules=config.get("target_modules") or [], modules=modules,
        base_class=(config.get("auto_mapping") or {}).get("base_model_class", ""),
        peft_version=str(config.get("peft_version", "")),
    )


def check_adapter_base(info: AdapterInfo, base_dir: Path, base_name: str) -> int:
    """Refuse an adapter whose modules, sizes or architecture the base model doesn't have;
    returns the hidden size of the base's language model."""
    config = json.loads((Path(base_dir) / "config.json").read_text())
    architectures = config.get("architectures", [])
    if info.base_class and info.base_class not in architectures:
        raise AdapterError(f"the adapter was trained on a {info.base_class}; {base_name} is a "
                           f"{','.join(architectures) or 'model of unknown architecture'}")
    hidden = (config.get("text_config") or config).get("hidden_size")
    base_shapes = _checkpoint_shapes(Path(base_dir))
    for module, (fan_in, fan_out) in info.modules.items():
        if "language_model" not in module:
            raise AdapterError(f"the adapter adapts {module}, outside the language model; only "
                               "the language model's layers can carry an adapter (the vision "
                               "tower and projector are served as they are)")
        tail = module[module.index("layers."):] if "layers." in module else module.rsplit(
            "language_model.", 1)[-1]
        found = [s for k, s in base_shapes.items()
                 if "language_model" in k and k.endswith(f".{tail}.weight")]
        if not found:
            raise AdapterError(f"the adapter adapts {module}, which {base_name} doesn't have "
                               "(a different architecture or layer count)")
        if list(found[0]) != [fan_out, fan_in]:
            raise AdapterError(
                f"the adapter's {module} is {fan_in} -> {fan_out} but {base_name}'s is "
                f"{found[0][1]} -> {found[0][0]}: it was trained on another model size "
                f"({base_name}'s language model has hidden size {hidden})")
    return int(hidden or 0)


def _checkpoint_shapes(directory: Path) -> dict[str, list[int]]:
    shapes: dict[str, list[int]] = {}
    for path in sorted(directory.glob("*.safetensors")):
        shapes.update(safetensors_shapes(path))
    return shapes


def adapter_store_name(base_name: str, directory: Path) -> str:
    """``lmm-shapes-llava`` + ``lora-terse/`` -> ``lmm-shapes-llava-terse``."""
    slug = re.sub(r"[^a-z0-9_.-]+", "-", directory.name.lower()).strip("-.")
    return f"{base_name}-{slug.removeprefix('lora-') or 'lora'}"


def save_adapter_to_store(directory: Path, base_tag: str, name: str | None = None,
                          labels: dict[str, str] | None = None,
                          metadata: dict | None = None) -> bentoml.Model:
    """Store a PEFT LoRA directory as ``name:<hash>`` beside its base model ``base_tag``.

    Refused (AdapterError) when it is no LoRA adapter or doesn't fit the base in the store.
    """
    directory = Path(directory)
    try:
        base = bentoml.models.get(base_tag)
    except NotFound as exc:
        raise AdapterError(f"base model {base_tag} is not in the store (`python -m models "
                           "build` stores the defaults; `bentoml models list` shows it)") from exc
    if base.info.labels.get("role") == "lora":
        raise AdapterError(f"{base.tag} is itself an adapter; --base takes the model it adapts")
    info = inspect_adapter(directory)
    hidden = check_adapter_base(info, Path(base.path), str(base.tag))
    return save_to_store(
        name or adapter_store_name(base.tag.name, directory), directory,
        labels={"role": "lora", "base_model": str(base.tag), "base_name": base.tag.name,
                **(labels or {})},
        metadata={"architecture": "peft-lora", "base_model": str(base.tag), "rank": info.rank, "lora_alpha": info.alpha,
                  "target_modules": info.target_modules, "adapted_modules": info.module_kinds,
                  "hidden_size": hidden, "peft_version": info.peft_version,
                  "base_architecture": info.base_class, **(metadata or {})},
        # The same adapter over another base version is another entry.
        version_salt=str(base.tag),
    )
