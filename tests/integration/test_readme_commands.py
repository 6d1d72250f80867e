"""The `bentoml serve` commands README.md shows run as written (on a free loopback port): each
serves the documented answer, an `--arg` override takes effect, and a misspelt key is refused
by name."""

from __future__ import annotations

import os
import re
import shlex

import httpx
import pytest

from tests.conftest import BENTOML, ROOT, Server, free_port, server_home

pytestmark = pytest.mark.integration


def readme_serve_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith("bentoml serve ")]


def start(command: str, bentoml_home, tmp_path) -> Server:
    port = free_port()
    args = shlex.split(command)
    env = {"BENTOML_HOME": str(server_home(bentoml_home, tmp_path / f"home-{port}")),
           "BENTOML_DO_NOT_TRACK": "True"}
    return Server([BENTOML, *args[1:], "--host", "127.0.0.1", "--port", str(port)],
                  {**os.environ, **env}, port, tmp_path / f"serve-{port}.log")


def test_the_readme_shows_the_override_and_the_vllm_commands():
    commands = readme_serve_commands()
    assert any("--arg llm.max_num_seqs=64" in c for c in commands), commands
    assert any("configs/vllm.yaml" in c for c in commands), commands


@pytest.mark.parametrize("command", readme_serve_commands())
def test_readme_serve_command(command, bentoml_home, tmp_path):
    server = start(command, bentoml_home, tmp_path)
    try:
        server.wait_ready(timeout=300)
        png = (ROOT / "examples" / "red-circle-left.png").read_bytes()
        r = httpx.post(server.url + "/generate", timeout=120,
                       data={"prompt": "Describe the image."},
                       files=[("images", ("i.png", png, "image/png"))])
        assert r.status_code == 200 and r.json()["text"] == "a red circle on the left", r.text
        info = httpx.post(server.url + "/model_info", json={}, timeout=30).json()
        overrides = dict(re.findall(r"--arg (\S+)=(\S+)", command))
        if "llm.max_num_seqs" in overrides:
            assert info["max_num_seqs"] == int(overrides["llm.max_num_seqs"])
        assert info["llm"]["backend"] == ("vllm" if "vllm.yaml" in command else "transformers")
        if "lora.yaml" in command:  # the shipped adapter answers in its own form
            r = httpx.post(server.url + "/generate", timeout=120,
                           data={"prompt": "Describe the image.", "model": "shapes-terse"},
                           files=[("images", ("i.png", png, "image/png"))])
            assert r.status_code == 200 and r.json()["text"] == "circle red left", r.text
    finally:
        server.stop()


def test_a_misspelt_override_is_refused_by_name(bentoml_home, tmp_path):
    command = next(c for c in readme_serve_commands() if "--arg llm.max_num_seqs" in c)
    server = start(command.replace("llm.max_num_seqs", "llm.max_num_seq"), bentoml_home,
                   tmp_path)
    try:
        assert server.proc.wait(120) != 0
    finally:
        server.stop()
    log = server.log.read_text()
    assert "max_num_seq" in log and "extra" in log.lower(), log[-3000:]
