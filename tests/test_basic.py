"""What is particular to basic/: the whole answer first, then sent as the stream Vapi expects."""

import json

import pytest

from conftest import load_fixture, post_chat, read_sse, run_at_once, streamed_text


@pytest.fixture
def server(start_server):
    return start_server("basic")


def test_whole_answer_as_role_content_finish_done(server, fake):
    fake.script({"text": "Sure thing! Do you prefer a morning or an afternoon?",
                 "token_delay": 0.01})
    response = post_chat(server, load_fixture("first-turn.json"))
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events, done = read_sse(response)
    assert done
    assert [event["choices"][0]["delta"] for event in events] == [
        {"role": "assistant", "content": ""},
        {"content": "Sure thing! Do you prefer a morning or an afternoon?"},
        {},
    ]
    assert [event["choices"][0]["finish_reason"] for event in events] == [None, None, "stop"]
    assert len({event["id"] for event in events}) == 1
    assert fake.chat_bodies()[0].get("stream") in (None, False), \
        "basic asks the provider for the whole answer"


def test_tool_calls_in_one_chunk_with_their_finish_reason(server, fake):
    fake.script({"tool_calls": [
        {"name": "endCall", "arguments": "{}"},
        {"name": "transferCall", "arguments": '{"destination":"+15555550188"}'}]})
    events, done = read_sse(post_chat(server, load_fixture("with-vapi-tools.json")))
    assert done
    [tool_event] = [event for event in events if "tool_calls" in event["choices"][0]["delta"]]
    calls = tool_event["choices"][0]["delta"]["tool_calls"]
    assert [(c["index"], c["function"]["name"]) for c in calls] == [(0, "endCall"),
                                                                     (1, "transferCall")]
    assert json.loads(calls[1]["function"]["arguments"]) == {"destination": "+15555550188"}
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_fifty_concurrent_calls_complete_without_mixing(start_server, fake):
    server = start_server("basic", WEB_CONCURRENCY="2")
    fake.ttft = 1.0  # long enough for all 50 to wait on the provider at once
    results = {}

    def call(i):
        body = {**load_fixture("first-turn.json"),
                "messages": [{"role": "user", "content": f"caller {i}"}]}
        events, done = read_sse(post_chat(server, body, timeout=30))
        results[i] = streamed_text(events) if done else None

    errors = run_at_once(call, range(50))
    assert errors == []
    assert results == {i: f"You said: caller {i}" for i in range(50)}
    assert max(s.opened_at for s in fake.streams) < min(s.closed_at for s in fake.streams)
