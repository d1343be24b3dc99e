"""The gateway's pure parts: request parsing (400 naming the field), stop sequences, error mapping."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.gateway.chat import ChatRenderer, chatml
from services.gateway.errors import from_rpc_error
from services.gateway.requests import BadRequest, parse
from services.gateway.stops import StopMatcher

RENDERER = ChatRenderer("")


def _parse(body, is_chat=False):
    return parse(body, is_chat=is_chat, renderer=RENDERER, default_max_tokens=16, model="m")


def test_completion_body_maps_to_the_batchers_fields():
    job = _parse({"prompt": "hi", "max_tokens": 7, "stop": "\n", "user": "acme", "stream": True})
    assert (job.prompt, job.max_tokens, job.stops, job.tenant_id, job.is_stream, job.model) == (
        "hi", 7, ("\n",), "acme", True, "m")
    assert _parse({"prompt": ["one"]}).max_tokens == 16


def test_chat_messages_are_rendered_as_chatml_without_a_template():
    job = _parse({"messages": [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": [{"type": "text", "text": "你好"}]}],
                  "max_completion_tokens": 5}, is_chat=True)
    assert job.prompt == chatml([("system", "Be brief."), ("user", "你好")])
    assert job.prompt.endswith("<|im_start|>assistant\n") and job.max_tokens == 5


@pytest.mark.parametrize(("body", "is_chat", "param"), [
    ({"prompt": "x", "max_tokens": 0}, False, "max_tokens"),
    ({"prompt": "x", "max_tokens": "many"}, False, "max_tokens"),
    ({}, False, "prompt"),
    ({"prompt": ["a", "b"]}, False, "prompt"),
    ({"prompt": "   "}, False, "prompt"),
    ({"prompt": "x", "n": 2}, False, "n"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, False, "stop"),
    ({"messages": []}, True, "messages"),
    ({"messages": [{"content": "no role"}]}, True, "messages.0.role"),
    ({"prompt": "x", "echo": True}, False, "echo"),
])
def test_bad_bodies_name_their_field(body, is_chat, param):
    with pytest.raises(BadRequest) as raised:
        _parse(body, is_chat)
    assert raised.value.param == param and raised.value.message.startswith(param)


def test_stop_sequence_cuts_before_it_even_across_deltas():
    matcher = StopMatcher(["END", "\n\n"])
    out = [matcher.feed(d) for d in ["abc E", "N", "xy", "z\n", "\nmore"]]
    assert "".join(out) == "abc ENxyz" and matcher.is_stopped
    assert matcher.feed("after") == "" and matcher.finish() == ""


@given(text=st.text(alphabet="abXY\n", max_size=60), cuts=st.lists(st.integers(0, 60), max_size=8))
def test_stop_matcher_equals_cutting_the_whole_text(text, cuts):
    stops = ["XY", "\n\n"]
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    matcher = StopMatcher(stops)
    sent = "".join(matcher.feed(text[a:b]) for a, b in zip(bounds, bounds[1:])) + matcher.finish()
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    assert sent == (text[:min(found)] if found else text)


class _Error(grpc.aio.AioRpcError):
    def __init__(self, code, details, trailers=()):
        super().__init__(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers), details)


@pytest.mark.parametrize(("error", "status", "param", "retry_after"), [
    (_Error(grpc.StatusCode.INVALID_ARGUMENT, "prompt.max_new_tokens: must be <= 512"), 400, "max_tokens", None),
    (_Error(grpc.StatusCode.UNAUTHENTICATED, "send a key"), 401, None, None),
    (_Error(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full", [("retry-after-s", "1.200")]), 429, None, "2"),
    (_Error(grpc.StatusCode.RESOURCE_EXHAUSTED, "needs more KV memory than any worker has"), 400, None, None),
    (_Error(grpc.StatusCode.UNAVAILABLE, "draining"), 503, None, None),
    (_Error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"), 504, None, None),
])
def test_batcher_statuses_become_openai_errors(error, status, param, retry_after):
    got_status, body, headers = from_rpc_error(error, is_chat=False)
    assert got_status == status and body["error"]["param"] == param
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert headers.get("Retry-After") == retry_after
