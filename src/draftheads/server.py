"""OpenAI-compatible HTTP API for one DraftModel: /v1/chat/completions, /v1/completions, /v1/models, /health.

The loop decodes one sequence at a time, so one worker thread runs the model and requests wait in a
bounded FIFO queue (429 when it is full). The worker pulls the generator one step at a time and checks,
before each step, whether the client is still there; every request watches its connection, so a
disconnect stops decoding at the next step, or frees the queue slot of a request still waiting.
Request bodies are validated strictly, as OpenAI's API does ("4" and true are not integers). Our
acceptance statistics ride along in a `draftheads` field that OpenAI clients ignore.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Annotated, Any, Callable, Literal, Union

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import defaults
from .acceptance import GREEDY_BELOW
from .backbone import ROLES
from .errors import UserError
from .batch import refusal, slot_context
from .round_costs import RoundCosts

log = logging.getLogger("draftheads.server")



class APIError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _unicode(s: str) -> str:
    # JSON can spell a lone UTF-16 surrogate ("\ud800"), which is no Unicode text: no tokenizer takes it.
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("holds a lone UTF-16 surrogate, which is not valid Unicode text") from None
    return s


Text = Annotated[str, AfterValidator(_unicode)]
# Numbers as OpenAI takes them: strict (true is no number), finite (JSON's NaN / 1e400 are refused by name).
Number = Field(strict=True, allow_inf_nan=False)


def _refused(accepted: Callable[[Any], bool], why: str):
    """A field this server cannot honour: its default (null, false, 0, empty) passes, anything else is refused by
    name, as OpenAI's API refuses what it cannot do: ignoring it would be a silent wrong answer."""
    def check(v):
        if not accepted(v):
            raise ValueError(f"not supported by this server ({why})")
        return v
    return Annotated[Any, AfterValidator(check)]


_UNSET = (None, False, 0, "", [], {})
NoLogprobs = _refused(lambda v: v in _UNSET, "no log-probabilities are returned")
NoTools = _refused(lambda v: v in _UNSET, "no tool or function calls")
ToolChoice = _refused(lambda v: v in _UNSET or v in ("none", "auto"), "no tool or function calls")  # "auto": none given
NoPenalty = _refused(lambda v: v in _UNSET, "sampling takes temperature, top_p and seed only")
TextOnly = _refused(lambda v: v in _UNSET or v == {"type": "text"}, "replies are free text")


# Request bodies. Unknown OpenAI fields (user, metadata, ...) are accepted and ignored, as other
# OpenAI-compatible servers do, so ordinary clients work unchanged; fields that would change the reply are
# refused unless they ask for nothing (_refused). Integers and booleans are strict.
class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool | None = None


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: Text
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    # None (JSON null) means the default, as in OpenAI's API; some clients send nulls for unset fields.
    temperature: Annotated[float | None, Number] = Field(None, ge=0.0, le=2.0)  # OpenAI's default is 1
    top_p: Annotated[float | None, Number] = Field(None, gt=0.0, le=1.0)
    n: StrictInt | None = Field(None, ge=1, le=1)  # one sequence per request: the loop is batch size 1
    stop: Union[Text, list[Text], None] = None
    seed: StrictInt | None = Field(None, ge=-(2**63), le=2**64 - 1)  # what torch's generators take
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    logprobs: NoLogprobs = None  # chat: a boolean; completions: a count
    top_logprobs: NoLogprobs = None
    tools: NoTools = None
    tool_choice: ToolChoice = None
    functions: NoTools = None
    function_call: ToolChoice = None
    response_format: TextOnly = None
    logit_bias: NoPenalty = None
    presence_penalty: NoPenalty = None
    frequency_penalty: NoPenalty = None
    best_of: _refused(lambda v: v in (None, 1), "one sequence per request") = None
    echo: _refused(lambda v: v in _UNSET, "the reply holds the new text only") = None
    suffix: _refused(lambda v: v in _UNSET, "no text is inserted before a suffix") = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class Message(BaseModel):
    role: Literal[ROLES]  # the API's own (backbone.chat_ids maps developer to system)
    content: Union[Text, list[TextPart]]


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(_Sampling):
    prompt: Union[Text, list[Text], list[StrictInt]]


@dataclass(eq=False)  # compared by identity: Worker.cancel finds the job itself in the queue
class Job:
    ids: list[int]
    kwargs: dict
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue  # ("chunk", Chunk) ... then ("done", None) or ("error", exception)
    cancelled: threading.Event = field(default_factory=threading.Event)


class Worker:
    """Runs jobs in arrival order on its own thread: up to `max_batch` at once (continuous batching: a job
    joins at the next step boundary and leaves when it ends or its client goes), or one at a time where
    the model does not take the batched step (batch.BatchDecoder says why)."""

    def __init__(self, model, queue_size: int, max_batch: int = 1, max_seq_len: int = defaults.MAX_SEQ_LEN,
                 own_thread: bool = True, max_tree_rows: int | None = None, prefill_chunk: int | None = None,
                 adapt_trees: bool = defaults.ADAPT_TREES, draft_confidence: float | None = None):
        self.model, self.queue_size = model, queue_size
        # None: the cut calibrated with the heads' trees per batch size (model.batch_cuts), else the default
        self.draft_confidence = model.batch_cuts if draft_confidence is None else draft_confidence
        self.max_batch, self.max_seq_len, self.max_tree_rows = max_batch, max_seq_len, max_tree_rows
        self.prefill_chunk = prefill_chunk
        # Served rounds decide whether the heads' trees pay at each batch size (round_costs.py); None: off.
        self.costs = RoundCosts() if adapt_trees else None
        # Where the worker's time goes (seconds): admitting jobs (prefill, first chunk), the verify passes,
        # and handing each job its next chunk (text, or a long prompt's next prefill chunk); plus passes,
        # and sequences summed over them. /health reports it: served configurations compared by phase.
        self.phases = {"admit_s": 0.0, "passes_s": 0.0, "advance_s": 0.0, "passes": 0, "sequences": 0}
        self.stopped = threading.Event()
        # A deque rather than queue.Queue: a cancelled job must leave the queue at once, not when its turn comes.
        self.waiting: deque[Job] = deque()
        self.changed = threading.Condition()
        self.running = False
        if own_thread:  # else the caller runs run() (serve(): on the thread that loaded the model)
            threading.Thread(target=self.run, name="draftheads-worker", daemon=True).start()

    def submit(self, job: Job) -> None:
        with self.changed:
            if len(self.waiting) >= self.queue_size:
                raise APIError(429, f"the server is busy: {self.queue_size} request{'s are' if self.queue_size != 1 else ' is'} already waiting; retry later",
                               type="rate_limit_error", code="queue_full")
            self.waiting.append(job)
            self.changed.notify()

    def cancel(self, job: Job) -> None:
        """Stop `job` at its next step, or free its queue slot if it is still waiting."""
        job.cancelled.set()
        with self.changed:
            if job in self.waiting:
                self.waiting.remove(job)

    def _next(self) -> Job | None:
        with self.changed:
            while not self.waiting:
                if self.stopped.is_set():
                    return None
                self.changed.wait(0.5)
            return self.waiting.popleft()

    def run(self) -> None:
        """Decode jobs until stop() (the worker's loop; never returns while serving)."""
        batch = None
        if self.max_batch > 1:
            from .batch import batch_decoder

            try:  # made on this thread: it does all the torch work from here on
                batch = batch_decoder(self.model.decoder, self.max_batch, self.max_seq_len, self.max_tree_rows,
                                      self.model.batch_trees, self.prefill_chunk, self.costs, self.draft_confidence)
            except UserError as e:
                log.warning("serving one request at a time: %s", e)
            except Exception:  # a dead worker would leave every request waiting forever
                log.exception("batched decoding failed to start: serving one request at a time")
        if batch is not None:
            return self._run_batched(batch)
        while not self.stopped.is_set():
            job = self._next()
            if job is None or job.cancelled.is_set():  # cancelled between leaving the queue and now
                continue
            self.running = True
            try:
                self._generate(job)
            except BaseException as e:  # never let one request kill the worker
                self._send(job, "error", e)
                if not isinstance(e, Exception):  # Ctrl-C (serve() decodes on the main thread): stop serving
                    raise
            finally:
                self.running = False

    def _generate(self, job: Job) -> None:
        ph = self.phases  # as the batched worker's, but a step's text is made inside its pass (next(chunks))
        chunks = self.model.iter_generate(torch.tensor(job.ids), **job.kwargs)
        try:
            t0, phase = time.perf_counter(), "admit_s"  # the first chunk: prefill
            for chunk in chunks:  # each next() is one decoding step (draftmodel yields a chunk per step)
                t1 = time.perf_counter()
                ph[phase] += t1 - t0
                ph["passes"] += phase == "passes_s"
                ph["sequences"] += phase == "passes_s"
                if job.cancelled.is_set():
                    return
                self._send(job, "chunk", chunk)
                t0, phase = time.perf_counter(), "passes_s"
                ph["advance_s"] += t0 - t1
            self._send(job, "done", None)
        finally:
            chunks.close()

    def _run_batched(self, batch) -> None:
        running: dict[int, tuple[Job, object]] = {}  # id(job) -> (job, its chunk generator)
        while not self.stopped.is_set():
            with self.changed:
                while not self.waiting and not running:
                    if self.stopped.is_set():
                        return
                    self.changed.wait(0.5)
                joining = [self.waiting.popleft() for _ in range(min(len(self.waiting), len(batch.free)))]
            self.running = True
            t0 = time.perf_counter()
            for job in joining:  # prefill (its first chunk of --prefill-chunk tokens), first chunk of text
                if not job.cancelled.is_set():
                    chunks = self.model.iter_generate(torch.tensor(job.ids), batch=batch, **job.kwargs)
                    if self._advance(job, chunks):
                        running[id(job)] = (job, chunks)
            t1, stepped = time.perf_counter(), 0
            try:
                stepped = batch.step()  # one verify pass for every running job
            except BaseException as e:  # never let one pass kill the worker: fail its jobs, go on
                for job, chunks in running.values():
                    chunks.close()
                    self._send(job, "error", e)
                running.clear()
                if not isinstance(e, Exception):  # Ctrl-C: the jobs are told, then serving stops
                    raise
            t2 = time.perf_counter()
            for key, (job, chunks) in list(running.items()):
                if not self._advance(job, chunks):
                    del running[key]
            ph = self.phases
            ph["admit_s"] += t1 - t0
            ph["passes_s"] += t2 - t1
            ph["advance_s"] += time.perf_counter() - t2
            ph["passes"] += stepped > 0
            ph["sequences"] += stepped
            self.running = bool(running)  # after the phases: an idle worker's (/health) are complete

    def _advance(self, job: Job, chunks) -> bool:
        """Send `job` its next chunk (one decoding step); False once it is finished, failed or cancelled
        (its generator closed, so its batch slot is free)."""
        try:
            chunk = None if job.cancelled.is_set() else next(chunks, None)
        except BaseException as e:
            chunks.close()
            self._send(job, "error", e)
            if not isinstance(e, Exception):  # Ctrl-C: the job is told, then serving stops
                raise
            return False
        if chunk is None:
            chunks.close()
            return False
        self._send(job, "chunk", chunk)
        if chunk.result is not None:
            chunks.close()
            self._send(job, "done", None)
            return False
        return True

    def stop(self) -> None:
        self.stopped.set()

    @staticmethod
    def _send(job: Job, kind: str, item) -> None:
        try:
            job.loop.call_soon_threadsafe(job.out.put_nowait, (kind, item))
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            job.cancelled.set()


def create_app(model, model_name: str | None = None, api_key: str | None = None,
               max_body_bytes: int = defaults.MAX_BODY_BYTES, max_prompt_tokens: int = defaults.MAX_PROMPT_TOKENS,
               max_tokens_limit: int = defaults.MAX_TOKENS_LIMIT, default_max_tokens: int = defaults.DEFAULT_MAX_TOKENS,
               queue_size: int = defaults.QUEUE_SIZE, parse_special_tokens: bool = False, max_batch: int = 1,
               max_seq_len: int = defaults.MAX_SEQ_LEN, worker_thread: bool = True, max_tree_rows: int | None = None,
               prefill_chunk: int | None = None, adapt_trees: bool = defaults.ADAPT_TREES,
               draft_confidence: float | None = None, prompt_cache_tokens: int = defaults.PROMPT_CACHE_TOKENS) -> FastAPI:
    """An app serving `model` (a DraftModel). The worker thread starts here, one per app.
    parse_special_tokens: whether a /v1/completions string prompt may spell control tokens
    ("<|im_start|>"); off, they are text like any other. Chat messages are always text.
    max_batch: requests decoded together (continuous batching; 1: one at a time), each in a cache slot
    of max_seq_len tokens (prompt + reply); max_tree_rows: most tree nodes per batched pass (None: no limit);
    prefill_chunk: prompt tokens prefilled between two batched passes (None: a whole prompt at once, the
    running requests wait for it). adapt_trees: per batch size, the heads' trees or plain decoding,
    whichever served rounds measured faster (round_costs.py); /health reports those rates. draft_confidence: in a
    batched pass of two or more requests, tree nodes the heads give a lower path probability are not verified
    (0: all are; None: the probability calibrated with the heads' trees per batch size, else
    defaults.BATCH_DRAFT_CONFIDENCE). prompt_cache_tokens: tokens of recent prompts whose keys the model's engine
    keeps from now on (kvcache.PromptCache; 0: none), so that a prompt starting as one of them prefills only the
    rest; /health counts the hits. worker_thread: start the decoding thread here; False leaves
    `app.state.worker.run()` to the caller (serve() runs it on the thread that loaded the model)."""
    name = model_name or model.backbone_name
    # A batch slot holds prompt + reply + room for one step: its largest tree and lookup branches.
    batched = max_batch > 1 and refusal(model.decoder) is None
    context = (min(model.decoder.context, slot_context(model.decoder, max_seq_len, model.batch_trees)) if batched
               else model.decoder.context)
    engine = getattr(model.decoder, "engine", None)
    if hasattr(engine, "use_prompt_cache"):  # llama.cpp keeps no prompts of ours
        off = engine.use_prompt_cache(prompt_cache_tokens)
        if off:
            log.info("no prompt cache: %s", off)
    worker = Worker(model, queue_size, max_batch, max_seq_len, own_thread=worker_thread, max_tree_rows=max_tree_rows,
                    prefill_chunk=prefill_chunk, adapt_trees=adapt_trees, draft_confidence=draft_confidence)
    created = int(time.time())
    app = FastAPI(title="draftheads", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=max_body_bytes)

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return _error(e)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, e: RequestValidationError):
        # A union (content: a string or parts) reports one error per member. The deepest names the
        # parameter best, and a wrong value (a surrogate in a string) says more than a wrong type.
        first = max(e.errors(), default={}, key=lambda x: (_param(x.get("loc", ())).count("."),
                                                           not x.get("type", "").endswith("_type")))
        if first.get("type") == "json_invalid":
            return _error(APIError(400, "the request body is not valid JSON", code="invalid_json"))
        if tuple(first.get("loc", ())) == ("body",):  # a JSON array or string, or a body sent without its JSON type
            return _error(APIError(400, "the request body must be a JSON object, sent with Content-Type: "
                                        "application/json", code="invalid_body"))
        where, msg = _param(first.get("loc", ())), first.get("msg", "invalid value").removeprefix("Value error, ")
        return _error(APIError(400, f"{where}: {msg}" if where else msg,
                               param=where or None, code=first.get("type")))

    @app.exception_handler(Exception)
    async def crashed(_, e: Exception):  # a bug in a handler: answer 500, keep serving
        log.error("unhandled error", exc_info=e)
        return _error(APIError(500, "internal server error", type="server_error"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        return _error(APIError(e.status_code, str(e.detail), type="invalid_request_error" if e.status_code < 500 else "server_error"))

    @app.get("/health")
    async def health():
        body = {"status": "ok", "model": name, "running": worker.running, "waiting": len(worker.waiting)}
        if worker.costs is not None and worker.costs.rounds:  # tokens/s per batch size, with trees and plain
            body["batched_rounds"] = {str(b): r for b, r in worker.costs.summary().items()}
        if worker.phases["passes"]:  # the worker's time per phase (Worker.phases)
            body["phases"] = dict(worker.phases)
        prompts = getattr(engine, "prompt_cache", None)
        if prompts is not None:  # prompts prefilled, how many started as a cached one, their tokens and those reused
            body["prompt_cache"] = dict(prompts.counts)
        return body

    card = {"id": name, "object": "model", "created": created, "owned_by": "draftheads"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")  # :path: a model name may hold slashes (an HF repository id)
    async def model_card(model_id: str):
        if model_id != name:
            raise APIError(404, f"the model {model_id!r} does not exist; this server serves {name!r}",
                           param="model", code="model_not_found")
        return card

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        messages = [{"role": m.role,
                     "content": m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)}
                    for m in req.messages]
        if not any(m["content"].strip() for m in messages):
            raise APIError(400, "messages are all empty", param="messages", code="empty_prompt")
        return await run(req, request, lambda: model.prompt_ids(messages), chat=True)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request (the server decodes batch size 1)", param="prompt")
            prompt = prompt[0]
        if not prompt or (isinstance(prompt, str) and not prompt.strip()):
            raise APIError(400, "the prompt is empty", param="prompt", code="empty_prompt")
        if isinstance(prompt, list):
            vocab = model.backbone.config.vocab_size
            if any(not 0 <= t < vocab for t in prompt):
                raise APIError(400, f"token ids must lie in [0, {vocab})", param="prompt")
            return await run(req, request, lambda: list(prompt), chat=False)
        # A plain completion continues the text as it is: no chat template, and control-token spellings
        # are text unless the server was started with --parse-special-tokens.
        return await run(req, request, lambda: list(model.tokenizer(
            prompt, split_special_tokens=not parse_special_tokens)["input_ids"]), chat=False)

    async def run(req: _Sampling, request: Request, tokenize, chat: bool):
        if req.model != name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves {name!r}",
                           param="model", code="model_not_found")
        if req.stream_options is not None and not req.stream:  # as OpenAI's API: a setting for a stream only
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
        try:
            ids = tokenize()
        except UserError as e:
            raise APIError(400, str(e), param="messages" if chat else "prompt", code="empty_prompt") from None
        limit = min(max_prompt_tokens, context - 1)
        if len(ids) > limit:
            raise APIError(400, f"the prompt has {len(ids)} tokens, over this server's limit of {limit}",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
        max_tokens = req.max_completion_tokens or req.max_tokens or default_max_tokens
        if max_tokens > max_tokens_limit:
            raise APIError(400, f"max_tokens is {max_tokens}, over this server's limit of {max_tokens_limit}",
                           param="max_tokens", code="max_tokens_exceeded")
        stops = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        if len(stops) > 4:
            raise APIError(400, "at most 4 stop sequences", param="stop")
        # Sampling uses the exact rule, so the output has the backbone's own distribution.
        temperature = 1.0 if req.temperature is None else req.temperature
        temperature = 0.0 if temperature < GREEDY_BELOW else temperature
        kwargs = dict(max_new_tokens=max_tokens, temperature=temperature, top_p=req.top_p or 1.0, stop=stops,
                      seed=req.seed, acceptance="exact" if temperature > 0 else "greedy")
        job = Job(ids, kwargs, asyncio.get_running_loop(), asyncio.Queue())
        worker.submit(job)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if req.stream:
            usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_sse(job, worker, rid, name, chat, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return JSONResponse(await _collect(job, worker, request, rid, name, chat))

    return app


class Guard:
    """Plain ASGI middleware (not BaseHTTPMiddleware, which would get in the way of streaming and
    disconnect detection): the API key, then the body size, before any parsing or model work."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int):
        self.app, self.key, self.limit = app, (api_key or "").encode(), max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.key and scope["path"] != "/health":
            auth = headers.get(b"authorization", b"")
            token = auth[7:] if auth[:7].lower() == b"bearer " else headers.get(b"x-api-key", b"")
            if not hmac.compare_digest(token.strip(), self.key):
                return await _error(APIError(401, "missing or incorrect API key (send 'Authorization: Bearer <key>')",
                                             code="invalid_api_key"))(scope, receive, send)
        too_big = APIError(413, f"the request body is over {self.limit} bytes", code="request_too_large")
        length = headers.get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.limit:
            return await _error(too_big)(scope, receive, send)
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        body, more = b"", True
        while more:  # read it all here, bounded, whatever Content-Length claimed
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.limit:
                return await _error(too_big)(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect notice, which streaming watches for

        await self.app(scope, replay, send)


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


_TYPE_TAGS = {"str", "int", "float", "bool"}


def _param(loc) -> str:
    """'messages.0.content' from pydantic's location ('body', 'messages', 0, 'content', 'str'): the union
    member it tried ('str', 'list[int]', 'function-after[...]') is no part of the parameter's name."""
    return ".".join(str(x) for x in loc[1:] if isinstance(x, int) or (x.isidentifier() and x not in _TYPE_TAGS))


def _from_worker(e: BaseException) -> APIError:
    if isinstance(e, UserError):
        return APIError(400, str(e))
    log.error("generation failed", exc_info=e)
    return APIError(500, f"generation failed: {type(e).__name__}", type="server_error")


def _finish(result) -> str:
    return "stop" if result.finish_reason == "stop" else "length"  # "context" is a length limit too


def _usage(result) -> dict:
    s = result.stats
    return {"prompt_tokens": s.prompt_tokens, "completion_tokens": len(result.token_ids),
            "total_tokens": s.prompt_tokens + len(result.token_ids)}


def _ours(result) -> dict:
    s = result.stats
    return {"steps": s.steps, "mean_accepted": round(s.mean_accepted, 4), "tokens_per_second": round(s.tokens_per_second, 2),
            "tree_size": s.tree_size, "finish_reason": result.finish_reason}


async def _watch(request: Request, job: Job, worker: Worker) -> None:
    """Wait for the client to leave, then stop the job (or free its queue slot) and wake _collect.
    The body has been read, so the next ASGI message is the disconnect notice."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    worker.cancel(job)
    job.out.put_nowait(("gone", None))


async def _collect(job: Job, worker: Worker, request: Request, rid: str, name: str, chat: bool) -> dict:
    result = None
    # Watched all along, not only while no chunk comes: an abandoned request must not decode to its end.
    watcher = asyncio.create_task(_watch(request, job, worker))
    try:
        while result is None:
            kind, item = await job.out.get()
            if kind == "gone":
                return {}  # nobody will read it
            if kind == "error":
                raise _from_worker(item)
            if kind == "chunk" and item.result is not None:
                result = item.result
    finally:
        watcher.cancel()
        worker.cancel(job)
    choice = ({"index": 0, "message": {"role": "assistant", "content": result.text}, "logprobs": None,
               "finish_reason": _finish(result)} if chat else
              {"index": 0, "text": result.text, "logprobs": None, "finish_reason": _finish(result)})
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": name, "choices": [choice], "usage": _usage(result), "draftheads": _ours(result)}


async def _sse(job: Job, worker: Worker, rid: str, name: str, chat: bool, include_usage: bool):
    created = int(time.time())
    obj = "chat.completion.chunk" if chat else "text_completion"

    def event(choice: dict | None, **extra) -> str:
        body = {"id": rid, "object": obj, "created": created, "model": name,
                "choices": [choice] if choice is not None else [], **extra}
        return f"data: {json.dumps(body)}\n\n"

    def piece(text: str, finish=None) -> dict:
        if chat:
            return {"index": 0, "delta": {"content": text} if text else {}, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

    # Starlette cancels this generator when the client disconnects; `finally` then tells the worker.
    try:
        if chat:
            yield event({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None})
        while True:
            kind, item = await job.out.get()
            if kind == "error":
                yield f"data: {json.dumps(_from_worker(item).body())}\n\n"
                break
            if kind == "done":
                break
            if item.text and item.result is None:
                yield event(piece(item.text))
            if item.result is not None:
                if item.text:
                    yield event(piece(item.text))
                yield event(piece("", _finish(item.result)), draftheads=_ours(item.result))
                if include_usage:
                    yield event(None, usage=_usage(item.result))
        yield "data: [DONE]\n\n"
    finally:
        worker.cancel(job)


def serve(model, host: str = "127.0.0.1", port: int = 8000, **limits) -> None:
    """Serve until Ctrl-C. HTTP runs on a thread of its own and decoding on this one, the thread that
    loaded the model: torch work on a second thread ran at about half speed on a 2-core CPU (each
    thread that runs parallel torch ops gets an OpenMP team of its own; README, "Serving")."""
    import uvicorn

    app = create_app(model, worker_thread=False, **limits)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info"))
    http = threading.Thread(target=server.run, name="draftheads-http", daemon=True)
    http.start()
    watch = threading.Thread(target=lambda: (http.join(), app.state.worker.stop()), daemon=True)
    watch.start()  # uvicorn ended (a bind error, a signal): the worker's loop ends too
    try:
        app.state.worker.run()
    except KeyboardInterrupt:
        return
    finally:
        server.should_exit = True
        http.join(10)
    if not server.started:  # uvicorn said why on stderr; a script must not see success
        raise UserError(f"the server could not listen on {host}:{port} (in use, or not an address of this machine)")

