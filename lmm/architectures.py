"""Which checkpoints this build serves, checked when the service is loaded.

A model of another architecture would load (every runner reads it with transformers' auto
classes) and then answer wrongly or fail on the first request: its vision features, image
tokens or positions follow another layout. So the configured models are checked when
``service.py`` is imported, before any worker starts, and ``bentoml serve`` / ``bentoml build``
stop with a message that names the architectures that are supported.
"""

from __future__ import annotations

import json
from pathlib import Path

from lmm import families

# architectures[0] of config.json (or a "*Suffix" pattern) -> what serves it: every family of
# the registry (lmm.families.REGISTRY)
GENERATIVE = families.supported()
EMBEDDING = {
    "CLIPModel": "CLIP image and text towers with projections",
}


class UnsupportedModel(ValueError):
    """The configured model is not of an architecture this build serves."""


def architecture_of(model_path: str | Path) -> str:
    """``architectures[0]`` of the checkpoint's config.json ("" when it names none)."""
    config = Path(model_path) / "config.json"
    if not config.is_file():
        raise UnsupportedModel(f"{model_path} has no config.json: it is not a transformers "
                               "checkpoint (save it with save_pretrained)")
    names = json.loads(config.read_text()).get("architectures") or [""]
    return names[0]


def matches(architecture: str, supported: dict[str, str]) -> bool:
    """``architecture`` is one of ``supported``'s names or ends with a ``*Suffix`` of it."""
    return any(architecture == name or (name.startswith("*") and architecture.endswith(name[1:])
                                        and len(architecture) >= len(name))
               for name in supported)


def require(model_path: str | Path, setting: str, tag: str, supported: dict[str, str]) -> str:
    """The architecture of ``model_path``; UnsupportedModel naming the supported ones if it is
    not one of ``supported``. ``setting`` and ``tag`` say which config field chose the model."""
    found = architecture_of(model_path)
    if matches(found, supported):
        return found
    listed = "; ".join(f"{name} ({what})" for name, what in supported.items())
    raise UnsupportedModel(
        f"{setting}={tag} is a {found or 'checkpoint without an architectures entry'}, which "
        f"this build does not serve. {setting} must be one of: {listed}. Choose another model "
        "(bentoml models list shows the store), see the README's Models section.")


def check_models(llm_path: str | Path, llm_tag: str, clip_path: str | Path, clip_tag: str) -> None:
    require(llm_path, "llm_model", llm_tag, GENERATIVE)
    require(clip_path, "clip_model", clip_tag, EMBEDDING)
