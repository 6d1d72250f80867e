"""What the Bento's `src/` holds, by BentoML's own include/exclude matching on bentofile*.yaml:
every module the served services import, and none of the model build and training code."""

from __future__ import annotations

import ast
import os
import warnings
from pathlib import Path

import pytest
import yaml
from bentoml._internal.bento.build_config import BentoPathSpec

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
BENTOFILES = ("bentofile.yaml", "bentofile.gpu.yaml")
SKIP_DIRS = {".git", ".venv", "__pycache__", "weights", ".bentoml-home"}
# Building, training, evaluating and importing models: run before `bentoml build`, never served.
MODEL_SCRIPTS = (
    "models/__main__.py",
    "models/hub.py",
    "models/store.py",
    "models/shapes/build.py",
    "models/shapes/data.py",
    "models/shapes/evaluate.py",
    "models/shapes/train.py",
)


def included_files(bentofile: str) -> set[str]:
    """The project files `bentoml build -f bentofile` copies into the Bento, as it decides it:
    each path relative to the build context, in the form BentoML's walk gives it."""
    spec = yaml.safe_load((ROOT / bentofile).read_text())
    with warnings.catch_warnings():  # BentoML asks pathspec for its deprecated "gitwildmatch"
        warnings.simplefilter("ignore", DeprecationWarning)
        specs = BentoPathSpec(spec["include"], spec.get("exclude", []), str(ROOT))
    found = set()
    for root, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]  # large; never part of the Bento
        for name in files:
            path = os.path.join(os.path.relpath(root, ROOT), name).replace(os.sep, "/")
            if specs.includes(path):
                found.add(path.removeprefix("./"))
    return found


def local_module_file(module: str) -> Path | None:
    """The project file that defines `module` (a package's __init__.py), if it is ours."""
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports anywhere (lazy imports in functions included), absolute."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    if path.name != "__init__.py":
        package = package.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".") if package else []
                base = ".".join(parts[: len(parts) - node.level + 1] + [node.module or ""])
            else:
                base = node.module or ""
            base = base.strip(".")
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # may be submodules
    return names


def served_code() -> set[str]:
    """Project files the services load: service.py and, transitively, every local module it
    imports, with the packages above each (importing ``lmm.config`` runs ``lmm/__init__.py``)."""
    todo, seen = [ROOT / "service.py"], set()
    while todo:
        path = todo.pop()
        rel = path.relative_to(ROOT).as_posix()
        if rel in seen:
            continue
        seen.add(rel)
        for module in imported_modules(path):
            parts = module.split(".")
            for i in range(1, len(parts) + 1):
                found = local_module_file(".".join(parts[:i]))
                if found is not None:
                    todo.append(found)
    return seen


@pytest.fixture(scope="module")
def served() -> set[str]:
    code = served_code()
    # the walk finds what it must: the runners, an engine imported lazily, the shared modules
    assert {
        "service.py",
        "runners/llm.py",
        "runners/vision.py",
        "runners/engines/vllm_engine.py",
        "runners/engines/transformers_engine.py",
        "lmm/config.py",
        "lmm/postprocess.py",
    } <= code
    return code


@pytest.mark.parametrize("bentofile", BENTOFILES)
def test_every_module_the_services_import_is_in_the_bento(bentofile, served):
    assert served - included_files(bentofile) == set()


def test_served_code_needs_nothing_from_the_model_scripts(served):
    assert not [f for f in served if f.startswith("models/")]


@pytest.mark.parametrize("bentofile", BENTOFILES)
def test_model_build_and_training_code_is_left_out(bentofile):
    files = included_files(bentofile)
    assert (ROOT / "models/shapes/train.py").is_file()
    assert [f for f in MODEL_SCRIPTS if f in files] == []
    assert not [f for f in files if f.startswith(("models/", "tests/", "client/", "bench/"))]
    assert "configs/default.yaml" in files  # the deployment configs travel with the code


def test_both_specs_ship_the_same_code():
    specs = [yaml.safe_load((ROOT / f).read_text()) for f in BENTOFILES]
    assert [(s["include"], s["exclude"]) for s in specs[1:]] == [
        (specs[0]["include"], specs[0]["exclude"])
    ] * (len(specs) - 1)
