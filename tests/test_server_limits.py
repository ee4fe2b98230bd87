"""The server against abuse and bad luck: any JSON body, bodies nested deep, clients that stall
half-way through a request, host names in any case, a full disk under `--cache-dir`."""

from __future__ import annotations

import json
import os
import socket
import time

import httpx
import mlx.core as mx
import pytest
from checkpoints import requires_reference
from hypothesis import HealthCheck, assume, event, given, settings, strategies as st
from test_server import MODEL, OPENAI_TOOLS, ask, chat_body, client, no_think, post, running, user
from trained_model import answer, trained_checkpoint

from smollm3_mlx.loading import load
from smollm3_mlx.serve.cache_dir import MARKER

pytestmark = requires_reference
DEEP = 1000  # levels: past Python's recursion limit, as the trial sent


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load(trained_checkpoint(tmp_path_factory))


@pytest.fixture(scope="module")
def srv(loaded):
    with running(loaded, read_timeout=0.5) as s:
        yield s


def one_line_error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    assert message and "\n" not in message and "Traceback" not in message
    return message


def test_bodies_nested_deeper_than_a_reader_can_go_are_a_400_in_one_line(srv):
    deep = "[" * DEEP + "]" * DEEP
    raw = f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "hi"}}], "x": {deep}}}'
    message = one_line_error(post(srv, raw), 400)
    assert message == "the body is not valid JSON: nested more than 64 levels deep"
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": deep}}
    history = [user("weather"), {"role": "assistant", "content": "", "tool_calls": [call]}]
    message = one_line_error(post(srv, chat_body(messages=history, tools=OPENAI_TOOLS)), 400)
    assert "tool call arguments are not JSON" in message
    assert ask(srv, [user("hi")], extra_body=no_think()).choices[0].message.content == answer("hi")


def test_host_names_are_case_insensitive(srv):
    for host in ("LOCALHOST", "LocalHost:8000", "127.0.0.1:1", "[::1]:80"):
        r = httpx.get(srv.url + "/v1/models", headers={"host": host})
        assert r.status_code == 200, (host, r.text)
    assert "Host" in one_line_error(
        httpx.get(srv.url + "/v1/models", headers={"host": "LOCALHOST.evil.example"}), 400
    )


def test_a_non_ascii_api_key_is_refused_before_serving(loaded):
    with pytest.raises(ValueError, match="visible ASCII"), running(loaded, api_key="clé"):
        pass


def closed_within(sock: socket.socket, seconds: float) -> bytes:
    """What the server sent before it closed the connection (it must close within `seconds`)."""
    sock.settimeout(seconds)
    received = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        chunk = sock.recv(65536)  # socket.timeout (a failure) if it never closes
        if not chunk:
            return received
        received += chunk
    raise AssertionError(f"still open after {seconds} s")


def test_stalled_clients_are_dropped_after_the_read_timeout(srv):
    """read_timeout 0.5 s here (30 s by default): no headers, half the headers, or half the
    body; a client that sends its request whole is served as before."""
    port = int(srv.url.rsplit(":", 1)[1])
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    body = json.dumps(chat_body(max_tokens=2)).encode()
    full = (
        head + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    sockets = [socket.create_connection(("127.0.0.1", port)) for _ in range(4)]
    silent, half_head, half_body, whole = sockets
    half_head.sendall(head.encode())
    half_body.sendall(full + body[:10])
    whole.sendall(full + body)
    try:
        assert closed_within(silent, 10) == b""
        assert closed_within(half_head, 10) == b""
        status, _, rest = closed_within(half_body, 10).partition(b"\r\n")
        assert status == b"HTTP/1.1 408 Request Timeout" and b"did not arrive within 0.5 s" in rest
        whole.settimeout(60)
        assert whole.recv(65536).startswith(b"HTTP/1.1 200 OK")
    finally:
        for s in sockets:
            s.close()
    with httpx.Client(base_url=srv.url) as keep_alive:  # a slow client between requests is fine
        assert keep_alive.get("/v1/models").status_code == 200
        time.sleep(0.7)
        assert keep_alive.get("/v1/models").status_code == 200


def test_a_full_disk_under_cache_dir_costs_the_file_never_the_answer(loaded, tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise RuntimeError("[write] Unable to write 2579 bytes to file.")

    monkeypatch.setattr(mx, "save_safetensors", full_disk)
    system = {"role": "system", "content": "Answer briefly and kindly. " * 80}
    first = [system, user("math")]
    follow_up = [*first, {"role": "assistant", "content": answer("math")}, user("hi")]
    with running(loaded, cache_dir=tmp_path) as s:
        r = ask(s, first, max_tokens=30, extra_body=no_think())
        assert r.usage.prompt_tokens > 256 and r.choices[0].message.content == answer("math")
        chunks = list(ask(s, follow_up, max_tokens=30, stream=True, extra_body=no_think()))
        assert chunks[-1].choices[0].finish_reason == "stop"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == answer("hi")
        again = ask(s, follow_up, max_tokens=30, extra_body=no_think())  # the memory cache holds
        assert again.usage.prompt_tokens_details.cached_tokens > 256
        raw = httpx.post(
            s.url + "/v1/chat/completions",
            timeout=60,
            json=chat_body(messages=first, stream=True, max_tokens=5),
        )
        assert raw.text.rstrip().endswith("data: [DONE]")
    assert [p.name for p in tmp_path.iterdir()] == [MARKER]


scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text()
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=10,
)
# Each field's values a client might well send (with any JSON value, these reach past the checks)
GOOD = {
    "model": [MODEL, "other"],
    "messages": [[user("hi")], [], [{"role": "system", "content": "Be brief."}, user("hi")]],
    "prompt": ["Hello", ["Hello"], [1, 2, 3], ""],
    "temperature": [0, 0.7, 2.5, -1],
    "top_p": [0.5, 1, 0],
    "top_k": [-1, 0, 5],
    "min_p": [0.1, 1.5],
    "repetition_penalty": [1.1, 0],
    "seed": [0, 42, 2**64],
    "stop": ["\n", ["a", "b"], [""], ["x"] * 5],
    "max_tokens": [1, 0, -1],
    "max_completion_tokens": [2, 0],
    "n": [1, 2],
    "stream": [True, False],
    "stream_options": [{"include_usage": True}, None],
    "logprobs": [True, False],
    "top_logprobs": [2, 21],
    "tools": [OPENAI_TOOLS, [], [{"type": "function", "function": {"name": "f"}}]],
    "tool_choice": ["auto", "none", "required", {"type": "function", "function": {"name": "x"}}],
    "response_format": [
        {"type": "json_object"},
        {"type": "text"},
        {"type": "json_schema"},
        {"type": "json_schema", "json_schema": {"schema": {"type": "integer"}}},
    ],
    "chat_template_kwargs": [{"enable_thinking": True}, {}],
    "reasoning_effort": ["none", "low", "high"],
    "thinking_token_budget": [2, 0, -1],
    "role": ["user", "system", "assistant", "tool", "developer"],
    "content": ["hi", "", None, [{"type": "text", "text": "hi"}], [{"type": "image_url"}]],
    "name": ["bob"],
    "tool_calls": [
        [],
        [{"id": "1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}],
    ],
    "tool_call_id": ["1"],
    "reasoning_content": ["I think.", ""],
}
FIELDS = [
    "model",
    "messages",
    "prompt",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "seed",
    "stop",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "stream",
    "stream_options",
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "response_format",
    "chat_template_kwargs",
    "reasoning_effort",
    "thinking_token_budget",
]
MESSAGE_FIELDS = ["role", "content", "name", "tool_calls", "tool_call_id", "reasoning_content"]


DEEP_MARK = "<nested deep>"  # a value that becomes JSON nested `depth` levels deep


@st.composite
def bodies(draw):
    """(A request body, a depth): any JSON value, or a good request with a few fields (of its
    own or of its message) set to any JSON value, or to DEEP_MARK: a value nested `depth` deep
    in the JSON sent (up to 3000 levels; built as text, as Python could not print it)."""
    depth = draw(st.integers(1, 3000))
    if draw(st.integers(0, 4)) == 0:
        return draw(json_values | st.just(DEEP_MARK)), depth
    message = dict(user("hi"))
    body = {
        **chat_body(messages=[message], max_tokens=3),
        "prompt": "Hello",
        "chat_template_kwargs": {"enable_thinking": False},
    }
    for _ in range(draw(st.integers(1, 3))):
        own = draw(st.booleans())
        key = draw(st.sampled_from(FIELDS if own else MESSAGE_FIELDS))
        value = draw(st.sampled_from(GOOD[key]) | json_values | st.just(DEEP_MARK))
        (body if own else message)[key] = value
    for key in ("max_tokens", "max_completion_tokens"):  # a long answer is slow, not wrong
        assume(not (isinstance(body.get(key), int) and body[key] > 8))
    assume(body.get("max_tokens") is not None or body.get("max_completion_tokens") is not None)
    return body, depth


BODY_FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", 60)),
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
    ],
)


@BODY_FUZZ
@given(body=bodies())
def test_any_json_body_is_a_200_or_a_4xx_in_one_line_never_a_500(srv, body):
    value, depth = body
    raw = json.dumps(value).replace(json.dumps(DEEP_MARK), "[" * depth + "0" + "]" * depth)
    for route in ("/v1/chat/completions", "/v1/completions"):
        r = httpx.post(
            srv.url + route, content=raw, timeout=120, headers={"content-type": "application/json"}
        )
        event(f"{route} {r.status_code}")  # pytest --hypothesis-show-statistics: the mix
        if r.status_code == 200:
            continue
        assert 400 <= r.status_code < 500, (route, r.status_code, r.text)
        one_line_error(r, r.status_code)
    assert client(srv).models.list().data[0].id == MODEL
