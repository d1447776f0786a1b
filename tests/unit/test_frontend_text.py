"""Pure parts of the HTTP front end: incremental detokenization, stop strings, request parsing, SSE chunks."""

from __future__ import annotations

import random

import orjson
import pytest

from dynaserve.frontend.config import FrontendConfig
from dynaserve.frontend.errors import ApiError
from dynaserve.frontend.params import check_model, parse_chat, parse_completion
from dynaserve.frontend.responses import CHAT, COMPLETION, StreamEncoder
from dynaserve.frontend.text import (
    ByteDetokenizer,
    TextCodec,
    TextStops,
    WindowDetokenizer,
    render_simple_chat,
)
from dynaserve.tokenizer import ByteTokenizer

TOK = ByteTokenizer(32000)
CODEC = TextCodec(TOK)
CFG = FrontendConfig()


def test_byte_detokenizer_equals_whole_decode_and_never_splits_characters() -> None:
    rng = random.Random(1)
    texts = ["héllo wörld ✓ 𝄞 日本語", "plain"]
    for text in texts:
        ids = TOK.encode(text)
        detok = ByteDetokenizer()
        pieces = [detok.push(t) for t in ids]
        assert "".join(pieces) + detok.flush() == text
        assert all("\ufffd" not in p for p in pieces)  # a multi-byte character is emitted whole
    for _ in range(20):  # random ids, invalid UTF-8 included: same as the one-shot decode
        ids = [rng.randrange(0, 32000) for _ in range(rng.randrange(1, 200))]
        detok = ByteDetokenizer()
        assert "".join(detok.push(t) for t in ids) + detok.flush() == TOK.decode(ids)


class _PairTokenizer:
    """A toy subword tokenizer: each id above 2 is two bytes of UTF-8 text."""

    vocab_size = 1 << 16

    def decode(self, ids: list[int]) -> str:
        data = b"".join(bytes((i >> 8, i & 0xFF)) for i in ids if i > 2)
        return data.decode("utf-8", errors="replace")


def test_window_detokenizer_holds_incomplete_characters() -> None:
    data = "añb✓c".encode()
    data += b" " * (len(data) % 2)
    ids = [(data[i] << 8) | data[i + 1] for i in range(0, len(data), 2)]
    dec = _PairTokenizer().decode
    detok = WindowDetokenizer(dec)
    pieces = [detok.push(t) for t in ids]
    assert "".join(pieces) + detok.flush() == dec(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_text_stops_cut_and_hold_back() -> None:
    stops = TextStops(["END", "x"])
    out = []
    for piece in ["ab", "cE", "N", "D tail"]:
        text, hit = stops.feed(piece)
        out.append(text)
        if hit:
            break
    assert "".join(out) == "abc" and hit
    stops = TextStops(["END"])
    assert stops.feed("aEN") == ("a", False)  # "EN" might start END: held back
    assert stops.feed("x") == ("ENx", False)
    assert stops.flush() == ""


def test_parse_completion_and_chat() -> None:
    p = parse_completion({"model": "m", "prompt": "hi", "max_tokens": 5, "stop": ["i", "zz"],
                          "stream": True, "stream_options": {"include_usage": True}, "seed": 3}, CODEC, CFG)
    assert p.prompt == TOK.encode("hi") and p.max_tokens == 5 and p.include_usage and p.seed == 3
    assert p.stop == ("i", "zz") and p.stop_token_ids == (TOK.encode("i")[0],)
    assert parse_completion({"prompt": [[5, 6]]}, CODEC, CFG).prompt == [5, 6]
    assert parse_completion({"prompt": "x"}, CODEC, CFG).max_tokens == CFG.default_max_tokens
    msgs = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    c = parse_chat({"messages": msgs, "max_completion_tokens": 7, "max_tokens": 9}, CODEC, CFG)
    assert c.prompt == TOK.encode(render_simple_chat([{"role": "user", "content": "ab"}])) and c.max_tokens == 7


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": True}, "max_tokens"),
    ({"prompt": "x", "n": 2}, "n"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [1, 40000]}, "prompt"),
    ({"prompt": "x", "temperature": 3}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "stop": 5}, "stop"),
    ({"prompt": "x", "echo": True}, "echo"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
])
def test_bad_completion_params(body: dict, param: str) -> None:
    with pytest.raises(ApiError) as err:
        parse_completion(body, CODEC, CFG)
    assert err.value.status == 400 and err.value.param == param


def test_model_checks_and_context_length() -> None:
    with pytest.raises(ApiError) as err:
        check_model({"model": "other"}, "m")
    assert err.value.status == 404
    with pytest.raises(ApiError) as err:
        check_model({}, "m")
    assert err.value.status == 400
    cfg = FrontendConfig(max_model_len=10)
    with pytest.raises(ApiError) as err:
        parse_completion({"prompt": "abcdef", "max_tokens": 5}, CODEC, cfg)
    assert err.value.code == "prompt_too_long"
    assert parse_completion({"prompt": "abcdef"}, CODEC, cfg).max_tokens == 4  # default clamped to fit


@pytest.mark.parametrize("kind", [COMPLETION, CHAT])
def test_stream_chunks_are_openai_json(kind: str) -> None:
    enc = StreamEncoder(kind, "id-1", 123, "m", include_usage=True)
    for raw in (enc.first('a "quoted"\n'), enc.delta("é"), enc.finish("", "length"),
                enc.usage({"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3})):
        assert raw.startswith(b"data: ") and raw.endswith(b"\n\n")
        obj = orjson.loads(raw[6:])
        assert obj["id"] == "id-1" and obj["model"] == "m" and "usage" in obj
    first = orjson.loads(enc.first("x")[6:])["choices"][0]
    if kind == CHAT:
        assert first["delta"] == {"role": "assistant", "content": "x"}
    else:
        assert first["text"] == "x" and first["finish_reason"] is None
