"""Text in and out of token ids for the front end: prompt encoding, the chat template, incremental
detokenization that never splits a multi-byte character, and stop strings.

Everything here is pure (no I/O, no clock): the HTTP shell feeds tokens in and writes the text out.

Chat template: a tokenizer that carries one (HF ``chat_template``) renders the messages itself. Otherwise
the messages are rendered with this simple template and a generation prompt for the assistant::

    <|system|>
    {content}
    <|user|>
    {content}
    <|assistant|>
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from dynaserve.tokenizer import ByteTokenizer, Tokenizer

SIMPLE_CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")
"""Roles the simple template accepts (a tokenizer's own template decides for itself)."""


class Detokenizer(Protocol):
    """Turns a request's tokens into text, piece by piece."""

    def push(self, token: int) -> str:
        """Text completed by one more token ("" while a character is still incomplete)."""
        ...

    def flush(self) -> str:
        """Text still held at the end of the stream (an incomplete character becomes U+FFFD)."""
        ...


class ByteDetokenizer:
    """Incremental UTF-8 decoding of :class:`ByteTokenizer` ids; the concatenated pieces equal
    ``ByteTokenizer.decode`` of all tokens."""

    __slots__ = ("_decode",)

    def __init__(self) -> None:
        self._decode = codecs.getincrementaldecoder("utf-8")("replace").decode

    def push(self, token: int) -> str:
        if token < ByteTokenizer.OFFSET:
            return ""
        return self._decode(bytes(((token - ByteTokenizer.OFFSET) % 256,)))

    def flush(self) -> str:
        return self._decode(b"", True)


class WindowDetokenizer:
    """Incremental decoding for subword tokenizers: decodes a short window of recent tokens and emits the
    new suffix once it no longer ends in an incomplete character (U+FFFD)."""

    __slots__ = ("_decode", "_ids", "_prefix", "_read")

    def __init__(self, decode: Callable[[list[int]], str], context: Sequence[int] = ()) -> None:
        self._decode = decode
        self._ids = list(context[-6:])  # a little prompt context keeps leading spaces right
        self._prefix = 0
        self._read = len(self._ids)

    def push(self, token: int) -> str:
        ids = self._ids
        ids.append(token)
        prefix_text = self._decode(ids[self._prefix : self._read])
        new_text = self._decode(ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(ids)
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        ids = self._ids
        if self._read >= len(ids):
            return ""
        prefix_text = self._decode(ids[self._prefix : self._read])
        new_text = self._decode(ids[self._prefix :])
        self._prefix = self._read = len(ids)
        return new_text[len(prefix_text) :]


class TextStops:
    """Finds stop strings in the generated text. The end of the text that could still grow into a stop
    string is held back, so no stop string (or part of one) is ever emitted."""

    __slots__ = ("stops", "_buf")

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._buf = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Add generated text; returns (text safe to emit, whether a stop string was found). After a
        stop string is found, the text before it is the last to emit."""
        buf = self._buf + text
        cut = -1
        for s in self.stops:
            i = buf.find(s)
            if i >= 0 and (cut < 0 or i < cut):
                cut = i
        if cut >= 0:
            self._buf = ""
            return buf[:cut], True
        keep = 0  # the longest end of the text that may still grow into a stop string
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:k]):
                    keep = k
                    break
        self._buf = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        out, self._buf = self._buf, ""
        return out


class TextCodec:
    """The model's tokenizer behind the few calls the front end needs."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.is_bytes = isinstance(tokenizer, ByteTokenizer)
        tok: Any = tokenizer
        # HF: len() counts added special tokens, vocab_size does not
        self.vocab_size = int(tokenizer.vocab_size if self.is_bytes or not hasattr(tok, "__len__") else len(tok))
        self.chat_template: str | None = None if self.is_bytes else getattr(tok, "chat_template", None)
        if self.is_bytes:
            self._decode: Callable[[list[int]], str] = tokenizer.decode
        else:
            self._decode = lambda ids: tok.decode(ids, skip_special_tokens=True)

    def encode(self, text: str) -> list[int]:
        """A prompt's ids (special tokens such as BOS added as the tokenizer does by default)."""
        return list(self.tokenizer.encode(text))

    def encode_plain(self, text: str) -> list[int]:
        """Ids of a piece of text, without special tokens."""
        if self.is_bytes:
            return self.tokenizer.encode(text)
        return list(self.tokenizer.encode(text, add_special_tokens=False))  # type: ignore[call-arg]

    def decode(self, ids: list[int]) -> str:
        return self._decode(ids)

    def single_token(self, text: str) -> int | None:
        """The id of ``text`` when it is exactly one token, else None."""
        ids = self.encode_plain(text)
        if len(ids) == 1 and self._decode(ids) == text:
            return ids[0]
        return None

    def detokenizer(self, prompt: Sequence[int] = ()) -> Detokenizer:
        if self.is_bytes:
            return ByteDetokenizer()
        return WindowDetokenizer(self._decode, prompt)

    def chat_prompt(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt ids of a conversation, ending with the assistant's generation prompt."""
        if self.chat_template:
            tok: Any = self.tokenizer
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return self.encode_plain(text)
        return self.encode(render_simple_chat(messages))


def render_simple_chat(messages: list[dict[str, str]]) -> str:
    """The simple chat template (see the module docstring)."""
    parts = [f"<|{m['role']}|>\n{m['content']}\n" for m in messages]
    parts.append("<|assistant|>\n")
    return "".join(parts)
