from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from lmm.postprocess import IncrementalDetokenizer, StopStrings

pytestmark = pytest.mark.unit

TEXT = "héllo wörld, 你好世界! naïve café 😀🚀 ok " * 4


@pytest.fixture(scope="module")
def byte_bpe() -> PreTrainedTokenizerFast:
    """A byte-level BPE with a tiny vocabulary: multi-byte characters span several tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=280, show_progress=False,
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok)


@pytest.fixture(scope="module")
def shapes_tokenizer(llava_dir):
    """The shapes LLaVA's word-level tokenizer (WordPiece decoder: spaces between words)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llava_dir)


class SlowTokenizer:
    """Only ``decode``, like a pure-Python tokenizer: no tokenizers.Tokenizer behind it."""

    def __init__(self, fast):
        self.fast = fast

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.fast.decode(ids, skip_special_tokens=skip_special_tokens)


PATHS = {"decode_stream": lambda tok: tok, "window": SlowTokenizer}


@pytest.fixture(params=list(PATHS))
def path(request):
    """Each tokenizer through both detokenizer paths: DecodeStream (fast) and the window."""
    wrap = PATHS[request.param]

    def make(tok, **kwargs) -> IncrementalDetokenizer:
        detok = IncrementalDetokenizer(wrap(tok), **kwargs)
        assert detok.native == (request.param == "decode_stream")
        return detok

    return make


def stream(detok: IncrementalDetokenizer, chunks) -> list[str]:
    return [detok.push(chunk) for chunk in chunks] + [detok.flush()]


def test_byte_level_stream_never_splits_a_character(byte_bpe, path):
    ids = byte_bpe.encode(TEXT)
    # the vocabulary is small enough that some character needs two or more tokens
    assert any("\ufffd" in byte_bpe.decode([i]) for i in ids)
    deltas = stream(path(byte_bpe), [[i] for i in ids])
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == byte_bpe.decode(ids)


def test_several_ids_per_push_as_a_lagging_engine_sends_them(byte_bpe, shapes_tokenizer, path):
    for tok, text in ((byte_bpe, TEXT), (shapes_tokenizer, "a red circle on the left, ok?")):
        ids = tok.encode(text, add_special_tokens=False)
        chunks = [ids[i : i + 3] for i in range(0, len(ids), 3)] + [[]]
        assert "".join(stream(path(tok), chunks)) == tok.decode(ids, skip_special_tokens=True)


def test_a_character_cut_off_at_the_end_is_flushed(byte_bpe, path):
    ids = byte_bpe.encode("ok 😀")
    cut = ids[:-1]  # the emoji's last byte never came (max_tokens ran out)
    assert byte_bpe.decode(cut).endswith("\ufffd")
    detok = path(byte_bpe)
    deltas = stream(detok, [[i] for i in cut])
    assert "\ufffd" not in "".join(deltas[:-1])  # held back while it might complete
    assert "".join(deltas) == byte_bpe.decode(cut)
    assert detok.flush() == ""


def test_word_level_decoder_keeps_the_spaces(shapes_tokenizer, path):
    tok = shapes_tokenizer
    ids = tok.encode("a red circle on the left", add_special_tokens=False)
    text = "".join(stream(path(tok), [[i] for i in ids]))
    assert text == tok.decode(ids, skip_special_tokens=True) == "a red circle on the left"


def test_special_tokens_skipped_or_kept(shapes_tokenizer, path):
    tok = shapes_tokenizer
    ids = tok.encode("what is this? a red circle") + [tok.eos_token_id]
    assert ids[0] == tok.bos_token_id
    for skip in (True, False):
        text = "".join(stream(path(tok, skip_special_tokens=skip), [[i] for i in ids]))
        assert text == tok.decode(ids, skip_special_tokens=skip)
    assert "</s>" not in tok.decode(ids, skip_special_tokens=True)


def test_a_fast_tokenizer_that_cleans_up_spaces_keeps_the_window(shapes_tokenizer):
    """DecodeStream does not run transformers' clean_up_tokenization_spaces step: such a
    tokenizer streams through its own decode, so the stream equals what it decodes."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(shapes_tokenizer.name_or_path,
                                        clean_up_tokenization_spaces=True)
    assert tok.clean_up_tokenization_spaces
    detok = IncrementalDetokenizer(tok)
    assert not detok.native
    ids = tok.encode("what is this? a red circle.", add_special_tokens=False)
    text = "".join(stream(detok, [[i] for i in ids]))
    assert text == tok.decode(ids, skip_special_tokens=True)


def feed(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    s = StopStrings(stops)
    out = "".join(s.push(p) for p in pieces)
    return out + s.flush(), s.stopped


def test_stop_string_split_across_deltas_is_cut():
    assert feed(["STOP"], ["hello S", "TO", "P world"]) == ("hello ", True)


def test_earliest_stop_string_wins():
    assert feed(["world", "lo"], ["hello world"]) == ("hel", True)


def test_text_that_only_looks_like_a_stop_prefix_is_released():
    s = StopStrings(["STOP"])
    assert s.push("abc ST") == "abc"  # the last len("STOP") - 1 characters are held back
    assert s.push("ART") == " ST"
    assert s.flush() == "ART" and not s.stopped


def test_no_stop_strings_pass_everything_through():
    assert feed([], ["a", "b"]) == ("ab", False)
