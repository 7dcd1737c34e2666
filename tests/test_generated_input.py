"""Generated bad input (hypothesis): whatever a client sends, every server answers with a valid
stream or JSON, or an OpenAI-shaped 4xx — never a 500, a traceback or HTML — and forwards nothing
off the allow-list.

The number of generated cases, which the README quotes, is printed at the end of the run.
"""

import json
import socket

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import MESSAGE_KEYS, OPENAI_PARAMS, load_fixture, open_raw_stream, post_chat, read_sse

CASES = {"count": 0}
SETTINGS = settings(max_examples=120, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12)
messages = st.one_of(
    json_values,
    st.lists(st.one_of(
        json_values,
        st.fixed_dictionaries(
            {"role": st.one_of(
                st.sampled_from(["user", "assistant", "system", "tool", "function"]), json_values)},
            optional={"content": st.one_of(st.text(max_size=200), json_values),
                      "tool_calls": json_values, "tool_call_id": json_values, "name": json_values,
                      "metadata": json_values, "confidence": json_values})),
        max_size=6))
bodies = st.fixed_dictionaries({}, optional={
    "model": st.one_of(st.text(max_size=30), json_values), "messages": messages,
    "stream": st.one_of(st.booleans(), json_values), "temperature": json_values,
    "max_tokens": json_values, "tools": json_values, "tool_choice": json_values,
    "call": json_values, "customer": json_values, "phoneNumber": json_values,
    "metadata": json_values, "timestamp": json_values,
}).flatmap(lambda body: st.dictionaries(st.text(max_size=12), json_values, max_size=3).map(
    lambda extra: {**extra, **body}))


# Text of any code point, lone surrogates ('\ud800': not valid Unicode) included; JSON carries them.
any_text = st.text(st.characters(codec=None, exclude_categories=()), max_size=40) | st.builds(
    lambda head, surrogate, tail: head + surrogate + tail, st.text(max_size=12),
    st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), st.text(max_size=12))
caller_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | any_text,
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.sampled_from(["id", "number", "customer", "name", "sipUri"]) | any_text,
                      children, max_size=4),
    max_leaves=10)
field = any_text | caller_values
customer = caller_values | st.fixed_dictionaries({}, optional={"number": field, "name": field})
caller_fields = st.fixed_dictionaries({}, optional={
    "call": caller_values | st.fixed_dictionaries({}, optional={"id": field,
                                                                "customer": customer}),
    "customer": customer})


def assert_valid_answer(response, fake):
    """The invariant every generated case must keep."""
    CASES["count"] += 1
    text = response.text
    assert response.status_code in (200, 400, 413), (response.status_code, text[:300])
    for leak in ("Traceback", "<html", "<!doctype", 'File "', "/site-packages/"):
        assert leak.lower() not in text.lower()
    if response.status_code == 200 and response.headers["Content-Type"].startswith(
            "text/event-stream"):
        events, done = read_sse(text)
        assert done and all("choices" in event or "error" in event for event in events)
    elif response.status_code == 200:
        assert response.json()["object"] == "chat.completion"
    else:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    for body in fake.chat_bodies():
        if "You clean up phone-call transcripts" in json.dumps(body.get("messages", [""])[0]):
            continue
        assert set(body) <= OPENAI_PARAMS
        assert all(set(message) <= MESSAGE_KEYS for message in body["messages"])


@SETTINGS
@given(body=bodies)
def test_generated_bodies(server, fake, body):
    fake.reset()
    assert_valid_answer(post_chat(server, body, stream=False), fake)


@SETTINGS
@given(fields=caller_fields)
def test_generated_caller_fields_leave_the_call_working(start_server, fake, fields):
    """openai-advanced reads the caller's number and the call id for memory: whatever they hold, the
    call is answered in full (without memory for that caller if need be), twice in a row."""
    server = start_server("openai-advanced")
    body = {**load_fixture("first-turn.json"), "stream": True}
    body.pop("call"), body.pop("customer")
    body.update(fields)
    for _ in range(2):
        fake.reset()
        response = post_chat(server, body, stream=False)
        assert_valid_answer(response, fake)
        assert response.status_code == 200 and "error" not in response.text
        assert read_sse(response.text)[0], "an answer, not only [DONE]"


@SETTINGS
@given(data=st.binary(max_size=300), content_type=st.sampled_from(
    ["application/json", "application/json; charset=utf-8", "text/plain", "",
     "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
     "application/json; charset=latin-1"]))
def test_generated_bytes_and_content_types(server, fake, data, content_type):
    fake.reset()
    response = post_chat(server, data, headers={"Content-Type": content_type}, stream=False)
    assert_valid_answer(response, fake)


@SETTINGS
@given(headers=st.dictionaries(
    st.sampled_from(["Authorization", "X-Vapi-Secret", "Accept", "Accept-Encoding",
                     "X-Forwarded-For", "Cookie", "Transfer-Encoding-Hint", "X-Call-Id"]),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126),
            max_size=60).map(str.strip),
    max_size=4))
def test_generated_headers(server, fake, headers):
    fake.reset()
    response = post_chat(server, load_fixture("first-turn.json"), headers=headers, stream=False)
    assert_valid_answer(response, fake)


@pytest.mark.parametrize("raw", [
    b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "messages": "dup"}',
    b'{"model": "m", "messages": "dup", "messages": [{"role": "user", "content": "hi"}], '
    b'"stream": true}',
    b'{"model": "m", "model": 5, "messages": [{"role": "user", "content": "hi"}]}',
    b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}], "stream": true}',
    b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}',
    b'{"model": "m", "messages": [' + b'{"role": "user", "content": "x"},' * 5000
    + b'{"role": "user"}]}',
    b'{"model": "m", "messages": [{"role": "user", "content": "' + b"y" * 900_000 + b'"}]}',
    b'{"a":' * 5000 + b"1" + b"}" * 5000,
    b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": 5, "stream": true}',
    b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": "x", '
    b'"stream": true}',
    b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], '
    b'"tools": [{"function": 3}, 7]}',
    b'{"model": "m", "messages": [{"role": "user", '
    b'"content": [1, {"text": 2}, {"type": "text"}]}]}',
    b'{"model": "m", "messages": [{"role": "system", "content": null}, '
    b'{"role": "user", "content": "hi"}]}',
    b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], '
    b'"call": {"customer": {"number": 5}}}',
], ids=["duplicate-messages", "duplicate-messages-last-valid", "duplicate-model", "lone-surrogate",
        "nan", "5001-messages", "900-KB-string", "deep-object", "tools-number", "tools-string",
        "tools-odd-items", "odd-content-parts", "null-system-prompt", "number-not-a-string"])
def test_awkward_bodies(server, fake, raw):
    assert_valid_answer(post_chat(server, raw, stream=False), fake)


@pytest.mark.parametrize("declared, sent", [(200, 100), (50, 120), (10**9, 10)],
                         ids=["longer-than-sent", "shorter-than-sent", "huge"])
def test_content_length_that_lies(server, fake, declared, sent):
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "z" * 200}]})
    body = body.encode()[:sent]
    with open_raw_stream(server, body, content_length=declared,
                         headers=["Connection: close"]) as sock:
        sock.shutdown(socket.SHUT_WR)  # the client sends nothing more
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status = int(answer.split(b" ", 2)[1]) if answer else None
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert status in (400, 413), answer[:300]
    assert b"Traceback" not in answer and b"<html" not in payload.lower()
    assert fake.chat_bodies() == []
    assert requests.get(server.url + "/health", timeout=5).status_code == 200
