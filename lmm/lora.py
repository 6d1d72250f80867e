"""Served LoRA adapters (``adapters`` in lmm/config.py): their model-store entries and checks.

Each adapter is a PEFT LoRA directory (``adapter_config.json`` + ``adapter_model.safetensors``)
in the model store. Both services that need them (the API for ``/v1/models``, the LLM runner
for the weights) declare them as class-scope ``BentoModel``s, so a built Bento carries them like
the base models. The runner checks each one at startup, before an engine loads it: a LoRA that
adapts anything but the language model's decoder layers is refused with the reason, since the
vision tower runs in another service and would stay unadapted.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmm.config import LMMConfig

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Labels of an adapter's store entry that name its base model's tag (`python -m models
# import-adapter --base TAG` writes base_model).
BASE_LABELS = ("base_model", "base")
logger = logging.getLogger(__name__)
# Where an adapter's LoRA weights may sit: the Llama projections of the language model.
_DECODER = "language_model."


def declare_adapter_models(config: LMMConfig):
    """Class decorator (below ``@bentoml.service``): one ``BentoModel`` class attribute per
    served adapter, which BentoML collects like any model the service declares."""
    import bentoml

    def declare(cls):
        attrs = {}
        for i, adapter in enumerate(config.adapters):
            attrs[adapter.name] = f"lora_adapter_{i}"
            setattr(cls, attrs[adapter.name], bentoml.models.BentoModel(adapter.model))
        cls.lora_adapter_attrs = attrs
        return cls

    return declare


def stored_adapters(service: Any) -> dict[str, Any]:
    """Served name -> its ``bentoml.Model`` (path, tag, info) on a decorated service instance."""
    return {name: getattr(service, attr) for name, attr in service.lora_adapter_attrs.items()}


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    path: str
    rank: int


def check_adapter(name: str, path: str | Path, labels: dict[str, str] | None = None,
                  base: str | None = None) -> AdapterInfo:
    """The adapter's PEFT directory, checked: a LoRA of the language model only, of the base
    model this server serves (``base``, its store tag), where the entry's labels name its base:
    another name is refused, another version of the same name logged."""
    path = Path(path)
    missing = [f for f in ADAPTER_FILES if not (path / f).is_file()]
    if missing:
        raise ValueError(f"adapter {name!r}: {path} has no {', '.join(missing)}; store a PEFT "
                         "LoRA directory (save_pretrained) with python -m models import-adapter")
    config = json.loads((path / "adapter_config.json").read_text())
    if config.get("peft_type") != "LORA":
        raise ValueError(f"adapter {name!r}: peft_type {config.get('peft_type')!r}; only LORA "
                         "adapters are served")
    for unsupported in ("use_dora", "modules_to_save", "trainable_token_indices"):
        if config.get(unsupported):
            raise ValueError(f"adapter {name!r}: {unsupported} is set; the engines serve plain "
                             "LoRA (low-rank deltas of linear layers) only")
    trained_on = next((labels[k] for k in BASE_LABELS if (labels or {}).get(k)), None)
    if trained_on and base:
        (want, _, version), (have, _, had) = base.partition(":"), trained_on.partition(":")
        if want != have:
            raise ValueError(f"adapter {name!r} was trained on {trained_on!r}, but this "
                             f"server's LLM is {base!r}; serve it with its own base model")
        if version and had and "latest" not in (version, had) and version != had:
            logger.warning("adapter %r was trained on %s; this server's LLM is %s", name,
                           trained_on, base)
    from safetensors import safe_open

    with safe_open(str(path / "adapter_model.safetensors"), "pt") as weights:
        keys = list(weights.keys())
    outside = sorted({k.rsplit(".lora_", 1)[0].removeprefix("base_model.model.") for k in keys
                      if _DECODER not in k or ".lora_" not in k or ".embed_tokens." in k})
    if outside or not keys:
        raise ValueError(
            f"adapter {name!r} adapts {', '.join(outside[:3]) or 'nothing'}"
            f"{' ...' if len(outside) > 3 else ''}: only the language model's linear layers "
            "(model.language_model.*) can be served, the vision tower runs in another service")
    rank = max([int(config["r"]), *map(int, (config.get("rank_pattern") or {}).values())])
    return AdapterInfo(name, str(path), rank)
