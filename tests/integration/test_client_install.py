"""The client installs on its own: `pip install "./client[langchain]"` into a fresh venv (no
torch, transformers or bentoml there) gives a Client and a ChatBentoLMM that answer like the
repository's own. Needs PyPI (pip's cache makes reruns quick)."""

from __future__ import annotations

import json
import subprocess
import venv
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration

EXAMPLE = ROOT / "examples" / "red-circle-left.png"
ANSWER = "a red circle on the left"

SCRIPT = """
import base64, json, sys
import client
from client import Client
from client.langchain import ChatBentoLMM
from langchain_core.messages import HumanMessage

url, path = sys.argv[1], sys.argv[2]
with Client(url) as lmm:
    native = lmm.generate("Describe the image.", images=[path], do_sample=False, max_tokens=16)
png = base64.b64encode(open(path, "rb").read()).decode()
chat = ChatBentoLMM(base_url=url, max_tokens=16, temperature=0).invoke([HumanMessage(content=[
    {"type": "image", "base64": png, "mime_type": "image/png"},
    {"type": "text", "text": "Describe the image."}])])
print(json.dumps({"file": client.__file__, "native": native.text, "chat": chat.content}))
"""


@pytest.fixture(scope="module")
def client_venv(tmp_path_factory) -> Path:
    """A venv with only the client (and its langchain extra) installed."""
    where = tmp_path_factory.mktemp("client-venv")
    venv.create(where, with_pip=True, system_site_packages=False)
    python = where / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q",
         f"{ROOT / 'client'}[langchain]"],
        capture_output=True, text=True, timeout=540)
    assert install.returncode == 0, install.stdout + install.stderr
    return python


def test_the_client_needs_no_server_packages(client_venv):
    probe = ("import importlib.util, json; print(json.dumps([m for m in "
             "('torch', 'transformers', 'bentoml') if importlib.util.find_spec(m)]))")
    found = subprocess.run([str(client_venv), "-c", probe], capture_output=True, text=True,
                           check=True).stdout
    assert json.loads(found) == []


def test_installed_client_answers(client_venv, url, tmp_path):
    # Run outside the repository, so `client` can only come from the venv.
    run = subprocess.run([str(client_venv), "-c", SCRIPT, url, str(EXAMPLE)], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(result["file"]).is_relative_to(client_venv.parent.parent)
    assert result["native"] == ANSWER and result["chat"] == ANSWER
