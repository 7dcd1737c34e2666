"""The behaviour every server folder shares, run against each of them under gunicorn.

The tests that take the default `server` run twice per folder: in the repository (`basic-repo`), and
from a copy of the folder alone in its own virtualenv, configured by its `.env` alone (`basic-copy`,
see `copied_folders` in conftest.py).
"""

import json
import re

import openai
import pytest
import requests

from conftest import (FOLDERS, OPENAI_PARAMS, PROVIDER_KEY, free_port, load_fixture, post_chat,
                      read_sse, streamed_text, wait_for)

VAPI_FIXTURES = ["first-turn.json", "metadata-destructured.json", "metadata-off.json",
                 "web-call-first-turn.json", "after-tool-call.json", "with-vapi-tools.json"]


@pytest.fixture(params=[(folder, where) for folder in FOLDERS for where in ("repo", "copy")],
                ids=lambda param: "-".join(param))
def server(request, start_server):
    """The folder's server in its default configuration: in the repository, or its copy."""
    folder, where = request.param
    if where == "repo":
        return start_server(folder)
    return request.getfixturevalue("copied_folders").gunicorn(folder)


def sdk_client(server, path=""):
    return openai.OpenAI(base_url=server.url + path, api_key="vapi-credential", max_retries=0,
                         timeout=15)


def split_body(body):
    """Vapi's body as SDK arguments: the OpenAI fields, and everything else as extra_body."""
    known = {k: body[k] for k in ("model", "messages", "temperature", "max_tokens", "tools")
             if k in body}
    extra = {k: v for k, v in body.items() if k not in known and k != "stream"}
    return known, extra


def test_health_answers_without_calling_the_provider(server, fake):
    response = requests.get(server.url + "/health", timeout=5)
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert fake.requests == []


@pytest.mark.parametrize("fixture", VAPI_FIXTURES)
def test_vapi_bodies_stream_through_the_official_client(server, fake, fixture):
    body = load_fixture(fixture)
    known, extra = split_body(body)
    stream = sdk_client(server).chat.completions.create(**known, stream=True, extra_body=extra)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    last_user = [m["content"] for m in body["messages"] if m["role"] == "user"][-1]
    assert text == "You said: " + last_user
    assert chunks[-1].choices[0].finish_reason == "stop"

    [received] = fake.chat_bodies()
    assert set(received) <= OPENAI_PARAMS, "only OpenAI parameters may reach the provider"
    for vapi_only in ("call", "phoneNumber", "customer", "metadata", "timestamp", "clinicId",
                      "crmAccountId"):
        assert vapi_only not in received
    if server.folder == "openai-advanced":  # it adds its context to the prompt and offers its tools
        system = body["messages"][0]["content"]
        assert received["messages"][0]["content"].startswith(system + "\n\n")
        received["messages"][0] = body["messages"][0]
        received["tools"] = received["tools"][:len(body.get("tools", []))] or None
    assert received["messages"] == body["messages"], "messages, tool turns included, arrive intact"
    assert received["model"] == body["model"]
    assert received["temperature"] == body["temperature"]
    assert received["max_tokens"] == body["max_tokens"]
    assert received.get("tools") == body.get("tools")


def test_per_message_extra_keys_are_dropped_and_tool_turns_kept(server, fake):
    body = load_fixture("after-tool-call.json")
    body["messages"][2]["metadata"] = {
        "wordLevelConfidence": [{"word": "tuesday", "confidence": 0.91}]}
    body["messages"][3]["content"] = ""
    body["messages"].append(
        {"role": "user", "content": [{"type": "text", "text": "Morning please."}]})
    response = post_chat(server, body)
    events, done = read_sse(response)
    assert response.status_code == 200 and done
    assert streamed_text(events) == "You said: Morning please."
    [received] = fake.chat_bodies()
    assert "metadata" not in received["messages"][2]
    assert received["messages"][3] == {**body["messages"][3]}
    assert received["messages"][4] == body["messages"][4]
    assert received["messages"][-1]["content"] == [{"type": "text", "text": "Morning please."}]


@pytest.mark.parametrize("path", ["/chat/completions", "/v1/chat/completions",
                                  "/chat/completions/chat/completions",
                                  "/v1/chat/completions/chat/completions"])
def test_every_route_vapi_may_call(server, path):
    response = post_chat(server, load_fixture("first-turn.json"), path=path)
    events, done = read_sse(response)
    assert response.status_code == 200 and done and events


def test_stream_headers(server):
    response = post_chat(server, load_fixture("first-turn.json"))
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["Cache-Control"] == "no-cache"
    read_sse(response)


def test_every_event_is_a_chunk_with_choices(server):
    events, done = read_sse(post_chat(server, load_fixture("first-turn.json")))
    assert done
    for event in events:
        assert event["object"] == "chat.completion.chunk"
        assert isinstance(event["choices"], list)


def test_stream_false_gets_a_chat_completion(server, fake):
    known, extra = split_body(load_fixture("first-turn.json"))
    completion = sdk_client(server).chat.completions.create(**known, extra_body=extra)
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == \
        "You said: Hi, yeah, I'd like to book a cleaning for next week."
    assert fake.chat_bodies()[0].get("stream") in (None, False)


def test_model_override(folder, start_server, fake):
    server = start_server(folder, OPENAI_MODEL="override-model")
    events, done = read_sse(post_chat(server, load_fixture("first-turn.json")))
    assert done
    assert fake.chat_bodies()[0]["model"] == "override-model"


def test_provider_key_is_sent_to_the_provider_not_the_callers(server, fake):
    read_sse(post_chat(server, load_fixture("first-turn.json"),
                       headers={"Authorization": "Bearer caller-key"}))
    assert fake.requests[0]["headers"]["authorization"] == f"Bearer {PROVIDER_KEY}"


def test_tool_calls_stream_through_with_finish_reason(server, fake):
    fake.script({"tokens": ["Of course, connecting you now."],
                 "tool_calls": [{"name": "transferCall",
                                 "arguments": '{"destination":"+15555550188"}'}]})
    known, extra = split_body(load_fixture("with-vapi-tools.json"))
    chunks = list(sdk_client(server).chat.completions.create(**known, stream=True,
                                                             extra_body=extra))
    calls = {}
    for chunk in chunks:
        for call in chunk.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(call.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = call.id or entry["id"]
            entry["name"] += call.function.name or "" if call.function else ""
            entry["arguments"] += call.function.arguments or "" if call.function else ""
    assert calls[0]["name"] == "transferCall"
    assert json.loads(calls[0]["arguments"]) == {"destination": "+15555550188"}
    assert calls[0]["id"].startswith("call_")
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


# --- auth -----------------------------------------------------------------------------------------

ONE_KEY, TWO_KEYS = "vapi-secret-123", "old-key-1, new-key-2"  # two: while a key is replaced


@pytest.mark.parametrize("keys, header, status", [
    (ONE_KEY, None, 401), (ONE_KEY, "Bearer wrong-key", 401),
    (ONE_KEY, "Bearer vapi-secret-123", 200), (ONE_KEY, "bearer vapi-secret-123", 200),
    (ONE_KEY, "Basic vapi-secret-123", 401), (ONE_KEY, "Bearer vapi-secret-123x", 401),
    (ONE_KEY, "Bearer vapi-secret", 401), (ONE_KEY, "Bearer ", 401),
    (TWO_KEYS, "Bearer old-key-1", 200), (TWO_KEYS, "Bearer new-key-2", 200),
    (TWO_KEYS, "Bearer old-key-1, new-key-2", 401), (TWO_KEYS, "Bearer old-key-1,new-key-2", 401),
    (TWO_KEYS, "Bearer ,", 401), (TWO_KEYS, "Bearer new-key", 401), (TWO_KEYS, None, 401),
])
def test_bearer_auth(folder, start_server, fake, keys, header, status):
    server = start_server(folder, CUSTOM_LLM_API_KEY=keys)
    headers = {"Authorization": header} if header else {}
    response = post_chat(server, load_fixture("first-turn.json"), headers=headers)
    assert response.status_code == status
    if status == 401:
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert fake.requests == [], "an unauthorized request must not reach the provider"
    else:
        assert read_sse(response)[1]


def test_open_endpoint_warns_once_at_start_up(server):
    assert server.log().count("CUSTOM_LLM_API_KEY is not set") == 1


# --- bad input ------------------------------------------------------------------------------------

def assert_openai_error(response, status):
    assert response.status_code == status
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in response.text and "<html" not in response.text.lower()
    return error


@pytest.mark.parametrize("body, content_type, param", [
    (b"{not json", "application/json", None),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "text/plain", None),
    (b"[1, 2]", "application/json", None),
    (json.dumps({"model": "m"}), "application/json", "messages"),
    (json.dumps({"model": "m", "messages": []}), "application/json", "messages"),
    (json.dumps({"model": "m", "messages": "hello"}), "application/json", "messages"),
    (json.dumps({"model": "m", "messages": [{"content": "hi"}]}), "application/json",
     "messages[0].role"),
    (json.dumps({"model": "m", "messages": ["hi"]}), "application/json", "messages[0].role"),
    (json.dumps({"model": "m", "messages": [{"role": 5}]}), "application/json", "messages[0].role"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "application/json", "model"),
    (json.dumps({"model": "m", "stream": "yes", "messages": [{"role": "user"}]}),
     "application/json", "stream"),
    (b"\xff\xfe{}", "application/json", None),
    (b"[" * 100000 + b"]" * 100000, "application/json", None),
])
def test_bad_input_gets_400(server, fake, body, content_type, param):
    response = post_chat(server, body, headers={"Content-Type": content_type})
    error = assert_openai_error(response, 400)
    assert error["param"] == param
    assert fake.requests == []


def test_a_vapi_server_message_gets_400_saying_so(folder, start_server, fake):
    server = start_server(folder)
    before = len(server.log())
    body = {"message": {"type": "end-of-call-report", "call": {"id": "c-1"}, "endedReason": "x"}}
    error = assert_openai_error(post_chat(server, body), 400)
    assert error["code"] == "vapi_server_message" and error["param"] == "message"
    assert "server message" in error["message"] and "'end-of-call-report'" in error["message"]
    assert fake.requests == []
    log = server.log()[before:]
    warnings = [line for line in log.splitlines() if " WARNING " in line]
    assert len(warnings) == 1 and "'end-of-call-report'" in warnings[0], log


def test_body_over_the_limit_gets_413(server, fake):
    body = {"model": "m", "messages": [{"role": "user", "content": "x" * (1024 * 1024 + 10)}]}
    assert_openai_error(post_chat(server, body), 413)
    assert fake.requests == []


def test_wrong_method_gets_405_and_unknown_path_404(server):
    assert_openai_error(requests.get(server.url + "/chat/completions", timeout=5), 405)
    assert_openai_error(requests.post(server.url + "/nope", json={}, timeout=5), 404)


def test_missing_provider_key_starts_and_names_the_variable(folder, start_server, fake):
    server = start_server(folder, OPENAI_API_KEY="")
    assert requests.get(server.url + "/health", timeout=5).status_code == 200
    error = assert_openai_error(post_chat(server, load_fixture("first-turn.json")), 500)
    assert "OPENAI_API_KEY" in error["message"]
    assert fake.requests == []


# --- provider errors before the first byte --------------------------------------------------------

@pytest.mark.parametrize("provider_status, status", [
    (400, 400), (401, 401), (403, 403), (404, 404), (429, 429), (500, 502), (503, 502),
])
@pytest.mark.parametrize("stream", [True, False])
def test_provider_http_errors(server, fake, provider_status, status, stream):
    fake.script({"status": provider_status, "error": {"error": {
        "message": f"Provider says no ({provider_status}) to {PROVIDER_KEY}", "type": "some_error",
        "param": None, "code": "provider_code"}}})
    body = {**load_fixture("first-turn.json"), "stream": stream}
    response = post_chat(server, body)
    error = assert_openai_error(response, status)
    assert PROVIDER_KEY not in response.text, "an error body must never echo the provider key"
    if status < 500:
        assert f"({provider_status})" in error["message"]
        assert error["code"] == "provider_code"


def test_provider_unreachable_gets_502(folder, start_server):
    server = start_server(folder, OPENAI_BASE_URL=f"http://127.0.0.1:{free_port()}/v1")
    error = assert_openai_error(post_chat(server, load_fixture("first-turn.json")), 502)
    assert error["code"] == "provider_unavailable"


@pytest.mark.parametrize("plan", [{"hang": True}, {"headers_delay": 30}, {"ttft": 30}],
                         ids=["no-answer", "headers-late", "first-token-late"])
def test_provider_timeout_gets_504(folder, start_server, fake, plan):
    server = start_server(folder, OPENAI_TIMEOUT_SECONDS="1")
    fake.script(plan)
    response = post_chat(server, load_fixture("first-turn.json"))
    error = assert_openai_error(response, 504)
    assert error["code"] == "provider_timeout"
    assert response.elapsed.total_seconds() < 5


# --- logging --------------------------------------------------------------------------------------

def test_one_info_line_per_request_without_secrets(folder, start_server, fake):
    server = start_server(folder, CUSTOM_LLM_API_KEY="vapi-secret-123")
    body = load_fixture("metadata-destructured.json")
    before = server.log()
    read_sse(post_chat(server, body, headers={"Authorization": "Bearer vapi-secret-123"}))
    post_chat(server, body, headers={"Authorization": "Bearer wrong"})
    fake.script({"status": 429})
    post_chat(server, body, headers={"Authorization": "Bearer vapi-secret-123"})
    log = server.log()[len(before):]

    lines = [line for line in log.splitlines() if " INFO " in line and "call=" in line]
    assert len(lines) == 3, log
    assert re.search(r"call='5f1c2b7e-9a4d-4c1e-8b3a-2d7e6f0a1c93' model='gpt-4o-mini' stream=True "
                     r"status=200 ttft_ms=[\d.]+ total_ms=[\d.]+ chunks=\d+", lines[0]), lines[0]
    assert "status=401" in lines[1] and "status=429" in lines[2]
    secrets = [PROVIDER_KEY, "vapi-secret-123", body["phoneNumber"]["twilioAuthToken"],
               body["phoneNumber"]["twilioAccountSid"], "book a cleaning", "Riley", "+15555550123"]
    for secret in secrets:
        assert secret not in log


@pytest.mark.parametrize("ids, logged", [
    ({"chat": {"id": "chat-77"}}, "chat-77"),
    ({"call": {"id": "call-1"}, "chat": {"id": "chat-77"}}, "call-1"),
    ({"call": {}, "chat": {"id": "chat-77"}}, "chat-77"),
    ({"chat": {"id": "two\nlines"}}, "-"),
])
def test_call_id_falls_back_to_the_chat_id(folder, start_server, fake, ids, logged):
    server = start_server(folder)
    before = len(server.log())
    read_sse(post_chat(server, {**load_fixture("metadata-off.json"), **ids}))
    lines = wait_for(lambda: [line for line in server.log()[before:].splitlines()
                              if " INFO " in line and "call=" in line])
    assert len(lines) == 1 and f"call={logged!r} " in lines[0], lines

