"""The Kubernetes topology on one machine: each BentoML service in its own process (like its own
pod), started with exactly the command its rendered Deployment runs, talking HTTP on loopback.

The commands come from the generator (configs.k8s.render), not from this file: only the in-cluster
addresses are mapped to loopback ports (`--host`, `--port`, the `--depends` URLs) and the container
paths to local ones, and the image entrypoint's prefix is added, as the entrypoint does:
`python -m bentoml_cli._internal.start <args> $BENTO_PATH`.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

import httpx
import pytest

from configs.k8s import CONFIG_PATH, PORT, SERVICES, load_config, render, service_url
from tests.conftest import ROOT, Server, free_port, server_home
from tests.integration.test_bento_build import build

pytestmark = pytest.mark.integration

CONFIG = "configs/test.yaml"  # the Bento's build-time config
API_KEY = "split-topology-test-key"
KEYED = {"Authorization": f"Bearer {API_KEY}"}  # the rendered pods get LMM_API_KEY
CONFIGMAP_MAX_TOKENS = 200  # the "ConfigMap" differs from the baked config in this one value
TRAINED = "LMM_WEIGHTS" not in os.environ  # the trained weights answer shapes questions


def loopback_args(args: list[str], ports: dict[str, int]) -> list[str]:
    """A Deployment's container args with the cluster addresses mapped to loopback ports."""
    args = list(args)
    assert args[0] == "start-http-server"
    name = args[args.index("--service-name") + 1]
    for i, value in enumerate(args[:-1]):
        nxt = args[i + 1]
        if value == "--host":
            args[i + 1] = "127.0.0.1"
        elif value == "--port":
            assert nxt == str(PORT)
            args[i + 1] = str(ports[name])
        elif value == "--depends":
            dep, _, url = nxt.partition("=")
            assert url == service_url(dep), nxt
            args[i + 1] = f"{dep}=http://127.0.0.1:{ports[dep]}"
    return args


def local_command(container: dict, ports: dict[str, int], bento_path: Path) -> list[str]:
    """What the image entrypoint runs for these args, with a local Bento path."""
    return [
        sys.executable,
        "-m",
        "bentoml_cli._internal.start",
        *loopback_args(container["args"], ports),
        str(bento_path),
    ]


def local_env(container: dict, home: Path, config_file: Path) -> dict:
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    for var in container.get("env", []):
        if "value" in var:
            value = var["value"]
            env[var["name"]] = str(config_file) if value == CONFIG_PATH else value
        else:  # the Secret
            assert var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = API_KEY
    return env


@pytest.fixture(scope="module")
def split(bentoml_home, tmp_path_factory):
    """Three processes, one per service, from the rendered Deployments: name -> Server."""
    logs = tmp_path_factory.mktemp("split-logs")
    tag, bento_path = build(bentoml_home, ROOT, CONFIG)
    # The mounted ConfigMap: the build config with one value changed.
    configmap = logs / "config.yaml"
    configmap.write_text(
        re.sub(
            r"(?m)^max_tokens_limit: .*$",
            f"max_tokens_limit: {CONFIGMAP_MAX_TOKENS}",
            (ROOT / CONFIG).read_text(),
        )
    )
    assert f"max_tokens_limit: {CONFIGMAP_MAX_TOKENS}" in configmap.read_text()
    config, text = load_config(configmap)
    deployments = {
        o["metadata"]["name"]: o
        for docs in render(config, text, tag).values()
        for o in docs
        if o["kind"] == "Deployment"
    }
    assert set(deployments) == {s.name for s in SERVICES}
    ports = {name: free_port() for name in deployments}
    servers: dict[str, Server] = {}
    started = time.monotonic()
    try:
        for spec in sorted(SERVICES, key=lambda s: s.entry):  # runners first, like a rollout
            (container,) = deployments[spec.name]["spec"]["template"]["spec"]["containers"]
            cmd = local_command(container, ports, bento_path)
            print(spec.name, " ".join(cmd[1:]))
            servers[spec.name] = Server(
                cmd,
                local_env(container, server_home(bentoml_home, logs / spec.name), configmap),
                ports[spec.name],
                logs / f"{spec.name}.log",
            )
        for server in servers.values():
            server.wait_ready(240)
        print(f"split topology ready in {time.monotonic() - started:.1f}s")
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def post_generate(url: str, image: Path, prompt: str, max_tokens: int = 8) -> httpx.Response:
    with image.open("rb") as f:
        return httpx.post(
            f"{url}/generate",
            files={"images": (image.name, f, "image/png")},
            data={"prompt": prompt, "max_tokens": str(max_tokens)},
            headers=KEYED,
            timeout=120,
        )


def test_each_service_is_ready_in_its_own_process(split):
    pids = {name: server.proc.pid for name, server in split.items()}
    assert len(set(pids.values())) == 3
    for name, server in split.items():
        assert server.proc.poll() is None, name
        assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200, name
        assert httpx.get(f"{server.url}/livez", timeout=10).status_code == 200, name
    # Runners serve only their own APIs.
    assert (
        httpx.post(f"{split['lmm-llm'].url}/generate_stream", json={}, timeout=10).status_code
        == 404
    )


def test_image_and_prompt_end_to_end(split, tmp_path):
    from models.shapes.data import HELD_OUT_SEED, make_samples, normalize_answer

    api = split["lmm-api"].url
    samples = make_samples(4, seed=HELD_OUT_SEED)
    correct = 0
    for i, sample in enumerate(samples):
        image = tmp_path / f"sample{i}.png"
        sample.image.save(image)
        started = time.monotonic()
        resp = post_generate(api, image, sample.question, max_tokens=16)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert isinstance(body["text"], str) and body["usage"]["completion_tokens"] >= 1
        print(
            f"{sample.question!r} -> {body['text']!r} (want {sample.answer!r}) "
            f"{time.monotonic() - started:.2f}s"
        )
        correct += normalize_answer(body["text"]) == normalize_answer(sample.answer)
    if TRAINED:
        assert correct == len(samples)
    # The request crossed process boundaries: the separate runner processes did the work.
    stats = httpx.post(f"{api}/runner_stats", json={}, headers=KEYED, timeout=30).json()
    assert stats["vision"]["batches"] >= 1 and stats["llm"]["batches"] >= 1


def test_configmap_config_is_the_served_config(split):
    """LMM_CONFIG_FILE (the mounted ConfigMap) is what the services run with."""
    info = httpx.post(f"{split['lmm-api'].url}/model_info", json={}, headers=KEYED,
                      timeout=30).json()
    assert info["max_tokens_limit"] == CONFIGMAP_MAX_TOKENS
