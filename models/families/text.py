"""A tiny random-weight text-only LLM (``LlamaForCausalLM``), built offline.

The shapes model's word-level tokenizer and chat template (``models/shapes/weights/llava``: a
template that takes string content), a 2-layer Llama at hidden size 64.

    python -m models.families.text OUT_DIR [--seed N]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

SHAPES = Path(__file__).resolve().parents[1] / "shapes" / "weights" / "llava"


def build(out_dir: str | Path, seed: int = 0) -> Path:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(vocab_size=40, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         head_dim=32, max_position_embeddings=512, bos_token_id=2,
                         eos_token_id=3, pad_token_id=0, tie_word_embeddings=False,
                         initializer_range=0.2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=2, eos_token_id=3, pad_token_id=0)
    model.save_pretrained(out)
    shutil.copy(SHAPES / "tokenizer.json", out / "tokenizer.json")
    shutil.copy(SHAPES / "chat_template.jinja", out / "chat_template.jinja")
    tokenizer_config = json.loads((SHAPES / "tokenizer_config.json").read_text())
    tokenizer_config.pop("processor_class", None)
    tokenizer_config.pop("image_token", None)
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build(args.out_dir, args.seed))


if __name__ == "__main__":
    main()
