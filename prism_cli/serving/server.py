"""``prism serve``: an OpenAI-compatible HTTP server over the engine (Starlette + uvicorn).

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (a tokenizer without a chat
template answers it 400, saying so), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text). Streaming answers
are server-sent events (``data: {...}`` chunks, then ``data: [DONE]``). A request may carry
``quality_floor``: an operating point of the export (``"linear:4"``) or a perplexity ceiling (a number
or ``"ppl:45"``); without it the request gets the full model (under ``--policy static``, its point).

The engine runs in its own thread; the event loop hands it requests and receives tokens through
thread-safe callbacks. Admission is bounded: at most ``max_running + max_queue`` requests in flight,
beyond that 503 with ``Retry-After``. A client that disconnects cancels its request (its KV rows are
freed at the engine's next iteration). On SIGTERM uvicorn stops accepting connections and lets the
in-flight requests finish; then the engine thread stops. A second Ctrl-C cancels them instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from prism_cli.errors import PrismError
from prism_cli.io import lone_surrogate
from prism_cli.operating_points import OperatingPoint
from prism_cli.serving.engine import Engine
from prism_cli.serving.floors import Ladder, PointSpace, floor_spec
from prism_cli.serving.requests import Request, SamplingParams

API_KEY_ENV = "PRISM_API_KEY"
_UNSUPPORTED = {"logprobs": (None, False, 0), "echo": (None, False), "best_of": (None, 1), "suffix": (None, ""),
                "logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
                "top_logprobs": (None, 0),
                "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0),
                # vLLM's extra sampling fields and JSON mode: accepted only as the no-ops they default to
                "top_k": (None, -1, 0), "min_tokens": (None, 0), "repetition_penalty": (None, 1, 1.0),
                "ignore_eos": (None, False), "response_format": (None, {"type": "text"})}


def _is_default(value: Any, allowed: tuple[Any, ...]) -> bool:
    """``value`` is one of ``allowed``, a bool only as a bool (``True == 1``: ``"top_k": true`` is no default)."""
    return any(value == a and isinstance(value, bool) == isinstance(a, bool) for a in allowed)


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None, status: int = 400, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.param, self.status, self.kind = param, status, kind


def error(message: str, param: str | None = None, status: int = 400, kind: str = "invalid_request_error",
          headers: dict[str, str] | None = None) -> JSONResponse:
    # A message may quote the request (a model's name); what it quotes may hold a lone surrogate, which the
    # response's UTF-8 encoder refuses: escaped, not a 500.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}}, status_code=status,
                        headers=headers)


@dataclass
class Counters:
    """What /metrics reports (updated on the event loop only)."""

    by_status: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    generation_tokens: int = 0
    e2e_sum: float = 0.0
    e2e_count: int = 0
    ttft_sum: float = 0.0
    ttft_count: int = 0

    def count(self, status: str) -> None:
        self.by_status[status] = self.by_status.get(status, 0) + 1


class EngineLoop:
    """The engine's thread: iterate while running; on stop, finish what is in flight first."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="prism-engine", daemon=True)
        self.error: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            while not (self._stop.is_set() and not self.engine.pending()):
                self.engine.step()
        except BaseException as exc:  # noqa: BLE001 - reported by /health and re-raised on stop
            self.error = exc
            self.engine.abort("error")  # no client waits forever on a dead engine

    def stop(self, timeout: float = 60.0) -> None:
        self._stop.set()
        self.engine.wake()
        self._thread.join(timeout)


@dataclass
class ServerState:
    engine: Engine
    tokenizer: Any
    space: PointSpace
    ladder: Ladder
    cost_model: Any
    model_name: str
    context: int
    api_key: str | None
    max_queue: int
    chat_template: str | None = None  # the tokenizer's, if it has one: /v1/chat/completions works only then
    loop: EngineLoop | None = None
    counters: Counters = field(default_factory=Counters)
    in_flight: int = 0
    active: set[Request] = field(default_factory=set)  # submitted and not yet finished: a forced stop cancels them
    stopping: bool = False  # a second Ctrl-C: in-flight requests are cancelled, new ones refused, the command exits 130
    event_loop: asyncio.AbstractEventLoop | None = None  # the server's, once it runs
    created: int = field(default_factory=lambda: int(time.time()))
    #: The most characters of a prompt one token covers (``longest_token_chars``); None: no early refusal.
    longest_token: int | None = field(init=False)

    def __post_init__(self) -> None:
        self.longest_token = longest_token_chars(self.tokenizer)

    @property
    def capacity(self) -> int:
        return self.engine.limits.max_running + self.max_queue


# --- request parsing -----------------------------------------------------------------------------

def _field(body: dict, name: str, kinds: tuple[type, ...], default: Any) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise BadRequest(f"{name}: expected {' or '.join(k.__name__ for k in kinds)}, got {type(value).__name__}", name)
    return value


def _real(body: dict, name: str, default: float) -> float:
    value = _field(body, name, (int, float), default)
    try:
        return float(value)
    except OverflowError:  # an integer past float range
        raise BadRequest(f"{name}: {str(value)[:20]}... is out of range", name) from None


def output_limit_field(body: dict, chat: bool) -> str:
    """The field that bounds a request's output: chat's ``max_completion_tokens`` where it holds a value (a null
    field is absent, as in OpenAI's API), else ``max_tokens``."""
    return "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"


def parse_sampling(body: dict, max_tokens_field: str, default_max_tokens: int) -> SamplingParams:
    """The request's sampling; without a limit it may generate ``default_max_tokens`` (OpenAI's 16 for
    completions, the rest of the context for chat, as vLLM does)."""
    for name, allowed in _UNSUPPORTED.items():
        if name in body and not _is_default(body[name], allowed):
            raise BadRequest(f"{name}: not supported by prism serve", name)
    if _field(body, "n", (int,), 1) != 1:
        raise BadRequest("n: only n = 1 is supported", "n")
    stop = body.get("stop")
    stops = () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, list) else None
    if stops is None:
        raise BadRequest("stop: expected a string or a list of strings", "stop")
    params = SamplingParams(
        max_tokens=_field(body, max_tokens_field, (int,), default_max_tokens),
        temperature=_real(body, "temperature", 1.0),
        top_p=_real(body, "top_p", 1.0),
        stop=stops,
        seed=_field(body, "seed", (int,), None),
    )
    try:
        params.validate()
    except ValueError as exc:
        name = str(exc).split(":")[0]
        if name == "max_tokens":  # named as the request named it (chat: max_completion_tokens)
            raise BadRequest(str(exc).replace("max_tokens", max_tokens_field, 1), max_tokens_field) from None
        raise BadRequest(str(exc), name) from None
    return params


def parse_quality_floor(state: ServerState, body: dict) -> OperatingPoint:
    from prism_cli.serving.runner import resolve_floor

    value = body.get("quality_floor")
    fixed = state.engine.policy.fixed_point  # --policy static: every request runs at it, whatever its floor
    if value is None:
        return fixed or state.space.full()  # under static, the operator's point is the default floor
    try:
        spec = floor_spec(value, state.space)
        if fixed is not None and spec.ceiling is not None and _within(state, fixed, spec.ceiling):
            return fixed  # the ceiling's floor is then the point served (not the cheapest within it)
        point = resolve_floor(spec, state.space, state.ladder, state.cost_model)
        check_costed(state, point)
    except PrismError as exc:
        raise BadRequest(f"quality_floor: {exc}", "quality_floor") from None
    if fixed is not None and not state.ladder.meets(fixed, point):  # served below it: refused, never counted
        raise BadRequest(f"quality_floor: {value!r} asks for {point}, which {fixed}, the one point this server runs "
                         "(--policy static), does not meet", "quality_floor")
    return point


def _within(state: ServerState, point: OperatingPoint, ceiling: float) -> bool:
    """Whether the bench table puts ``point``'s perplexity within ``ceiling``."""
    cost = state.cost_model.points.get(str(point)) if state.cost_model is not None else None
    return cost is not None and cost.perplexity is not None and cost.perplexity <= ceiling


def check_costed(state: ServerState, point: OperatingPoint) -> None:
    """A policy that plans with the cost model cannot plan a point it has no timing of: refuse the floor."""
    if state.engine.policy.plans_with_costs and not state.cost_model.has(point):
        kind = "original" if state.space.gate is None else "elastic"
        timed = ", ".join(p.point for p in state.cost_model.points.values() if p.kind == kind)
        raise PrismError(f"{point} has no timing in the cost model the {state.engine.policy.name} policy plans "
                         f"with (timed: {timed})")


#: Seconds a request's body may take to arrive whole: a client that declares more bytes than it sends (or
#: sends them a byte a minute) would otherwise hold its connection for ever.
BODY_TIMEOUT_S = 30.0


def body_limit(context: int) -> int:
    """The largest request body read, in bytes: room for a prompt of the whole context at 64 bytes a token
    (JSON escapes included) plus 1 MiB. A larger body cannot hold a prompt that fits, and reading and
    tokenizing it only to say so held the server for seconds."""
    return 2**20 + 64 * context


async def read_body(http: HttpRequest, limit: int) -> dict:
    declared = http.headers.get("content-length", "")
    too_large = BadRequest(f"the request body is larger than {limit:,} bytes, more than a prompt that fits the "
                           "context could take", None, 413, "request_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_large

    async def receive() -> bytes:
        chunks, size = [], 0
        async for chunk in http.stream():  # a chunked upload declares no length: counted as it comes
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        raw = await asyncio.wait_for(receive(), BODY_TIMEOUT_S)
    except ClientDisconnect:  # gone before its body was whole: no one to answer (uvicorn logged a traceback)
        raise BadRequest("the client disconnected before the body was complete", None, 499, "client_closed") from None
    except asyncio.TimeoutError:
        raise BadRequest(f"the request body did not arrive whole within {BODY_TIMEOUT_S:g} s", None, 408,
                         "request_timeout") from None
    try:
        body = json.loads(raw, parse_constant=_not_a_json_number)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}", None) from None
    except RecursionError:  # arrays or objects nested deeper than the parser's recursion limit
        raise BadRequest("the body is not valid JSON: nested too deeply", None) from None
    except ValueError:  # an integer past Python's digit limit for int(str), 4,300 by default
        raise BadRequest(f"the body holds an integer of more than {sys.get_int_max_str_digits():,} digits", None) from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object", None)
    for key, value in body.items():
        if lone_surrogate([key, value]):
            name = key.encode("utf-8", "backslashreplace").decode("utf-8")
            raise BadRequest(f"{name}: not valid Unicode text (a lone surrogate, \\ud800-\\udfff)", name)
    return body


def _not_a_json_number(name: str) -> float:
    """Python's json reads NaN and Infinity, which JSON does not have: refuse them as the strict parsers do."""
    raise BadRequest(f"the body is not valid JSON: {name} is not a JSON number", None)


def check_model(state: ServerState, body: dict) -> None:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("model: required (see GET /v1/models)", "model")
    if model != state.model_name:
        raise BadRequest(f"The model '{model}' does not exist; this server serves '{state.model_name}'", "model", 404,
                         "not_found_error")


# --- handlers ------------------------------------------------------------------------------------

def build_app(state: ServerState) -> Starlette:
    tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prism-tokenize")

    def authorized(http: HttpRequest) -> bool:
        if state.api_key is None:
            return True
        header = http.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), state.api_key.encode())

    async def completions(http: HttpRequest) -> Response:
        return await generate(http, chat=False)

    async def chat_completions(http: HttpRequest) -> Response:
        return await generate(http, chat=True)

    async def generate(http: HttpRequest, chat: bool) -> Response:
        if not authorized(http):
            state.counters.count("401")
            return error("invalid API key", None, 401, "authentication_error")
        try:
            body = await read_body(http, body_limit(state.context))
            check_model(state, body)
            # Tokenized on one worker thread (the tokenizer is not shared between threads that encode):
            # a long prompt does not hold the event loop, so other requests and /health go on meanwhile.
            if not chat:
                refuse_certainly_too_long(state, body)
            prompt_ids = await asyncio.get_running_loop().run_in_executor(
                tokenizing, chat_prompt if chat else completion_prompt, state, body)
            name = "messages" if chat else "prompt"
            if len(prompt_ids) >= state.context:  # no room for one token of output, whatever the limit
                raise BadRequest(too_long(name, state.context), name)
            limit_field = output_limit_field(body, chat)
            params = parse_sampling(body, limit_field, state.context - len(prompt_ids) if chat else 16)
            floor = parse_quality_floor(state, body)
            stream = _field(body, "stream", (bool,), False)
            options = _field(body, "stream_options", (dict,), {})
            if options.get("include_usage") is not None and not isinstance(options["include_usage"], bool):  # null: absent
                raise BadRequest("stream_options.include_usage: expected bool", "stream_options")
            if options and not stream:  # as OpenAI answers
                raise BadRequest("stream_options: only allowed when stream is true", "stream_options")
            if params.max_tokens >= state.context:  # no prompt could fit: the limit is the field to fix
                raise BadRequest(f"{limit_field}: {params.max_tokens} leaves no room for the prompt in the context of "
                                 f"{state.context} tokens", limit_field)
            if len(prompt_ids) + params.max_tokens > state.context:
                given = "" if body.get(limit_field) is not None else " (the default; set it lower)"
                raise BadRequest(f"{name}: {len(prompt_ids)} prompt tokens plus {limit_field} {params.max_tokens}{given} "
                                 f"exceed the context of {state.context} tokens", name)
        except BadRequest as exc:
            state.counters.count(str(exc.status))
            return error(str(exc), exc.param, exc.status, exc.kind)
        if state.stopping:  # read or tokenized while the server was being stopped (a second Ctrl-C)
            state.counters.count("503")
            return error(STOPPED, None, 503, "server_stopped")
        if state.in_flight >= state.capacity:
            state.counters.count("503")
            return error("the server is at capacity; retry later", None, 503, "server_overloaded", headers={"Retry-After": "1"})
        if state.loop is not None and state.loop.error is not None:
            return error("the engine stopped on an internal error", None, 500, "internal_error")
        return await run_request(http, prompt_ids, params, floor, stream, bool(options.get("include_usage")), chat)

    async def run_request(http, prompt_ids, params, floor, stream, include_usage, chat) -> Response:
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[tuple[str, str | None, int]] = asyncio.Queue()

        def deliver(update: tuple[str, str | None, int], finished: bool) -> None:  # event loop
            if finished:  # once: the engine holds the request (its slot, its KV rows) until here, cancelled or not
                state.in_flight -= 1
                state.active.discard(req)
            updates.put_nowait(update)  # after the release: a client answered may send its next request at once

        def on_update(r: Request) -> None:  # engine thread
            loop.call_soon_threadsafe(deliver, (r.stream_text(), r.finish_reason, len(r.output_ids)), r.finished)

        req = Request(list(prompt_ids), params, floor, state.engine.now(), on_update=on_update)
        state.in_flight += 1
        state.active.add(req)
        state.engine.submit(req)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        started = time.perf_counter()

        def done(status: str) -> None:
            state.counters.count(status)
            if req.finish_reason in ("length", "stop"):
                state.counters.prompt_tokens += req.prompt_len
                state.counters.generation_tokens += len(req.output_ids)
                state.counters.e2e_sum += time.perf_counter() - started
                state.counters.e2e_count += 1
                if req.first_token_at is not None:
                    state.counters.ttft_sum += req.first_token_at - req.arrival
                    state.counters.ttft_count += 1

        def usage(n: int) -> dict:
            return {"prompt_tokens": len(prompt_ids), "completion_tokens": n, "total_tokens": len(prompt_ids) + n}

        def chunk(delta: str, reason: str | None) -> dict:
            if chat:
                choice = {"index": 0, "delta": {"content": delta} if delta or reason is None else {}, "logprobs": None,
                          "finish_reason": reason}
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": state.model_name,
                        "choices": [choice]}
            return {"id": rid, "object": "text_completion", "created": created, "model": state.model_name,
                    "choices": [{"index": 0, "text": delta, "finish_reason": reason, "logprobs": None}]}

        if stream:
            async def events() -> AsyncIterator[str]:
                sent = 0
                status = "cancelled"
                try:
                    if chat:
                        first = chunk("", None)
                        first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                        yield f"data: {json.dumps(first)}\n\n"
                    while True:
                        text, reason, n = await updates.get()
                        if len(text) > sent:
                            yield f"data: {json.dumps(chunk(text[sent:], None))}\n\n"
                            sent = len(text)
                        if reason == "error":
                            yield f"data: {json.dumps({'error': {'message': 'the engine failed', 'type': 'internal_error'}})}\n\n"
                            status = "500"
                            return
                        if reason == "cancelled":  # by the server (a forced stop): the client is still here
                            yield f"data: {json.dumps({'error': {'message': STOPPED, 'type': 'server_stopped'}})}\n\n"
                            return
                        if reason is not None:
                            yield f"data: {json.dumps(chunk('', _reason(reason)))}\n\n"
                            if include_usage:
                                last = chunk("", None)
                                last["choices"], last["usage"] = [], usage(n)
                                yield f"data: {json.dumps(last)}\n\n"
                            yield "data: [DONE]\n\n"
                            status = "200"
                            return
                finally:
                    if status == "cancelled":
                        state.engine.cancel(req)
                    done(status)

            return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

        disconnect = asyncio.ensure_future(_wait_disconnect(http))
        try:
            while True:
                getter = asyncio.ensure_future(updates.get())
                finished, _ = await asyncio.wait({getter, disconnect}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in finished:
                    getter.cancel()
                    state.engine.cancel(req)
                    done("cancelled")
                    return Response(status_code=499)
                text, reason, n = getter.result()
                if reason is not None:
                    break
        except asyncio.CancelledError:  # the task itself cancelled (the server forced down): free the slot
            state.engine.cancel(req)
            raise
        finally:
            disconnect.cancel()
        if reason == "error":
            done("500")
            return error("the engine failed on an internal error", None, 500, "internal_error")
        if reason == "cancelled":  # by the server (a forced stop): the client is still here
            done("cancelled")
            return error(STOPPED, None, 503, "server_stopped")
        done("200")
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": _reason(reason)}
            body = {"id": rid, "object": "chat.completion", "created": created, "model": state.model_name, "choices": [choice]}
        else:
            body = chunk(text, _reason(reason))
        body["usage"] = usage(n)
        return JSONResponse(body)

    def model_card() -> dict:
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "prism",
                "max_model_len": state.context}

    async def models(http: HttpRequest) -> Response:
        if not authorized(http):
            return error("invalid API key", None, 401, "authentication_error")
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def model(http: HttpRequest) -> Response:
        if not authorized(http):
            return error("invalid API key", None, 401, "authentication_error")
        if http.path_params["name"] != state.model_name:
            return error(f"model {http.path_params['name']!r} does not exist; this server serves {state.model_name!r}",
                         "model", 404, "not_found_error")
        return JSONResponse(model_card())

    async def http_error(http: HttpRequest, exc: Exception) -> Response:
        """Starlette's own 404 and 405 (and a malformed upload's 400) in OpenAI's error shape, not plain text."""
        assert isinstance(exc, HTTPException)
        if exc.status_code == 404:
            message = f"no route {http.url.path}: the API is /v1/completions, /v1/chat/completions, /v1/models"
        elif exc.status_code == 405:
            message = f"{http.method} is not allowed on {http.url.path}"
        else:
            message = str(exc.detail)
        return error(message, None, exc.status_code, "invalid_request_error", headers=exc.headers)

    async def health(_http: HttpRequest) -> Response:
        if state.loop is not None and state.loop.error is not None:
            return PlainTextResponse(f"engine failed: {state.loop.error}", status_code=500)
        return PlainTextResponse("ok")

    async def metrics(_http: HttpRequest) -> Response:
        return PlainTextResponse(prometheus_text(state), media_type="text/plain; version=0.0.4")

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        state.loop = EngineLoop(state.engine)
        state.event_loop = asyncio.get_running_loop()
        state.loop.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, state.loop.stop)
            tokenizing.shutdown(wait=False)

    routes = [Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]), Route("/v1/models", models, methods=["GET"]),
              Route("/v1/models/{name:path}", model, methods=["GET"]),
              Route("/health", health, methods=["GET"]), Route("/metrics", metrics, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: http_error})
    # Starlette answers /v1/completions/ with a 307 to a URL built from the client's Host header: a 404 here.
    app.router.redirect_slashes = False
    return app


STOPPED = "the server was stopped (a second Ctrl-C) before this request finished"


def _reason(reason: str | None) -> str:
    return "length" if reason == "length" else "stop"


async def _wait_disconnect(http: HttpRequest) -> None:
    while True:
        message = await http.receive()
        if message["type"] == "http.disconnect":
            return


def _one_prompt(body: dict) -> Any:
    """The request's prompt, a one-prompt batch (``["text"]``, ``[[1, 2, 3]]``, both OpenAI forms) unwrapped."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        return prompt[0]
    return prompt


def too_long(name: str, context: int) -> str:
    return f"{name}: longer than the model's context of {context} tokens, with no room left for output"


def refuse_certainly_too_long(state: ServerState, body: dict) -> None:
    """Refuse, before tokenizing, a text prompt that surely has more tokens than the context: one token covers
    at most ``state.longest_token`` of its characters, so a longer prompt only held the tokenizer thread (a
    1 MB prompt, seconds) to be refused in the end. The message is the one tokenizing would give."""
    prompt = _one_prompt(body)
    if state.longest_token is not None and isinstance(prompt, str) and len(prompt) > state.context * state.longest_token:
        raise BadRequest(too_long("prompt", state.context), "prompt")


def longest_token_chars(tokenizer: Any) -> int | None:
    """The most characters of a prompt that one token can cover, where that has a sound bound: the length of
    the longest token string of the vocabulary. None where a tokenizer's parts may drop or merge characters.

    Why it is sound for the tokenizers accepted here: an added (special) token is cut out of the prompt where
    its own string is; the normalizers kept (none, Prepend, a Replace by no shorter text) never shorten the
    rest; the pre-tokenizers kept (ByteLevel, Metaspace, Split and Punctuation but not "removed", Digits)
    keep every character, ByteLevel as one character per UTF-8 byte, at least one per character; BPE then
    cuts each piece into tokens whose strings put together are the piece (an unknown character, unless
    fused, is one token). So a token covers at most as many of the prompt's characters as its string holds,
    n tokens at most n x longest, and a prompt of more than ``context`` x longest characters has more than
    ``context`` tokens (``test_the_early_bound_is_sound`` checks it on many texts)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer: nothing to check its parts against
        return None
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("unk_token") is not None and model.get("fuse_unk"):
        return None
    if not _keeps_length(spec.get("normalizer"), _NORMALIZERS) or not _keeps_length(spec.get("pre_tokenizer"), _PRE_TOKENIZERS):
        return None
    return max(len(t) for t in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))


_NORMALIZERS = {"Prepend", "Replace"}
_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Split", "Digits", "Punctuation"}


def _keeps_length(part: dict | None, kinds: set[str]) -> bool:
    """``part`` (a normalizer or pre-tokenizer in tokenizer.json) never shortens the text or drops a character."""
    if part is None:
        return True
    kind = part.get("type")
    if kind == "Sequence":
        return all(_keeps_length(p, kinds) for p in part.get("normalizers", part.get("pretokenizers", [])))
    if kind == "Replace":
        pattern = part.get("pattern", {})
        return "String" in pattern and len(part.get("content", "")) >= len(pattern["String"])
    return kind in kinds and part.get("behavior") not in ("Removed", "removed")


def completion_prompt(state: ServerState, body: dict) -> list[int]:
    prompt = _one_prompt(body)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if any(not 0 <= t < len(state.tokenizer) for t in prompt):
            raise BadRequest("prompt: a token id is outside the vocabulary", "prompt")
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, str) or isinstance(p, list) for p in prompt):
        raise BadRequest(f"prompt: a batch of {len(prompt)} prompts is not supported; send one prompt per request", "prompt")
    if not isinstance(prompt, str) or not prompt:
        raise BadRequest("prompt: required, a non-empty string (or one list of token ids)", "prompt")
    ids = state.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if not ids:
        raise BadRequest("prompt: has no tokens", "prompt")
    return list(ids)


def chat_prompt(state: ServerState, body: dict) -> list[int]:
    if not state.chat_template:  # as vLLM answers: a client error that says what to use instead
        raise BadRequest("this model's tokenizer has no chat template: use /v1/completions with a prompt", None)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: required, a non-empty list of {role, content}", "messages")
    messages = [_text_message(i, m) for i, m in enumerate(messages)]
    try:
        ids = state.tokenizer.apply_chat_template(messages, chat_template=state.chat_template, add_generation_prompt=True,
                                                  tokenize=True)
    except Exception as exc:  # noqa: BLE001 - a template error is the client's input (or the template's) problem
        raise BadRequest(f"messages: the chat template failed: {exc}", "messages") from None
    if isinstance(ids, Mapping):  # transformers 5 returns a BatchEncoding
        ids = ids["input_ids"]
    if not len(ids):  # a template that skips every message it is given (a role it does not handle)
        raise BadRequest("messages: the chat template rendered them as no tokens", "messages")
    return [int(t) for t in ids]


def _text_message(i: int, message: Any) -> dict[str, str]:
    """``{role, content}`` with the content as one string: the OpenAI client may send content as a list
    of parts (``[{"type": "text", "text": ...}]``); text parts are joined, other kinds refused."""
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise BadRequest(f"messages[{i}]: expected {{role: string, content: string or text parts}}", "messages")
    content = message.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise BadRequest(f"messages[{i}].content: only text parts ({{type: 'text', text: string}}) are supported",
                             "messages")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise BadRequest(f"messages[{i}]: expected {{role: string, content: string or text parts}}", "messages")
    return {"role": message["role"], "content": content}


def prometheus_text(state: ServerState) -> str:
    c, e = state.counters, state.engine
    lines = [
        "# HELP prism_requests_total HTTP generation requests by outcome.", "# TYPE prism_requests_total counter",
        *[f'prism_requests_total{{status="{s}"}} {n}' for s, n in sorted(c.by_status.items())],
        "# HELP prism_prompt_tokens_total Prompt tokens of completed requests.", "# TYPE prism_prompt_tokens_total counter",
        f"prism_prompt_tokens_total {c.prompt_tokens}",
        "# HELP prism_generation_tokens_total Tokens generated for completed requests.",
        "# TYPE prism_generation_tokens_total counter", f"prism_generation_tokens_total {c.generation_tokens}",
        "# HELP prism_requests_running Requests holding a KV cache.", "# TYPE prism_requests_running gauge",
        f"prism_requests_running {e.running()}",
        "# HELP prism_requests_waiting Requests waiting for a launch.", "# TYPE prism_requests_waiting gauge",
        f"prism_requests_waiting {len(e.waiting)}",
        "# HELP prism_floor_violations_total Rows served below their quality floor (must stay 0).",
        "# TYPE prism_floor_violations_total counter", f"prism_floor_violations_total {e.stats.violations}",
        "# HELP prism_e2e_seconds End-to-end latency of completed requests.", "# TYPE prism_e2e_seconds summary",
        f"prism_e2e_seconds_sum {c.e2e_sum}", f"prism_e2e_seconds_count {c.e2e_count}",
        "# HELP prism_ttft_seconds Time to first token of completed requests.", "# TYPE prism_ttft_seconds summary",
        f"prism_ttft_seconds_sum {c.ttft_sum}", f"prism_ttft_seconds_count {c.ttft_count}",
        "# HELP prism_scheduler_seconds_total Time spent in scheduling decisions.", "# TYPE prism_scheduler_seconds_total counter",
        f"prism_scheduler_seconds_total {e.stats.decision_s}",
    ]
    return "\n".join(lines) + "\n"


def bind(host: str, port: int) -> socket.socket:
    """Bind the listening socket first, so that a port in use is one clear error, not a uvicorn log."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise PrismError(f"cannot resolve --host {host}: {exc}") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        reason = "is in use" if exc.errno in (98, 48) else f"cannot be bound ({exc.strerror})"
        raise PrismError(f"port {port} on {host} {reason}; choose another with --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(address: tuple) -> str:
    """``http://HOST:PORT`` of a bound socket's address, an IPv6 host in brackets (RFC 3986)."""
    host, port = address[0], address[1]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def is_loopback(host: str) -> bool:
    """Only this machine reaches ``host`` (a bound address: 0.0.0.0 and :: are every interface)."""
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def serve_forever(state: ServerState, sock: socket.socket, on_ready=None) -> None:
    """Run uvicorn on ``sock`` until SIGINT/SIGTERM; in-flight requests are drained first."""
    import uvicorn

    def cancel_active() -> None:
        for req in list(state.active):
            state.engine.cancel(req)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame) -> None:
            # A second Ctrl-C stops without draining: uvicorn would cancel the handlers mid-response
            # (tracebacks, a bare 500) while the engine went on generating for them. prism cancels the
            # requests instead; each answers at once (503, or an error event), then uvicorn stops as usual.
            # A third forces uvicorn down.
            if self.should_exit and sig == signal.SIGINT and not state.stopping and state.event_loop is not None:
                state.stopping = True
                # On the loop, not here: this handler may have interrupted the loop thread inside a lock that
                # cancelling takes (the engine's wake-up event), and would wait on it for ever.
                state.event_loop.call_soon_threadsafe(cancel_active)
                return
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn re-raises a captured SIGTERM after its graceful shutdown, so the process would end
            # "killed by SIGTERM"; prism drains, then exits normally (status 0).
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(build_app(state), log_level="warning", timeout_graceful_shutdown=120, lifespan="on")
    server = Server(config)
    if on_ready is not None:
        on_ready()
    server.run(sockets=[sock])
    if state.loop is not None and state.loop.error is not None:
        raise state.loop.error
    if state.stopping:
        raise KeyboardInterrupt  # exit 130, as any interrupted command
