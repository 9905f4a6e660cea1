"""The OpenAI-compatible server, against a real uvicorn on loopback, with the official openai client."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import uvicorn
from openai import OpenAI

try:
    import httpx
except ImportError:  # the openai client's HTTP library ships as httpx2 in this environment
    import httpx2 as httpx

from draftheads.heads import save_heads
from draftheads.server import create_app
from tiny import tiny_draftmodel

KEY = "secret-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, app):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


class Gated:
    """The model, with a gate and a delay before each chunk, and a record of chunks served per request."""

    def __init__(self, model, delay=0.0):
        self.model, self.delay, self.gate, self.served = model, delay, threading.Event(), []
        self.gate.set()

    def __getattr__(self, name):
        return getattr(self.model, name)

    def iter_generate(self, *args, **kwargs):
        n = 0
        try:
            for chunk in self.model.iter_generate(*args, **kwargs):
                self.gate.wait(30)
                time.sleep(self.delay)
                n += 1
                yield chunk
        finally:
            self.served.append(n)


@pytest.fixture(scope="module")
def model():
    return tiny_draftmodel()


@pytest.fixture(scope="module")
def server(model):
    s = Server(create_app(model, api_key=KEY, max_tokens_limit=300, max_prompt_tokens=400))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def _msgs(text):
    return [{"role": "user", "content": text}]


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = httpx.get(server.url + "/health")  # no key needed
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_chat_matches_generate(model, client):
    ref = model.generate(_msgs("hello there"), max_new_tokens=40)
    r = client.chat.completions.create(model="tiny", messages=_msgs("hello there"), max_tokens=40, temperature=0)
    assert r.choices[0].message.content == ref.text
    assert r.choices[0].finish_reason == ("length" if ref.finish_reason != "stop" else "stop")
    assert r.usage.prompt_tokens == ref.stats.prompt_tokens and r.usage.completion_tokens == len(ref.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    ours = r.model_extra["draftheads"]
    assert ours["steps"] == ref.stats.steps and ours["mean_accepted"] > 0


def test_completion_matches_generate(model, client):
    ids = model.tokenizer("Once upon")["input_ids"]
    ref = model.generate(torch.tensor(ids), max_new_tokens=30)
    r = client.completions.create(model="tiny", prompt="Once upon", max_tokens=30, temperature=0)
    assert r.choices[0].text == ref.text and r.usage.prompt_tokens == len(ids)
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=30, temperature=0)  # token ids work too
    assert r.choices[0].text == ref.text


def test_streaming(model, client):
    ref = model.generate(_msgs("stream me"), max_new_tokens=50)
    stream = client.chat.completions.create(model="tiny", messages=_msgs("stream me"), max_tokens=50, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids)

    ids = model.tokenizer("abc")["input_ids"]
    ref = model.generate(torch.tensor(ids), max_new_tokens=20)
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="abc", max_tokens=20, temperature=0, stream=True))
    assert text == ref.text


def test_sse_wire_format(server):
    with httpx.stream("POST", server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "tiny", "messages": _msgs("hi"), "max_tokens": 8, "temperature": 0,
                            "stream": True}, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [l for l in r.iter_lines() if l]
    assert all(l.startswith("data: ") for l in lines) and lines[-1] == "data: [DONE]"
    assert "draftheads" in json.loads(lines[-2][6:])


def test_stop_and_seeded_sampling(model, client):
    ref = model.generate(_msgs("cut"), max_new_tokens=40)
    stop = ref.text[5:8]
    r = client.chat.completions.create(model="tiny", messages=_msgs("cut"), max_tokens=40, temperature=0, stop=[stop])
    assert r.choices[0].message.content == ref.text[:ref.text.find(stop)] and r.choices[0].finish_reason == "stop"
    kw = dict(model="tiny", messages=_msgs("sample"), max_tokens=30, temperature=0.9, top_p=0.95, seed=7)
    a, b = (client.chat.completions.create(**kw).choices[0].message.content for _ in range(2))
    ref = model.generate(_msgs("sample"), max_new_tokens=30, temperature=0.9, top_p=0.95, seed=7, acceptance="exact")
    assert a == b == ref.text


def test_sixteen_concurrent_streams(model, server):
    prompts = [f"request number {i}: tell me something" for i in range(16)]
    refs = [model.generate(_msgs(p), max_new_tokens=24).text for p in prompts]  # before the load: one user of the model
    client = OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)

    def one(p):
        stream = client.chat.completions.create(model="tiny", messages=_msgs(p), max_tokens=24, temperature=0,
                                                stream=True)
        parts, finish = [], None
        for c in stream:
            if c.choices:
                parts.append(c.choices[0].delta.content or "")
                finish = c.choices[0].finish_reason or finish
        return "".join(parts), finish

    with ThreadPoolExecutor(16) as pool:
        out = list(pool.map(one, prompts))
    assert [t for t, _ in out] == refs
    assert all(f in ("stop", "length") for _, f in out)


def _post(server, path, body=None, key=KEY, raw=None, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        headers["Content-Type"] = "application/json"
        return httpx.post(server.url + path, content=raw, headers=headers, timeout=60)
    return httpx.post(server.url + path, json=body, headers=headers, timeout=60, **kw)


@pytest.mark.parametrize("body,status,param", [
    ({"model": "tiny", "messages": _msgs("hi"), "max_tokens": "lots"}, 400, "max_tokens"),
    ({"model": "tiny", "messages": "hi"}, 400, "messages"),
    ({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ({"model": "gpt-4", "messages": _msgs("hi")}, 404, "model"),
    ({"model": "tiny", "messages": _msgs("hi"), "max_tokens": 100000}, 400, "max_tokens"),
    ({"model": "tiny", "messages": _msgs("x" * 600)}, 400, "messages"),
    ({"model": "tiny", "messages": []}, 400, "messages"),
    ({"model": "tiny", "messages": _msgs("   ")}, 400, "messages"),
    ({"model": "tiny", "messages": _msgs("hi"), "temperature": -1}, 400, "temperature"),
    ({"messages": _msgs("hi")}, 400, "model"),
])
def test_bad_chat_requests(server, body, status, param):
    r = _post(server, "/v1/chat/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param


def test_bad_requests_other(server, client):
    r = _post(server, "/v1/chat/completions", raw=b'{"model": "tiny", "messages": [')
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = _post(server, "/v1/completions", {"model": "tiny", "prompt": ""})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = _post(server, "/v1/completions", {"model": "tiny", "prompt": [1, 2, 99999]})
    assert r.status_code == 400
    r = _post(server, "/v1/chat/completions", raw=b'{"pad": "' + b"x" * (2 << 20) + b'"}')
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    for key in (None, "wrong"):
        r = _post(server, "/v1/chat/completions", {"model": "tiny", "messages": _msgs("hi")}, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(server.url + "/v1/models")
    assert r.status_code == 401
    r = _post(server, "/v1/nowhere", {})
    assert r.status_code == 404 and "error" in r.json()
    # JSON nulls mean "default", as several OpenAI-compatible clients send them for unset fields.
    r = _post(server, "/v1/chat/completions", {"model": "tiny", "messages": _msgs("hi"), "max_tokens": 3, "n": None,
                                               "temperature": None, "top_p": None, "stop": None, "stream": None})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
    # The server is still fine after all that.
    assert client.chat.completions.create(model="tiny", messages=_msgs("ok?"), max_tokens=3).choices[0].message


def _wait(pred, timeout=20):
    deadline = time.time() + timeout
    while not pred():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def test_full_queue_gets_429_and_fifo_order(model):
    gated = Gated(model)
    gated.gate.clear()
    s = Server(create_app(gated, queue_size=1))
    try:
        health = lambda: httpx.get(s.url + "/health").json()  # noqa: E731
        body = {"model": "tiny", "messages": _msgs("queued"), "max_tokens": 5, "temperature": 0}
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(httpx.post, s.url + "/v1/chat/completions", json=body, timeout=60)
            _wait(lambda: health()["running"])
            second = pool.submit(httpx.post, s.url + "/v1/chat/completions", json=body, timeout=60)
            _wait(lambda: health()["waiting"] == 1)
            r = httpx.post(s.url + "/v1/chat/completions", json=body, timeout=60)
            assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_error"
            gated.gate.set()
            assert first.result().status_code == 200 and second.result().status_code == 200
    finally:
        s.stop()


def test_disconnect_stops_generation(model):
    gated = Gated(model, delay=0.03)
    ref = model.generate(_msgs("a long one"), max_new_tokens=200)
    assert ref.stats.steps > 40  # otherwise the test proves nothing
    s = Server(create_app(gated))
    try:
        with httpx.stream("POST", s.url + "/v1/chat/completions", timeout=60,
                          json={"model": "tiny", "messages": _msgs("a long one"), "max_tokens": 200, "stream": True,
                                "temperature": 0}) as r:
            lines = r.iter_lines()
            for _ in range(3):
                next(lines)
        _wait(lambda: gated.served, timeout=10)
        assert gated.served[0] < 15, gated.served  # stopped within a few steps, not after ~all of them
        _wait(lambda: not httpx.get(s.url + "/health").json()["running"])
    finally:
        s.stop()


def test_worker_error_is_500_and_server_survives(model):
    class Broken(Gated):
        def iter_generate(self, *a, **k):
            raise RuntimeError("boom")
            yield

    s = Server(create_app(Broken(model)))
    try:
        r = httpx.post(s.url + "/v1/chat/completions", json={"model": "tiny", "messages": _msgs("x")}, timeout=30)
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        assert httpx.get(s.url + "/health").status_code == 200
    finally:
        s.stop()


def test_cli_serve(tmp_path, model):
    model.backbone.save_pretrained(tmp_path / "bb")
    model.tokenizer.save_pretrained(tmp_path / "bb")
    save_heads(model.heads, tmp_path / "heads")
    port = _free_port()
    env = {**os.environ, "DRAFTHEADS_API_KEY": KEY, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "draftheads.cli", "serve", "--backbone", str(tmp_path / "bb"),
                             "--heads", str(tmp_path / "heads"), "--port", str(port), "--model-name", "tiny"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        ref = model.generate(_msgs("from the cli"), max_new_tokens=20)
        r = client.chat.completions.create(model="tiny", messages=_msgs("from the cli"), max_tokens=20, temperature=0)
        assert r.choices[0].message.content == ref.text
    finally:
        proc.terminate()
        proc.wait(20)
