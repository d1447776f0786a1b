"""OpenAI response shapes: whole bodies (stream=false) and server-sent-event chunks (stream=true).

The per-token chunk is two pre-encoded byte strings around the JSON-encoded text, so a streamed token
costs one ``orjson.dumps`` of its text and one concatenation.
"""

from __future__ import annotations

from typing import Any

import orjson

from dynaserve.frontend.errors import ApiError

DONE = b"data: [DONE]\n\n"
COMPLETION = "completion"
CHAT = "chat"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, created: int, model: str, text: str, finish: str | None,
                    use: dict[str, int]) -> dict[str, Any]:
    """The body of a non-streaming /v1/completions response."""
    return {
        "id": rid, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
        "usage": use,
    }


def chat_body(rid: str, created: int, model: str, text: str, finish: str | None,
              use: dict[str, int]) -> dict[str, Any]:
    """The body of a non-streaming /v1/chat/completions response."""
    return {
        "id": rid, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                     "finish_reason": finish}],
        "usage": use,
    }


def sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def error_event(err: ApiError) -> bytes:
    """An error after the stream started (the status line was already sent)."""
    return sse(err.body())


class StreamEncoder:
    """The SSE chunks of one streaming response."""

    __slots__ = ("kind", "_head", "_obj", "_pre", "_pre_first", "_post", "_usage_null")

    def __init__(self, kind: str, rid: str, created: int, model: str, include_usage: bool) -> None:
        self.kind = kind
        self._obj = "text_completion" if kind == COMPLETION else "chat.completion.chunk"
        self._head = {"id": rid, "object": self._obj, "created": created, "model": model}
        head = orjson.dumps(self._head)[:-1]  # without the closing brace
        self._usage_null = include_usage
        tail = b',"usage":null}' if include_usage else b"}"
        if kind == COMPLETION:
            self._pre = b"data: " + head + b',"choices":[{"index":0,"text":'
            self._pre_first = self._pre
            self._post = b',"logprobs":null,"finish_reason":null}]' + tail + b"\n\n"
        else:
            self._pre = b"data: " + head + b',"choices":[{"index":0,"delta":{"content":'
            self._pre_first = b"data: " + head + b',"choices":[{"index":0,"delta":{"role":"assistant","content":'
            self._post = b'},"logprobs":null,"finish_reason":null}]' + tail + b"\n\n"

    def first(self, text: str) -> bytes:
        """The first chunk (chat: carries the assistant role)."""
        return self._pre_first + orjson.dumps(text) + self._post

    def delta(self, text: str) -> bytes:
        return self._pre + orjson.dumps(text) + self._post

    def finish(self, text: str, reason: str | None) -> bytes:
        """The last content chunk: remaining text and the finish reason."""
        if self.kind == COMPLETION:
            choice: dict[str, Any] = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "delta": {"content": text} if text else {}, "logprobs": None,
                      "finish_reason": reason}
        obj = {**self._head, "choices": [choice]}
        if self._usage_null:
            obj["usage"] = None
        return sse(obj)

    def usage(self, use: dict[str, int]) -> bytes:
        """The usage chunk (stream_options.include_usage): no choices."""
        return sse({**self._head, "choices": [], "usage": use})
