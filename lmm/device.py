"""Device and dtype resolution shared by the runners."""

from __future__ import annotations


def resolve_device_dtype(device: str, dtype: str):
    """``auto`` means CUDA when present; bf16 there, fp32 on CPU (CPU bf16 matmuls are slow)."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return torch.device(device), getattr(torch, dtype)
