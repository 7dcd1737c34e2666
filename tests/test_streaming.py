"""What the streaming servers (openai-sse, openai-advanced) add: a live relay that stops when
the caller goes."""

import time

import openai
import pytest

from conftest import (STREAMING_FOLDERS, hang_up, load_fixture, open_raw_stream, post_chat,
                      read_sse, run_at_once, streamed_text, wait_for)


@pytest.fixture(params=STREAMING_FOLDERS)
def folder(request):
    return request.param


def test_first_chunk_arrives_before_the_provider_finishes(server, fake):
    fake.script({"tokens": ["One", " two", " three", " four", " five", " six"], "token_delay": 0.3})
    client = openai.OpenAI(base_url=server.url, api_key="x", max_retries=0)
    started = time.monotonic()
    stream = client.chat.completions.create(model="m", stream=True,
                                            messages=[{"role": "user", "content": "count"}])
    first_text_at = None
    for chunk in stream:
        if first_text_at is None and chunk.choices and chunk.choices[0].delta.content:
            first_text_at = time.monotonic()
    [provider_stream] = fake.streams
    assert provider_stream.finished
    assert first_text_at < provider_stream.closed_at - 1.0, \
        "the first words must not wait for the last"
    assert first_text_at - started < 1.0


def test_hang_up_mid_stream_closes_the_provider_stream(server, fake):
    assert hang_up(server, fake) < 1.0
    assert fake.streams[-1].chunks_sent < 50


@pytest.mark.parametrize("plan", [{"ttft": 5}, {"headers_delay": 5}],
                         ids=["model-thinking", "no-headers-yet"])
def test_hang_up_before_the_first_token_closes_the_provider_request(server, fake, plan):
    fake.script(plan)
    sock = open_raw_stream(server, load_fixture("first-turn.json"))
    assert wait_for(lambda: fake.streams, 2.0), "the request reached the provider"
    time.sleep(0.3)
    hung_up_at = time.monotonic()
    sock.close()
    assert wait_for(lambda: not fake.streams[0].open, 2.0), \
        "the provider request must not wait for the model"
    assert fake.streams[0].client_closed
    assert fake.streams[0].closed_at - hung_up_at < 2.0
    assert fake.streams[0].chunks_sent == 0


def test_server_is_healthy_after_hang_ups(server, fake):
    for _ in range(5):
        fake.script({"ttft": 5})
        sock = open_raw_stream(server, load_fixture("first-turn.json"))
        time.sleep(0.1)
        sock.close()
    assert wait_for(lambda: len(fake.streams) == 5 and not fake.open_streams(), 3.0)
    events, done = read_sse(post_chat(server, load_fixture("first-turn.json")))
    assert done and streamed_text(events).startswith("You said:")


def test_fifty_concurrent_calls_complete_without_mixing(folder, start_server, fake):
    server = start_server(folder, WEB_CONCURRENCY="2")
    fake.ttft, fake.token_delay = 1.0, 0.02  # long enough for all 50 to be open at once
    client = openai.OpenAI(base_url=server.url, api_key="x", max_retries=0, timeout=30)
    results = {}

    def call(i):
        text = f"caller {i} wants slot {i * 7}"
        stream = client.chat.completions.create(model="m", stream=True,
                                                messages=[{"role": "user", "content": text}])
        results[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    errors = run_at_once(call, range(50))
    assert errors == []
    assert results == {i: f"You said: caller {i} wants slot {i * 7}" for i in range(50)}
    assert max(s.opened_at for s in fake.streams) < min(s.closed_at for s in fake.streams), \
        "all 50 provider streams were open at the same time"


# --- failures after the first byte: one error event, then [DONE] ----------------------------------

@pytest.mark.parametrize("plan, code", [
    ({"cut_after": 3}, "provider_unavailable"),
    ({"error_event_after": 3}, None),
    ({"malformed_after": 3}, "bad_chunk"),
    ({"tokens": ["a", " b", " c", " d"], "token_delay": 3}, "provider_timeout"),
], ids=["connection-cut", "in-band-error", "malformed-chunk", "stall"])
def test_failure_mid_stream_becomes_one_error_event_then_done(folder, start_server, fake, plan,
                                                              code):
    server = start_server(folder, OPENAI_TIMEOUT_SECONDS="1")
    fake.script(plan)
    response = post_chat(server, load_fixture("first-turn.json"))
    assert response.status_code == 200
    events, done = read_sse(response)
    assert done, "a stream never just stops"
    errors = [event for event in events if "error" in event]
    assert len(errors) == 1 and events[-1] is errors[0]
    assert isinstance(errors[0]["error"]["message"], str)
    if code:
        assert errors[0]["error"]["code"] == code
    assert wait_for(lambda: not fake.open_streams(), 3.0)


def test_stream_without_done_still_ends_with_done(server, fake):
    fake.script({"text": "All good.", "no_done": True})
    events, done = read_sse(post_chat(server, load_fixture("first-turn.json")))
    assert done and streamed_text(events) == "All good."
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_provider_chunks_are_relayed_as_sent(server, fake):
    fake.script({"tokens": ["Line one\nline two", ' "quoted"', " ünïcødé"]})
    response = post_chat(server, load_fixture("first-turn.json"))
    raw = response.content.decode()
    assert raw.endswith("data: [DONE]\n\n")
    events, _ = read_sse(raw)
    assert streamed_text(events) == 'Line one\nline two "quoted" ünïcødé'
    assert all(line.startswith("data: ") for line in raw.split("\n\n") if line)

