"""The OpenAI wire format on its own (the server tests drive it end to end): strict request models and their 400s,
SSE framing, and the Prometheus text of /metrics checked against the counts that went in."""

import json

import pytest
from pydantic import ValidationError

from chatsmith.protocol import TTFT_BUCKETS, APIError, ChatRequest, Metrics, invalid_body, sse, stream_chunk


def bad(body: dict) -> APIError:
    with pytest.raises(ValidationError) as e:
        ChatRequest.model_validate(body)
    return invalid_body(e.value, ChatRequest)


MSG = [{"role": "user", "content": "hi"}]


def test_defaults_nulls_and_no_coercion():
    req = ChatRequest.model_validate({"messages": MSG, "temperature": None, "stop": "x", "unknown_key": 1})
    assert req.temperature == 1.0 and req.stop == "x" and req.n == 1 and not req.stream
    err = bad({"messages": MSG, "temperature": "0.5"})  # a string is not a number
    assert err.status == 400 and err.param == "temperature"
    assert bad({"messages": MSG, "n": True}).param == "n"  # nor is a bool


@pytest.mark.parametrize("body, param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ({"messages": MSG, "temperature": 2.5}, "temperature"),
    ({"messages": MSG, "top_p": -0.1}, "top_p"),
    ({"messages": MSG, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": MSG, "max_tokens": 0}, "max_tokens"),
    ({"messages": MSG, "top_logprobs": 21}, "top_logprobs"),
])
def test_invalid_values_name_their_field_without_paths(body, param):
    err = bad(body)
    body_json = err.body()
    assert err.status == 400 and set(body_json["error"]) == {"message", "type", "param", "code"}
    assert body_json["error"]["param"] == param and body_json["error"]["type"] == "invalid_request_error"
    assert "/" not in body_json["error"]["message"] and "Traceback" not in body_json["error"]["message"]


def test_sse_framing_and_chunk_shape():
    event = stream_chunk({"id": "c1", "object": "chat.completion.chunk"}, True, 0, {"content": "你好"}, usage=True)
    assert event.startswith("data: ") and event.endswith("\n\n")
    data = json.loads(event[len("data: "):])
    assert data == {"id": "c1", "object": "chat.completion.chunk", "usage": None,
                    "choices": [{"index": 0, "delta": {"content": "你好"}, "logprobs": None, "finish_reason": None}]}
    assert "你好" in sse({"x": "你好"})  # raw UTF-8, not \\u escapes


def test_metrics_text_matches_what_was_counted():
    m = Metrics()
    m.requests[("chat", 200)] += 3
    m.requests[("chat", 429)] += 1
    m.cancelled["disconnect"] += 2
    m.tokens(5)
    m.tokens(7)
    for s in (0.001, TTFT_BUCKETS[-1] * 10):
        m.ttft(s)
    text = m.render(waiting=4, live=2, in_flight=6)
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert values['chatsmith_requests_total{endpoint="chat",status="200"}'] == "3"
    assert values['chatsmith_requests_total{endpoint="chat",status="429"}'] == "1"
    assert values['chatsmith_cancelled_total{reason="disconnect"}'] == "2"
    assert values["chatsmith_completion_tokens_total"] == "12"
    assert values["chatsmith_queue_depth"] == "4" and values["chatsmith_live_sequences"] == "2"
    assert values["chatsmith_time_to_first_token_seconds_count"] == "2"
    assert values[f'chatsmith_time_to_first_token_seconds_bucket{{le="{TTFT_BUCKETS[0]}"}}'] == "1"
    assert values['chatsmith_time_to_first_token_seconds_bucket{le="+Inf"}'] == "2"  # cumulative
    assert float(values["chatsmith_tokens_per_second"]) == pytest.approx(12 / m.window)
