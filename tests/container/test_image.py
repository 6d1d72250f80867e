"""The OCI image: scripts/image.sh builds it (base image, Bento, buildah containerize, OCI export);
the Bento in it serves an image + prompt request, both as one container (`serve`) and as one
container per service started with the rendered Kubernetes Deployments' args.

`podman run` cannot start containers on this kind of host (setrlimit is not permitted), so the
containers run with `buildah run --isolation chroot`, which shares the host's network namespace:
each server binds a free loopback port and the test talks to it directly. Each phase is timed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import httpx
import psutil
import pytest

from configs.k8s import SERVICES, load_config, render
from tests.conftest import BENTOML, ROOT, Server, free_port
from tests.integration.test_split_topology import API_KEY, KEYED, loopback_args

pytestmark = [pytest.mark.container, pytest.mark.timeout(2400)]

IMAGE = "localhost/bento-lmm-test:ci"
ENTRYPOINT = "/home/bentoml/bento/env/docker/entrypoint.sh"
TRAINED = "LMM_WEIGHTS" not in os.environ  # the trained weights answer shapes questions
MAX_IMAGE_BYTES = 3e9  # CPU torch: ~2.1 GB; the CUDA build of torch alone would be several GB
TIMINGS: dict[str, float] = {}


def buildah(*args: str, check: bool = True) -> str:
    return subprocess.run(
        ["buildah", *args], capture_output=True, text=True, check=check
    ).stdout.strip()


def image_bytes(image: str) -> int:
    """Unpacked size of a local image: its config plus its layers, from the manifest buildah
    stores (the figure `buildah images` rounds for display)."""
    manifest = json.loads(json.loads(buildah("inspect", "--type", "image", image))["Manifest"])
    return manifest["config"]["size"] + sum(layer["size"] for layer in manifest["layers"])


@pytest.fixture(scope="module")
def built_image(bentoml_home, tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root: debootstrap and chroot-isolated buildah")
    work = tmp_path_factory.mktemp("image")
    archive = work / "bento-lmm.oci.tar"
    env = {
        **os.environ,
        "BENTOML_HOME": str(bentoml_home),
        "BENTOML": BENTOML,
        "WORK_DIR": str(work / "scratch"),
    }
    started = time.monotonic()
    proc = subprocess.run(
        [
            "bash",
            "scripts/image.sh",
            "--config",
            "configs/default.yaml",
            "--tag",
            IMAGE,
            "--export",
            str(archive),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    TIMINGS["image.sh total"] = time.monotonic() - started
    progress = [line for line in proc.stderr.splitlines() if line.startswith("[image]")]
    print("\n".join(progress))
    assert proc.returncode == 0, proc.stderr[-6000:]
    result = dict(kv.split("=", 1) for kv in proc.stdout.strip().splitlines()[-1].split())
    timings = next(line for line in progress if line.startswith("[image] timings:"))
    for name, seconds in re.findall(r"(\w+)=(\d+)s", timings):
        TIMINGS[f"image.sh {name}"] = float(seconds)
    yield {**result, "archive": archive, "progress": progress}
    buildah("rmi", IMAGE, IMAGE.rsplit(":", 1)[0] + ":latest", check=False)


def test_script_reports_and_exports_the_image(built_image):
    assert built_image["IMAGE"] == IMAGE
    progress = "\n".join(built_image["progress"])
    for line in ("base image", "built Bento", "containerized in", "image id:", "image size:"):
        assert line in progress, line
    info = json.loads(buildah("inspect", "--type", "image", IMAGE))
    config = info["OCIv1"]["config"]
    assert config["Entrypoint"] == [ENTRYPOINT]
    assert config["User"] == "bentoml"
    assert config["Labels"]["com.bentoml.bento"] == built_image["BENTO"]
    assert "BENTOML_DO_NOT_TRACK=True" in config["Env"]
    assert info["FromImageID"] == built_image["IMAGE_ID"]
    size = int(
        subprocess.run(
            ["du", "-sb", str(built_image["archive"])], capture_output=True, text=True, check=True
        ).stdout.split()[0]
    )
    with tarfile.open(built_image["archive"]) as tar:
        names = set(tar.getnames())
    assert {"index.json", "oci-layout"} <= names
    print(f"OCI archive: {size / 1e6:.0f} MB")
    built_image["archive"].unlink()


def test_cpu_torch_and_size(built_image):
    name = f"bento-lmm-check-{os.getpid()}"
    buildah("from", "--name", name, IMAGE)
    try:
        out = buildah(
            "run",
            "--isolation",
            "chroot",
            name,
            "--",
            "/app/.venv/bin/python",
            "-c",
            "import importlib.metadata as m, torch, sys; print(torch.__version__); "
            "print(sys.version.split()[0]); "
            "print(sorted(d.metadata['Name'] for d in m.distributions() "
            "if d.metadata['Name'].lower().startswith(('nvidia-', 'triton')) "
            "and d.metadata['Name'].lower() != 'nvidia-ml-py'))",
        )
    finally:
        buildah("rm", name, check=False)
    torch_version, python, cuda_packages = out.splitlines()[-3:]
    assert torch_version.endswith("+cpu"), torch_version
    assert python.startswith("3.11.")
    assert cuda_packages == "[]"  # no CUDA runtime wheels (nvidia-ml-py is BentoML's, tiny)
    size = image_bytes(IMAGE)
    print(f"image size: {size / 1e9:.2f} GB")
    assert size < MAX_IMAGE_BYTES


class Container(Server):
    """A chroot-isolated buildah container of the image running ENTRYPOINT + args."""

    def __init__(
        self,
        image: str,
        args: list[str],
        port: int,
        log: Path,
        env: dict[str, str] | None = None,
        volumes: tuple[str, ...] = (),
    ):
        self.name = f"bento-lmm-test-{port}"
        buildah("rm", self.name, check=False)
        buildah("from", "--name", self.name, image)
        cmd = ["buildah", "run", "--isolation", "chroot"]
        for key, value in (env or {}).items():
            cmd += ["--env", f"{key}={value}"]
        for volume in volumes:
            cmd += ["--volume", volume]
        cmd += [self.name, "--", ENTRYPOINT, *args]
        super().__init__(cmd, dict(os.environ), port, log)

    def stop(self) -> None:
        # With chroot isolation the server's processes are ordinary host processes, and the
        # BentoML workers run in sessions of their own: stop the whole tree.
        try:
            tree = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            tree = []
        for proc in tree:
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(tree, timeout=30)
        for proc in alive:
            proc.kill()
        super().stop()
        buildah("rm", self.name, check=False)


def ask_shapes(url: str, tmp_path: Path, n: int = 4) -> None:
    """Image + prompt requests; with the trained weights the answers must be right."""
    from models.shapes.data import HELD_OUT_SEED, make_samples, normalize_answer

    correct = 0
    for i, sample in enumerate(make_samples(n, seed=HELD_OUT_SEED)):
        path = tmp_path / f"sample{i}.png"
        sample.image.save(path)
        with path.open("rb") as f:
            resp = httpx.post(
                f"{url}/generate",
                files={"images": (path.name, f, "image/png")},
                data={"prompt": sample.question, "max_tokens": "16"},
                headers=KEYED,
                timeout=120,
            )
        assert resp.status_code == 200, resp.text
        text = resp.json()["text"]
        assert isinstance(text, str) and text
        print(f"{sample.question!r} -> {text!r} (want {sample.answer!r})")
        correct += normalize_answer(text) == normalize_answer(sample.answer)
    if TRAINED:
        assert correct == n
    assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200


@pytest.fixture(scope="module")
def container(built_image, tmp_path_factory):
    """`serve`: all three services in one container, as `docker run IMAGE` would."""
    log = tmp_path_factory.mktemp("container") / "serve.log"
    port = free_port()
    server = Container(IMAGE, ["serve", "--host", "127.0.0.1", "--port", str(port)], port, log)
    try:
        TIMINGS["one container ready"] = server.wait_ready(300)
        yield server
    finally:
        server.stop()
        print(log.read_text()[-2000:])


def test_the_image_serves_an_image_and_prompt(container, tmp_path):
    started = time.monotonic()
    ask_shapes(container.url, tmp_path)
    TIMINGS["one container: 4 requests"] = time.monotonic() - started


@pytest.fixture(scope="module")
def pods(built_image, tmp_path_factory):
    """One container per service, like the Kubernetes pods: the rendered Deployments' args
    (through the image entrypoint), env and ConfigMap mount; loopback instead of cluster DNS."""
    work = tmp_path_factory.mktemp("pods")
    configmap = work / "configmap"
    configmap.mkdir()
    (configmap / "config.yaml").write_text((ROOT / "configs/test.yaml").read_text())
    configmap.chmod(0o755)  # the container runs as the image's `bentoml` user
    (configmap / "config.yaml").chmod(0o644)
    config, text = load_config(configmap / "config.yaml")
    deployments = {
        o["metadata"]["name"]: o
        for docs in render(config, text, built_image["BENTO"], image=IMAGE).values()
        for o in docs
        if o["kind"] == "Deployment"
    }
    ports = {name: free_port() for name in deployments}
    servers: dict[str, Container] = {}
    started = time.monotonic()
    try:
        for spec in sorted(SERVICES, key=lambda s: s.entry):
            pod = deployments[spec.name]["spec"]["template"]["spec"]
            (c,) = pod["containers"]
            assert c["image"] == IMAGE
            env = {v["name"]: v.get("value", API_KEY) for v in c["env"]}
            (mount,) = c["volumeMounts"]
            servers[spec.name] = Container(
                IMAGE,
                loopback_args(c["args"], ports),
                ports[spec.name],
                work / f"{spec.name}.log",
                env=env,
                volumes=(f"{configmap}:{mount['mountPath']}:ro",),
            )
        for server in servers.values():
            server.wait_ready(300)
        TIMINGS["three pods ready"] = time.monotonic() - started
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def test_one_container_per_service_with_the_rendered_args(pods, tmp_path):
    ask_shapes(pods["lmm-api"].url, tmp_path)
    stats = httpx.post(f"{pods['lmm-api'].url}/runner_stats", json={}, headers=KEYED,
                       timeout=30).json()
    assert stats["vision"]["batches"] >= 1 and stats["llm"]["batches"] >= 1
    info = httpx.post(f"{pods['lmm-api'].url}/model_info", json={}, headers=KEYED,
                      timeout=30).json()
    print("timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in TIMINGS.items()))
    assert info["max_tokens_limit"] == 256  # configs/test.yaml, mounted; the Bento has 1024
