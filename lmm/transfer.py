"""Image features on the wire: vision runner -> API service -> LLM runner, in the model's dtype.

Features are the largest thing a request moves between services (LLaVA-1.5-7B: 576 x 4096 per
image, 9.4 MB as float32). They travel as numpy arrays (BentoML pickles them, buffers out of
band), in the dtype the vision tower computed them in, so float16 and bfloat16 models move half
the bytes of float32 and nothing is rounded on the way:

- float32 and float16 travel as themselves;
- bfloat16 has no numpy dtype: it travels as its raw 16-bit patterns in a ``uint16`` array. The
  dtype is the tag: image features are never integers, so ``uint16`` here always means
  bfloat16 bits. (float16 as a carrier would not be lossless: bfloat16's range reaches 3e38,
  float16's ends at 65504, and values under 6e-5 lose bits as float16 subnormals.)

The API service never reads the values (it caches and forwards them), so it needs no torch;
the LLM runner turns them back into a tensor of its engine's dtype (``from_wire``).
"""

from __future__ import annotations

import numpy as np

# numpy dtype on the wire -> the dtype it stands for
WIRE_DTYPES = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16",
               np.dtype(np.uint16): "bfloat16"}


def to_wire(tensor) -> np.ndarray:
    """A torch tensor as the array that carries it, on the CPU, without rounding (float32,
    float16 and bfloat16; any other floating dtype travels as float32)."""
    import torch

    tensor = tensor.detach().to("cpu").contiguous()
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(np.uint16)
    if tensor.dtype in (torch.float16, torch.float32):
        return tensor.numpy()
    return tensor.float().numpy()


def wire_dtype(array: np.ndarray) -> str:
    """The dtype ``array`` carries ("float32", "float16" or "bfloat16"); ValueError otherwise."""
    name = WIRE_DTYPES.get(array.dtype)
    if name is None:
        raise ValueError(f"image features of dtype {array.dtype} are not accepted; send float32, "
                         "float16, or bfloat16 bits as uint16")
    return name


def from_wire(array: np.ndarray, dtype=None, device=None):
    """The tensor ``array`` carries, moved to ``device`` and then converted to ``dtype`` (a torch
    dtype; None keeps the sent one), so that a conversion runs on the GPU, not the CPU. Features
    sent in the engine's own dtype are not converted at all: a bfloat16 array sent to a bfloat16
    engine comes back bit for bit."""
    import torch

    sent = wire_dtype(array)
    if not array.flags.writeable:  # a buffer BentoML received: torch wants memory it may own
        array = array.copy()
    array = np.ascontiguousarray(array)
    if sent == "bfloat16":
        tensor = torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    else:
        tensor = torch.from_numpy(array)
    if device is not None:
        tensor = tensor.to(device)
    return tensor if dtype is None else tensor.to(dtype)
