"""The OpenAI wire format on its own (the server tests drive it end to end): strict request models and their 400s,
SSE framing, and the Prometheus text of /metrics checked against the counts that went in."""

import json

import pytest
from pydantic import ValidationError

from chatsmith.protocol import (
    TTFT_BUCKETS,
    APIError,
    ChatRequest,
    Metrics,
    endpoint_label,
    invalid_body,
    sse,
    stream_chunk,
)


def bad(body: dict) -> APIError:
    with pytest.raises(ValidationError) as e:
        ChatRequest.model_validate(body)
    return invalid_body(e.value, ChatRequest)


MSG = [{"role": "user", "content": "hi"}]


def test_defaults_nulls_and_no_coercion():
    req = ChatRequest.model_validate({"messages": MSG, "temperature": None, "stop": "x", "unknown_key": 1})
    assert req.temperature is None and req.stop == "x" and req.n == 1 and not req.stream  # None: the server's default
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


def samples(text: str) -> dict:
    """{(sample name, sorted labels): value} from the exposition, parsed by prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(x.name, tuple(sorted(x.labels.items()))): x.value
            for family in text_string_to_metric_families(text) for x in family.samples}


def test_metrics_text_matches_what_was_counted():
    m = Metrics()
    for _ in range(3):
        m.request("/v1/chat/completions", 200)
    m.request("/v1/chat/completions", 429)
    m.cancelled("disconnect", 2)
    m.prompt_tokens(9)
    m.tokens(5)
    m.tokens(7)
    for s in (0.001, TTFT_BUCKETS[-1] * 10):
        m.ttft(s)
    values = samples(m.render(waiting=4, live=2, in_flight=6).decode())
    chat = ("endpoint", "/v1/chat/completions")
    assert values["chatsmith_requests_total", (chat, ("status", "200"))] == 3
    assert values["chatsmith_requests_total", (chat, ("status", "429"))] == 1
    assert values["chatsmith_cancelled_total", (("reason", "disconnect"),)] == 2
    assert values["chatsmith_completion_tokens_total", ()] == 12 and values["chatsmith_prompt_tokens_total", ()] == 9
    assert values["chatsmith_queue_depth", ()] == 4 and values["chatsmith_live_sequences", ()] == 2
    assert values["chatsmith_in_flight_sequences", ()] == 6
    assert values["chatsmith_time_to_first_token_seconds_count", ()] == 2
    assert values["chatsmith_time_to_first_token_seconds_bucket", (("le", str(TTFT_BUCKETS[0])),)] == 1
    assert values["chatsmith_time_to_first_token_seconds_bucket", (("le", "+Inf"),)] == 2  # cumulative
    assert values["chatsmith_tokens_per_second", ()] == pytest.approx(12 / m.window)


def test_metric_labels_come_from_a_fixed_set():
    """Regression: a 401 was counted under the raw request path, unescaped, so a client could write sample lines."""
    forged = '/v1/x",status="200"} 1e9 #'
    assert endpoint_label(forged) == "other" and endpoint_label("/v1/models/tiny") == "/v1/models"
    assert endpoint_label("/v1/chat/completions/extra") == "other"
    m = Metrics()
    for k in range(50):
        m.request(f"/random/{k}", 404)
    m.request(forged, 401)
    m.cancelled('x"} 1', 1)
    text = m.render(0, 0, 0).decode()
    values = samples(text)
    labels = {dict(k[1]).get("endpoint") for k in values if k[0] == "chatsmith_requests_total"}
    assert labels == {"other"} and 'status="200"' not in text and "1e9" not in text
    assert values["chatsmith_requests_total", (("endpoint", "other"), ("status", "404"))] == 50
    assert {dict(k[1])["reason"] for k in values if k[0] == "chatsmith_cancelled_total"} == {"other"}
