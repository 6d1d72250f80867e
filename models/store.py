"""Put a ``save_pretrained`` directory into the BentoML model store as a versioned entry.

The version is derived from the weights' content hash, so rebuilding identical weights finds
the existing entry instead of piling up duplicates, and a Bento pins exactly what it serves.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
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
                  metadata: dict | None = None) -> bentoml.Model:
    """Store ``directory`` as ``name:<hash>``; an identical entry already there is reused."""
    weights_hash = content_hash(directory)
    tag = f"{name}:{weights_hash[:16]}"
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
