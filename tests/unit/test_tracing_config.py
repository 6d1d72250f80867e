"""tracing: the config turns into BentoML's tracing section for every service, or none."""

import pytest
from pydantic import ValidationError

from lmm.config import LMMConfig

pytestmark = pytest.mark.unit


def test_no_endpoint_no_tracing_section():
    assert LMMConfig().tracing.service_config() == {}


def test_an_endpoint_exports_over_otlp_http_at_the_sample_rate():
    config = LMMConfig(tracing={"otlp_endpoint": "http://collector:4318/v1/traces",
                                "sample_rate": 0.25})
    assert config.tracing.service_config() == {"tracing": {
        "exporter_type": "otlp", "sample_rate": 0.25,
        "otlp": {"protocol": "http", "endpoint": "http://collector:4318/v1/traces"}}}


def test_a_sample_rate_without_an_endpoint_is_refused_by_name():
    with pytest.raises(ValidationError, match="tracing.sample_rate has no effect"):
        LMMConfig(tracing={"sample_rate": 0.5})


def test_an_unknown_tracing_field_is_refused():
    with pytest.raises(ValidationError, match="protocol"):
        LMMConfig(tracing={"otlp_endpoint": "http://c:4318/v1/traces", "protocol": "grpc"})
