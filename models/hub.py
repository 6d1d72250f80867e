"""Import a Hugging Face checkpoint (model + processor files) into the BentoML model store."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from models.store import save_to_store


class HubUnreachable(RuntimeError):
    pass


def store_name(model_id: str) -> str:
    return re.sub(r"[^a-z0-9_.-]+", "-", model_id.lower()).strip("-.")


def download(model_id: str, revision: str, target: Path) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(
            model_id, revision=revision, local_dir=target,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"],
        ))
    except (LocalEntryNotFoundError, OSError, HfHubHTTPError) as exc:
        raise HubUnreachable(
            f"could not download {model_id}@{revision} from the Hugging Face Hub ({exc}). "
            "Check the network or HF_ENDPOINT, and HF_TOKEN for gated models; or save the "
            "checkpoint elsewhere and copy its directory here."
        ) from exc


def import_local(directory: Path, name: str | None = None) -> int:
    """A checkpoint directory (anything ``from_pretrained`` reads: config.json, weights,
    processor files) into the store as it is, the same entry a hub import makes of it."""
    from lmm.architectures import (EMBEDDING, GENERATIVE, UnsupportedModel, architecture_of,
                                    matches)

    try:
        found = architecture_of(directory)
    except UnsupportedModel as exc:
        print(f"[models] error: {exc}", flush=True)
        return 2
    if not any(directory.glob("*.safetensors")):
        print(f"[models] error: {directory} has no *.safetensors weights; load it with "
              "from_pretrained and save it with save_pretrained (safetensors) first", flush=True)
        return 2
    if not matches(found, GENERATIVE) and found not in EMBEDDING:
        print(f"[models] warning: {found or 'no architecture'} is not served by this build "
              f"(serves {', '.join([*GENERATIVE, *EMBEDDING])}); storing it anyway", flush=True)
    model = save_to_store(name or store_name(directory.resolve().name), directory,
                          labels={"source": "local"},
                          metadata={"source": str(directory.resolve())})
    print(f"[models] {model.tag}", flush=True)
    return 0


def import_checkpoint(model_id: str, name: str | None = None, revision: str = "main") -> int:
    """``model_id`` is a hub id, or a local checkpoint directory (stored as it is)."""
    if Path(model_id).is_dir():
        return import_local(Path(model_id), name)
    with tempfile.TemporaryDirectory() as tmp:
        print(f"[models] downloading {model_id}@{revision} ...", flush=True)
        try:
            directory = download(model_id, revision, Path(tmp) / "snapshot")
        except HubUnreachable as exc:
            print(f"[models] error: {exc}", flush=True)
            return 2
        model = save_to_store(name or store_name(model_id), directory,
                              labels={"source": "huggingface", "hf_id": model_id},
                              metadata={"hf_id": model_id, "revision": revision})
    print(f"[models] {model.tag}", flush=True)
    return 0
