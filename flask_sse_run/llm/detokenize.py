"""Turn generated token ids into text pieces, one token at a time, in O(1) per token.

Pure Python: only the tokenizer's ``decode`` is called, so this module imports neither torch
nor transformers and works with any tokenizer that has ``decode(ids, skip_special_tokens=...)``.

A token is not a piece of text. A byte-level BPE token (Falcon's, GPT-2's) may hold half of a
multi-byte UTF-8 character, and a tokenizer's decoder may put spaces between tokens or strip
the first one, so ``decode([id])`` for each new id gives wrong text. The whole sequence must not
be decoded again at every token either: that is quadratic (``TextIteratorStreamer`` does it,
per line). Like vLLM and TGI, :class:`IncrementalDetokenizer` decodes a short sliding window of
the last tokens and hands out only what the window's text gained:

* the window starts a few tokens back (``context``), so the decoder sees the previous token and
  writes the space between the two, or a character split between them, correctly;
* a window text that ends in U+FFFD may end in an incomplete character, whose missing bytes the
  next tokens bring: that last character is held back until it is complete (a genuinely invalid
  byte sequence is handed out once something follows it, or by :meth:`flush`);
* once the window is longer than ``window`` tokens it slides forward, so each token costs one
  decode of at most ``window`` ids, plus one more decode each time the window slides.

Concatenating every piece and the final :meth:`flush` gives exactly
``tokenizer.decode(context_ids + ids)[len(tokenizer.decode(context_ids)):]`` for the decoders
of byte-level BPE and WordLevel tokenizers (and ``decode(ids)`` with no context ids).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

__all__ = ["IncrementalDetokenizer", "TokenDecoder"]

REPLACEMENT = "\ufffd"


class TokenDecoder(Protocol):
    """What the detokenizer needs of a tokenizer (a transformers tokenizer has it)."""

    def decode(self, token_ids: Any, skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Decode a stream of token ids into text pieces, one :meth:`push` per token.

    ``context_ids`` are the tokens before the first pushed one (the prompt's tail): they are
    never handed out, but they make the first piece start as it would in the whole text (with
    its leading space, for instance). ``context`` tokens of context are kept when the window
    slides; ``window`` bounds the tokens decoded per push.
    """

    def __init__(
        self,
        tokenizer: TokenDecoder,
        context_ids: Sequence[int] = (),
        *,
        skip_special_tokens: bool = True,
        context: int = 5,
        window: int = 16,
    ) -> None:
        if context < 1 or window <= context:
            raise ValueError("need 1 <= context < window")
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._context = context
        self._window_size = window
        self._ids: list[int] = list(context_ids[-context:]) if context_ids else []
        # How many characters of decode(self._ids) have been handed out, or belong to the
        # context and never will be.
        self._done = self._settled(self._decode(self._ids)) if self._ids else 0

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=self._skip_special_tokens)

    @staticmethod
    def _settled(text: str) -> int:
        """Length of the part of ``text`` that later tokens cannot change."""
        return len(text) - 1 if text.endswith(REPLACEMENT) else len(text)

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text it completes (often ``""``)."""
        self._ids.append(token_id)
        text = self._decode(self._ids)
        settled = self._settled(text)
        piece = text[self._done : settled] if settled > self._done else ""
        self._done = max(self._done, settled)
        if len(self._ids) > self._window_size:
            self._slide()
        return piece

    def extend(self, token_ids: Iterable[int]) -> str:
        """Push several tokens; return the text they complete."""
        return "".join(self.push(token_id) for token_id in token_ids)

    def _slide(self) -> None:
        # Restart the window ``context`` tokens back. Everything the new window's text holds
        # before its unsettled tail has been handed out already (an incomplete character spans
        # at most 3 bytes, so at most the last 3 tokens). A window that starts inside a
        # character decodes its first bytes as U+FFFD, the same way every time: they count as
        # done and are never handed out again.
        self._ids = self._ids[-self._context :]
        self._done = self._settled(self._decode(self._ids))

    def flush(self) -> str:
        """The text still held back (an incomplete or invalid last character); call at the end."""
        text = self._decode(self._ids)
        piece = text[self._done :]
        self._done = len(text)
        return piece
