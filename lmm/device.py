"""Device and dtype resolution shared by the runners."""

from __future__ import annotations


def map_uses_cuda(device_map) -> bool:
    """A device_map that runs something on a GPU: a strategy (auto/balanced/sequential) when
    CUDA is present, or an explicit map naming a CUDA device (an int is one, as in accelerate)."""
    import torch

    if device_map is None:
        return False
    if isinstance(device_map, str):
        return torch.cuda.is_available()
    return any(isinstance(d, int) or str(d).startswith("cuda") for d in device_map.values())


def resolve_device_dtype(device: str, dtype: str, device_map=None):
    """``auto`` means CUDA when present; bf16 there, fp32 on CPU (CPU bf16 matmuls are slow).

    ``device`` is ``cpu``, ``cuda``, ``cuda:N`` or ``auto``. With a ``device_map`` the model is
    spread by it, and ``auto`` dtype follows whether it puts anything on a GPU.
    """
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    on_gpu = map_uses_cuda(device_map) if device_map is not None else resolved.type == "cuda"
    if dtype == "auto":
        dtype = "bfloat16" if on_gpu else "float32"
    return resolved, getattr(torch, dtype)
