"""Request bodies of /v1/completions and /v1/chat/completions -> validated generation parameters.

Pure: a decoded JSON body in, :class:`GenParams` out, or :class:`ApiError` (400/404) naming the parameter.
Parameters DynaServe does not implement are refused when set to anything but their default, so a client
never silently gets something other than what it asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dynaserve.frontend.config import FrontendConfig
from dynaserve.frontend.errors import ApiError, bad_param
from dynaserve.frontend.text import SIMPLE_CHAT_ROLES, TextCodec

MAX_TOKENS_LIMIT = 2**31 - 1
MAX_STOP_STRINGS = 16
_SEED_MIN, _SEED_MAX = -(2**63), 2**63 - 1

# parameter -> values accepted (anything else is refused as unsupported)
_COMPLETION_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "echo": (None, False), "best_of": (None, 1), "logprobs": (None,), "suffix": (None, ""),
    "logit_bias": (None, {}), "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0),
}
_CHAT_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0), "frequency_penalty": (None, 0, 0.0), "tools": (None, []),
    "functions": (None, []), "response_format": (None, {"type": "text"}), "audio": (None,),
    "modalities": (None, ["text"]), "prediction": (None,),
}


@dataclass(frozen=True, slots=True)
class GenParams:
    """One generation request, ready for the broker."""

    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings (matched in the text)
    stop_token_ids: tuple[int, ...] = ()  # single-token stop strings and explicit stop ids
    ignore_eos: bool = False
    stream: bool = False
    include_usage: bool = False


def _is_int(v: Any) -> bool:
    return type(v) is int


def _is_num(v: Any) -> bool:
    return type(v) is int or type(v) is float


def _opt_int(body: dict, name: str, lo: int, hi: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if not _is_int(v) or not lo <= v <= hi:
        raise bad_param(name, f"{name} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def _num(body: dict, name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if not _is_num(v) or not (lo < v <= hi if lo_open else lo <= v <= hi):
        rng = f"({lo}, {hi}]" if lo_open else f"[{lo}, {hi}]"
        raise bad_param(name, f"{name} must be a number in {rng}, got {v!r}")
    return float(v)


def _bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if type(v) is not bool:
        raise bad_param(name, f"{name} must be a boolean, got {v!r}")
    return v


def _refuse_unsupported(body: dict, accepted: dict[str, tuple[Any, ...]]) -> None:
    for name, ok in accepted.items():
        if name in body and not any(body[name] == v and type(body[name]) is type(v) for v in ok):
            raise bad_param(name, f"{name}={body[name]!r} is not supported by this server")


def check_body(body: Any) -> dict:
    if type(body) is not dict:
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def check_model(body: dict, served: str) -> None:
    """400 when ``model`` is missing, 404 when it names a model this server does not serve."""
    model = body.get("model")
    if type(model) is not str or not model:
        raise bad_param("model", "model is required (a string)")
    if model != served:
        raise ApiError(404, f"The model `{model}` does not exist. This server serves `{served}`.",
                       "invalid_request_error", "model", "model_not_found")


def _token_ids(v: list, param: str, vocab: int) -> list[int]:
    for t in v:
        if not _is_int(t) or not 0 <= t < vocab:
            raise bad_param(param, f"token ids must be integers in [0, {vocab})")
    return list(v)


def parse_prompt(v: Any, codec: TextCodec) -> list[int]:
    """``prompt``: a string, a list with one string, a list of token ids, or a list with one id list."""
    if type(v) is list and len(v) == 1 and type(v[0]) in (str, list):
        v = v[0]
    if type(v) is str:
        ids = codec.encode(v)
    elif type(v) is list and all(_is_int(t) for t in v):
        ids = _token_ids(v, "prompt", codec.vocab_size)
    elif type(v) is list and v and all(type(p) in (str, list) for p in v):
        raise bad_param("prompt", "only one prompt per request is supported (n=1)")
    else:
        raise bad_param("prompt", "prompt must be a string, a list of token ids, or a list with one of those")
    if not ids:
        raise bad_param("prompt", "prompt is empty")
    return ids


def parse_messages(v: Any, codec: TextCodec) -> list[dict[str, str]]:
    """``messages``: a non-empty list of {role, content}; content is a string or a list of text parts."""
    if type(v) is not list or not v:
        raise bad_param("messages", "messages must be a non-empty list")
    out = []
    for i, m in enumerate(v):
        if type(m) is not dict or type(m.get("role")) is not str:
            raise bad_param("messages", f"messages[{i}] must be an object with a string role")
        role, content = m["role"], m.get("content")
        if not codec.chat_template and role not in SIMPLE_CHAT_ROLES:
            raise bad_param("messages", f"messages[{i}].role {role!r} is not one of {list(SIMPLE_CHAT_ROLES)}")
        if content is None:
            content = ""
        elif type(content) is list:
            texts = []
            for part in content:
                if type(part) is not dict or part.get("type") != "text" or type(part.get("text")) is not str:
                    raise bad_param("messages", f"messages[{i}].content: only text parts are supported")
                texts.append(part["text"])
            content = "".join(texts)
        elif type(content) is not str:
            raise bad_param("messages", f"messages[{i}].content must be a string or a list of text parts")
        out.append({"role": role, "content": content})
    return out


def _stops(body: dict, codec: TextCodec) -> tuple[tuple[str, ...], tuple[int, ...]]:
    v = body.get("stop")
    if v is None:
        stops: list[str] = []
    elif type(v) is str:
        stops = [v]
    elif type(v) is list and all(type(s) is str for s in v) and len(v) <= MAX_STOP_STRINGS:
        stops = list(v)
    else:
        raise bad_param("stop", f"stop must be a string or a list of at most {MAX_STOP_STRINGS} strings")
    stops = [s for s in stops if s]
    ids = [t for t in (codec.single_token(s) for s in stops) if t is not None]
    extra = body.get("stop_token_ids")
    if extra is not None:
        if type(extra) is not list:
            raise bad_param("stop_token_ids", "stop_token_ids must be a list of token ids")
        ids += _token_ids(extra, "stop_token_ids", codec.vocab_size)
    return tuple(stops), tuple(dict.fromkeys(ids))


def _common(body: dict, prompt: list[int], max_tokens: int | None, default_max: int, codec: TextCodec,
            cfg: FrontendConfig) -> GenParams:
    n = _opt_int(body, "n", 1, MAX_TOKENS_LIMIT)
    if n not in (None, 1):
        raise bad_param("n", "only n=1 is supported")
    if max_tokens is None:
        max_tokens = default_max
        if cfg.max_model_len:
            max_tokens = max(1, min(max_tokens, cfg.max_model_len - len(prompt)))
    if cfg.max_model_len and len(prompt) + max_tokens > cfg.max_model_len:
        raise ApiError(400, f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceeds the model's "
                            f"context length {cfg.max_model_len}", "invalid_request_error", "max_tokens",
                       "prompt_too_long")
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if type(opts) is not dict:
            raise bad_param("stream_options", "stream_options must be an object")
        if not stream:
            raise bad_param("stream_options", "stream_options is only allowed with stream=true")
        include_usage = _bool(opts, "include_usage")
    stop, stop_ids = _stops(body, codec)
    return GenParams(
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=_num(body, "temperature", 1.0, 0.0, 2.0),  # OpenAI's default is 1
        top_p=_num(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        seed=_opt_int(body, "seed", _SEED_MIN, _SEED_MAX),
        stop=stop,
        stop_token_ids=stop_ids,
        ignore_eos=_bool(body, "ignore_eos"),
        stream=stream,
        include_usage=include_usage,
    )


def parse_completion(body: dict, codec: TextCodec, cfg: FrontendConfig) -> GenParams:
    """Parameters of POST /v1/completions (``model`` already checked)."""
    _refuse_unsupported(body, _COMPLETION_DEFAULTS)
    max_tokens = _opt_int(body, "max_tokens", 1, MAX_TOKENS_LIMIT)
    if "prompt" not in body:
        raise bad_param("prompt", "prompt is required")
    prompt = parse_prompt(body["prompt"], codec)
    return _common(body, prompt, max_tokens, cfg.default_max_tokens, codec, cfg)


def parse_chat(body: dict, codec: TextCodec, cfg: FrontendConfig) -> GenParams:
    """Parameters of POST /v1/chat/completions (``model`` already checked)."""
    _refuse_unsupported(body, _CHAT_DEFAULTS)
    max_tokens = _opt_int(body, "max_completion_tokens", 1, MAX_TOKENS_LIMIT)
    if max_tokens is None:
        max_tokens = _opt_int(body, "max_tokens", 1, MAX_TOKENS_LIMIT)
    messages = parse_messages(body.get("messages"), codec)
    prompt = codec.chat_prompt(messages)
    return _common(body, prompt, max_tokens, cfg.default_chat_max_tokens, codec, cfg)
