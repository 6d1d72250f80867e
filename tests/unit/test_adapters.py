"""lmm.adapters.ChunkTemplate: a templated chunk is byte for byte the chunk its model renders."""

import pytest

from lmm import openai_protocol as oai
from lmm.adapters import ChunkTemplate, sse

pytestmark = pytest.mark.unit
HEAD = dict(id="chatcmpl-1", created=1, model="shapes-llava", system_fingerprint="tag:1")
TEXTS = ["a", " red circle", 'say "hi"', "line\nbreak\ttab", "back\\slash", "ünïcödé ✓ 中文",
         "\x00\x1f control", "</script>", ""]


def chat(index: int, text: str) -> oai.ChatCompletionChunk:
    return oai.ChatCompletionChunk(**HEAD, choices=[
        oai.ChunkChoice(index=index, delta={"content": text})])


def completion(index: int, text: str) -> oai.TextCompletion:
    return oai.TextCompletion(**HEAD, choices=[oai.CompletionChoice(index=index, text=text)])


@pytest.mark.parametrize("model", [chat, completion])
def test_templated_chunks_are_the_models_own_bytes(model):
    for index in (0, 3):
        template = ChunkTemplate(model(index, ChunkTemplate.SLOT))
        for text in TEXTS:
            assert sse(template(text)) == sse(model(index, text))


def test_a_model_without_the_slot_is_refused():
    with pytest.raises(ValueError, match="SLOT"):
        ChunkTemplate(chat(0, "no slot here"))
