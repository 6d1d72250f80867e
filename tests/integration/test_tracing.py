"""Tracing: with ``tracing.otlp_endpoint`` set, the three services export spans over OTLP/HTTP to
a collector, and one request is one trace through the API, the vision runner and the LLM runner.

The collector here is a real OTLP/HTTP receiver on loopback (``POST /v1/traces``, protobuf
``ExportTraceServiceRequest``), decoded with the OpenTelemetry protocol classes.
"""

from __future__ import annotations

import base64
import io
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from models.shapes.data import make_samples
from tests.conftest import serve

pytestmark = pytest.mark.integration
SERVICES = {"lmm-api", "lmm-vision", "lmm-llm"}


class Collector(ThreadingHTTPServer):
    """Spans received, as (service.name, trace id hex, span name) triples."""

    def __init__(self):
        self.spans: list[tuple[str, str, str]] = []
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Receive)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1/traces"

    def traces(self) -> dict[str, set[str]]:
        """trace id -> the services that sent spans of it."""
        by_trace: dict[str, set[str]] = defaultdict(set)
        with self.lock:
            for service, trace_id, _ in self.spans:
                by_trace[trace_id].add(service)
        return by_trace


class _Receive(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = ExportTraceServiceRequest.FromString(body)
        with self.server.lock:
            for resource_spans in request.resource_spans:
                attributes = {a.key: a.value.string_value
                              for a in resource_spans.resource.attributes}
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        self.server.spans.append(
                            (attributes.get("service.name", ""), span.trace_id.hex(), span.name))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def collector():
    server = Collector()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def traced(bentoml_home, tmp_path_factory, collector):
    # Export every 200 ms instead of every 5 s, so the test waits less.
    srv = serve(bentoml_home, tmp_path_factory.mktemp("logs-tracing"),
                extra=["--arg", f"tracing.otlp_endpoint={collector.url}"],
                env={"OTEL_BSP_SCHEDULE_DELAY": "200"})
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def image_url() -> str:
    buffer = io.BytesIO()
    make_samples(1, seed=3)[0].image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat_with_an_image(url: str) -> httpx.Response:
    body = {"model": "shapes-llava", "max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image_url()}},
                {"type": "text", "text": "What shape is it?"}]}]}
    response = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response


def test_one_request_is_one_trace_through_all_three_services(traced, collector):
    response = chat_with_an_image(traced.url)
    trace_id = response.headers["x-request-id"]  # no client id: the request's trace id
    assert len(trace_id) == 32 and int(trace_id, 16)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and collector.traces().get(trace_id, set()) != SERVICES:
        time.sleep(0.2)
    assert collector.traces().get(trace_id) == SERVICES
    names = {(service, name) for service, tid, name in collector.spans if tid == trace_id}
    assert any(service == "lmm-vision" and "encode" in name for service, name in names), names
    assert any(service == "lmm-llm" and "generate" in name for service, name in names), names


def test_a_request_without_images_does_not_reach_the_vision_runner(traced, collector):
    response = httpx.post(traced.url + "/generate", data={"prompt": "hi", "max_tokens": "2"},
                          timeout=120)
    assert response.status_code == 200, response.text
    trace_id = response.headers["x-request-id"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "lmm-llm" not in collector.traces().get(trace_id, ()):
        time.sleep(0.2)
    # A later request with an image: once its vision span is in, anything the vision runner
    # had made for the first request is in too (one exporter queue per process, in order).
    later = chat_with_an_image(traced.url).headers["x-request-id"]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and "lmm-vision" not in collector.traces().get(later, ()):
        time.sleep(0.2)
    assert "lmm-vision" in collector.traces().get(later, ())
    assert collector.traces().get(trace_id) == {"lmm-api", "lmm-llm"}
