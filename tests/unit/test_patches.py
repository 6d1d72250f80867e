"""lmm.patches: BentoML's traffic timeout no longer keeps a finished request's context alive,
and a streamed answer is one server span, not one span per chunk."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import weakref

import httpx
import pytest
from bentoml._internal.server.http.traffic import TimeoutMiddleware

from lmm import patches

pytestmark = pytest.mark.unit
REQUEST_STATE: contextvars.ContextVar = contextvars.ContextVar("request_state")


class State:
    """Stands for what a request's context holds (its OpenTelemetry span, its baggage)."""


async def slow_or_fast(scope, receive, send):
    if scope["path"] == "/slow":
        await asyncio.sleep(5)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def app_with_context(timeout: float, refs: list):
    """BentoML's middleware under an outer one that puts per-request state in the context, as
    the OpenTelemetry ASGI middleware does with the span."""
    inner = TimeoutMiddleware(slow_or_fast, timeout=timeout)

    async def outer(scope, receive, send):
        state = State()
        refs.append(weakref.ref(state))
        token = REQUEST_STATE.set(state)
        try:
            await inner(scope, receive, send)
        finally:
            REQUEST_STATE.reset(token)

    return outer


async def alive_after_requests(n: int) -> int:
    refs: list[weakref.ref] = []
    transport = httpx.ASGITransport(app=app_with_context(300, refs))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        for _ in range(n):
            assert (await client.get("/")).status_code == 200
    for _ in range(3):  # the loop drops cancelled timers at the head of its heap as it turns
        await asyncio.sleep(0)
    gc.collect()
    return sum(ref() is not None for ref in refs)


def test_a_finished_request_leaves_nothing_scheduled_holding_its_context():
    assert patches.install()
    assert asyncio.run(alive_after_requests(20)) == 0


def test_without_the_fix_the_timer_keeps_every_context_for_the_whole_timeout():
    """The control: BentoML's own __call__ keeps all 20 alive (so the test above can fail)."""
    assert patches.install()
    fixed = TimeoutMiddleware.__call__
    TimeoutMiddleware.__call__ = patches._originals["TimeoutMiddleware.__call__"]
    try:
        assert asyncio.run(alive_after_requests(20)) == 20
    finally:
        TimeoutMiddleware.__call__ = fixed


def test_the_timeout_still_answers_504_in_time():
    assert patches.install()

    async def go():
        transport = httpx.ASGITransport(app=TimeoutMiddleware(slow_or_fast, timeout=0.2))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            loop = asyncio.get_running_loop()
            started = loop.time()
            slow = await client.get("/slow")
            return slow, loop.time() - started, await client.get("/")

    slow, took, fast = asyncio.run(go())
    assert slow.status_code == 504 and "0.2 seconds" in slow.json()["error"]
    assert took < 2
    assert fast.status_code == 200 and fast.text == "ok"


def test_install_is_idempotent():
    assert patches.install() and patches.install()
    assert TimeoutMiddleware.__call__ is patches._timeout_call


async def streamed(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    for i in range(50):
        await send({"type": "http.response.body", "body": b"data: %d\n\n" % i,
                    "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def spans_of_one_streamed_request(middleware_init=None) -> list[str]:
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = OpenTelemetryMiddleware.__new__(OpenTelemetryMiddleware)
    (middleware_init or OpenTelemetryMiddleware.__init__)(app, streamed, tracer_provider=provider)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.get("/stream")
    assert r.status_code == 200 and r.text.count("data:") == 50
    return [span.name for span in exporter.get_finished_spans()]


def test_a_streamed_answer_is_one_span_not_one_per_chunk():
    assert patches.install()
    assert asyncio.run(spans_of_one_streamed_request()) == ["GET /stream"]
    # the control: OpenTelemetry's own defaults give a span per message sent
    original = patches._originals["OpenTelemetryMiddleware.__init__"]
    names = asyncio.run(spans_of_one_streamed_request(original))
    assert names.count("GET /stream http send") == 52 and "GET /stream" in names
