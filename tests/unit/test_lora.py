"""The checks an adapter passes before an engine loads it (lmm/lora.py), and the engine settings
that refuse to start: real PEFT directories, made here."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from lmm.config import LMMConfig
from lmm.lora import AdapterInfo, check_adapter
from runners.engines import make_engine
from runners.engines.vllm_engine import VLLMEngine

pytestmark = pytest.mark.unit


def test_the_test_adapter_passes_with_its_rank(test_adapter_dir):
    info = check_adapter("t", test_adapter_dir, {"role": "lora", "base": "lmm-shapes-llava:1"},
                         "lmm-shapes-llava:latest")
    assert info == AdapterInfo("t", str(test_adapter_dir), 8)


def edited(src, tmp_path, **config):
    out = tmp_path / "adapter"
    shutil.copytree(src, out)
    path = out / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return out


@pytest.mark.parametrize("change, message", [
    ({"peft_type": "IA3"}, "peft_type 'IA3'; only LORA"),
    ({"use_dora": True}, "use_dora is set"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save is set"),
])
def test_other_peft_kinds_are_refused(test_adapter_dir, tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        check_adapter("t", edited(test_adapter_dir, tmp_path, **change))


def test_an_adapter_of_another_base_or_of_the_vision_tower_is_refused(test_adapter_dir,
                                                                       tmp_path, llava_dir,
                                                                       caplog):
    with pytest.raises(ValueError, match="trained on 'other-llava:1'.*lmm-shapes-llava"):
        check_adapter("t", test_adapter_dir, {"base": "other-llava:1"}, "lmm-shapes-llava:x")
    with caplog.at_level("WARNING", logger="lmm.lora"):  # same model, other weights: a warning
        check_adapter("t", test_adapter_dir, {"base_model": "lmm-shapes-llava:1"},
                      "lmm-shapes-llava:2")
    assert "trained on lmm-shapes-llava:1" in caplog.text
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(llava_dir)
    tower = LoraConfig(r=4, target_modules=r".*vision_tower.*\.q_proj")
    get_peft_model(model, tower).save_pretrained(tmp_path / "tower")
    with pytest.raises(ValueError, match="adapts model.vision_tower.*only the language model"):
        check_adapter("t", tmp_path / "tower")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no adapter_config.json, adapter_model"):
        check_adapter("t", tmp_path / "empty")
    assert torch.is_grad_enabled()  # nothing here changed global torch state


def test_vllm_refuses_an_adapter_over_max_lora_rank_and_too_few_slots_on_cpu(test_adapter_dir):
    adapters = [AdapterInfo("a", str(test_adapter_dir), 16), AdapterInfo("b", "x", 8)]
    config = LMMConfig(adapters=[{"name": "a", "model": "a:1"}, {"name": "b", "model": "b:1"}],
                       llm={"backend": "vllm", "max_lora_rank": 8, "max_loras": 1})
    with pytest.raises(ValueError, match=r"adapters a \(rank 16\) exceed llm.max_lora_rank 8"):
        make_engine(config, "unused", adapters=adapters)
    engine = make_engine(config, "unused", adapters=adapters[1:] * 2)
    assert isinstance(engine, VLLMEngine) and engine.max_loras == 1
    engine.adapters = {"a": "x", "b": "y"}
    with pytest.raises(RuntimeError, match="max_loras 1 < 2 adapters: on CPU"):
        engine._check_platform()
    engine.max_loras = 2
    engine._check_platform()
    assert engine._lora_args() == {"enable_lora": True, "max_loras": 3, "max_lora_rank": 8,
                                   "max_cpu_loras": 3}
