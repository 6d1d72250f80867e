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


def test_byte_level_stream_never_splits_a_character(byte_bpe):
    ids = byte_bpe.encode(TEXT)
    # the vocabulary is small enough that some character needs two or more tokens
    assert any("\ufffd" in byte_bpe.decode([i]) for i in ids)
    detok = IncrementalDetokenizer(byte_bpe)
    deltas = [detok.push([i]) for i in ids] + [detok.flush()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == byte_bpe.decode(ids)


def test_word_level_decoder_keeps_the_spaces(llava_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(llava_dir)
    ids = tok.encode("a red circle on the left", add_special_tokens=False)
    detok = IncrementalDetokenizer(tok)
    text = "".join(detok.push([i]) for i in ids) + detok.flush()
    assert text == tok.decode(ids, skip_special_tokens=True) == "a red circle on the left"


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
