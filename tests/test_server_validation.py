"""The server's validation, limits and error objects, in process (starlette's TestClient) on a stub model
that records what each request asked for: every boundary on both sides, every message whole.

test_server.py runs the real thing (uvicorn, the openai client, a tiny model); these pin what it does
not look at closely: which limit, which parameter and code, which sampling settings reach the model.
"""

from types import SimpleNamespace

import pytest
from starlette.testclient import TestClient

from draftheads.errors import UserError
from draftheads.server import Job, Worker, create_app


class Stub:
    """What create_app uses of a DraftModel. A prompt is one id per character of "role:content" (chat)
    or of the text (completion); the reply is "hello" in two chunks."""

    backbone_name = "stub"

    def __init__(self, context=100, vocab=50, fail=None, finish="length"):
        self.decoder = SimpleNamespace(context=context, lean=None)  # lean None: no batched decoding
        self.batch_trees, self.batch_cuts = {}, {}
        self.backbone = SimpleNamespace(config=SimpleNamespace(vocab_size=vocab))
        self.fail, self.finish, self.calls, self.messages, self.split = fail, finish, [], [], []

    def prompt_ids(self, messages):
        self.messages.append(messages)
        if messages[0]["content"] == "user error":
            raise UserError("the prompt is refused")
        if messages[0]["content"] == "crash":
            raise RuntimeError("a bug")
        return [ord(c) % 50 for m in messages for c in f"{m['role']}:{m['content']}"]

    def tokenizer(self, text, split_special_tokens):
        self.split.append(split_special_tokens)
        return {"input_ids": [ord(c) % 50 for c in text]}

    def iter_generate(self, ids, **kwargs):
        self.calls.append((ids.tolist(), kwargs))
        if self.fail:
            raise self.fail
        stats = SimpleNamespace(prompt_tokens=len(ids), steps=3, mean_accepted=1.234567, tokens_per_second=12.3456,
                                tree_size=4)
        yield SimpleNamespace(text="hel", result=None)
        yield SimpleNamespace(text="lo", result=SimpleNamespace(text="hello", token_ids=[1, 2, 3], stats=stats,
                                                                 finish_reason=self.finish))


@pytest.fixture
def api():
    apps = []

    def make(model=None, **kw):
        model = model or Stub()
        apps.append(create_app(model, **kw))
        return TestClient(apps[-1], raise_server_exceptions=False), model

    yield make
    for app in apps:
        app.state.worker.stop()


def chat(text="hi", **kw):
    return {"model": "stub", "messages": [{"role": "user", "content": text}], **kw}


def error(r, status, message, param=None, code=None, type="invalid_request_error"):
    assert r.status_code == status, r.text
    assert r.json() == {"error": {"message": message, "type": type, "param": param, "code": code}}


def test_replies_usage_and_our_statistics(api):
    client, model = api(model_name="named")
    r = client.post("/v1/chat/completions", json={**chat(), "model": "named"}).json()
    assert r["id"].startswith("chatcmpl-") and len(r["id"]) == 9 + 24 and r["object"] == "chat.completion"
    assert r["model"] == "named" and isinstance(r["created"], int)
    assert r["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "logprobs": None,
                             "finish_reason": "length"}]
    assert r["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}  # "user:hi"
    assert r["draftheads"] == {"steps": 3, "mean_accepted": 1.2346, "tokens_per_second": 12.35, "tree_size": 4,
                               "finish_reason": "length"}
    for finish, shown in (("stop", "stop"), ("context", "length")):
        client, model = api(Stub(finish=finish))
        r = client.post("/v1/completions", json={"model": "stub", "prompt": "abc"}).json()
        assert r["id"].startswith("cmpl-") and len(r["id"]) == 5 + 24 and r["object"] == "text_completion"
        assert r["choices"] == [{"index": 0, "text": "hello", "logprobs": None, "finish_reason": shown}]
    health = client.get("/health").json()
    phases = health.pop("phases")  # where the worker's time went (server.Worker.phases)
    assert health == {"status": "ok", "model": "stub", "running": False, "waiting": 0}
    assert phases["passes"] == phases["sequences"] >= 1 and min(phases.values()) >= 0
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [(m["id"], m["object"], m["owned_by"]) for m in models["data"]] == \
        [("stub", "model", "draftheads")]


def test_sampling_settings_reach_the_model(api):
    client, model = api(default_max_tokens=7)
    greedy = dict(max_new_tokens=7, temperature=0.0, top_p=1.0, stop=[], seed=None, acceptance="greedy")
    for body, want in [
        (chat(), {**greedy, "temperature": 1.0, "acceptance": "exact"}),  # OpenAI's default temperature is 1
        (chat(temperature=0), greedy),
        (chat(temperature=0.99e-5), greedy),  # below GREEDY_BELOW (1e-5): greedy
        (chat(temperature=1e-5, top_p=0.5, seed=3), {**greedy, "temperature": 1e-5, "top_p": 0.5, "seed": 3,
                                                     "acceptance": "exact"}),
        (chat(max_tokens=5, stop="x"), {**greedy, "temperature": 1.0, "acceptance": "exact", "max_new_tokens": 5,
                                        "stop": ["x"]}),
        (chat(max_tokens=5, max_completion_tokens=6, temperature=0, stop=["a", "b", "c", "d"]),
         {**greedy, "max_new_tokens": 6, "stop": ["a", "b", "c", "d"]}),
    ]:
        assert client.post("/v1/chat/completions", json=body).status_code == 200
        assert model.calls[-1] == ([ord(c) % 50 for c in "user:" + body["messages"][0]["content"]], want), body


def test_prompts_as_the_model_sees_them(api):
    client, model = api()
    msgs = [{"role": "developer", "content": "be"}, {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                                 {"type": "text", "text": "b"}]}]
    assert client.post("/v1/chat/completions", json={"model": "stub", "messages": msgs}).status_code == 200
    assert model.messages[-1] == [{"role": "developer", "content": "be"}, {"role": "user", "content": "ab"}]
    for prompt, ids in (("ab", [47, 48]), (["ab"], [47, 48]), ([0, 49, 3], [0, 49, 3])):
        assert client.post("/v1/completions", json={"model": "stub", "prompt": prompt}).status_code == 200
        assert model.calls[-1][0] == ids
    assert model.split == [True, True]  # control-token spellings are text
    client, model = api(parse_special_tokens=True)
    client.post("/v1/completions", json={"model": "stub", "prompt": "ab"})
    assert model.split == [False]


def test_request_errors_name_the_parameter_and_code(api):
    client, _ = api(max_tokens_limit=20, default_max_tokens=30)
    post = client.post
    error(post("/v1/chat/completions", json={**chat(), "model": "other"}), 404,
          "the model 'other' does not exist; this server serves 'stub'", "model", "model_not_found")
    error(post("/v1/chat/completions", json=chat(" \n")), 400, "messages are all empty", "messages", "empty_prompt")
    error(post("/v1/chat/completions", json=chat("user error")), 400, "the prompt is refused", "messages",
          "empty_prompt")
    error(post("/v1/completions", json={"model": "stub", "prompt": ["a", "b"]}), 400,
          "one prompt per request (the server decodes batch size 1)", "prompt")
    for empty in ("", " ", [], [""]):
        error(post("/v1/completions", json={"model": "stub", "prompt": empty}), 400, "the prompt is empty", "prompt",
              "empty_prompt")
    for ids in ([50], [-1], [3, 50]):
        error(post("/v1/completions", json={"model": "stub", "prompt": ids}), 400, "token ids must lie in [0, 50)",
              "prompt")
    error(post("/v1/chat/completions", json=chat()), 400, "max_tokens is 30, over this server's limit of 20",
          "max_tokens", "max_tokens_exceeded")  # the default counts too
    error(post("/v1/chat/completions", json=chat(max_tokens=5, max_completion_tokens=21)), 400,
          "max_tokens is 21, over this server's limit of 20", "max_tokens", "max_tokens_exceeded")
    assert post("/v1/chat/completions", json=chat(max_tokens=20)).status_code == 200
    error(post("/v1/chat/completions", json=chat(max_tokens=1, stop=list("abcde"))), 400, "at most 4 stop sequences",
          "stop")
    error(post("/v1/chat/completions", content=b'{"model": "stub", ',
               headers={"Content-Type": "application/json"}), 400, "the request body is not valid JSON",
          code="invalid_json")
    error(post("/v1/chat/completions", json={**chat(), "n": 2}), 400, "n: Input should be less than or equal to 1", "n",
          "less_than_equal")
    error(post("/v1/chat/completions", json={"model": "stub", "messages": [{"role": "user", "content": [
        {"type": "text", "text": 5}]}]}), 400, "messages.0.content.0.text: Input should be a valid string",
        "messages.0.content.0.text", "string_type")
    error(client.get("/v1/nowhere"), 404, "Not Found")
    error(client.get("/v1/chat/completions"), 405, "Method Not Allowed")
    error(post("/v1/chat/completions", json=chat("crash")), 500, "internal server error", type="server_error")


def test_prompt_limits_on_both_sides(api):
    client, _ = api(max_prompt_tokens=10)  # "user:" + 5 characters = 10 ids
    assert client.post("/v1/chat/completions", json=chat("x" * 5)).status_code == 200
    error(client.post("/v1/chat/completions", json=chat("x" * 6)), 400,
          "the prompt has 11 tokens, over this server's limit of 10", "messages", "context_length_exceeded")
    client, _ = api(Stub(context=12))  # the context keeps one position for the first new token
    assert client.post("/v1/completions", json={"model": "stub", "prompt": [1] * 11}).status_code == 200
    error(client.post("/v1/completions", json={"model": "stub", "prompt": [1] * 12}), 400,
          "the prompt has 12 tokens, over this server's limit of 11", "prompt", "context_length_exceeded")
    # Batched: a slot of max_seq_len tokens keeps room for one step, here a 5-node tree (20 - 5 = 15 tokens).
    batchable = Stub()
    batchable.decoder = SimpleNamespace(context=100, lean=object(), drafter=None, tree=SimpleNamespace(size=5))
    client, _ = api(batchable, max_batch=2, max_seq_len=20)
    assert client.post("/v1/completions", json={"model": "stub", "prompt": [1] * 14}).status_code == 200
    error(client.post("/v1/completions", json={"model": "stub", "prompt": [1] * 15}), 400,
          "the prompt has 15 tokens, over this server's limit of 14", "prompt", "context_length_exceeded")
    # A model the batched step does not take is served one request at a time: its own context holds.
    client, _ = api(max_batch=2, max_seq_len=20)
    assert client.post("/v1/completions", json={"model": "stub", "prompt": [1] * 99}).status_code == 200
    client, _ = api(Stub(context=10), max_batch=2, max_seq_len=2048)
    error(client.post("/v1/completions", json={"model": "stub", "prompt": [1] * 10}), 400,
          "the prompt has 10 tokens, over this server's limit of 9", "prompt", "context_length_exceeded")


def test_worker_errors_become_error_objects(api):
    client, _ = api(Stub(fail=UserError("too long for the model")))
    error(client.post("/v1/chat/completions", json=chat()), 400, "too long for the model")
    client, _ = api(Stub(fail=RuntimeError("boom")))
    error(client.post("/v1/chat/completions", json=chat()), 500, "generation failed: RuntimeError", type="server_error")


def test_streaming_events_and_usage(api):
    import json

    client, _ = api()
    for usage in (True, False):
        body = chat(stream=True, stream_options={"include_usage": usage})
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert ("usage" in last) == usage and (not usage or last["usage"]["completion_tokens"] == 3)
    with client.stream("POST", "/v1/completions", json={"model": "stub", "prompt": "ab", "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert [e["choices"][0]["text"] for e in events] == ["hel", "lo", ""] and events[0]["id"].startswith("cmpl-")


def test_api_key_and_body_limit(api):
    client, _ = api(Stub(context=1000), api_key="k3y", max_body_bytes=200)  # room for a 200-byte prompt
    body = chat()
    for headers in ({"Authorization": "Bearer k3y"}, {"authorization": "bearer k3y "}, {"X-API-Key": "k3y"}):
        assert client.post("/v1/chat/completions", json=body, headers=headers).status_code == 200, headers
    message = "missing or incorrect API key (send 'Authorization: Bearer <key>')"
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Token k3y"}, {"X-API-Key": "k3"}):
        error(client.post("/v1/chat/completions", json=body, headers=headers), 401, message, code="invalid_api_key")
    error(client.get("/v1/models"), 401, message, code="invalid_api_key")
    assert client.get("/health").status_code == 200  # health needs no key
    key = {"Authorization": "Bearer k3y", "Content-Type": "application/json"}
    fits = b'{"model": "stub", "messages": [{"role": "user", "content": "%s"}]}'
    fits = fits % (b"x" * (200 - len(fits) + 2))
    assert len(fits) == 200 and client.post("/v1/chat/completions", content=fits, headers=key).status_code == 200
    too_big = "the request body is over 200 bytes"
    error(client.post("/v1/chat/completions", content=fits + b" ", headers=key), 413, too_big,
          code="request_too_large")
    # No Content-Length (chunked): counted while it is read.
    error(client.post("/v1/chat/completions", content=iter([fits[:150], fits[150:] + b"  "]), headers=key), 413,
          too_big, code="request_too_large")
    assert client.post("/v1/chat/completions", content=iter([fits[:150], fits[150:]]), headers=key).status_code == 200
    error(client.post("/v1/chat/completions", content=fits, headers={**key, "Content-Length": "x1"}), 413, too_big,
          code="request_too_large")


def test_a_full_queue_refuses_by_name():
    worker = Worker(Stub(), queue_size=1, own_thread=False)
    worker.submit(Job([1], {}, None, None))
    with pytest.raises(Exception) as e:
        worker.submit(Job([2], {}, None, None))
    assert (e.value.status, e.value.code, e.value.type) == (429, "queue_full", "rate_limit_error")
    assert e.value.message == "the server is busy: 1 request is already waiting; retry later"
    assert len(worker.waiting) == 1


def test_default_limits_and_what_the_worker_is_given(api):
    from draftheads import defaults

    client, model = api(Stub(context=10 * defaults.MAX_PROMPT_TOKENS))
    ok = lambda body: client.post("/v1/completions", json={"model": "stub", **body}).status_code  # noqa: E731
    assert ok({"prompt": [1] * defaults.MAX_PROMPT_TOKENS}) == 200
    assert model.calls[-1][1]["max_new_tokens"] == defaults.DEFAULT_MAX_TOKENS
    assert ok({"prompt": [1] * (defaults.MAX_PROMPT_TOKENS + 1)}) == 400
    assert ok({"prompt": [1], "max_tokens": defaults.MAX_TOKENS_LIMIT}) == 200
    assert ok({"prompt": [1], "max_tokens": defaults.MAX_TOKENS_LIMIT + 1}) == 400
    w = client.app.state.worker
    assert (w.queue_size, w.max_batch, w.max_seq_len, w.max_tree_rows, w.prefill_chunk, w.draft_confidence) == \
        (defaults.QUEUE_SIZE, 1, defaults.MAX_SEQ_LEN, None, None, {})
    assert w.draft_confidence is model.batch_cuts  # the cuts calibrated with the heads' batch trees (none: the default)
    # One request at a time: the model's whole context, however short a batch slot would be.
    client, _ = api(Stub(context=500), max_batch=1, max_seq_len=80)
    assert client.post("/v1/completions", json={"model": "stub", "prompt": [1] * 400}).status_code == 200
    import threading

    before = set(threading.enumerate())  # workers of earlier apps may end meanwhile; none may start
    client, _ = api(max_batch=3, max_seq_len=300, max_tree_rows=7, prefill_chunk=5, draft_confidence=0.25,
                    worker_thread=False)
    w = client.app.state.worker
    assert (w.max_batch, w.max_seq_len, w.max_tree_rows, w.prefill_chunk, w.draft_confidence) == (3, 300, 7, 5, 0.25)
    started = [t for t in set(threading.enumerate()) - before if t.name == "draftheads-worker"]
    assert started == []  # worker_thread=False: the caller runs it
    for path in ("/docs", "/redoc", "/openapi.json"):  # no schema or docs pages on a server meant to be locked down
        assert client.get(path).status_code == 404, path
    models = client.get("/v1/models").json()
    assert isinstance(models["data"][0]["created"], int)


def test_the_body_is_read_whole_from_every_chunk_and_a_disconnect_ends_it():
    """The Guard as ASGI sees it: a body in several messages (one without a "body" key), and a client gone
    before the end."""
    import asyncio

    from draftheads.server import Guard

    seen = []

    async def app(scope, receive, send):
        seen.append(await receive())

    def run(messages, limit=100):
        queue = list(messages)

        async def receive():
            return queue.pop(0)

        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
        sent = []

        async def send(m):
            sent.append(m)

        asyncio.run(Guard(app, None, limit)(scope, receive, send))
        return sent

    run([{"type": "http.request", "body": b"ab", "more_body": True}, {"type": "http.request", "more_body": True},
         {"type": "http.request", "body": b"cd"}])
    assert seen == [{"type": "http.request", "body": b"abcd", "more_body": False}]
    seen.clear()
    assert run([{"type": "http.request", "body": b"ab", "more_body": True}, {"type": "http.disconnect"}]) == []
    assert seen == []  # the handler never ran
    sent = run([{"type": "http.request", "body": b"x" * 60, "more_body": True},
                {"type": "http.request", "body": b"x" * 60, "more_body": False}])
    assert sent[0]["status"] == 413 and seen == []
    lifespan, sent = [], []

    async def lifespan_app(scope, receive, send):
        lifespan.append((scope["type"], await receive()))
        await send({"type": "lifespan.startup.complete"})

    async def receive():
        return {"type": "lifespan.startup"}

    async def send(message):
        sent.append(message)

    asyncio.run(Guard(lifespan_app, "k", 10)({"type": "lifespan"}, receive, send))
    assert lifespan == [("lifespan", {"type": "lifespan.startup"})]  # passed through as it is
    assert sent == [{"type": "lifespan.startup.complete"}]


def test_lone_surrogates_and_worker_failures_are_named(api, caplog):
    import logging

    from draftheads.server import APIError, _unicode

    with pytest.raises(ValueError, match="^holds a lone UTF-16 surrogate, which is not valid Unicode text$"):
        _unicode("a\ud800")
    assert str(APIError(400, "the message")) == "the message"
    client, _ = api(Stub(fail=RuntimeError("boom")))
    with caplog.at_level(logging.ERROR, logger="draftheads.server"):
        client.post("/v1/chat/completions", json=chat())
    failed = [r for r in caplog.records if r.getMessage() == "generation failed"]
    assert failed and failed[0].exc_info[0] is RuntimeError


def test_empty_prompt_errors_name_the_parameter_of_each_endpoint(api):
    class Refusing(Stub):
        def tokenizer(self, text, split_special_tokens):
            raise UserError("nothing left of it")

    client, _ = api(Refusing())
    error(client.post("/v1/completions", json={"model": "stub", "prompt": "ab"}), 400, "nothing left of it", "prompt",
          "empty_prompt")
    client, _ = api()
    error(client.post("/v1/completions", json={"model": "stub", "prompt": [], "max_tokens": 1}), 400,
          "the prompt is empty", "prompt", "empty_prompt")
    import json

    with client.stream("POST", "/v1/completions", json={"model": "stub", "prompt": "ab", "stream": True}) as r:
        first = json.loads(next(line[6:] for line in r.iter_lines() if line.startswith("data: {")))
    assert (first["object"], first["model"]) == ("text_completion", "stub")
    client, _ = api(model_name="named")
    with client.stream("POST", "/v1/chat/completions", json={**chat(), "model": "named", "stream": True}) as r:
        first = json.loads(next(line[6:] for line in r.iter_lines() if line.startswith("data: {")))
    assert (first["object"], first["model"]) == ("chat.completion.chunk", "named")


def test_fields_that_would_change_the_reply_are_refused_unless_they_ask_for_nothing(api):
    client, model = api()
    asking = {"logprobs": True, "top_logprobs": 2, "tools": [{"type": "function", "function": {"name": "f"}}],
              "tool_choice": "required", "functions": [{"name": "f"}], "function_call": {"name": "f"},
              "response_format": {"type": "json_object"}, "logit_bias": {"5": 100}, "presence_penalty": 0.5,
              "frequency_penalty": -1, "best_of": 2, "echo": True, "suffix": "end"}
    for field, value in asking.items():
        r = client.post("/v1/chat/completions", json=chat(**{field: value}))
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, r.text)
        assert r.json()["error"]["message"].startswith(f"{field}: not supported by this server ("), r.text
    error(client.post("/v1/completions", json={"model": "stub", "prompt": "ab", "logprobs": 5}), 400,
          "logprobs: not supported by this server (no log-probabilities are returned)", "logprobs", "value_error")
    assert not model.calls  # nothing reached the model
    nothing = {"logprobs": False, "top_logprobs": 0, "tools": [], "tool_choice": "auto", "functions": None,
               "function_call": "none", "response_format": {"type": "text"}, "logit_bias": {}, "presence_penalty": 0,
               "frequency_penalty": 0.0, "best_of": 1, "echo": False, "suffix": "", "user": "u", "metadata": {"a": "b"}}
    assert client.post("/v1/chat/completions", json=chat(**nothing)).status_code == 200
    assert client.post("/v1/completions", json={"model": "stub", "prompt": "ab", "logprobs": None}).status_code == 200


def test_a_model_card_by_id_and_stream_options_only_with_a_stream(api):
    client, model = api(model_name="org/named")
    card = client.get("/v1/models/org/named").json()
    assert card == client.get("/v1/models").json()["data"][0] and card["id"] == "org/named"
    error(client.get("/v1/models/other"), 404, "the model 'other' does not exist; this server serves 'org/named'",
          "model", "model_not_found")
    body = {**chat(), "model": "org/named", "stream_options": {"include_usage": True}}
    error(client.post("/v1/chat/completions", json=body), 400, "stream_options is only allowed when stream is true",
          "stream_options")
    assert not model.calls
    assert client.post("/v1/chat/completions", json={**body, "stream_options": None}).status_code == 200


def test_a_body_that_is_no_json_object_is_named(api):
    client, model = api()
    message = "the request body must be a JSON object, sent with Content-Type: application/json"
    error(client.post("/v1/chat/completions", json=[chat()]), 400, message, code="invalid_body")
    error(client.post("/v1/completions", content=b'{"model": "stub", "prompt": "ab"}',
                      headers={"Content-Type": "application/x-www-form-urlencoded"}), 400, message, code="invalid_body")
    assert not model.calls
