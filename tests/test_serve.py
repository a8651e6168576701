"""``prism serve`` through real HTTP clients (the official ``openai`` client and httpx) on an ephemeral
loopback port: completions streaming and not, quality floors, chat, models, health, metrics, API key,
bad input, a full queue (503), a client that disconnects, a port in use."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from conftest import synthetic_cost_model

from prism_cli.errors import PrismError

openai = pytest.importorskip("openai")

KEY = "s3cret-key"


def _start(served, policy="prism", max_running=4, max_queue=8, chat_template=None, api_key=KEY, host="127.0.0.1", point=None):
    import uvicorn

    from prism_cli.serving.engine import Engine, Limits
    from prism_cli.serving.executor import ModelExecutor
    from prism_cli.serving.floors import Ladder
    from prism_cli.serving.policies import SCHEDULING_POLICIES
    from prism_cli.serving.server import ServerState, bind, build_app

    cost = synthetic_cost_model()
    limits = Limits(min(2, max_running), max_running, 1.0)
    instance = SCHEDULING_POLICIES.get(policy)(*([served.space.parse(point)] if point else []))
    engine = Engine(ModelExecutor(served), instance, Ladder(served.space, cost, 2), limits, cost)
    state = ServerState(engine, served.tokenizer, served.space, Ladder(served.space, cost, 2), cost, "tiny", served.context,
                        api_key, max_queue, chat_template)
    app = build_app(state)
    sock = bind(host, 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.02)
    address, port = sock.getsockname()[:2]
    return server, thread, state, f"http://[{address}]:{port}" if ":" in address else f"http://{address}:{port}"


@pytest.fixture(scope="module")
def server(served):
    srv, thread, state, url = _start(served, chat_template="{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    yield state, url
    srv.should_exit = True
    thread.join(10)


def test_openai_client_completions_streaming_and_not(server):
    state, url = server
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    out = client.completions.create(model="tiny", prompt="The whale", max_tokens=6, temperature=0, extra_body={"quality_floor": "linear:2"})
    assert out.choices[0].finish_reason in ("length", "stop") and out.usage.completion_tokens <= 6
    text = out.choices[0].text
    stream = client.completions.create(model="tiny", prompt="The whale", max_tokens=6, temperature=0, stream=True,
                                       extra_body={"quality_floor": "linear:2"})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == text  # same greedy text, streamed
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    assert state.engine.stats.violations == 0


def test_streamed_text_with_stop_strings_is_the_non_streamed_text(server):
    """Stop strings cut from the greedy output itself, at every length and two offsets: the streamed deltas
    add up to the non-streamed text, which ends right before the stop string. A stop string longer than the
    text so far sent the text's head less the hold counted from its end (``", and"`` streamed ``", a"``)."""
    _, url = server
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY)
    kw = dict(model="tiny", prompt="The whale", max_tokens=10, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    assert len(full) >= 12, full
    for offset in (0, 3):
        for length in (1, 2, 4, 7, 9, 12):
            stop = full[offset:offset + length]
            if not stop:
                continue
            expected = full[:full.find(stop)]  # the oracle: the first occurrence in the unstopped text
            assert client.completions.create(stop=stop, **kw).choices[0].text == expected, stop
            streamed = "".join(c.choices[0].text for c in client.completions.create(stop=stop, stream=True, **kw))
            assert streamed == expected, (stop, streamed, expected)


def test_chat_completions_with_a_template(server):
    _, url = server
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY)
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=4, temperature=0)
    assert out.choices[0].message.role == "assistant" and out.usage.completion_tokens <= 4
    parts = list(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=4,
                                                temperature=0, stream=True))
    assert "".join(p.choices[0].delta.content or "" for p in parts if p.choices) == out.choices[0].message.content
    # Content as text parts (as the client also sends it) is the same prompt as the string.
    split = client.chat.completions.create(model="tiny", max_tokens=4, temperature=0, messages=[
        {"role": "user", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]}])
    assert split.choices[0].message.content == out.choices[0].message.content
    assert split.usage.prompt_tokens == out.usage.prompt_tokens


def test_chat_max_completion_tokens_is_named_as_sent(server):
    state, url = server
    r = httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_completion_tokens"
    assert r.json()["error"]["message"].startswith("max_completion_tokens:"), r.text
    # A prompt and limit past the context: the message names the fields the request used.
    limit = state.context - 1  # leaves room for a 1-token prompt, no more
    r = httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": limit})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    message = r.json()["error"]["message"]
    assert message.startswith("messages:") and f"max_completion_tokens {limit}" in message, message
    # A prompt past the context by itself: the messages are the field to fix, whatever the limit.
    r = httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"model": "tiny", "messages": [{"role": "user", "content": "word " * 200}], "max_completion_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text


def test_chat_null_max_completion_tokens_is_absent(server):
    """``max_completion_tokens: null`` beside ``max_tokens: 2`` generated 256 tokens: the field was chosen by
    its key, not its value."""
    _, url = server
    r = httpx.post(url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                   json={"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": None,
                         "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 2, r.text


def test_nulls_and_the_default_limit(server):
    """A null nested field is an absent one (``include_usage: null`` was 400); a prompt that the default
    limit of 16 pushes past the context says the limit was the default, which the client never sent."""
    state, url = server
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(url + "/v1/completions", headers=headers, timeout=60, json={
        "model": "tiny", "prompt": "x", "max_tokens": 2, "stream": True, "stream_options": {"include_usage": None}})
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]"), r.text
    r = httpx.post(url + "/v1/completions", headers=headers, timeout=60,
                   json={"model": "tiny", "prompt": [5] * (state.context - 8)})
    assert r.status_code == 400 and "max_tokens 16 (the default" in r.json()["error"]["message"], r.text


def test_a_template_that_renders_no_tokens_is_400_and_the_engine_stays_up(served):
    """A template that handles only user and assistant turns renders a system-only conversation as nothing: the
    empty prompt reached the engine, whose prefill raised; the engine stopped for good (every later request
    500) and the request, out of the waiting queue but in no batch yet, was never answered."""
    template = "{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n{% endif %}{% endfor %}"
    srv, thread, _, url = _start(served, chat_template=template, api_key=None)
    try:
        r = httpx.post(url + "/v1/chat/completions", timeout=30, json={
            "model": "tiny", "messages": [{"role": "system", "content": "You are helpful."}], "max_tokens": 4})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
        assert "no tokens" in r.json()["error"]["message"]
        assert httpx.get(url + "/health").text == "ok"
        ok = httpx.post(url + "/v1/chat/completions", timeout=30, json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert ok.status_code == 200, ok.text
    finally:
        srv.should_exit = True
        thread.join(10)


def test_an_engine_that_fails_mid_launch_answers_the_request_it_was_launching(served):
    """``Engine.abort`` ended the requests waiting, queued or in a batch, not those it had taken out of the
    waiting queue to prefill: a prefill that raised left that client waiting for ever."""
    srv, thread, state, url = _start(served, policy="fifo", api_key=None)

    def broken(*_args):
        raise RuntimeError("prefill failed")

    state.engine.executor.prefill = broken
    try:
        r = httpx.post(url + "/v1/completions", timeout=30, json={"model": "tiny", "prompt": "The whale", "max_tokens": 4})
        assert r.status_code == 500 and r.json()["error"]["type"] == "internal_error", r.text
        assert httpx.get(url + "/health").status_code == 500
    finally:
        srv.should_exit = True
        thread.join(10)


@pytest.mark.parametrize("messages", [
    "hello", [], [{"role": "user"}], [{"role": 5, "content": "x"}], [{"role": "user", "content": 5}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}],
    [{"role": "user", "content": [{"type": "text", "text": 5}]}],
])
def test_bad_chat_messages_are_400_naming_messages(server, messages):
    _, url = server
    r = httpx.post(url + "/v1/chat/completions", json={"model": "tiny", "messages": messages},
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "messages"


@pytest.mark.parametrize("body, status, param", [
    ("{not json", 400, None),
    ({"model": "tiny", "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "x", "temperature": 7}, 400, "temperature"),
    ({"model": "tiny", "prompt": "x", "quality_floor": "linear:9"}, 400, "quality_floor"),
    # a point of the export that the cost model does not time: the prism policy could not plan it, and
    # the engine thread stopped on it (every later request 500)
    ({"model": "tiny", "prompt": "x", "quality_floor": "threshold:0.5"}, 400, "quality_floor"),
    ({"model": "tiny", "prompt": "x", "n": 2}, 400, "n"),
    ({"model": "tiny"}, 400, "prompt"),
    ({"model": "tiny", "prompt": "word " * 200, "max_tokens": 4}, 400, "prompt"),
    ({"model": "gpt-9", "prompt": "x"}, 404, "model"),
    ({"model": "tiny", "prompt": ["a", "b"]}, 400, "prompt"),  # a batch of prompts
    ({"model": "tiny", "prompt": [[1, 2], [3]]}, 400, "prompt"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 10**30}, 400, "max_tokens"),  # no prompt fits beside it
    ({"model": "tiny", "prompt": "x", "seed": 2**64}, 400, "seed"),  # stopped the engine thread
    ({"model": "tiny", "prompt": "x", "seed": -(2**63) - 1}, 400, "seed"),
    # torch keeps a seed's low 63 bits: -1 drew what 2**63-1 draws (the CLI's --seed refuses negatives too)
    ({"model": "tiny", "prompt": "x", "seed": -1}, 400, "seed"),
    # vLLM's sampling fields and JSON mode, which prism does not implement: they answered 200, ignored
    ({"model": "tiny", "prompt": "x", "top_k": 5}, 400, "top_k"),
    ({"model": "tiny", "prompt": "x", "top_k": True}, 400, "top_k"),  # True == 1, but no default
    ({"model": "tiny", "prompt": "x", "min_tokens": 3}, 400, "min_tokens"),
    ({"model": "tiny", "prompt": "x", "repetition_penalty": 1.2}, 400, "repetition_penalty"),
    ({"model": "tiny", "prompt": "x", "ignore_eos": True}, 400, "ignore_eos"),
    ({"model": "tiny", "prompt": "x", "response_format": {"type": "json_object"}}, 400, "response_format"),
    ('{"model": "tiny", "prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", 400, None),  # RecursionError in json
    ({"model": "tiny", "prompt": "x", "stream": True, "stream_options": {"include_usage": "yes"}}, 400, "stream_options"),
    ({"model": "tiny", "prompt": "x", "stream": True, "stream_options": {"include_usage": 0}}, 400, "stream_options"),
    ({"model": "tiny", "prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),  # not streaming
    ({"model": "tiny", "prompt": "x", "tool_choice": "auto"}, 400, "tool_choice"),  # no tools to choose from
    # a lone surrogate (a JSON \\u escape no UTF-8 text holds): the tokenizer, and the 404's encoder, raised (500)
    ({"model": "tiny", "prompt": "a\ud800b"}, 400, "prompt"),
    ({"model": "\udc00", "prompt": "x"}, 400, "model"),
    ({"model": "tiny", "prompt": "x", "quality_floor": "ppl:1e400"}, 400, "quality_floor"),  # infinite: accepted
    ({"model": "tiny", "prompt": "x", "quality_floor": -3}, 400, "quality_floor"),
    # past float range: float() raised OverflowError (500, a traceback in the server log)
    ({"model": "tiny", "prompt": "x", "temperature": 10**400}, 400, "temperature"),
    ({"model": "tiny", "prompt": "x", "top_p": -(10**400)}, 400, "top_p"),
    # an integer past Python's digit limit in any field: json.loads raised a plain ValueError (500)
    ('{"model": "tiny", "prompt": "x", "extra": 1' + "0" * 5000 + "}", 400, None),
    # NaN and Infinity are not JSON (Python's json reads them): an ignored field took NaN without a word
    ('{"model": "tiny", "prompt": "x", "presence_penalty": NaN}', 400, None),
    ('{"model": "tiny", "prompt": "x", "temperature": -Infinity}', 400, None),
])
def test_bad_requests_name_the_field(server, body, status, param):
    _, url = server
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(url + "/v1/completions", content=content, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param
    assert httpx.get(url + "/health").text == "ok"  # a bad request never takes the engine down


def test_a_body_past_the_limit_is_413_before_it_is_read_whole(server):
    """A 10 MB prompt was read, parsed and tokenized (seconds, holding the server) only to be refused as
    longer than the context: a body past ``body_limit`` is 413, declared (Content-Length) or chunked."""
    from prism_cli.serving.server import body_limit

    state, url = server
    limit = body_limit(state.context)
    body = json.dumps({"model": "tiny", "prompt": "x" * limit, "max_tokens": 2}).encode()
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for content in (body, iter([body[i:i + 65536] for i in range(0, len(body), 65536)])):  # the second: chunked
        r = httpx.post(url + "/v1/completions", content=content, headers=headers, timeout=60)
        assert r.status_code == 413, r.text
        assert r.json()["error"]["type"] == "request_too_large"
        assert httpx.get(url + "/health").text == "ok"
    ok = json.dumps({"model": "tiny", "prompt": "hello", "max_tokens": 2}).encode()
    r = httpx.post(url + "/v1/completions", content=iter([ok[:10], ok[10:]]), headers=headers, timeout=60)
    assert r.status_code == 200, r.text  # a chunked upload under the limit is read as any other


def test_a_body_that_never_arrives_whole_is_408_after_the_timeout(server, monkeypatch):
    """A client that declared 100 bytes and sent 9 held its connection open for as long as it liked (found by
    fuzzing): the body must arrive within ``BODY_TIMEOUT_S``, else 408 in OpenAI's error shape."""
    from prism_cli.serving import server as module

    monkeypatch.setattr(module, "BODY_TIMEOUT_S", 0.5)
    _, url = server
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                  + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":")
        started = time.perf_counter()
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            part = s.recv(4096)
            if not part:
                break
            reply += part
        waited = time.perf_counter() - started
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), reply
    assert json.loads(body)["error"]["type"] == "request_timeout"
    assert 0.4 < waited < 8, waited
    assert httpx.get(url + "/health").text == "ok"


def test_a_client_gone_before_its_body_is_whole_is_dropped_quietly(server, caplog):
    """A declared body that never comes whole (the client closed): uvicorn logged 'Exception in ASGI
    application' with a traceback (starlette's ClientDisconnect out of read_body)."""
    import logging

    state, url = server
    port = int(url.rsplit(":", 1)[1])
    before = state.counters.by_status.get("499", 0)
    uvicorn_log = logging.getLogger("uvicorn.error")  # does not propagate to the root, where caplog listens
    uvicorn_log.addHandler(caplog.handler)
    try:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                      + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":")
            time.sleep(0.3)
        for _ in range(30):
            if state.counters.by_status.get("499", 0) > before or caplog.records:
                break
            time.sleep(0.1)
    finally:
        uvicorn_log.removeHandler(caplog.handler)
    assert not [r for r in caplog.records if "Exception in ASGI application" in r.getMessage()]
    assert state.counters.by_status.get("499", 0) == before + 1
    assert httpx.get(url + "/health").text == "ok"


def test_unknown_routes_and_methods_answer_in_openai_error_shape(server):
    _, url = server
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.get(url + "/v1/engines", headers=auth)
    assert r.status_code == 404 and r.json()["error"]["message"].startswith("no route /v1/engines")
    r = httpx.get(url + "/v1/completions", headers=auth)
    assert r.status_code == 405 and "GET is not allowed" in r.json()["error"]["message"]
    assert httpx.get(url + "/v1/models/tiny", headers=auth).json()["id"] == "tiny"
    r = httpx.get(url + "/v1/models/gpt-9", headers=auth)
    assert r.status_code == 404 and r.json()["error"]["param"] == "model"
    assert httpx.get(url + "/v1/models/tiny").status_code == 401
    # A trailing slash was a 307 to a URL built from the client's Host header.
    r = httpx.post(url + "/v1/completions/", headers={**auth, "Host": "evil.example"}, json={"model": "tiny", "prompt": "x"})
    assert r.status_code == 404 and "location" not in r.headers and r.json()["error"]["message"].startswith("no route")


def test_a_prompt_being_tokenized_does_not_hold_the_server(served):
    """Tokenizing ran on the event loop: while one long prompt was tokenized (12 s for 10 MB), /health and
    every other request waited. Here the tokenizer blocks on an event that is set only once /health has
    answered: if tokenizing held the loop, /health could not answer (its client times out) and the test fails."""
    import dataclasses

    entered, release = threading.Event(), threading.Event()

    class SlowTokenizer:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, *args, **kwargs):
            entered.set()
            release.wait(30)
            return self.inner(*args, **kwargs)

        def __len__(self):
            return len(self.inner)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    srv, thread, _, url = _start(dataclasses.replace(served, tokenizer=SlowTokenizer(served.tokenizer)))
    try:
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(httpx.post, url + "/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 2},
                               headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
            assert entered.wait(30)  # the request is being tokenized now
            try:
                assert httpx.get(url + "/health", timeout=5).text == "ok"
                assert not slow.done()
            finally:
                release.set()
            assert slow.result().status_code == 200
    finally:
        release.set()
        srv.should_exit = True
        thread.join(10)


@pytest.mark.parametrize("sampling", [{"top_p": 5e-324}, {"temperature": 1e-300}, {"temperature": 1e-300, "top_p": 1e-30}])
def test_extreme_sampling_values_sample_and_keep_the_engine_up(server, sampling):
    """A top_p that rounds to 0 in float32 keeps the likeliest token; a temperature that overflows the
    logits samples greedily: both gave NaN or zero probabilities, and the engine thread stopped."""
    _, url = server
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 3, "seed": 1, **sampling}
    r = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200, r.text
    greedy = httpx.post(url + "/v1/completions", json={**body, "temperature": 0, "top_p": 1},
                        headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]  # one token left: the argmax
    assert httpx.get(url + "/health").text == "ok"


def test_api_key_health_and_metrics(server):
    _, url = server
    assert httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x"}).status_code == 401
    assert httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x"},
                      headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(url + "/health").text == "ok"
    metrics = httpx.get(url + "/metrics").text
    assert 'prism_requests_total{status="401"}' in metrics and "prism_floor_violations_total 0" in metrics


def test_a_cancelled_request_holds_its_slot_until_the_engine_lets_it_go(served):
    """A client that disconnects is answered at once, but its request keeps its slot (KV rows, a place in a
    batch) until the engine's next iteration drops it: the queue bound counts it until then, and a request
    sent in between is turned away with 503 (counting the slot free at the disconnect let the engine's
    load pass max_running + max_queue). Here the engine is held inside a decode step meanwhile."""
    import threading

    srv, thread, state, url = _start(served, policy="fifo", max_running=1, max_queue=0, api_key=None)
    decode = state.engine.executor.decode
    entered, gate = threading.Event(), threading.Event()
    gate.set()

    def gated_decode(*args):
        entered.set()
        assert gate.wait(30)
        return decode(*args)

    state.engine.executor.decode = gated_decode
    try:
        body = {"model": "tiny", "prompt": "The whale", "max_tokens": 100, "temperature": 0, "stream": True}
        with httpx.Client(timeout=30) as client, client.stream("POST", url + "/v1/completions", json=body) as first:
            lines = first.iter_lines()
            next(lines)  # the request runs
            gate.clear()
            entered.clear()
            assert entered.wait(30)  # the engine is inside a decode step, held there
        for _ in range(500):  # the server saw the disconnect
            if state.counters.by_status.get("cancelled"):
                break
            time.sleep(0.01)
        assert state.counters.by_status.get("cancelled") == 1
        assert state.engine.running() == 1  # the engine has not let it go yet
        busy = httpx.post(url + "/v1/completions", json={**body, "stream": False, "max_tokens": 3}, timeout=30)
        assert busy.status_code == 503
        gate.set()
        for _ in range(500):
            if state.in_flight == 0:
                break
            time.sleep(0.01)
        assert state.in_flight == 0 and state.engine.running() == 0
        ok = httpx.post(url + "/v1/completions", json={**body, "stream": False, "max_tokens": 3}, timeout=30)
        assert ok.status_code == 200
    finally:
        gate.set()
        srv.should_exit = True
        thread.join(10)


def test_sequential_requests_at_capacity_are_never_turned_away(served):
    """One slot, no queue, one client sending each request after the last answer: nothing else is in flight,
    so no 503. The final update and the slot's release reached the event loop in two steps, and a client
    answered between them was refused now and then (1 in 150)."""
    srv, thread, state, url = _start(served, policy="fifo", max_running=1, max_queue=0, api_key=None)
    try:
        body = {"model": "tiny", "prompt": "The whale", "max_tokens": 1, "temperature": 0}
        with httpx.Client(timeout=30) as client:
            codes = [client.post(url + "/v1/completions", json=body, headers={"Connection": "close"}).status_code
                     for _ in range(150)]
        assert codes == [200] * 150
    finally:
        srv.should_exit = True
        thread.join(10)


def test_a_request_arriving_while_the_server_is_stopped_is_refused(served):
    """After a second Ctrl-C (``stopping``) a request whose body was still being read or tokenized is answered
    503 at once, not served to its end after the stop."""
    srv, thread, state, url = _start(served, policy="fifo", api_key=None)
    try:
        state.stopping = True
        answer = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "The whale", "max_tokens": 3}, timeout=30)
        assert answer.status_code == 503 and answer.json()["error"]["type"] == "server_stopped"
        assert state.in_flight == 0 and not state.active
    finally:
        srv.should_exit = True
        thread.join(10)


def test_static_policy_refuses_floors_above_its_point(served):
    """Under --policy static every request runs at the one point: a floor above it is refused (400), never
    served below it; a request without a floor runs at the operator's point; no row is below its floor."""
    srv, thread, state, url = _start(served, policy="static", point="linear:4", api_key=None)
    try:
        body = {"model": "tiny", "prompt": "The whale", "max_tokens": 3, "temperature": 0}
        above = httpx.post(url + "/v1/completions", json={**body, "quality_floor": "linear:6"}, timeout=30)
        assert above.status_code == 400 and above.json()["error"]["param"] == "quality_floor"
        assert "linear:4" in above.json()["error"]["message"]
        # topk:4 is not above linear:4, but the ladder orders only one family: it does not meet it either.
        other = httpx.post(url + "/v1/completions", json={**body, "quality_floor": "topk:2"}, timeout=30)
        assert other.status_code == 400 and "does not meet" in other.json()["error"]["message"]
        # A perplexity ceiling: linear:4's perplexity in the cost model is 25 (100 / K): within 30, not within 20.
        tight = httpx.post(url + "/v1/completions", json={**body, "quality_floor": "ppl:20"}, timeout=30)
        assert tight.status_code == 400, tight.text
        for floor in (None, "linear:4", "linear:2", "ppl:30", 25):
            answer = httpx.post(url + "/v1/completions", json={**body, "quality_floor": floor}, timeout=30)
            assert answer.status_code == 200, (floor, answer.text)
        assert {str(p) for r in state.engine.finished for p in r.served_at} == {"linear:4"}
        assert state.engine.stats.violations == 0
    finally:
        srv.should_exit = True
        thread.join(10)


def test_chat_without_a_template_is_a_client_error_that_says_so(served):
    srv, thread, _, url = _start(served, api_key=None)
    try:
        answer = httpx.post(url + "/v1/chat/completions",
                            json={"model": "tiny", "messages": [{"role": "user", "content": "hello"}]})
        assert answer.status_code == 400
        assert "no chat template" in answer.json()["error"]["message"]
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="/v1/completions"):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=2)
    finally:
        srv.should_exit = True
        thread.join(10)


def test_full_queue_answers_503_and_a_disconnect_frees_the_slot(served):
    srv, thread, state, url = _start(served, policy="fifo", max_running=1, max_queue=0, api_key=None)
    decode = state.engine.executor.decode

    def slow_decode(*args):  # 100 tokens take seconds: the first request surely holds its slot meanwhile
        time.sleep(0.03)
        return decode(*args)

    state.engine.executor.decode = slow_decode
    try:
        body = {"model": "tiny", "prompt": "The whale", "max_tokens": 100, "temperature": 0, "stream": True}
        with httpx.Client(timeout=30) as client, client.stream("POST", url + "/v1/completions", json=body) as first:
            lines = first.iter_lines()  # kept: a dropped iterator would close the response
            next(lines)  # the first request holds the only slot
            busy = httpx.post(url + "/v1/completions", json={**body, "stream": False})
            assert busy.status_code == 503 and busy.headers["Retry-After"] == "1"
        # the client went away mid-stream: its request is cancelled and its slot freed
        for _ in range(200):
            if state.in_flight == 0 and state.engine.running() == 0:
                break
            time.sleep(0.02)
        assert state.in_flight == 0 and state.engine.running() == 0
        cancelled = [r for r in state.engine.finished if r.finish_reason == "cancelled"]
        assert len(cancelled) == 1 and len(cancelled[0].output_ids) < 100
        ok = httpx.post(url + "/v1/completions", json={**body, "stream": False, "max_tokens": 3}, timeout=30)
        assert ok.status_code == 200
    finally:
        srv.should_exit = True
        thread.join(10)


def test_port_in_use_is_one_clear_error():
    from prism_cli.serving.server import bind

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        with pytest.raises(PrismError, match=f"port {port} on 127.0.0.1 is in use"):
            bind("127.0.0.1", port)
    finally:
        taken.close()


def test_serve_cli_bad_input(cli, tiny_export, tmp_path):
    cli("serve", tmp_path).assert_one_line_error("not a prism export")
    cli("serve", tmp_path / "missing").assert_one_line_error("missing does not exist")
    (tmp_path / "file").write_text("x")
    cli("serve", tmp_path / "file").assert_one_line_error("is a file")
    cli("serve", tiny_export, "--port", "70000").assert_one_line_error("--port")
    cli("serve", tiny_export, "--policy", "fifo", "--api-key", "").assert_one_line_error("--api-key is empty")
    # Accepted, then 401 for ever: a header carries Latin-1 bytes, stripped at the ends.
    cli("serve", tiny_export, "--policy", "fifo", "--api-key", "k\u00e9y").assert_one_line_error("printable ASCII")
    cli("serve", tiny_export, "--policy", "fifo", "--api-key", " pad ").assert_one_line_error("printable ASCII")
    cli("serve", tiny_export, "--policy", "fifo", "--served-model-name", " ").assert_one_line_error("--served-model-name")
    cli("serve", tiny_export, "--policy", "fifo", "--point", "linear:2").assert_one_line_error("--policy static")
    cli("serve", tiny_export, "--policy", "static", "--point", "foo").assert_one_line_error("--point foo", "operating point")
    cli("serve", tiny_export, "--policy", "prism").assert_one_line_error("cost model")
    partial = synthetic_cost_model()
    del partial.points["linear:8"]  # the full model, which requests without a floor run
    partial.save(tmp_path / "partial.json")
    cli("serve", tiny_export, "--cost-model", tmp_path / "partial.json").assert_one_line_error("no timing of the full model (linear:8)")
    cli("serve", tiny_export, "--policy", "fifo", "--device-memory", "4XB").assert_one_line_error("4XB")
    cli("serve", tiny_export, "--policy", "fifo", "--cache-policy", "mru", "--device-memory", "50%").assert_one_line_error("mru")


def _serve_process(tiny_export):
    """``prism serve`` (fifo) in a process of its own, once it answers /health: (the process, its URL)."""
    import os
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "prism_cli", "serve", str(tiny_export), "--policy", "fifo", "--port", str(port),
                             "--served-model-name", "tiny"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={k: v for k, v in os.environ.items() if k != "PRISM_API_KEY"})
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.1)
    return proc, url


@pytest.mark.slow
def test_sigterm_drains_in_flight_requests_then_exits(tiny_export):
    import signal

    proc, url = _serve_process(tiny_export)
    try:
        body = {"model": "tiny", "prompt": "The whale", "max_tokens": 100, "temperature": 0, "stream": True}
        with httpx.Client(timeout=60) as client, client.stream("POST", url + "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            next(lines)
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"  # the request in flight was served to its end
        assert proc.wait(60) == 0
    finally:
        proc.kill()


@pytest.mark.slow
def test_a_second_ctrl_c_cancels_in_flight_requests_and_exits_130(tiny_export):
    """The first Ctrl-C drains; a second stops without draining: each request in flight is answered at once
    (a 503 in OpenAI's error shape, an error event on a stream), quietly, and the command exits 130. uvicorn's
    own forced stop cancelled the handlers mid-response (tracebacks, a bare-text 500, a stream cut short),
    left the engine generating the abandoned requests, and exited 0."""
    import signal

    proc, url = _serve_process(tiny_export)
    try:
        context = httpx.get(url + "/v1/models").json()["data"][0]["max_model_len"]
        body = {"model": "tiny", "prompt": [5, 6], "max_tokens": context - 2, "temperature": 1.0, "seed": 1}
        with ThreadPoolExecutor(1) as pool, httpx.Client(timeout=60) as client, \
                client.stream("POST", url + "/v1/completions", json={**body, "stream": True}) as response:
            lines = response.iter_lines()
            next(lines)
            plain = pool.submit(httpx.post, url + "/v1/completions", json=body, timeout=60)
            deadline = time.monotonic() + 30
            while "prism_requests_running 2" not in httpx.get(url + "/metrics").text:  # both run
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.01)
            proc.send_signal(signal.SIGINT)
            time.sleep(0.3)
            proc.send_signal(signal.SIGINT)
            started = time.perf_counter()
            rest = [line for line in lines if line]
            answer = plain.result()
        assert proc.wait(60) == 130 and time.perf_counter() - started < 15
        assert json.loads(rest[-1].removeprefix("data: "))["error"]["type"] == "server_stopped", rest[-3:]
        assert answer.status_code == 503 and answer.json()["error"]["type"] == "server_stopped", answer.text
        err = proc.stderr.read()
        assert "Traceback" not in err and err.strip().startswith("interrupted:"), err
    finally:
        proc.kill()
