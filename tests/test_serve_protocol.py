"""``prism serve``'s protocol edges against OpenAI's and vLLM's behaviour, through real HTTP clients: chat's
default output limit, prompts refused before tokenizing, no-op sampling fields, one-prompt batches, seeds,
the chat ``logprobs`` field, the startup lines (IPv6 URL, a network-reachable server without a key)."""

from __future__ import annotations

import json
import socket

import httpx
import pytest
from test_serve import KEY, _start

openai = pytest.importorskip("openai")

AUTH = {"Authorization": f"Bearer {KEY}"}
TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def chat_server(served):
    srv, thread, state, url = _start(served, chat_template=TEMPLATE)
    yield state, url
    srv.should_exit = True
    thread.join(10)


def test_chat_without_a_limit_may_use_the_rest_of_the_context(chat_server):
    """Chat without max_tokens or max_completion_tokens was cut at 16 tokens (the completions default): as vLLM,
    it may generate up to the rest of the context; completions keep OpenAI's default of 16."""
    state, url = chat_server
    body = {"model": "tiny", "messages": [{"role": "user", "content": "The whale"}], "temperature": 0}
    free = httpx.post(url + "/v1/chat/completions", headers=AUTH, json=body, timeout=120).json()
    room = state.context - free["usage"]["prompt_tokens"]
    explicit = httpx.post(url + "/v1/chat/completions", headers=AUTH, json={**body, "max_tokens": room}, timeout=120).json()
    assert explicit["usage"]["completion_tokens"] > 16, explicit  # else this test tells nothing
    assert free["choices"][0]["message"] == explicit["choices"][0]["message"]
    assert free["usage"] == explicit["usage"] and free["choices"][0]["finish_reason"] == explicit["choices"][0]["finish_reason"]
    # the response carries "logprobs": null, as the completions endpoint's and OpenAI's do
    assert free["choices"][0]["logprobs"] is None and "logprobs" in free["choices"][0]
    chunks = httpx.post(url + "/v1/chat/completions", headers=AUTH, json={**body, "max_tokens": 3, "stream": True}, timeout=60)
    choices = [json.loads(line[6:])["choices"] for line in chunks.text.split("\n\n") if line.startswith("data: {")]
    assert choices and all("logprobs" in c[0] and c[0]["logprobs"] is None for c in choices)
    completion = {"model": "tiny", "prompt": "The whale", "temperature": 0}
    default = httpx.post(url + "/v1/completions", headers=AUTH, json=completion, timeout=60).json()
    sixteen = httpx.post(url + "/v1/completions", headers=AUTH, json={**completion, "max_tokens": 16}, timeout=60).json()
    assert default["choices"][0]["text"] == sixteen["choices"][0]["text"] and default["usage"] == sixteen["usage"]


def test_a_prompt_surely_past_the_context_is_refused_before_tokenizing(served):
    """Four 1 MB prompts, each refused in the end as longer than the context, held the one tokenizer thread for
    seconds before a tiny request could be tokenized. A prompt of more characters than the context times the
    longest token is refused at once, with the message tokenizing it gives (the oracle: the same server with the
    early refusal off)."""
    import dataclasses

    from prism_cli.serving.server import longest_token_chars

    calls = []

    class Counting:
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, *args, **kwargs):
            calls.append(args)
            return self.inner(*args, **kwargs)

        def __len__(self):
            return len(self.inner)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    srv, thread, state, url = _start(dataclasses.replace(served, tokenizer=Counting(served.tokenizer)), api_key=None)
    try:
        longest = state.longest_token
        assert longest == longest_token_chars(served.tokenizer) and longest is not None
        for prompt in ("x" * (state.context * longest + 1), ["ab " * (state.context * longest)]):
            body = {"model": "tiny", "prompt": prompt, "max_tokens": 4}
            early = httpx.post(url + "/v1/completions", json=body, timeout=60)
            assert early.status_code == 400 and early.json()["error"]["param"] == "prompt", early.text
            assert calls == []  # refused without tokenizing
            state.longest_token = None  # the oracle: tokenize it, then refuse it
            try:
                tokenized = httpx.post(url + "/v1/completions", json=body, timeout=60)
            finally:
                state.longest_token = longest
            assert len(calls) == 1 and tokenized.status_code == 400
            assert early.json() == tokenized.json()
            calls.clear()
        at_bound = httpx.post(url + "/v1/completions", json={"model": "tiny", "prompt": "x" * (state.context * longest),
                                                             "max_tokens": 4}, timeout=60)
        assert len(calls) == 1 and at_bound.status_code == 400  # not surely too long: tokenized
    finally:
        srv.should_exit = True
        thread.join(10)


def test_the_early_bound_is_sound(served):
    """No text has fewer than len(text) / longest tokens: for the served byte-level BPE and a Metaspace
    (SentencePiece-style) BPE with an unknown token, over texts of every kind (multi-byte characters, spaces,
    special tokens, characters outside the vocabulary); tokenizers that drop characters get no bound."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from prism_cli.serving.server import longest_token_chars

    meta = Tokenizer(models.BPE(unk_token="<unk>"))
    meta.pre_tokenizer = pre_tokenizers.Metaspace()
    meta.train_from_iterator(["the whale swims in the sea", "a whale, the sea; whales"] * 20,
                             trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<|endoftext|>"], show_progress=False))
    metaspace = PreTrainedTokenizerFast(tokenizer_object=meta, unk_token="<unk>")
    bert = Tokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    bert.pre_tokenizer = pre_tokenizers.Whitespace()  # drops every space
    stripping = Tokenizer(models.BPE())
    stripping.normalizer = normalizers.Strip()  # drops spaces at the ends
    for dropping in (bert, stripping):
        assert longest_token_chars(PreTrainedTokenizerFast(tokenizer_object=dropping)) is None
    texts = ["the whale", " " * 500, "日本語のテキスト" * 30, "🙂🙃" * 40, "<|endoftext|>" * 20, "whalewhalewhale" * 30,
             "Привет, как дела?" * 10, "\x00\x01\n\t" * 50, "the sea " * 100, "ǖ ᾯ e\u0301" * 20]
    for tokenizer in (served.tokenizer, metaspace):
        longest = longest_token_chars(tokenizer)
        assert longest is not None
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert len(text) <= longest * len(ids), (text[:20], len(ids), longest)


def test_one_prompt_of_token_ids_in_a_list_is_one_prompt(chat_server):
    """``"prompt": [[ids]]`` (the OpenAI client's one-element batch of token ids) was refused; it is the prompt
    ``[ids]``, as ``["text"]`` is ``"text"``. A batch of two stays refused."""
    state, url = chat_server
    ids = state.tokenizer("The whale", add_special_tokens=False)["input_ids"]
    texts = []
    for prompt in ("The whale", ["The whale"], ids, [ids]):
        r = httpx.post(url + "/v1/completions", headers=AUTH, timeout=60,
                       json={"model": "tiny", "prompt": prompt, "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200, (prompt, r.text)
        assert r.json()["usage"]["prompt_tokens"] == len(ids)
        texts.append(r.json()["choices"][0]["text"])
    assert len(set(texts)) == 1, texts
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    assert client.completions.create(model="tiny", prompt=[ids], max_tokens=5, temperature=0).choices[0].text == texts[0]
    r = httpx.post(url + "/v1/completions", headers=AUTH, json={"model": "tiny", "prompt": [ids, ids]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


@pytest.mark.parametrize("field, value", [("top_k", -1), ("top_k", 0), ("top_k", None), ("min_tokens", 0),
                                          ("repetition_penalty", 1), ("repetition_penalty", 1.0), ("ignore_eos", False),
                                          ("response_format", {"type": "text"}), ("seed", 0), ("seed", 2**63 - 1)])
def test_no_op_values_of_unsupported_fields_are_accepted(chat_server, field, value):
    """vLLM's defaults of the fields prism does not implement change nothing: accepted, the same text as without
    them (seeds: the whole range 0 .. 2**63-1, greedy here)."""
    _, url = chat_server
    body = {"model": "tiny", "prompt": "The whale", "max_tokens": 4, "temperature": 0}
    plain = httpx.post(url + "/v1/completions", headers=AUTH, json=body, timeout=60)
    r = httpx.post(url + "/v1/completions", headers=AUTH, json={**body, field: value}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == plain.json()["choices"][0]["text"]


def test_an_ipv6_server_prints_and_serves_a_bracketed_url(served):
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    from prism_cli.serving.server import url_of

    srv, thread, state, url = _start(served, api_key=None, host="::1")
    try:
        assert url.startswith("http://[::1]:") and url_of(("::1", int(url.rsplit(":", 1)[1]), 0, 0)) == url
        assert httpx.get(url + "/health", timeout=10).text == "ok"  # a client reaches the URL as printed
    finally:
        srv.should_exit = True
        thread.join(10)


def test_serve_startup_lines(cli, tiny_export, monkeypatch):
    """The startup line is one line, however long (rich wrapped it at 80 columns when not on a terminal); a
    server reachable from the network without a key says so; an empty PRISM_API_KEY is refused as
    ``--api-key ""`` is (it meant no key, without a word)."""
    from prism_cli.serving import server as module

    monkeypatch.setattr(module, "serve_forever", lambda state, sock, on_ready=None: sock.close())
    monkeypatch.delenv("PRISM_API_KEY", raising=False)
    name = "a-served-model-name-long-enough-to-wrap-" * 3
    result = cli("serve", tiny_export, "--policy", "fifo", "--port", "0", "--served-model-name", name)
    assert result.code == 0, result
    line = [x for x in result.out.splitlines() if x.strip()]
    assert len(line) == 1 and line[0].startswith(f"prism serve: {name} on http://127.0.0.1:"), result.out
    assert "warning" not in result.err
    result = cli("serve", tiny_export, "--policy", "fifo", "--port", "0", "--host", "0.0.0.0")
    assert result.code == 0, result
    warning = [x for x in result.err.splitlines() if x.strip()]
    assert len(warning) == 1 and "reachable from the network without authentication" in warning[0], result.err
    result = cli("serve", tiny_export, "--policy", "fifo", "--port", "0", "--host", "0.0.0.0", "--api-key", "k")
    assert result.code == 0 and "warning" not in result.err, result
    monkeypatch.setenv("PRISM_API_KEY", "")
    cli("serve", tiny_export, "--policy", "fifo").assert_one_line_error("PRISM_API_KEY is set but empty")
