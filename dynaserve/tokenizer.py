"""Tokenizers the broker uses for text prompts: a byte tokenizer for the simulated model, the model's own
HF tokenizer otherwise (loaded lazily, so nothing here needs transformers unless asked)."""

from __future__ import annotations

from typing import Protocol


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, tokens: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes shifted past the special ids (0 pad, 1 bos, 2 eos)."""

    OFFSET = 3

    def __init__(self, vocab_size: int = 32000) -> None:
        if vocab_size < 256 + self.OFFSET:
            raise ValueError("ByteTokenizer needs vocab_size >= 259")
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        return [b + self.OFFSET for b in text.encode("utf-8")]

    def decode(self, tokens: list[int]) -> str:
        data = bytes((t - self.OFFSET) % 256 for t in tokens if t >= self.OFFSET)
        return data.decode("utf-8", errors="replace")


def load_tokenizer(model: str, vocab_size: int) -> Tokenizer:
    """The tokenizer for a model: a directory with tokenizer files uses HF, anything else bytes."""
    from pathlib import Path

    path = Path(model)
    if path.is_dir() and (path / "tokenizer.json").exists():
        from transformers import AutoTokenizer  # only the vLLM stack installs it

        tok = AutoTokenizer.from_pretrained(str(path))
        try:
            tok.vocab_size = len(tok)  # type: ignore[misc]
        except AttributeError:  # a read-only property in newer transformers: callers use len(tok)
            pass
        return tok  # type: ignore[return-value]
    return ByteTokenizer(vocab_size)
