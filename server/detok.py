"""Incremental detokenisation: the text of a growing token sequence, one token at a time, in
O(1) decodes per token (re-decoding the whole output every token is O(n²) over a generation).

Two offsets into the ids mark a short window::

    ids:  t0 t1 t2 t3 t4 t5 t6
                   ^prefix  ^read
    prefix_text = decode(ids[prefix:read])   (already emitted)
    new_text    = decode(ids[prefix:])       (with the new tokens)

The delta is ``new_text[len(prefix_text):]``. Both decodes start at the same token, so whatever
a tokenizer does to the first token of a decode (SentencePiece drops its leading space) happens
to both and cancels. A delta that ends in U+FFFD is an unfinished UTF-8 sequence (byte-level
BPE splits a character over tokens): nothing is emitted until the character completes; the
final :meth:`flush` emits whatever is left as it decodes.
"""

from __future__ import annotations

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""  # everything emitted so far
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=self.skip)

    def add(self, token: int) -> str:
        """Append one token; return the text that is now complete (may be empty)."""
        self.ids.append(token)
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT):
            return ""
        delta = new_text[len(prefix_text):]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += delta
        return delta

    def flush(self) -> str:
        """The rest, as it decodes (an unfinished character stays U+FFFD): the sequence ended."""
        if self._read == len(self.ids):
            return ""
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        delta = self._decode(self.ids[self._prefix:])[len(prefix_text):]
        self._prefix = self._read = len(self.ids)
        self.text += delta
        return delta
