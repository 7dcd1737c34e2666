"""openai-advanced with a second provider: fall back on failure, hedge on slowness, never switch
after the first byte. Two stand-in providers: `fake` is the primary, `second` the fallback."""

import re
import time

import pytest

from conftest import (FOLDERS, free_port, load_fixture, open_raw_stream, post_chat, read_sse,
                      streamed_text, time_to_first_words, wait_for)
from fake_llm import FakeLLM

pytestmark = pytest.mark.skipif("openai-advanced" not in FOLDERS, reason="no folder yet")
FALLBACK_WORDS = "The fallback speaking."


@pytest.fixture(scope="session")
def second():
    server = FakeLLM().start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def fresh_second(second):
    second.reset()
    second.responder = lambda body: {"text": FALLBACK_WORDS}
    yield


def with_fallback(start_server, second, **env):
    """openai-advanced with `second` as its fallback; hedging after 300 ms unless `env` says."""
    return start_server("openai-advanced", FALLBACK_BASE_URL=second.base_url,
                        FALLBACK_API_KEY="sk-fallback-key", FALLBACK_MODEL="fallback-model",
                        **{"HEDGE_AFTER_MS": "300", "OPENAI_TIMEOUT_SECONDS": "2", **env})


def log_line(server, call_id):
    """The log line of one call."""
    assert wait_for(lambda: server.log_lines(call_id), 3)
    return server.log_lines(call_id)[-1]


def call(text="Are you open on Saturday?"):
    body = load_fixture("first-turn.json")
    body["messages"][-1]["content"] = text
    body["call"]["id"] = f"call-{time.monotonic_ns()}"
    return body


# --- fall back on failure -------------------------------------------------------------------------

@pytest.mark.parametrize("plan", [{"status": 500}, {"status": 503}, {"status": 429},
                                  {"status": 401}, {"hang": True}, {"headers_delay": 10}],
                         ids=["500", "503", "429", "401", "no-answer", "no-headers"])
def test_a_primary_failure_before_the_first_token_gets_the_fallbacks_answer(start_server, fake,
                                                                             second, plan):
    server = with_fallback(start_server, second, HEDGE_AFTER_MS="0", OPENAI_TIMEOUT_SECONDS="1")
    fake.script(plan)
    body = call()
    response = post_chat(server, body)
    events, done = read_sse(response)
    assert response.status_code == 200 and done
    assert streamed_text(events) == FALLBACK_WORDS
    [request] = second.chat_bodies()
    assert request["model"] == "fallback-model" and request["messages"][-1] == body["messages"][-1]
    assert second.requests[0]["headers"]["authorization"] == "Bearer sk-fallback-key"
    assert "provider=fallback:failure" in log_line(server, body["call"]["id"])
    assert len(fake.chat_bodies()) == 1, "the primary is not retried: the fallback is asked at once"


def test_an_unreachable_primary_gets_the_fallbacks_answer(start_server, second):
    server = with_fallback(start_server, second,
                           OPENAI_BASE_URL=f"http://127.0.0.1:{free_port()}/v1")
    events, done = read_sse(post_chat(server, call()))
    assert done and streamed_text(events) == FALLBACK_WORDS


def test_when_both_fail_the_caller_gets_the_fallbacks_error(start_server, fake, second):
    server = with_fallback(start_server, second)
    fake.script({"status": 500})
    second.responder = None
    second.script({"status": 429, "error": {"error": {"message": "Fallback rate limit",
                                                       "type": "requests", "param": None,
                                                       "code": "rate_limit"}}})
    response = post_chat(server, call())
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "rate_limit"
    assert "Fallback rate limit" in response.json()["error"]["message"]


def test_stream_false_falls_back_on_failure(start_server, fake, second):
    server = with_fallback(start_server, second)
    fake.script({"status": 503})
    response = post_chat(server, {**call(), "stream": False})
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == FALLBACK_WORDS


def test_a_tool_round_falls_back_too(start_server, fake, second):
    server = with_fallback(start_server, second)

    def primary(body):
        if body["messages"][-1]["role"] == "tool":
            return {"status": 500}  # the second round fails at the primary
        return {"tool_calls": [{"name": "local_time", "arguments": "{}"}]}

    fake.responder = primary
    body = call("What time is it there?")
    events, done = read_sse(post_chat(server, body))
    assert done and streamed_text(events) == "One moment while I check that. " + FALLBACK_WORDS
    assert second.chat_bodies()[0]["messages"][-1]["role"] == "tool"
    assert "provider=primary+fallback:failure" in log_line(server, body["call"]["id"])


# --- hedge on slowness ----------------------------------------------------------------------------

@pytest.mark.parametrize("plan", [{"ttft": 6}, {"tokens": ["Late", " words."], "token_delay": 6}],
                         ids=["silent", "role-chunk-then-silent"])
def test_a_slow_primary_is_hedged(start_server, fake, second, plan):
    server = with_fallback(start_server, second, OPENAI_TIMEOUT_SECONDS="10")
    fake.script(plan)
    second.ttft = 0.2
    body = call()
    first, text = time_to_first_words(server, body)
    assert text == FALLBACK_WORDS
    assert 0.3 + 0.2 <= first < 0.3 + 0.2 + 1.0, "HEDGE_AFTER_MS plus the fallback's own time"
    [primary] = fake.streams
    assert primary.client_closed and not primary.finished, "the primary's stream was closed"
    fallback_started = second.streams[0].opened_at + 0.2
    assert primary.closed_at - fallback_started < 0.5, "closed as soon as the fallback answered"
    assert "provider=fallback:hedge" in log_line(server, body["call"]["id"])


def test_a_primary_that_answers_after_the_hedge_but_first_wins(start_server, fake, second):
    server = with_fallback(start_server, second)
    fake.script({"ttft": 0.6})
    second.ttft = 3
    body = call()
    first, text = time_to_first_words(server, body)
    assert text == "You said: Are you open on Saturday?"
    assert wait_for(lambda: second.streams and not second.streams[0].open, 2)
    assert second.streams[0].client_closed, "the fallback's stream was closed"
    assert "provider=primary:hedge" in log_line(server, body["call"]["id"])


def test_a_fast_primary_never_calls_the_fallback(start_server, fake, second):
    server = with_fallback(start_server, second)
    fake.ttft = 0.1
    body = call()
    events, done = read_sse(post_chat(server, body))
    assert done and streamed_text(events) == "You said: Are you open on Saturday?"
    assert second.requests == []
    assert re.search(r"provider=primary( |$)", log_line(server, body["call"]["id"]))


def test_never_a_switch_after_the_first_byte(start_server, fake, second):
    server = with_fallback(start_server, second)
    fake.script({"tokens": ["One", " two", " three", " four"], "cut_after": 3})
    events, done = read_sse(post_chat(server, call()))
    assert done and streamed_text(events) == "One two"
    assert events[-1]["error"]["code"] == "provider_unavailable"
    assert second.requests == [], "a caller never hears a second answer spliced onto the first"


def test_a_hang_up_during_a_hedge_closes_both_streams(start_server, fake, second):
    server = with_fallback(start_server, second, OPENAI_TIMEOUT_SECONDS="10")
    fake.script({"ttft": 6})
    second.ttft = 6
    sock = open_raw_stream(server, call())
    assert wait_for(lambda: second.streams, 3), "the hedge reached the fallback"
    hung_up_at = time.monotonic()
    sock.close()
    assert wait_for(lambda: not fake.open_streams() and not second.open_streams(), 2)
    for stream in fake.streams + second.streams:
        assert stream.client_closed and stream.closed_at - hung_up_at < 1.0


def test_without_a_fallback_nothing_changes(start_server, fake, second):
    server = start_server("openai-advanced")
    fake.script({"status": 500})
    assert post_chat(server, call()).status_code == 502
    body = call()
    read_sse(post_chat(server, body))
    assert second.requests == [] and "provider=" not in log_line(server, body["call"]["id"])


# --- answers without words, and parameters the fallback refuses -----------------------------------

@pytest.mark.parametrize("stream", [True, False], ids=["stream", "stream-false"])
def test_an_answer_without_words_gets_the_fallbacks_answer(start_server, fake, second, stream):
    server = with_fallback(start_server, second, HEDGE_AFTER_MS="0")
    body = {**call(), "model": "gpt-5-mini", "stream": stream}  # medium effort: 250 is too few
    response = post_chat(server, body)
    if stream:
        events, done = read_sse(response)
        assert done and streamed_text(events) == FALLBACK_WORDS
    else:
        assert response.json()["choices"][0]["message"]["content"] == FALLBACK_WORDS
    [primary] = fake.chat_bodies()
    assert primary["max_completion_tokens"] == 250, "the primary answered, with no words"
    assert len(second.chat_bodies()) == 1
    assert "provider=fallback:failure" in log_line(server, body["call"]["id"])


def test_a_parameter_the_fallback_refuses_is_learned_there_too(start_server, fake, second):
    server = start_server("openai-advanced", FALLBACK_BASE_URL=second.base_url,
                          FALLBACK_API_KEY="sk-fallback-key", HEDGE_AFTER_MS="0")
    model = f"shared-model-{time.monotonic_ns()}"  # the fallback gets the turn's own model name
    second.refusals = {model: {"temperature": None}}
    for turn in range(2):
        fake.script({"status": 503})
        second.requests.clear()
        events, done = read_sse(post_chat(server, {**call(), "model": model}))
        assert done and streamed_text(events) == FALLBACK_WORDS
        sent = second.chat_bodies()
        assert len(sent) == (2 if turn == 0 else 1) and "temperature" not in sent[-1]
    assert [request["temperature"] for request in fake.chat_bodies()] == [0.5, 0.5], \
        "the primary did not refuse it: it keeps getting it"
