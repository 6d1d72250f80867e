"""API keys on a real server: every route of /docs.json and /v1 needs one, health probes do
not, a rotated keys file takes effect without a restart, and the openai SDK passes its key."""

from __future__ import annotations

import base64
import time

import httpx
import openai
import pytest

from tests.conftest import ROOT, serve
from tests.helpers import assert_error

pytestmark = pytest.mark.integration
ENV_KEY, FILE_KEY, NEW_KEY = "env-key-1", "file-key-1", "file-key-2"


@pytest.fixture(scope="module")
def keyed(bentoml_home, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs-auth")
    keys = logs / "keys.txt"
    keys.write_text(f"# current keys\n{FILE_KEY}\n")
    srv = serve(bentoml_home, logs, extra=["--arg", f"auth.api_keys_file={keys}"],
                env={"LMM_API_KEY": ENV_KEY})
    srv.keys_file = keys
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def routes(url: str) -> list[tuple[str, str]]:
    spec = httpx.get(url + "/docs.json", timeout=30).json()
    found = [(method.upper(), path.replace("{model_id}", "shapes-llava"))
             for path, ops in spec["paths"].items() for method in ops]
    assert any(p.startswith("/v1/") for _, p in found) and ("POST", "/generate") in found
    return found + [("GET", "/metrics"), ("POST", "/v1/no-such-route")]


def call(url: str, method: str, path: str, key: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"json": {}} if method == "POST" else {}
    return httpx.request(method, url + path, headers=headers, timeout=60, **body)


def test_every_route_needs_a_key_and_health_does_not(keyed):
    for method, path in routes(keyed.url):
        if path in ("/livez", "/readyz", "/healthz"):
            assert call(keyed.url, method, path).status_code == 200, path
            continue
        assert_error(call(keyed.url, method, path), 401, text="missing API key")
        assert_error(call(keyed.url, method, path, "wrong"), 401, text="invalid API key")
        answered = call(keyed.url, method, path, ENV_KEY)
        assert answered.status_code != 401, (method, path, answered.text)
        assert answered.status_code < 500, (method, path, answered.text)
    log = keyed.log.read_text()
    assert ENV_KEY not in log and FILE_KEY not in log and "wrong" not in log.lower()


def test_keys_from_the_file_rotate_without_a_restart(keyed):
    assert call(keyed.url, "POST", "/model_info", FILE_KEY).status_code == 200
    time.sleep(0.01)
    keyed.keys_file.write_text(f"{NEW_KEY}\n")
    assert call(keyed.url, "POST", "/model_info", NEW_KEY).status_code == 200
    assert call(keyed.url, "POST", "/model_info", FILE_KEY).status_code == 401
    assert call(keyed.url, "POST", "/model_info", ENV_KEY).status_code == 200


def test_the_openai_sdk_passes_its_key(keyed):
    png = (ROOT / "examples" / "red-circle-left.png").read_bytes()
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                             {"type": "text", "text": "Describe the image."}]}]
    good = openai.OpenAI(base_url=keyed.url + "/v1", api_key=ENV_KEY, max_retries=0)
    reply = good.chat.completions.create(model="shapes-llava", messages=messages, temperature=0)
    assert reply.choices[0].message.content == "a red circle on the left"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed.url + "/v1", api_key="wrong", max_retries=0
                      ).models.list()


def test_an_open_server_says_so_at_startup(server):
    assert "no API key configured" in server.log.read_text()


def test_the_client_and_both_langchain_models_pass_their_key(keyed):
    from langchain_core.messages import HumanMessage

    from client import Client, ClientError
    from client.langchain import BentoLMM, ChatBentoLMM

    png = (ROOT / "examples" / "red-circle-left.png").read_bytes()
    with Client(keyed.url, api_key=ENV_KEY) as lmm:
        assert lmm.generate("Describe the image.", images=[png],
                            do_sample=False).text == "a red circle on the left"
    with Client(keyed.url, api_key="wrong") as lmm, pytest.raises(ClientError) as refused:
        lmm.model_info()
    assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
    message = HumanMessage(content=[
        {"type": "image", "base64": base64.b64encode(png).decode(), "mime_type": "image/png"},
        {"type": "text", "text": "Describe the image."}])
    chat = ChatBentoLMM(base_url=keyed.url, api_key=ENV_KEY, max_tokens=16)
    assert chat.invoke([message]).content == "a red circle on the left"
    llm = BentoLMM(base_url=keyed.url, api_key=ENV_KEY, max_tokens=16)
    assert isinstance(llm.invoke("Describe the image."), str)
    with pytest.raises(openai.AuthenticationError):
        ChatBentoLMM(base_url=keyed.url, api_key="wrong", max_retries=0).invoke("hi")
