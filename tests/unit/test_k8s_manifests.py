"""Kubernetes manifests from `python -m configs.k8s`: schema-valid, in sync with the checked-in
examples and with the BentoML services in the code, one Deployment per service."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from configs.k8s import (
    API_KEY_SECRET,
    CONFIG_MAP,
    CONFIG_PATH,
    EXAMPLE_BENTO,
    EXAMPLE_CONFIG,
    EXAMPLE_DIR,
    GENERATED,
    PORT,
    SERVICES,
    ServiceSpec,
    dump,
    load_config,
    render,
    scale_cpu,
    scale_memory,
    service_graph,
    service_url,
    threads_per_worker,
)
from configs.k8s.graph import walk

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.30.0"  # oldest Kubernetes release the manifests must apply to
SERVICE_NAMES = {"lmm-api", "lmm-vision", "lmm-llm"}


def objects(files: dict[str, list[dict]]) -> list[dict]:
    return [o for docs in files.values() for o in docs]


def by_kind(files: dict[str, list[dict]], kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects(files) if o["kind"] == kind}


@pytest.fixture(scope="module")
def example() -> dict[str, list[dict]]:
    config, text = load_config(ROOT / EXAMPLE_CONFIG)
    return render(config, text, EXAMPLE_BENTO)


def validate(obj: dict) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def test_every_object_validates_against_the_kubernetes_schema(example):
    kinds = [o["kind"] for o in objects(example)]
    assert sorted(set(kinds)) == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "Service"]
    for obj in objects(example):
        validate(obj)


def test_the_validator_rejects_a_broken_manifest(example):
    """Strict schemas: a misspelled field or a wrong type does not slip through."""
    bad = copy.deepcopy(by_kind(example, "Deployment")["lmm-llm"])
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(bad)
    bad = copy.deepcopy(by_kind(example, "Deployment")["lmm-llm"])
    bad["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(bad)


def test_checked_in_examples_equal_a_fresh_render(example):
    rendered = {p.name: p.read_text() for p in EXAMPLE_DIR.glob("*.yaml")}
    fresh = {name: dump(docs, "--examples") for name, docs in example.items()}
    assert set(rendered) == set(fresh), "run: python -m configs.k8s --examples"
    for name, text in fresh.items():
        assert rendered[name] == text, f"{name} is stale: python -m configs.k8s --examples"
        assert rendered[name].startswith(GENERATED)
        assert list(yaml.safe_load_all(rendered[name])) == example[name]


def test_one_deployment_service_and_hpa_per_bentoml_service(example):
    for kind in ("Deployment", "Service", "HorizontalPodAutoscaler"):
        names = [o["metadata"]["name"] for o in objects(example) if o["kind"] == kind]
        assert sorted(names) == sorted(SERVICE_NAMES), kind
    for name in SERVICE_NAMES:
        hpa = by_kind(example, "HorizontalPodAutoscaler")[name]
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": name,
        }
        svc = by_kind(example, "Service")[name]
        pod_labels = by_kind(example, "Deployment")[name]["spec"]["template"]["metadata"]["labels"]
        assert svc["spec"]["selector"].items() <= pod_labels.items()


def test_services_match_the_code():
    """The generator's service graph is the one `bentoml.depends` declares in service.py."""
    from service import LMMService

    graph = {
        svc.name: sorted(dep.on.name for dep in svc.dependencies.values())
        for svc in LMMService.all_services().values()
    }
    assert graph == {s.name: sorted(s.depends) for s in SERVICES}
    assert [s.name for s in SERVICES if s.entry] == [LMMService.name]
    assert sorted(SERVICES[0].depends) == sorted(
        dep.on.name for dep in LMMService.dependencies.values()
    )
    # read in a fresh interpreter with the config, it is what this process imported
    assert SERVICES == tuple(ServiceSpec.from_graph(n) for n in walk(LMMService))


@pytest.mark.parametrize("config_file", ["configs/default.yaml", "configs/gpu.yaml"])
def test_declared_scaling_is_the_config_sections(config_file):
    """Workers, resources and timeouts come from the service objects, imported with the
    config: they are what each section of that config says."""
    config, text = load_config(ROOT / config_file)
    for spec in service_graph(text):
        scaling = spec.scaling(config)
        assert (spec.workers, spec.cpu, spec.memory, spec.gpus, spec.timeout) == (
            scaling.workers, scaling.cpu, scaling.memory, scaling.gpus_needed(), scaling.timeout
        ), spec.name
    vision = next(s for s in service_graph(text) if s.name == "lmm-vision")
    assert vision.max_batch_size == config.vision.batching.max_batch_size


def test_a_config_change_reaches_the_manifests_through_the_services(tmp_path):
    path = tmp_path / "config.yaml"
    default = (ROOT / EXAMPLE_CONFIG).read_text()
    path.write_text(default.replace("llm:\n  backend: transformers\n  workers: 1",
                                    "llm:\n  backend: transformers\n  workers: 3"))
    config, text = load_config(path)
    assert config.llm.workers == 3
    llm = by_kind(render(config, text, EXAMPLE_BENTO), "Deployment")["lmm-llm"]
    assert container(llm)["resources"]["limits"]["nvidia.com/gpu"] == 3
    assert container(llm)["resources"]["requests"]["cpu"] == "3"


@pytest.mark.parametrize("llm, gpus", [
    ("llm:\n  backend: vllm\n  tensor_parallel_size: 4\n", 4),
    ("llm:\n  device_map: {model.language_model.layers: 0, model.language_model: 'cuda:1', "
     + "lm_head: cpu}\n", 2),
    ("llm:\n  device_map: {model.language_model: cpu, lm_head: cpu}\n", 0),
])
def test_the_llm_pod_requests_the_gpus_its_placement_uses(tmp_path, llm, gpus):
    """tensor_parallel_size (vllm) or the distinct CUDA devices of a device_map
    (transformers): the runner's resources, so its pod's nvidia.com/gpu, follow them."""
    path = tmp_path / "config.yaml"
    path.write_text(llm)
    config, text = load_config(path)
    llm_pod = container(by_kind(render(config, text, EXAMPLE_BENTO), "Deployment")["lmm-llm"])
    assert llm_pod["resources"]["limits"].get("nvidia.com/gpu", 0) == gpus


def test_a_service_added_to_the_graph_gets_its_manifests():
    """A BentoML service reached through `bentoml.depends` is rendered like the others."""
    import bentoml

    from runners.llm import LLM

    @bentoml.service(name="lmm-extra", workers=2, traffic={"timeout": 120},
                     resources={"cpu": "500m", "memory": "1Gi", "gpu": 1})
    class Extra:
        @bentoml.api(batchable=True, max_batch_size=8, max_latency_ms=1000)
        def double(self, xs: list[int]) -> list[int]:
            return [2 * x for x in xs]

    @bentoml.service(name="lmm-gateway", resources={"cpu": "1", "memory": "1Gi"})
    class Gateway:
        llm = bentoml.depends(LLM)
        extra = bentoml.depends(Extra)

        @bentoml.api
        def ping(self) -> str:
            return "pong"

    services = tuple(ServiceSpec.from_graph(n) for n in walk(Gateway))
    assert services[0].name == "lmm-gateway" and services[0].entry  # entry first
    assert {(s.name, s.depends, s.entry) for s in services} == {
        ("lmm-gateway", ("lmm-extra", "lmm-llm"), True),
        ("lmm-llm", (), False),
        ("lmm-extra", (), False),
    }
    config, text = load_config(ROOT / EXAMPLE_CONFIG)
    files = render(config, text, EXAMPLE_BENTO, services=services)
    assert set(files) == {"configmap.yaml", "lmm-gateway.yaml", "lmm-llm.yaml", "lmm-extra.yaml"}
    for obj in objects(files):
        validate(obj)
    extra = by_kind(files, "Deployment")["lmm-extra"]
    assert container(extra)["resources"] == {
        "requests": {"cpu": "1", "memory": "2Gi"},
        "limits": {"memory": "2Gi", "nvidia.com/gpu": 2},
    }
    assert extra["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 150
    hpa = by_kind(files, "HorizontalPodAutoscaler")["lmm-extra"]["spec"]["metrics"][0]
    assert hpa["pods"]["target"]["averageValue"] == "12"  # 8 per batch x 2 workers x 3/4
    gateway = container(by_kind(files, "Deployment")["lmm-gateway"])
    assert arg(gateway["args"], "--depends") == [
        f"lmm-extra={service_url('lmm-extra')}", f"lmm-llm={service_url('lmm-llm')}"]


def container(deployment: dict) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def arg(args: list[str], flag: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == flag]


def test_each_pod_starts_one_service_with_its_dependencies_by_url(example):
    for spec in SERVICES:
        args = container(by_kind(example, "Deployment")[spec.name])["args"]
        assert args[0] == "start-http-server"  # image entrypoint: bentoml_cli._internal.start
        assert arg(args, "--service-name") == [spec.name]
        assert arg(args, "--port") == [str(PORT)]
        assert arg(args, "--host") == ["0.0.0.0"]
        assert arg(args, "--depends") == [f"{d}={service_url(d)}" for d in sorted(spec.depends)]
        # longer than the idle timeouts of the clients and balancers in front (5-60 s)
        assert arg(args, "--timeout-keep-alive") == ["75"]


def test_resources_probes_config_and_secret(example):
    config, _ = load_config(ROOT / EXAMPLE_CONFIG)
    deployments = by_kind(example, "Deployment")
    for spec in SERVICES:
        scaling = spec.scaling(config)
        pod = deployments[spec.name]["spec"]["template"]["spec"]
        c = container(deployments[spec.name])
        limits, requests = c["resources"]["limits"], c["resources"]["requests"]
        assert requests["cpu"] == scale_cpu(scaling.cpu, scaling.workers)
        assert (
            requests["memory"] == limits["memory"] == scale_memory(scaling.memory, scaling.workers)
        )
        assert limits.get("nvidia.com/gpu", 0) == scaling.gpus * scaling.workers
        assert c["livenessProbe"]["httpGet"]["path"] == "/livez"
        assert c["startupProbe"]["httpGet"]["path"] == "/livez"
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert {"name": "LMM_CONFIG_FILE", "value": CONFIG_PATH} in c["env"]
        (mount,) = c["volumeMounts"]
        assert CONFIG_PATH.startswith(mount["mountPath"] + "/")
        assert pod["volumes"] == [{"name": mount["name"], "configMap": {"name": CONFIG_MAP}}]
    # The default config: the API on CPU, each runner on one GPU.
    assert "nvidia.com/gpu" not in container(deployments["lmm-api"])["resources"]["limits"]
    assert container(deployments["lmm-llm"])["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container(deployments["lmm-vision"])["resources"]["limits"]["nvidia.com/gpu"] == 1
    # The API key is only referenced, and only the API service gets it.
    api_env = {e["name"]: e for e in container(deployments["lmm-api"])["env"]}
    assert api_env["LMM_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == API_KEY_SECRET
    assert not [o for o in objects(example) if o["kind"] == "Secret"]
    for name in ("lmm-vision", "lmm-llm"):
        assert "LMM_API_KEY" not in {e["name"] for e in container(deployments[name])["env"]}
    # Each runner pod's torch threads are its CPU request per worker (one service per pod).
    for spec in SERVICES:
        env = {e["name"]: e.get("value") for e in container(deployments[spec.name])["env"]}
        if spec.entry:
            assert "LMM_CPU_THREADS" not in env
        else:
            assert env["LMM_CPU_THREADS"] == str(threads_per_worker(spec.scaling(config).cpu))
    assert [threads_per_worker(c) for c in ("1", "2", "500m", "1.5", "2500m")] == [1, 2, 1, 2, 3]


def test_configmap_carries_the_config_and_pods_roll_on_change(example):
    (cm,) = example["configmap.yaml"]
    assert cm["data"]["config.yaml"] == (ROOT / EXAMPLE_CONFIG).read_text()
    config, text = load_config(ROOT / EXAMPLE_CONFIG)
    changed = render(config, text + "# changed\n", EXAMPLE_BENTO)
    key = "bento-lmm/config-sha256"
    before = by_kind(example, "Deployment")["lmm-llm"]["spec"]["template"]["metadata"]
    after = by_kind(changed, "Deployment")["lmm-llm"]["spec"]["template"]["metadata"]
    assert before["annotations"][key] != after["annotations"][key]


def test_cpu_runners_scale_on_cpu_and_gpu_runners_on_requests_in_flight(example, tmp_path):
    metrics = {
        n: h["spec"]["metrics"][0]["type"]
        for n, h in by_kind(example, "HorizontalPodAutoscaler").items()
    }
    assert metrics == {"lmm-api": "Resource", "lmm-vision": "Pods", "lmm-llm": "Pods"}
    config, text = load_config(ROOT / "configs/test.yaml")  # gpus: 0 everywhere
    cpu_only = render(
        config, text, "bento-lmm:abc", replicas={"lmm-llm": 3}, max_replicas={"lmm-llm": 6}
    )
    for obj in objects(cpu_only):
        validate(obj)
    for name, hpa in by_kind(cpu_only, "HorizontalPodAutoscaler").items():
        assert hpa["spec"]["metrics"][0]["type"] == "Resource", name
    llm = by_kind(cpu_only, "Deployment")["lmm-llm"]
    assert llm["spec"]["replicas"] == 3
    assert "tolerations" not in llm["spec"]["template"]["spec"]
    assert by_kind(cpu_only, "HorizontalPodAutoscaler")["lmm-llm"]["spec"]["maxReplicas"] == 6
    assert container(llm)["image"] == "localhost/bento-lmm:abc"


def test_bento_version_must_be_concrete():
    config, text = load_config(ROOT / EXAMPLE_CONFIG)
    for tag in ("bento-lmm", "bento-lmm:latest", ":v1"):
        with pytest.raises(ValueError):
            render(config, text, tag)
    with pytest.raises(ValueError, match="unknown services"):
        render(config, text, "bento-lmm:v1", replicas={"lmm-typo": 2})


def test_quantities():
    assert [scale_cpu("2", 1), scale_cpu("500m", 3), scale_cpu("1.5", 2)] == ["2", "1500m", "3"]
    assert [scale_memory("2Gi", 2), scale_memory("1.5Gi", 1), scale_memory("1G", 2)] == [
        "4Gi",
        "1536Mi",
        "2G",
    ]


def test_cli_writes_the_files_and_removes_stale_ones(tmp_path):
    stale = tmp_path / "lmm-old.yaml"
    stale.write_text(f"{GENERATED} ...`\n")
    mine = tmp_path / "kustomization.yaml"
    mine.write_text("resources: []\n")
    cmd = [
        sys.executable,
        "-m",
        "configs.k8s",
        "--bento",
        "bento-lmm:v1",
        "--config",
        "configs/default.yaml",
        "--out",
        str(tmp_path),
        "--namespace",
        "ml",
    ]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    assert sorted(p.name for p in tmp_path.glob("*.yaml")) == [
        "configmap.yaml",
        "kustomization.yaml",
        "lmm-api.yaml",
        "lmm-llm.yaml",
        "lmm-vision.yaml",
    ]
    docs = [d for p in tmp_path.glob("lmm-*.yaml") for d in yaml.safe_load_all(p.read_text())]
    assert {d["metadata"]["namespace"] for d in docs} == {"ml"}
    for doc in docs:
        validate(doc)
