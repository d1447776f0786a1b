"""The OpenAI-compatible HTTP front end over a real cluster (broker + simulated workers + front end
processes), driven by the official ``openai`` client, plus the Prometheus endpoints of all three shells.

The simulated engine's greedy tokens are a pure function of the prompt ids (``reference_tokens``) and the
front end uses the byte tokenizer, so every returned text is checked exactly against the decoded reference.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import openai
import orjson
import pytest

from dynaserve.client import DynaServeClient
from dynaserve.cluster import LocalCluster
from dynaserve.frontend.config import FrontendConfig
from dynaserve.frontend.text import render_simple_chat
from dynaserve.tokenizer import ByteTokenizer
from tests.conftest import free_base_port, make_prompt, metric_value, start_cluster, wait_idle
from workers.engines.sim import reference_tokens

pytestmark = pytest.mark.integration

MODEL = "llama3-8b"
TOK = ByteTokenizer(32000)


@pytest.fixture(scope="module")
def http_cluster() -> Iterator[LocalCluster]:
    """Two workers, the front end on a free port, metrics on the next three (broker, w0, w1)."""
    base = free_base_port(4)
    cluster = start_cluster("dynaserve", http_port=base, metrics_base_port=base + 1,
                            broker_args=["--allow-forced-splits"])
    yield cluster
    cluster.stop()
    log = cluster.log("frontend")
    assert "Traceback" not in log, log[-3000:]


@pytest.fixture(scope="module")
def oai(http_cluster: LocalCluster) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=f"{http_cluster.http_url}/v1", api_key="unused", max_retries=0, timeout=30)
    yield client
    client.close()


def _expected(prompt_ids: list[int], n: int) -> str:
    return TOK.decode(reference_tokens(prompt_ids, n))


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _post_raw(url: str, data: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_completion_matches_simulated_tokens(oai: openai.OpenAI) -> None:
    prompt = "Hello, DynaServe! ünïcödé ✓"
    ids = TOK.encode(prompt)
    r = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0,
                               extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.model == MODEL
    assert r.choices[0].text == _expected(ids, 24)
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (len(ids), 24, len(ids) + 24)
    # token ids as the prompt give the same result
    r2 = oai.completions.create(model=MODEL, prompt=ids, max_tokens=24, temperature=0,
                                extra_body={"ignore_eos": True})
    assert r2.choices[0].text == r.choices[0].text


def test_completion_stream_with_usage(oai: openai.OpenAI) -> None:
    prompt = "streaming prompt 123"
    ids = TOK.encode(prompt)
    chunks = list(oai.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stream=True,
                                         stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == _expected(ids, 40)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 40 and chunks[-1].usage.prompt_tokens == len(ids)
    assert all(c.usage is None for c in chunks[:-1])


def test_chat_stream_and_whole(oai: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]
    ids = TOK.encode(render_simple_chat(messages))
    want = _expected(ids, 30)
    r = oai.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=30,  # type: ignore[arg-type]
                                    temperature=0, extra_body={"ignore_eos": True})
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 30)
    chunks = list(oai.chat.completions.create(model=MODEL, messages=messages, max_tokens=30,  # type: ignore[arg-type]
                                              temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_strings(oai: openai.OpenAI) -> None:
    for seed in range(50):  # a prompt whose reference output holds printable characters to stop at
        ids = TOK.encode(f"stop test {seed}")
        full = _expected(ids, 60)
        printable = [i for i, ch in enumerate(full) if ch.isascii() and ch.isalnum()]
        if len(printable) >= 2 and printable[0] > 0:
            break
    else:
        pytest.skip("no reference output with printable characters")
    prompt = TOK.decode(ids)
    one = full[printable[0]]  # one byte = one token: mapped to a stop token id as well
    r = oai.completions.create(model=MODEL, prompt=prompt, max_tokens=60, temperature=0, stop=one,
                               extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[: full.index(one)]
    two = full[printable[1] - 1 : printable[1] + 1]  # two characters: cut in the text, request aborted
    chunks = list(oai.completions.create(model=MODEL, prompt=prompt, max_tokens=60, temperature=0, stop=[two],
                                         stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == full[: full.index(two)]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_errors(oai: openai.OpenAI, http_cluster: LocalCluster) -> None:
    url = f"{http_cluster.http_url}/v1/completions"
    status, body = _post_raw(url, b"{not json")
    assert status == 400 and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error"
    status, body = _post_raw(url, b"[1, 2]")
    assert status == 400
    with pytest.raises(openai.NotFoundError) as nf:
        oai.completions.create(model="no-such-model", prompt="x", max_tokens=4)
    assert nf.value.status_code == 404
    for bad in (0, -1, 10**6):
        with pytest.raises(openai.BadRequestError):
            oai.completions.create(model=MODEL, prompt="x", max_tokens=bad)
    with pytest.raises(openai.BadRequestError) as too_long:
        oai.completions.create(model=MODEL, prompt="a" * 33000, max_tokens=4)
    assert "prompt_too_long" in str(too_long.value)
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model=MODEL, prompt="x", max_tokens=4, n=2)
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model=MODEL, prompt=["a", "b"], max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model=MODEL, messages=[], max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model=MODEL, prompt="x", max_tokens=4, temperature=-1)
    status, body = _post_raw(url, b" " * (9 << 20))  # over the body size limit
    assert status == 413 and "error" in body
    status, body = _get(f"{http_cluster.http_url}/v1/nothing-here")
    assert status == 404 and "error" in json.loads(body)


def test_models_and_health(oai: openai.OpenAI, http_cluster: LocalCluster) -> None:
    assert [m.id for m in oai.models.list()] == [MODEL]
    status, body = _get(f"{http_cluster.http_url}/health")
    assert status == 200 and json.loads(body)["workers"] == 2


def test_client_disconnect_aborts(http_cluster: LocalCluster) -> None:
    port = http_cluster.config.http_port
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    body = {"model": MODEL, "prompt": "a long one", "max_tokens": 3000, "stream": True, "ignore_eos": True}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type", "").startswith("text/event-stream")
    assert resp.read(6) == b"data: "  # the stream has started
    conn.close()

    async def active_after_disconnect() -> int:
        async with DynaServeClient(http_cluster.client_addr) as c:
            deadline = time.monotonic() + 5.0
            while True:
                st = await c.status()
                if st.active == 0 or time.monotonic() > deadline:
                    return st.active
                await asyncio.sleep(0.05)

    assert asyncio.run(active_after_disconnect()) == 0  # 3000 tokens would take ~30 s: it was aborted
    loads = asyncio.run(wait_idle(http_cluster))
    assert all(v["active_requests"] == 0 and v["kv_used_tokens"] == 0 for v in loads.values()), loads


def test_metrics_of_frontend_broker_and_workers(oai: openai.OpenAI, http_cluster: LocalCluster) -> None:
    base = http_cluster.config.metrics_base_port
    broker_url, w_urls = f"http://127.0.0.1:{base}/metrics", [f"http://127.0.0.1:{base + 1 + i}/metrics"
                                                              for i in range(2)]
    before = _get(broker_url)[1].decode()
    finished0 = metric_value(before, "dynaserve:broker_requests_total", outcome="finished")
    aborted0 = metric_value(before, "dynaserve:broker_requests_total", outcome="aborted")
    oai.completions.create(model=MODEL, prompt="metrics", max_tokens=8, temperature=0,
                           extra_body={"ignore_eos": True})
    with pytest.raises(openai.BadRequestError):  # rejected by the broker
        oai.completions.create(model=MODEL, prompt="a" * 33000, max_tokens=4)

    async def sdk_requests() -> None:
        async with DynaServeClient(http_cluster.client_addr) as c:
            prompt = make_prompt(64, seed=7)  # a pd split: instance B pulls A's KV
            async with c.generate(prompt, max_tokens=8, ignore_eos=True, force_split=64) as stream:
                assert await stream.collect() == reference_tokens(prompt, 8)
            async with c.generate(prompt, max_tokens=500, ignore_eos=True) as stream:
                await stream.__anext__()  # leaving the block after one token aborts the request

    asyncio.run(sdk_requests())
    fe = _get(f"{http_cluster.http_url}/metrics")[1].decode()
    assert metric_value(fe, "dynaserve:frontend_requests_total", endpoint="completions", status="200") >= 1
    assert metric_value(fe, "dynaserve:frontend_requests_total", endpoint="completions", status="400") >= 1
    assert metric_value(fe, "dynaserve:frontend_time_to_first_token_seconds_count", endpoint="completions") >= 1
    assert metric_value(fe, "dynaserve:frontend_generation_tokens_total", endpoint="completions") >= 8
    assert metric_value(fe, "dynaserve:frontend_requests_in_flight") == 0

    deadline = time.monotonic() + 5.0  # the SDK's abort reaches the broker asynchronously
    after = _get(broker_url)[1].decode()
    while (metric_value(after, "dynaserve:broker_requests_total", outcome="aborted") < aborted0 + 1
           and time.monotonic() < deadline):
        time.sleep(0.05)
        after = _get(broker_url)[1].decode()
    assert metric_value(after, "dynaserve:broker_requests_total", outcome="finished") >= finished0 + 2
    assert metric_value(after, "dynaserve:broker_requests_total", outcome="aborted") >= aborted0 + 1
    assert metric_value(after, "dynaserve:broker_rejected_requests_total", code="prompt_too_long") >= 1
    assert metric_value(after, "dynaserve:broker_split_decisions_total", kind="pd") >= 1
    assert metric_value(after, "dynaserve:broker_time_to_first_token_seconds_count") >= 2
    assert metric_value(after, "dynaserve:broker_time_between_tokens_seconds_count") >= 7
    assert metric_value(after, "dynaserve:broker_requests_queued") == 0
    assert metric_value(after, "dynaserve:broker_workers") == 2
    for iid in ("w0", "w1"):  # simulated A100s: priced with their own cost-table model, as the local scheduler plans
        assert metric_value(after, "dynaserve:broker_instance_step_scale", instance=iid) > 0
        assert 1e-6 < metric_value(after, "dynaserve:broker_instance_prefill_seconds_per_token", instance=iid) < 1e-3

    workers = [_get(u)[1].decode() for u in w_urls]
    assert sum(metric_value(w, "dynaserve:worker_steps_total") for w in workers) > 0
    assert sum(metric_value(w, "dynaserve:worker_step_seconds_count") for w in workers) > 0
    assert sum(metric_value(w, "dynaserve:worker_kv_transfer_bytes_total") for w in workers) > 0
    assert sum(metric_value(w, "dynaserve:worker_kv_transfer_seconds_count") for w in workers) >= 1
    for i, w in enumerate(workers):
        assert metric_value(w, "dynaserve:worker_token_budget", worker=f"w{i}") >= 0
        assert metric_value(w, "dynaserve:worker_kv_transfer_failures_total", worker=f"w{i}") == 0


def test_broker_unavailable_gives_503(tmp_path: object) -> None:
    """A front end whose broker never answers: /health and new requests get 503."""
    from aiohttp import ClientSession

    from dynaserve.frontend.server import Frontend

    async def main() -> None:
        cfg = FrontendConfig(broker=f"ipc://{tmp_path}/nobody.sock", port=0, health_timeout_s=0.2,
                             broker_timeout_s=0.2, monitor_interval_s=0.05)
        fe = Frontend(cfg)
        await fe.start()
        try:
            url = f"http://127.0.0.1:{fe.port}"
            async with ClientSession() as s:
                async with s.get(f"{url}/health") as r:
                    assert r.status == 503
                    assert (await r.json())["error"]["code"] == "broker_unavailable"
                await asyncio.sleep(0.5)  # the monitor has marked the broker down
                body = orjson.dumps({"model": MODEL, "prompt": "x", "max_tokens": 4})
                async with s.post(f"{url}/v1/completions", data=body) as r:
                    assert r.status == 503
                    assert (await r.json())["error"]["code"] == "broker_unavailable"
        finally:
            await fe.stop()

    asyncio.run(main())
