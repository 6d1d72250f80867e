"""Streaming post-processing: incremental detokenization and stop strings, as pure objects."""

from __future__ import annotations

from typing import Protocol, Sequence


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Decoding token by token splits multi-byte characters (byte-level BPE) and drops the spaces
    that word-piece and word-level decoders insert between tokens. Both paths below decode a
    window of previous tokens with the new ones and emit only what the window did not already
    show, holding back text that ends in an incomplete character (U+FFFD):

    - a fast tokenizer (one with a ``backend_tokenizer``) streams through tokenizers' own
      ``DecodeStream``, which does this in Rust against the tokenizer's decoder;
    - a slow (pure Python) tokenizer has no ``tokenizers.Tokenizer`` to give ``DecodeStream``,
      and a fast one whose ``decode`` cleans up spaces afterwards (``clean_up_tokenization_spaces``,
      a transformers step ``DecodeStream`` does not run) would stream other text than it decodes:
      both keep the window decoded through ``tokenizer.decode``, as vLLM does.
    """

    def __init__(self, tokenizer: Decoder, skip_special_tokens: bool = True):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if _streams_natively(tokenizer, backend):
            self._impl: _Detokenizer = _DecodeStream(backend, skip_special_tokens)
        else:
            self._impl = _Window(tokenizer, skip_special_tokens)

    @property
    def native(self) -> bool:
        """Whether tokenizers' ``DecodeStream`` does the work (a fast tokenizer)."""
        return isinstance(self._impl, _DecodeStream)

    def push(self, new_ids: Sequence[int]) -> str:
        """The text the new ids complete (may be empty while a character is incomplete)."""
        return self._impl.push(list(new_ids))

    def flush(self) -> str:
        """Whatever is still held back, once the sequence has ended."""
        return self._impl.flush()


class _Detokenizer(Protocol):
    def push(self, new_ids: list[int]) -> str: ...

    def flush(self) -> str: ...


def _streams_natively(tokenizer: Decoder, backend: object) -> bool:
    from tokenizers import Tokenizer

    return isinstance(backend, Tokenizer) and not getattr(
        tokenizer, "clean_up_tokenization_spaces", False
    )


class _DecodeStream:
    """tokenizers' ``DecodeStream``, plus the flush it lacks.

    ``DecodeStream.step`` returns ``None`` until the ids it holds decode to complete characters,
    then everything they add, so it either releases all ids pushed since its last chunk or none.
    At the end those held ids are decoded once after the last chunk's ids (for the decoder's
    spacing), as the window path does.
    """

    def __init__(self, backend, skip_special_tokens: bool):
        from tokenizers.decoders import DecodeStream

        self.backend = backend
        self.skip_special_tokens = skip_special_tokens
        self.stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self.last: list[int] = []  # the ids behind the last chunk: they start and end cleanly
        self.held: list[int] = []  # ids pushed since

    def push(self, new_ids: list[int]) -> str:
        if not new_ids:
            return ""
        self.held.extend(new_ids)
        chunk = self.stream.step(self.backend, new_ids)
        if chunk is None:
            return ""
        self.last, self.held = self.held, []
        return chunk

    def flush(self) -> str:
        if not self.held:
            return ""
        prefix = self.backend.decode(self.last, skip_special_tokens=self.skip_special_tokens)
        full = self.backend.decode(self.last + self.held,
                                   skip_special_tokens=self.skip_special_tokens)
        self.last, self.held = self.last + self.held, []
        return full[len(prefix):] if full.startswith(prefix) else ""


class _Window:
    """The window re-decoded through ``tokenizer.decode`` (slow tokenizers), like vLLM's."""

    def __init__(self, tokenizer: Decoder, skip_special_tokens: bool):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :] if full.startswith(prefix) else full
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :] if full.startswith(prefix) and len(full) > len(prefix) else ""


class StopStrings:
    """Cuts the output at the first stop string, holding back text that may start one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text = ""  # everything received
        self.sent = 0  # how much of it was released
        self.stopped = False

    def push(self, delta: str) -> str:
        """Text safe to release now; sets ``stopped`` once a stop string is seen."""
        if self.stopped:
            return ""
        before = len(self.text)
        self.text += delta
        for stop in self.stops:
            # A match may straddle the old text and the delta, never lie wholly in the old text.
            at = self.text.find(stop, max(0, before - len(stop) + 1))
            if at != -1:
                self.text = self.text[:at]
                self.stopped = True
        if self.stopped or not self.stops:
            end = len(self.text)
        else:
            end = max(self.sent, len(self.text) - self.hold)
        out = self.text[self.sent : end]
        self.sent = end
        return out

    def flush(self) -> str:
        out = self.text[self.sent :]
        self.sent = len(self.text)
        return out
