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
