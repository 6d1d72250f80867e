"""Streaming post-processing: incremental detokenization and stop strings, as pure objects."""

from __future__ import annotations

from typing import Protocol, Sequence


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Decoding token by token splits multi-byte characters (byte-level BPE) and drops the spaces
    that word-piece and word-level decoders insert between tokens. Like vLLM, decode a short
    window of previous tokens with the new ones and emit only what the window did not already
    show, holding back text that ends in an incomplete character (U+FFFD).
    """

    def __init__(self, tokenizer: Decoder, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, new_ids: Sequence[int]) -> str:
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
        """Whatever is still held back, once the sequence has ended."""
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
