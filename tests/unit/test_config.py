from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from lmm.config import LMMConfig

pytestmark = pytest.mark.unit
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name", ["default.yaml", "test.yaml"])
def test_shipped_configs_parse(name):
    config = LMMConfig(**yaml.safe_load((CONFIGS / name).read_text()))
    assert config.vision.batching.max_batch_size >= config.images.max_images


def test_default_yaml_matches_the_model_defaults():
    """configs/default.yaml documents the defaults: it must not drift from them."""
    assert LMMConfig(**yaml.safe_load((CONFIGS / "default.yaml").read_text())) == LMMConfig()


def test_typos_and_inconsistent_caps_are_refused():
    with pytest.raises(ValidationError, match="extra"):
        LMMConfig(llm={"max_num_seq": 4})
    with pytest.raises(ValidationError, match="max_batch_size must be >="):
        LMMConfig(vision={"batching": {"max_batch_size": 2}}, images={"max_images": 4})


def test_gpu_resources_are_declared_from_config():
    config = LMMConfig()
    assert config.resources(config.llm)["gpu"] == 1
    assert "gpu" not in config.resources(config.api)


@pytest.mark.parametrize("name", ["vllm.yaml", "gpu.yaml"])
def test_vllm_configs_parse_and_fill_the_engine_arguments(name):
    config = LMMConfig(**yaml.safe_load((CONFIGS / name).read_text()))
    assert config.llm.backend == "vllm"
    args = config.llm.vllm_args()
    assert set(args) == {"gpu_memory_utilization", "tensor_parallel_size", "enforce_eager",
                         "enable_prefix_caching", "cpu_kvcache_space_gib"}
    assert None not in args.values()


def test_gpu_config_shards_the_llm_over_the_gpus_it_requests():
    config = LMMConfig(**yaml.safe_load((CONFIGS / "gpu.yaml").read_text()))
    assert config.llm.tensor_parallel_size == config.llm.gpus == 2
    assert config.resources(config.llm)["gpu"] == 2 and config.dtype == "bfloat16"
    with pytest.raises(ValidationError, match="tensor_parallel_size must be <= llm.gpus"):
        LMMConfig(llm={"backend": "vllm", "gpus": 1, "tensor_parallel_size": 2})


def test_vllm_settings_are_refused_on_the_transformers_backend():
    """A field no engine reads is refused, not ignored."""
    with pytest.raises(ValidationError, match="llm.gpu_memory_utilization: used by the vllm"):
        LMMConfig(llm={"gpu_memory_utilization": 0.5})
    with pytest.raises(ValidationError, match="llm.enforce_eager, llm.cpu_kvcache_space_gib"):
        LMMConfig(llm={"backend": "transformers", "enforce_eager": True,
                       "cpu_kvcache_space_gib": 2})
    assert LMMConfig(llm={"backend": "vllm", "enforce_eager": True}).llm.vllm_args()[
        "enforce_eager"] is True


def test_dotted_arg_overrides_nest_into_the_config():
    """`bentoml serve --arg-file F --arg llm.max_num_seqs=64`, as BentoML hands it over."""
    from lmm.config import nest_arguments

    file = yaml.safe_load((CONFIGS / "test.yaml").read_text())
    args = nest_arguments({**file, "llm.max_num_seqs": "64", "llm.backend": "vllm",
                           "llm.enforce_eager": "true", "images.allowed_url_domains": "[a.com]"})
    config = LMMConfig(**args)
    assert config.llm.max_num_seqs == 64 and config.llm.backend == "vllm"
    assert config.llm.enforce_eager is True and config.images.allowed_url_domains == ["a.com"]
    assert config.llm.max_model_len == file["llm"]["max_model_len"]  # the rest of the file stays
    with pytest.raises(ValidationError, match="max_num_seq\n"):
        LMMConfig(**nest_arguments({"llm.max_num_seq": "4"}))
    with pytest.raises(ValueError, match="device is not a section"):
        nest_arguments({"device": "cpu", "device.x": "1"})


def test_arg_overrides_arg_file_whatever_the_order():
    """BentoML keeps the first value parsed for a key: --arg after --arg-file would lose."""
    from bentoml._internal.configuration.containers import BentoMLContainer
    from bentoml._internal.utils.args import set_arguments

    from lmm.config import _let_arg_override_arg_file

    before = dict(BentoMLContainer.bento_arguments.get())
    try:
        set_arguments({"max_tokens_limit": 256, "llm.max_num_seqs": "8", "device": "cpu"},
                      override=True)
        _let_arg_override_arg_file(["/x/bin/bentoml", "serve", "service:LMMService",
                                    "--arg-file", "configs/test.yaml", "--arg",
                                    "max_tokens_limit=1024", "--arg=llm.max_num_seqs=64"])
        arguments = BentoMLContainer.bento_arguments.get()
        assert arguments["max_tokens_limit"] == "1024" and arguments["llm.max_num_seqs"] == "64"
        assert arguments["device"] == "cpu"  # what --arg does not name stays as the file says
        _let_arg_override_arg_file(["/x/bin/python", "-m", "pytest", "--arg", "x=1"])
        assert "x" not in BentoMLContainer.bento_arguments.get()
    finally:
        BentoMLContainer.bento_arguments.set(before)


def test_adapters_are_checked_and_lora_settings_need_vllm_and_adapters():
    terse = {"name": "shapes-terse", "model": "lmm-shapes-llava-terse:latest"}
    config = LMMConfig(adapters=[terse], llm={"backend": "vllm", "max_lora_rank": 8})
    assert config.adapter_names() == ["shapes-terse"]
    assert config.llm.vllm_lora_args(1) == {"max_loras": 1, "max_lora_rank": 8}
    assert LMMConfig(llm={"backend": "vllm"}).llm.vllm_lora_args(0) == {}
    with pytest.raises(ValidationError, match="shapes-terse named more than once"):
        LMMConfig(adapters=[terse, {**terse, "model": "other:latest"}])
    with pytest.raises(ValidationError, match="'shapes-llava' is already served_model_name"):
        LMMConfig(adapters=[{**terse, "name": "shapes-llava"}])
    with pytest.raises(ValidationError, match="is already the embedding model's name"):
        LMMConfig(adapters=[{**terse, "name": "lmm-shapes-clip"}])
    with pytest.raises(ValidationError, match="llm.max_loras: used by the vllm backend only"):
        LMMConfig(adapters=[terse], llm={"max_loras": 2})
    with pytest.raises(ValidationError, match="llm.max_lora_rank: used only with adapters"):
        LMMConfig(llm={"backend": "vllm", "max_lora_rank": 8})
    with pytest.raises(ValidationError, match="max_lora_rank"):
        LMMConfig(adapters=[terse], llm={"backend": "vllm", "max_lora_rank": 12})


def test_torch_threads_split_the_hosts_cpus_between_the_runners(monkeypatch):
    from lmm import config as config_module

    monkeypatch.setattr(config_module, "usable_cpus", lambda: 16)
    assert LMMConfig().cpu_threads() == 8  # one vision and one LLM process
    assert LMMConfig(vision={"workers": 3}, llm={"workers": 1}).cpu_threads() == 4
    assert LMMConfig(torch_threads=3).cpu_threads() == 3  # set: taken as it is
    monkeypatch.setattr(config_module, "usable_cpus", lambda: 2)
    assert LMMConfig(vision={"workers": 2}).cpu_threads() == 1  # never 0


def test_usable_cpus_follow_the_affinity_mask_and_the_cgroup_quota(monkeypatch, tmp_path):
    import os

    from lmm import config as config_module

    assert 1 <= config_module.usable_cpus() <= len(os.sched_getaffinity(0))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    quota = tmp_path / "cpu.max"
    monkeypatch.setattr(config_module, "Path", lambda p: quota if p.endswith("cpu.max") else p)
    quota.write_text("250000 100000\n")  # a 2.5-CPU container limit
    assert config_module.usable_cpus() == 3
    quota.write_text("max 100000\n")
    assert config_module.usable_cpus() == 6
    quota.unlink()  # no cgroup v2 file
    assert config_module.usable_cpus() == 6


def test_lmm_cpu_threads_sets_a_runners_threads_when_torch_threads_does_not(monkeypatch):
    from lmm import config as config_module

    monkeypatch.setattr(config_module, "usable_cpus", lambda: 16)
    monkeypatch.setenv("LMM_CPU_THREADS", "3")  # a Kubernetes runner pod's CPU request
    assert LMMConfig().cpu_threads() == 3
    assert LMMConfig(torch_threads=5).cpu_threads() == 5
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("LMM_CPU_THREADS", bad)
        with pytest.raises(ValueError, match="LMM_CPU_THREADS"):
            LMMConfig().cpu_threads()
    monkeypatch.delenv("LMM_CPU_THREADS")
    assert LMMConfig().cpu_threads() == 8
