"""Secrets and access: the bearer check in every variant, logs that never leak, and debug mode
only when asked."""

import json
import re

import pytest

from conftest import PROVIDER_KEY, load_fixture, post_chat, read_sse

BEARER_KEY = "vapi-Secret-Key-4242"


@pytest.mark.parametrize("headers, status", [
    ({}, 401),
    ({"Authorization": ""}, 401),
    ({"Authorization": "Bearer"}, 401),
    ({"Authorization": "Bearer "}, 401),
    ({"Authorization": f"Basic {BEARER_KEY}"}, 401),
    ({"Authorization": f"Token {BEARER_KEY}"}, 401),
    ({"Authorization": BEARER_KEY}, 401),
    ({"Authorization": f"Bearer {BEARER_KEY}x"}, 401),
    ({"Authorization": f"Bearer {BEARER_KEY[:-1]}"}, 401),
    ({"Authorization": f"Bearer {BEARER_KEY.lower()}"}, 401),
    ({"X-Vapi-Secret": BEARER_KEY}, 401),
    ({"X-Api-Key": BEARER_KEY}, 401),
    ({"Authorization": f"Bearer {BEARER_KEY}"}, 200),
    ({"Authorization": f"bearer {BEARER_KEY}"}, 200),
    ({"Authorization": f"BEARER {BEARER_KEY}"}, 200),
], ids=["missing", "empty", "scheme-only", "empty-token", "basic-scheme", "token-scheme",
        "no-scheme", "suffix", "prefix", "wrong-case-key", "x-vapi-secret-header",
        "x-api-key-header", "right", "lower-case-scheme", "upper-case-scheme"])
def test_bearer_variants(folder, start_server, fake, headers, status):
    server = start_server(folder, CUSTOM_LLM_API_KEY=BEARER_KEY)
    response = post_chat(server, load_fixture("first-turn.json"), headers=headers)
    assert response.status_code == status
    if status == 401:
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert BEARER_KEY not in response.text
        assert fake.requests == []
    else:
        assert read_sse(response)[1]


def exercise_every_path(server, fake):
    """Every path a request can take: a stream and JSON, bad input, a bad token, a provider
    error and a cut stream, a tool round."""
    body = load_fixture("metadata-destructured.json")
    auth = {"Authorization": f"Bearer {BEARER_KEY}"}
    read_sse(post_chat(server, body, headers=auth))
    post_chat(server, {**body, "stream": False}, headers=auth).content
    post_chat(server, {**body, "messages": []}, headers=auth).content
    post_chat(server, body, headers={"Authorization": "Bearer wrong-" + BEARER_KEY}).content
    fake.script({"status": 429, "error": {"error": {
        "message": f"Rate limit for key {PROVIDER_KEY}", "type": "requests", "param": None,
        "code": "rate_limit"}}})
    post_chat(server, body, headers=auth).content
    fake.script({"tokens": ["partial"], "cut_after": 1})
    read_sse(post_chat(server, body, headers=auth))
    fake.script({"tool_calls": [{"name": "local_time", "arguments": "{}"}]})
    read_sse(post_chat(server, body, headers=auth))
    return body


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_logs_never_leak(folder, start_server, fake, level):
    server = start_server(folder, CUSTOM_LLM_API_KEY=BEARER_KEY, LOG_LEVEL=level)
    before = len(server.log())
    body = exercise_every_path(server, fake)
    log = server.log()[before:]
    assert "status=200" in log and "status=429" in log
    secrets = [PROVIDER_KEY, BEARER_KEY, body["phoneNumber"]["twilioAuthToken"],
               body["phoneNumber"]["twilioAccountSid"]]
    conversation = [message["content"] for message in body["messages"]]
    conversation += ["book a cleaning", "Jordan Avery"]
    for line in log.splitlines():
        for secret in secrets:
            assert secret not in line, f"a secret in the log: {line[:200]}"
        if not re.search(r"\bDEBUG\b", line):
            for text in conversation:
                assert text not in line, f"conversation text at INFO or above: {line[:200]}"
    if level == "DEBUG" and folder != "basic":
        assert any(re.search(r"\bDEBUG\b", line) for line in log.splitlines()), \
            "DEBUG really was on"


def test_error_bodies_never_echo_the_provider_key(server, fake):
    fake.script({"status": 401, "error": {"error": {
        "message": f"Incorrect API key provided: {PROVIDER_KEY}", "type": "invalid_request_error",
        "param": None, "code": "invalid_api_key"}}})
    response = post_chat(server, load_fixture("first-turn.json"))
    assert response.status_code == 401
    assert PROVIDER_KEY not in response.text and "[redacted]" in response.json()["error"]["message"]


def test_debug_mode_is_off_unless_asked(folder, start_server):
    server = start_server(folder)
    assert "debug mode is ON" not in server.log()
    response = post_chat(server, b"{broken")
    assert response.status_code == 400 and "Traceback" not in response.text


@pytest.mark.parametrize("value", ["1", "true"])
def test_debug_mode_when_asked_says_so(folder, start_server, value):
    server = start_server(folder, FLASK_DEBUG=value)
    assert f"Flask debug mode is ON (FLASK_DEBUG={value})" in server.log()
    response = post_chat(server, json.dumps({"model": "m"}))
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
