"""Fuzzing the served API from its own OpenAPI spec (/docs.json) with schemathesis.

Every operation of the spec, native routes and the /v1 routes alike, gets generated requests in
two modes: *positive* (bodies that follow the schema) and *negative* (bodies that break it). Each
answer must be

- not a 5xx (but a 504 where the request set its own ``timeout`` and it ran out), and within
  ``TIMEOUT`` seconds (a hang fails the test);
- for a 4xx, the one error body ``{"error": {"message", "type", "param", "code"}}``;
- for text sent in a multipart file field (``images``, ``query_image``, ``candidate_images``),
  a 400 naming that field: such text is refused, never fetched as a URL;
- for a 200 from a streaming route (``/generate_stream``, ``/v1/...`` with ``stream: true``),
  ``text/event-stream`` ending in ``data: [DONE]``; JSON otherwise.

Generated values are sprinkled with ones the server knows (its model names, a real PNG as a data
URL, small ``max_tokens``), so positive requests also reach the generation and embedding paths
and not only the validation in front of them. Runs on one backend (transformers, configs/test.yaml),
on a server of its own: the fuzzed surface (routes, validation, error shapes) is the API
service's, the same in front of either engine, and whatever a hostile request breaks stays out of
the server the other tests share. ``LMM_FUZZ_EXAMPLES`` sets the examples per operation and mode.
A loopback listener stands for any URL sent: no request may make the server call it.
"""

from __future__ import annotations

import base64
import io
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import requests

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from models.shapes.data import make_samples  # noqa: E402
from tests.conftest import serve  # noqa: E402
from tests.helpers import assert_error  # noqa: E402

pytestmark = pytest.mark.integration

EXAMPLES = int(os.environ.get("LMM_FUZZ_EXAMPLES", "25"))
TIMEOUT = 30.0  # seconds, per request, all of its body included
BUDGET = 45.0  # seconds per operation and mode: past it, the remaining examples are not sent
FILE_FIELDS = {"images", "query_image", "candidate_images"}
STREAMING = {"/generate_stream"}

# What the spec must list (a new route should be fuzzed too: add it here).
OPERATIONS = [
    ("GET", "/healthz"), ("GET", "/livez"), ("GET", "/readyz"), ("GET", "/metrics"),
    ("POST", "/generate"), ("POST", "/generate_stream"), ("POST", "/embed"), ("POST", "/rank"),
    ("POST", "/model_info"), ("POST", "/runner_stats"),
    ("GET", "/v1/models"), ("GET", "/v1/models/{model_id}"),
    ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/embeddings"),
]


def _png_data_url() -> str:
    buffer = io.BytesIO()
    make_samples(1, seed=5)[0].image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class _Listener:
    """A loopback HTTP server that counts the requests it gets."""

    def __init__(self):
        hits = self.hits = []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                hits.append(self.path)
                self.send_response(404)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def listener():
    srv = _Listener()
    yield srv
    srv.close()


def loadable_spec(spec: dict) -> dict:
    """The served spec, as schemathesis can read it.

    BentoML labels it OpenAPI 3.0.2, but its schemas are pydantic 2's JSON Schema (numeric
    ``exclusiveMinimum``, ``type: null`` in ``anyOf``): that is OpenAPI 3.1, so it is read as
    3.1. File fields are ``{"type": "file"}`` (OpenAPI 2): read as ``string``/``binary``.
    """
    spec = json.loads(json.dumps(spec))
    spec["openapi"] = "3.1.0"

    def visit(node):
        if isinstance(node, dict):
            if node.get("type") == "file":
                node["type"] = "string"
                node.setdefault("format", "binary")
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(spec)
    return spec


@pytest.fixture(scope="module")
def fuzzed(bentoml_home, tmp_path_factory):
    """A server of configs/test.yaml for this module alone."""
    srv = serve(bentoml_home, tmp_path_factory.mktemp("fuzz"))
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def url(fuzzed) -> str:
    return fuzzed.url


def _log_tail(server, since: int) -> str:
    """What the server logged since byte ``since`` (its last 4000 characters)."""
    return server.log.read_bytes()[since:].decode(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def spec(url) -> dict:
    r = httpx.get(url + "/docs.json", timeout=TIMEOUT)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.fixture(scope="module")
def schema(spec, url):
    loaded = schemathesis.openapi.from_dict(loadable_spec(spec))
    loaded.config.update(base_url=url)
    return loaded


@pytest.fixture(scope="module")
def known(url, listener) -> dict:
    """Values the server accepts, for generated requests to pick from."""
    models = httpx.get(url + "/v1/models", timeout=TIMEOUT).json()["data"]
    return {
        "chat": next(m["id"] for m in models if m["kind"] == "chat"),
        "embedding": next(m["id"] for m in models if m["kind"] == "embedding"),
        "image": _png_data_url(),
        "url": listener.url + "/fuzz.png",
    }


def test_the_spec_lists_the_fuzzed_operations(spec):
    listed = {(method.upper(), path) for path, item in spec["paths"].items() for method in item}
    assert listed == set(OPERATIONS)


def _sprinkle(case, path: str, known: dict, pick: int) -> None:
    """Put known-good (or URL) values into a generated case, chosen by ``pick``."""
    if pick == 0:
        return
    if path == "/v1/models/{model_id}":
        case.path_parameters["model_id"] = known["chat"] if pick % 2 else known["embedding"]
        return
    body = case.body
    if not isinstance(body, dict):
        return
    if path.startswith("/v1/"):
        body["model"] = known["embedding"] if path.endswith("/embeddings") else known["chat"]
        if "max_tokens" in body or pick == 2:
            body["max_tokens"] = pick * 4
        if path.endswith("/chat/completions") and pick >= 2:
            image = known["url"] if pick == 3 else known["image"]
            body["messages"] = [{"role": "user", "content": [
                {"type": "text", "text": "What shape is this?"},
                {"type": "image_url", "image_url": {"url": image}}]}]
        if path.endswith("/embeddings") and pick >= 2:
            body["input"] = [known["url"] if pick == 3 else known["image"], "a red circle"]
    elif path in ("/generate", "/generate_stream"):
        body["max_tokens"] = pick * 4
        body.setdefault("prompt", "What shape is this?")
        if "model" in body:
            body["model"] = known["chat"]
        if pick >= 2:
            body["images_b64"] = [known["url"] if pick == 3 else known["image"]]
    elif path in ("/embed", "/rank") and pick >= 2:
        body["images_b64" if path == "/embed" else "candidate_images_b64"] = [
            known["url"] if pick == 3 else known["image"]]


def _text_in_file_field(kwargs: dict) -> str | None:
    """The first file field of a multipart request that carries non-empty text, not a file."""
    for name, value in kwargs.get("files") or []:
        if name in FILE_FIELDS and isinstance(value, tuple) and value[0] is None:
            content = value[1]
            if content not in ("", b"", None):
                return name
    return None


def _streams(path: str, kwargs: dict) -> bool:
    body = kwargs.get("json")
    return path in STREAMING or (
        path.startswith("/v1/") and isinstance(body, dict) and body.get("stream") is True)


def _send(session: requests.Session, kwargs: dict) -> tuple[requests.Response, bytes, float]:
    """One request, its whole body read within ``TIMEOUT`` seconds."""
    started = time.monotonic()
    with session.request(**kwargs, timeout=(5, TIMEOUT), stream=True) as r:
        chunks = []
        for chunk in r.iter_content(65536):
            chunks.append(chunk)
            assert time.monotonic() - started < TIMEOUT, "the answer took too long: a hang"
        return r, b"".join(chunks), time.monotonic() - started


def _error_shape(content: bytes) -> dict:
    """The one error body: ``{"error": {"message", "type", "param", "code"}}``."""
    body = json.loads(content)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, body
    assert isinstance(error["message"], str) and error["message"], body
    assert isinstance(error["type"], str) and error["type"], body
    return error


def _sets_timeout(kwargs: dict) -> bool:
    """Whether the request asks for a deadline of its own (``timeout``): past it, a 504."""
    body = kwargs.get("json")
    if isinstance(body, dict):
        return body.get("timeout") is not None
    return any(name == "timeout" for name, _ in kwargs.get("files") or [])


def _check(path: str, kwargs: dict, r: requests.Response, content: bytes) -> None:
    status = r.status_code
    if status == 504 and _sets_timeout(kwargs):  # the deadline the request set itself
        error = _error_shape(content)
        assert error["param"] == "timeout" and "deadline" in error["message"], error
        return
    assert status < 500, content[:2000]
    text_field = _text_in_file_field(kwargs)
    if text_field is not None:
        assert_error(_Answer(status, content), 400, text_field, "uploaded files")
        return
    if 400 <= status < 500:
        assert r.headers.get("content-type", "").startswith("application/json"), r.headers
        assert_error(_Answer(status, content), status)
    elif status == 200 and kwargs["method"] == "POST":
        kind = r.headers.get("content-type", "")
        if _streams(path, kwargs):
            assert kind.startswith("text/event-stream"), (kind, content[:500])
            events = [line[6:] for line in content.decode().splitlines()
                      if line.startswith("data: ")]
            assert events and events[-1] == "[DONE]", content[-500:]
            for event in events[:-1]:
                assert "error" not in json.loads(event), event
        else:
            assert kind.startswith("application/json"), (kind, content[:500])
            json.loads(content)


class _Answer:
    """What ``assert_error`` reads of a response."""

    def __init__(self, status: int, content: bytes):
        self.status_code, self.text = status, content.decode(errors="replace")

    def json(self):
        return json.loads(self.text)


def _reproduce(kwargs: dict) -> str:
    shown = {k: v for k, v in kwargs.items() if k not in ("headers", "timeout") and v}
    kind = (kwargs.get("headers") or {}).get("Content-Type")
    if kind:
        shown["Content-Type"] = kind
    return repr(shown)[:3000]


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                         ids=["positive", "negative"])
@pytest.mark.parametrize("method,path", OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_generated_requests_get_no_5xx_and_the_one_error_shape(schema, fuzzed, url, known,
                                                                listener, method, path, mode):
    operation = schema[path][method]
    has_input = bool(operation.definition.raw.get("parameters")
                     or operation.definition.raw.get("requestBody"))
    if mode is GenerationMode.NEGATIVE and not has_input:
        pytest.skip("no parameters or body to break")
    session = requests.Session()
    sent: list[tuple[int, float]] = []
    started = time.monotonic()

    @given(case=operation.as_strategy(generation_mode=mode),
           pick=st.integers(0, 3) if mode is GenerationMode.POSITIVE else st.integers(0, 1))
    @settings(max_examples=EXAMPLES if has_input else 1, deadline=None, database=None,
              phases=[Phase.generate], suppress_health_check=list(HealthCheck))
    def one(case, pick):
        if time.monotonic() - started > BUDGET:
            return
        _sprinkle(case, path, known, pick)
        kwargs = case.as_transport_kwargs(base_url=url)
        kwargs.pop("timeout", None)
        logged = fuzzed.log.stat().st_size
        try:
            r, content, took = _send(session, kwargs)
            _check(path, kwargs, r, content)
        except BaseException as exc:
            raise AssertionError(f"{exc!r}\nrequest: {_reproduce(kwargs)}\nserver log:\n"
                                 f"{_log_tail(fuzzed, logged)}") from exc
        sent.append((r.status_code, took))

    try:
        one()
    except Unsatisfiable:
        if sent:
            raise
        pytest.skip("no request breaking this operation's schema could be generated")
    finally:
        session.close()
    assert sent, "no request was sent"
    assert not listener.hits, f"the server fetched {listener.hits}"
    print(f"{method} {path} {mode.value}: {len(sent)} requests, statuses "
          f"{sorted({s for s, _ in sent})}, slowest {max(t for _, t in sent):.2f}s")


# Requests the fuzzing above has found answered with a 500; kept as fixed examples.
FOUND = {
    "multipart-part-without-headers": ("/generate", {
        "content": b"--b0undary\r\n[]--b0undary--\r\n",
        "headers": {"Content-Type": "multipart/form-data; boundary=b0undary"}}),
    "multipart-part-without-headers-embed": ("/embed", {
        "content": b"--b0undary\r\n\xc2\x80X--b0undary--\r\n",
        "headers": {"Content-Type": "multipart/form-data; boundary=b0undary"}}),
    "temperature-1e-308": ("/generate", {
        "data": {"prompt": "hi", "max_tokens": "4", "temperature": "1e-308"}}),
    "top-p-5e-324": ("/generate", {
        "data": {"prompt": "hi", "max_tokens": "4", "temperature": "1", "top_p": "5e-324"}}),
    "repetition-penalty-5e-324": ("/generate", {
        "data": {"prompt": "hi", "max_tokens": "4", "temperature": "1",
                 "repetition_penalty": "5e-324"}}),
    "chat-temperature-1e-308": ("/v1/chat/completions", {
        "json": {"model": "shapes-llava", "max_tokens": 4, "temperature": 1e-308,
                 "messages": [{"role": "user", "content": "hi"}]}}),
}


@pytest.mark.parametrize("name", list(FOUND))
def test_requests_the_fuzzing_found_get_no_5xx(fuzzed, url, name):
    path, request = FOUND[name]
    if "data" in request:  # a multipart form, as the native routes take it
        request = {"files": [(k, (None, v)) for k, v in request["data"].items()]}
    logged = fuzzed.log.stat().st_size
    r = httpx.post(url + path, timeout=TIMEOUT, **request)
    assert r.status_code < 500, f"{r.text}\nserver log:\n{_log_tail(fuzzed, logged)}"
    if r.status_code >= 400:
        assert_error(r, r.status_code)
