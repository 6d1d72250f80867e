"""The default bundled models: a tiny LLaVA and a tiny CLIP trained on synthetic shapes.

`weights/llava` and `weights/clip` are ordinary `save_pretrained` directories, so they load with
`AutoProcessor` / `LlavaForConditionalGeneration` / `CLIPModel` like hub checkpoints.
"""

from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"
LLAVA_DIR = WEIGHTS_DIR / "llava"
CLIP_DIR = WEIGHTS_DIR / "clip"
