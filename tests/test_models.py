"""Every model works with Vapi's body (temperature 0.5, max_tokens 250 on every turn): OpenAI's
reasoning models get their parameters right in the first request, a parameter any provider refuses
costs one extra request once per worker and model, and an answer without words is named in the log.
The stand-in refuses what OpenAI refuses, with OpenAI's errors (fake_llm.py)."""

import uuid

import pytest

from conftest import (load_fixture, post_chat, read_sse, streamed_text, tool_then_answer,
                      wait_for)
from fake_llm import error_body


def vapi_turn(model, stream=True):
    """Vapi's first-turn body, as sent with its defaults, for `model`, with a call id of its own."""
    body = load_fixture("first-turn.json")
    assert body["temperature"] == 0.5 and body["max_tokens"] == 250, "Vapi's defaults"
    body.update(model=model, stream=stream)
    body["call"]["id"] = f"call-{uuid.uuid4()}"
    return body


def answer(server, body):
    """(status, the words heard) for one turn, streamed or not."""
    response = post_chat(server, body)
    if response.status_code != 200:
        return response.status_code, None
    if body["stream"]:
        events, done = read_sse(response)
        assert done, "the stream ends with [DONE]"
        return 200, streamed_text(events)
    return 200, response.json()["choices"][0]["message"]["content"]


def log_line(server, call_id):
    assert wait_for(lambda: server.log_lines(call_id), 3), server.log()
    return server.log_lines(call_id)[-1]


def unique(prefix):
    """A model name no other test used: what a worker learned stays with it for the session."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "stream-false"])
@pytest.mark.parametrize("model", ["gpt-5-mini", "openai/gpt-5.1", "o4-mini"])
def test_a_reasoning_model_answers_vapis_body_in_one_request(start_server, fake, folder, model,
                                                             stream):
    server = start_server(folder, OPENAI_REASONING_EFFORT="low")
    status, words = answer(server, vapi_turn(model, stream))
    assert status == 200 and words.startswith("You said:")
    [request] = fake.chat_bodies()  # right the first time: no request refused
    assert request["max_completion_tokens"] == 250 and request["reasoning_effort"] == "low"
    assert not {"max_tokens", "temperature"} & set(request)


def test_other_models_get_the_request_as_vapi_sent_it(server, fake):
    status, words = answer(server, vapi_turn("gpt-4o"))
    assert status == 200 and words
    [request] = fake.chat_bodies()
    assert request["temperature"] == 0.5 and request["max_tokens"] == 250
    assert not {"max_completion_tokens", "reasoning_effort"} & set(request)


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "stream-false"])
@pytest.mark.parametrize("refused, sent_as", [("temperature", None),
                                              ("max_tokens", "max_completion_tokens")],
                         ids=["left-out", "renamed"])
def test_a_refused_parameter_costs_one_extra_request_once(server, fake, refused, sent_as, stream):
    model = unique("provider-model")
    fake.refusals = {model: {refused: sent_as}}
    assert answer(server, vapi_turn(model, stream))[1].startswith("You said:")
    first, again = fake.chat_bodies()
    assert first[refused] is not None and refused not in again
    if sent_as:
        assert again[sent_as] == first[refused]
    assert {k: v for k, v in again.items() if k not in (refused, sent_as)} == \
        {k: v for k, v in first.items() if k not in (refused, sent_as)}, "nothing else changed"

    fake.requests.clear()
    assert answer(server, vapi_turn(model, stream))[1].startswith("You said:")
    [later] = fake.chat_bodies()  # learned: right the first time from now on
    assert refused not in later
    warnings = server.log_lines(f"model {model!r} refuses {refused!r}")
    assert len(warnings) == 1 and "WARNING" in warnings[0]


def test_a_reasoning_effort_the_model_refuses_is_dropped_once(start_server, fake, folder):
    # Only this test runs with "minimal" (gpt-5's value, not gpt-5.1's): its workers learn here.
    server = start_server(folder, OPENAI_REASONING_EFFORT="minimal")
    model = "gpt-5.1"
    assert answer(server, vapi_turn(model))[1].startswith("You said:")
    first, again = fake.chat_bodies()
    assert first["reasoning_effort"] == "minimal" and "reasoning_effort" not in again
    assert server.log_lines(f"model {model!r} refuses 'reasoning_effort' (unsupported_value)")
    fake.requests.clear()
    assert answer(server, vapi_turn(model))[1].startswith("You said:")
    assert len(fake.chat_bodies()) == 1


@pytest.mark.parametrize("error", [
    error_body("This model's maximum context length is 128000 tokens.",
               code="context_length_exceeded", param="messages"),
    error_body("Unsupported parameter: 'tools' is not supported with this model.",
               code="unsupported_parameter", param="tools"),
    error_body("Unsupported parameter: 'seed' is not supported with this model.",
               code="unsupported_parameter", param="seed"),  # not in the request
], ids=["context-length", "tools", "not-sent"])
def test_any_other_400_goes_back_to_vapi_and_is_not_retried(server, fake, error):
    fake.script({"status": 400, "error": error})
    body = vapi_turn(unique("provider-model"))
    response = post_chat(server, body)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == error["error"]["code"]
    assert len(fake.chat_bodies()) == 1


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "stream-false"])
def test_an_answer_without_words_is_named_in_the_log(start_server, fake, folder, stream):
    server = start_server(folder)  # no OPENAI_REASONING_EFFORT: gpt-5's default effort, medium
    body = vapi_turn("gpt-5-mini", stream)
    status, words = answer(server, body)
    assert status == 200 and not words  # the budget of 250 tokens went on reasoning
    assert "no_words=length" in log_line(server, body["call"]["id"])
    assert any("WARNING" in line and "Max Tokens" in line and "OPENAI_REASONING_EFFORT" in line
               for line in server.log_lines("'gpt-5-mini' used its whole token budget"))


def test_an_empty_stream_is_named_in_the_log(start_server, fake, folder):
    server = start_server(folder)
    fake.script({"tokens": [], "text": ""})
    body = vapi_turn("gpt-4o")
    assert answer(server, body) == (200, "")
    assert "no_words=stop" in log_line(server, body["call"]["id"])


def test_a_whole_answer_has_no_no_words_field(server, fake):
    body = vapi_turn("gpt-4o")
    answer(server, body)
    assert "no_words" not in log_line(server, body["call"]["id"])


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "stream-false"])
def test_every_tool_round_of_a_reasoning_model_is_right_the_first_time(start_server, fake,
                                                                        stream):
    server = start_server("openai-advanced", OPENAI_REASONING_EFFORT="low")
    fake.responder = tool_then_answer("local_time", "{}", "It is just after nine.")
    status, words = answer(server, vapi_turn("gpt-5-mini", stream))
    assert status == 200 and words.endswith("It is just after nine.")
    rounds = fake.chat_bodies()
    assert len(rounds) == 2 and rounds[1]["messages"][-1]["role"] == "tool"
    assert all(r["max_completion_tokens"] == 250 and "temperature" not in r for r in rounds)
