"""Placement and quantization settings: per-runner devices, llm.device_map / max_memory /
offload_folder (transformers), llm.quantization (vllm), each refused where no engine uses it,
and the GPUs a runner requests following its placement."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from lmm.config import LMMConfig
from lmm.device import resolve_device_dtype
from runners.engines import make_engine

pytestmark = pytest.mark.unit
TWO_GPU_MAP = {"model.language_model.embed_tokens": 0, "model.language_model.layers": "cuda:1",
               "model.language_model.norm": "cuda:1", "lm_head": "cpu"}


def test_each_runner_names_its_device_and_the_top_level_is_the_default():
    config = LMMConfig(device="cpu")
    assert (config.vision_device(), config.llm_device()) == ("cpu", "cpu")
    config = LMMConfig(device="cuda", vision={"device": "cuda:1"}, llm={"device": "cuda:0"})
    assert (config.vision_device(), config.llm_device()) == ("cuda:1", "cuda:0")
    assert LMMConfig(device="cuda:2").llm_device() == "cuda:2"
    for bad in ("gpu", "cuda:", "cuda:x", "cpu:0"):
        with pytest.raises(ValidationError, match="should match pattern"):
            LMMConfig(llm={"device": bad})
    with pytest.raises(ValidationError, match="should match pattern"):
        LMMConfig(vision={"device": "tpu"})


def test_device_and_dtype_resolution():
    assert resolve_device_dtype("cpu", "auto") == (torch.device("cpu"), torch.float32)
    assert resolve_device_dtype("cuda:1", "auto") == (torch.device("cuda:1"), torch.bfloat16)
    assert resolve_device_dtype("cpu", "auto", {"a": "cpu", "b": "disk"})[1] == torch.float32
    assert resolve_device_dtype("cpu", "auto", {"a": 0, "b": "cpu"})[1] == torch.bfloat16


def test_device_map_settings_reach_the_transformers_engine():
    config = LMMConfig(llm={"device_map": {"model.language_model": "cpu", "lm_head": "disk"},
                            "offload_folder": "/tmp/offload"})
    engine = make_engine(config, "/models/llava")
    assert engine.device_map == {"model.language_model": "cpu", "lm_head": "disk"}
    assert (engine.max_memory, engine.offload_folder) == (None, "/tmp/offload")
    engine = make_engine(LMMConfig(llm={"device_map": "balanced",
                                        "max_memory": {0: "20GiB", "cpu": "60GiB"}}), "/m")
    assert (engine.device_map, engine.max_memory) == ("balanced", {0: "20GiB", "cpu": "60GiB"})
    assert make_engine(LMMConfig(device="cpu", llm={"device": "cuda:1"}), "/m").device_name == (
        "cuda:1")


def test_transformers_placement_is_refused_on_vllm_and_quantization_on_transformers():
    for field, value in (("device_map", "auto"), ("max_memory", {0: "1GiB"}),
                         ("offload_folder", "/tmp")):
        with pytest.raises(ValidationError, match=f"llm.{field}: used by the transformers "
                                                  "backend only"):
            LMMConfig(llm={"backend": "vllm", field: value})
    with pytest.raises(ValidationError, match="llm.quantization: used by the vllm backend only"):
        LMMConfig(llm={"quantization": "awq"})
    config = LMMConfig(llm={"backend": "vllm", "quantization": "awq"})
    assert config.llm.vllm_args()["quantization"] == "awq"
    assert "quantization" not in LMMConfig(llm={"backend": "vllm"}).llm.vllm_args()
    with pytest.raises(ValidationError, match="should match pattern"):
        LMMConfig(llm={"backend": "vllm", "quantization": "AWQ 4bit"})


def test_inconsistent_placements_are_refused_with_the_fix():
    with pytest.raises(ValidationError, match="max_memory is used with llm.device_map only"):
        LMMConfig(llm={"max_memory": {0: "1GiB"}})
    with pytest.raises(ValidationError, match="offload_folder is used with llm.device_map only"):
        LMMConfig(llm={"offload_folder": "/tmp"})
    with pytest.raises(ValidationError, match="both place the language model"):
        LMMConfig(llm={"device": "cuda:1", "device_map": "auto"})
    with pytest.raises(ValidationError, match="offloads to disk: set llm.offload_folder"):
        LMMConfig(llm={"device_map": {"model": "cpu", "lm_head": "disk"}})
    with pytest.raises(ValidationError, match="disk entries of llm.device_map only"):
        LMMConfig(llm={"device_map": {"model": "cpu", "lm_head": "cpu"}, "offload_folder": "/t"})
    with pytest.raises(ValidationError, match="an explicit map places every module itself"):
        LMMConfig(llm={"device_map": {"model": 0}, "max_memory": {0: "1GiB"}})
    with pytest.raises(ValidationError, match="device_map is empty"):
        LMMConfig(llm={"device_map": {}})
    with pytest.raises(ValidationError, match="llm.device_map"):
        LMMConfig(llm={"device_map": {"model": "gpu0"}})
    with pytest.raises(ValidationError, match="llm.device_map"):
        LMMConfig(llm={"device_map": "everywhere"})
    with pytest.raises(ValidationError, match="names one GPU but llm.tensor_parallel_size"):
        LMMConfig(llm={"backend": "vllm", "device": "cuda:1", "tensor_parallel_size": 2})
    with pytest.raises(ValidationError, match="cuda:1 names one GPU but llm.tensor_parallel"):
        LMMConfig(device="cuda:1", llm={"backend": "vllm", "tensor_parallel_size": 2})
    LMMConfig(device="cuda:1", llm={"backend": "vllm", "device": "cuda",
                                    "tensor_parallel_size": 2})
    with pytest.raises(ValidationError, match="placement uses 2 GPUs"):
        LMMConfig(llm={"gpus": 1, "device_map": TWO_GPU_MAP})


def test_gpus_requested_follow_the_placement():
    """tensor_parallel_size (vllm), or the distinct CUDA devices of a device_map
    (transformers); an explicit llm.gpus that is larger stays."""
    def gpus(**llm):
        config = LMMConfig(llm=llm)
        return config.resources(config.llm).get("gpu", 0)

    assert gpus(backend="vllm", tensor_parallel_size=4) == 4
    assert gpus(device_map=TWO_GPU_MAP) == 2
    assert gpus(device_map={"model": 3, "lm_head": "cuda:3"}) == 1
    assert gpus(device_map="balanced", max_memory={0: "10GiB", 1: "10GiB", "cpu": "1GiB"}) == 2
    assert gpus(device_map={"model": "cpu", "lm_head": "cpu"}) == 0
    assert gpus(gpus=4, device_map=TWO_GPU_MAP) == 4
    assert gpus() == 0 and LMMConfig().resources(LMMConfig().llm)["gpu"] == 1


def test_vllm_takes_the_quantization_and_checks_the_method(llava_dir):
    from runners.engines.vllm_engine import VLLMEngine

    config = LMMConfig(device="cpu", llm={"backend": "vllm", "quantization": "gptq"})
    engine = make_engine(config, str(llava_dir))
    assert engine.engine_args().quantization == "gptq"
    assert make_engine(LMMConfig(llm={"backend": "vllm"}), "/m").engine_args().quantization is None
    with pytest.raises(ValueError, match="'nope' is not a vLLM quantization method; choose"):
        VLLMEngine(str(llava_dir), device="cpu", quantization="nope")._check_platform()
