"""What the operator sees: settings that stop start-up with one line, the start-up summary, and a
log line per request that says why it failed (`error=`, `hung_up=1`, `primary=`, `rewrite=`)."""

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
import requests

from conftest import (BASE_ENV, FOLDERS, ROOT, STREAMING_FOLDERS, Server, free_port,
                      load_fixture, open_raw_stream, phone_call, post_chat, read_sse, wait_for)
from fake_llm import FakeLLM

GUNICORN_SETTINGS = {"basic": ("PORT", "WEB_CONCURRENCY", "GUNICORN_THREADS"),
                     "openai-sse": ("PORT", "WEB_CONCURRENCY", "WORKER_CONNECTIONS"),
                     "openai-advanced": ("PORT", "WEB_CONCURRENCY", "WORKER_CONNECTIONS")}
CONTRACT_SETTINGS = ("OPENAI_TIMEOUT_SECONDS", "OPENAI_MAX_RETRIES", "MAX_BODY_BYTES", "LOG_LEVEL",
                     "BODY_TIMEOUT_SECONDS", "MAX_CONCURRENT_CALLS")
STREAM_SETTINGS = ("PROVIDER_KEEPALIVE_SECONDS", "KEEP_WARM_SECONDS")  # provider_stream.py
ADVANCED_SETTINGS = ("BUSINESS_TIMEZONE", "KNOWLEDGE_MAX_PASSAGES", "KNOWLEDGE_MAX_CHARS",
                     "MEMORY_MAX_TURNS", "REWRITE_BUDGET_MS", "AVAILABILITY_TIMEOUT_SECONDS",
                     "MAX_TOOL_ROUNDS", "HEDGE_AFTER_MS", "MEMORY_RETENTION_DAYS")
WRONG = {"PORT": "70000", "WEB_CONCURRENCY": "two", "LOG_LEVEL": "chatty",
         "BUSINESS_TIMEZONE": "Mars/Olympus", "HEDGE_AFTER_MS": "-5", "MAX_CONCURRENT_CALLS": "-1",
         "BODY_TIMEOUT_SECONDS": "0", "PROVIDER_KEEPALIVE_SECONDS": "0",
         "OPENAI_BASE_URL": "127.0.0.1:9000/v1"}  # the others: "abc"


def copy_with_dotenv(folder, tmp_path, settings):
    """The folder copied into tmp_path with `settings` as its .env; returns (the copy, the
    environment to run it in: the tests' settings, minus those the .env sets)."""
    copy = tmp_path / folder
    shutil.copytree(ROOT / folder, copy, ignore=shutil.ignore_patterns(".env", "__pycache__",
                                                                       "*.sqlite3*"))
    (copy / ".env").write_text("".join(f"{name}={value}\n" for name, value in settings.items()))
    env = {**os.environ, **BASE_ENV, "MEMORY_DB_PATH": str(tmp_path / "memory.sqlite3")}
    return copy, {key: value for key, value in env.items()
                  if key not in {*settings, "PYTHONPATH"}}


def start_up_output(folder, command, tmp_path, **settings):
    """Run `command` in a copy of the folder whose .env holds `settings`, as a user would run it;
    it must stop by itself. Returns (exit code, everything it printed)."""
    copy, env = copy_with_dotenv(folder, tmp_path, {
        "OPENAI_BASE_URL": "http://127.0.0.1:9/v1", "PORT": str(free_port()),
        "WEB_CONCURRENCY": "2", **settings})  # two workers: both read the settings
    done = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=90)
    return done.returncode, done.stdout + done.stderr


def assert_one_line_saying_why(output, name, value):
    """Exactly one line of ours, naming the variable, its value and what is expected; the other
    lines are gunicorn's own (`[date] [pid] [LEVEL] ...`); no traceback."""
    assert "Traceback" not in output, output
    ours = [line for line in output.splitlines() if not line.startswith("[")]
    assert len(ours) == 1, output
    assert ours[0].startswith(f"Cannot start: {name}={value!r} ") and "expected " in ours[0], ours
    assert "empty means the default" in ours[0]


GUNICORN = [sys.executable, "-m", "gunicorn", "app:app"]
CASES = [(folder, name) for folder in FOLDERS for name in GUNICORN_SETTINGS[folder]]
CASES += [("basic", name) for name in CONTRACT_SETTINGS if "basic" in FOLDERS]
CASES += [(folder, "OPENAI_TIMEOUT_SECONDS") for folder in STREAMING_FOLDERS]  # gevent workers
CASES += [("openai-sse", name) for name in STREAM_SETTINGS if "openai-sse" in FOLDERS]
CASES += [(folder, "OPENAI_BASE_URL") for folder in FOLDERS]  # no http://
CASES += [("openai-advanced", name) for name in ADVANCED_SETTINGS if "openai-advanced" in FOLDERS]


@pytest.mark.parametrize("folder, name", CASES)
def test_a_wrong_setting_stops_start_up_with_one_line(folder, name, tmp_path):
    value = WRONG.get(name, "abc")
    status, output = start_up_output(folder, GUNICORN, tmp_path, **{name: value})
    assert status != 0, output
    assert_one_line_saying_why(output, name, value)


@pytest.mark.skipif("basic" not in FOLDERS, reason="no folder yet")
def test_python_app_py_says_the_same(tmp_path):
    status, output = start_up_output("basic", [sys.executable, "app.py"], tmp_path,
                                     OPENAI_TIMEOUT_SECONDS="soon")
    assert status != 0
    assert_one_line_saying_why(output, "OPENAI_TIMEOUT_SECONDS", "soon")


@pytest.mark.parametrize("folder", FOLDERS)
def test_empty_settings_mean_the_defaults(folder, fake, tmp_path):
    """Every number left empty in the folder's .env, as a copied .env with blanked lines has it."""
    names = GUNICORN_SETTINGS[folder] + CONTRACT_SETTINGS
    names += ADVANCED_SETTINGS if folder == "openai-advanced" else ()
    names += STREAM_SETTINGS if folder in STREAMING_FOLDERS else ()
    copy, env = copy_with_dotenv(folder, tmp_path, {"OPENAI_BASE_URL": fake.base_url,
                                                    **dict.fromkeys(names, "")})
    port = free_port()
    # --bind: PORT is empty (it means 8000); gunicorn's flag on the command line wins
    server = Server(folder, [*GUNICORN, "--bind", f"127.0.0.1:{port}"], copy, env, port, tmp_path)
    try:
        events, done = read_sse(post_chat(server, load_fixture("first-turn.json")))
        assert done and events
        assert "Cannot start" not in server.log() and "Traceback" not in server.log()
    finally:
        server.stop()


def test_start_up_summary_once_per_server(start_server, fake):
    folder = FOLDERS[-1]
    server = start_server(folder, WEB_CONCURRENCY="2")
    assert wait_for(lambda: server.log().count("Booting worker") == 2, 10)
    time.sleep(5)  # time for the second worker to import the app (it must not log the summary)
    [summary] = server.log_lines("starting with ")
    assert f"provider={fake.base_url}" in summary and "model=as Vapi sends it" in summary
    assert server.log().count("CUSTOM_LLM_API_KEY is not set") == 1
    if folder == "openai-advanced":
        for part in ("memory=", "knowledge=", "(5 documents, ", "fallback=none",
                     "server_tools=local_time"):
            assert part in summary, summary


# --- the log line says why ------------------------------------------------------------------------

def request_line(server, before, call_id=None):
    """The log line of the one request sent since the log was `before` characters long."""
    def lines():
        return [line for line in server.log()[before:].splitlines() if " status=" in line
                and (call_id is None or call_id in line)]
    assert wait_for(lines, 5), server.log()[before:]
    [line] = lines()
    return line


BAD_REQUESTS = [  # (what is sent, the status, the code in error.code and in the log line)
    ({"data": "{not json", "headers": {"Content-Type": "application/json"}}, 400, "invalid_json"),
    ({"data": "{}", "headers": {"Content-Type": "text/plain"}}, 400, "invalid_content_type"),
    ({"data": json.dumps({"model": "m", "messages": []})}, 400, "missing_messages"),
    ({"data": json.dumps({"messages": [{"role": "user", "content": "hi"}]})}, 400,
     "missing_model"),
    ({"data": json.dumps({"model": "m", "messages": [{"content": "hi"}]})}, 400,
     "invalid_message"),
    ({"data": "{}", "path": "/v2/chat"}, 404, "not_found"),
]


@pytest.mark.parametrize("sent, status, code", BAD_REQUESTS, ids=[c for _, _, c in BAD_REQUESTS])
def test_our_rejection_is_in_the_log_line(server, sent, status, code):
    before = len(server.log())
    response = requests.post(server.url + sent.get("path", "/chat/completions"),
                             data=sent["data"], timeout=10,
                             headers=sent.get("headers", {"Content-Type": "application/json"}))
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    line = request_line(server, before)
    assert f" status={status} " in line and f" error={code}" in line, line


def test_our_bearer_check_and_the_providers_key_check_are_told_apart(folder, start_server,
                                                                     fake):
    server = start_server(folder, CUSTOM_LLM_API_KEY="vapi-secret-123")
    body = load_fixture("first-turn.json")
    before = len(server.log())
    assert post_chat(server, body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    ours = request_line(server, before)  # refused before the body is read: call='-'
    fake.script({"status": 401, "error": {"error": {
        "message": "Incorrect API key provided.", "type": "invalid_request_error",
        "param": None, "code": "invalid_api_key"}}})
    before = len(server.log())
    response = post_chat(server, body, headers={"Authorization": "Bearer vapi-secret-123"})
    assert response.status_code == 401
    theirs = request_line(server, before, body["call"]["id"])
    assert " error=invalid_api_key" in ours and " error=provider:invalid_api_key" in theirs


@pytest.mark.parametrize("script, status, logged", [
    ({"status": 404, "error": {"error": {"message": "The model `gpt-9` does not exist",
                                         "type": "invalid_request_error", "param": None,
                                         "code": "model_not_found"}}},
     404, "provider:model_not_found"),
    ({"status": 503}, 502, "provider:503"),
    ({"status": 400, "error": {"error": {"message": "Bad", "type": "invalid_request_error",
                                         "param": None, "code": None}}},
     400, "provider:invalid_request_error"),
], ids=["model_not_found", "5xx", "no-code"])
def test_the_providers_error_is_marked_as_the_providers(server, fake, script, status, logged):
    fake.script(script)
    body = load_fixture("first-turn.json")
    before = len(server.log())
    assert post_chat(server, body).status_code == status
    assert f" error={logged}" in request_line(server, before, body["call"]["id"])


@pytest.mark.parametrize("folder", STREAMING_FOLDERS)
def test_a_failure_mid_stream_is_in_the_log_line(folder, start_server, fake):
    server = start_server(folder)
    fake.script({"error_event_after": 2})
    body = load_fixture("first-turn.json")
    before = len(server.log())
    events, done = read_sse(post_chat(server, body))
    assert done and "error" in events[-1], events
    line = request_line(server, before, body["call"]["id"])
    assert " status=200 " in line and " error=provider:server_error" in line, line


@pytest.mark.parametrize("folder", FOLDERS)
def test_a_provider_that_refuses_connections_gets_one_warning(folder, start_server):
    port = free_port()  # nothing listens there
    server = start_server(folder, OPENAI_BASE_URL=f"http://127.0.0.1:{port}/v1")
    body = load_fixture("first-turn.json")
    before = len(server.log())
    assert post_chat(server, body).status_code == 502
    line = request_line(server, before, body["call"]["id"])
    assert " error=provider_unavailable" in line
    warnings = [w for w in server.log()[before:].splitlines() if " WARNING " in w]
    assert len(warnings) == 1, warnings
    assert f"model provider at 127.0.0.1:{port}: connection refused" in warnings[0]


@pytest.fixture
def plain_http_port():
    """A port that answers a TLS handshake with plain HTTP, as an http:// server does."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    threading.Thread(target=serve, daemon=True).start()
    yield listener.getsockname()[1]
    listener.close()


@pytest.mark.skipif("openai-sse" not in FOLDERS, reason="no folder yet")
def test_the_warning_tells_dns_and_tls_apart(start_server, plain_http_port):
    for base_url, reason in [("http://no-such-host.invalid/v1", "no-such-host.invalid:80: DNS"),
                             (f"https://127.0.0.1:{plain_http_port}/v1",
                              f"127.0.0.1:{plain_http_port}: TLS failed")]:
        server = start_server("openai-sse", OPENAI_BASE_URL=base_url)
        before = len(server.log())
        assert post_chat(server, load_fixture("first-turn.json")).status_code == 502
        assert wait_for(lambda: f"model provider at {reason}" in server.log()[before:]), \
            server.log()[before:]


@pytest.mark.parametrize("folder", STREAMING_FOLDERS)
def test_a_caller_who_hangs_up_is_marked_in_the_line(folder, start_server, fake):
    server = start_server(folder)
    body = load_fixture("first-turn.json")
    fake.script({"text": "one two three four five six seven eight", "token_delay": 0.3})
    before = len(server.log())
    sock = open_raw_stream(server, body)
    received = b""
    while b"data:" not in received:  # the headers, then the first event
        received += sock.recv(65536)
    sock.close()
    line = request_line(server, before, body["call"]["id"])
    assert " status=200 " in line and " hung_up=1" in line, line

    fake.script({"ttft": 3})  # gone before the first word: 499
    before = len(server.log())
    open_raw_stream(server, body).close()
    line = request_line(server, before, body["call"]["id"])
    assert " status=499 " in line and " hung_up=1" in line, line

    fake.reset()  # the provider may not even have been asked
    fake.reset()  # the provider may not even have been asked: its script is still queued
    before = len(server.log())
    events, done = read_sse(post_chat(server, body))
    assert done, (events, server.log()[before:])  # heard to the end: not marked
    assert "hung_up" not in request_line(server, before, body["call"]["id"])


# --- the base URL ---------------------------------------------------------------------------------

def test_the_stand_in_answers_only_openais_paths(fake):
    root = fake.base_url.removesuffix("/v1")
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    for path in ("/v1/chat/completions", "/chat/completions"):
        assert requests.post(root + path, json=body, timeout=5).status_code == 200
    for path in ("/v1/chat/completions/chat/completions", "/v2/chat/completions", "/x"):
        response = requests.post(root + path, json=body, timeout=5)
        assert response.status_code == 404
        assert response.json()["error"]["message"] == f"Invalid URL (POST {path})"


@pytest.mark.parametrize("folder", FOLDERS)
def test_a_base_url_with_a_wrong_path_is_named_in_a_warning(folder, start_server, fake):
    server = start_server(folder, OPENAI_BASE_URL=fake.base_url.removesuffix("/v1") + "/api")
    response = post_chat(server, load_fixture("first-turn.json"))
    assert response.status_code == 404
    assert wait_for(lambda: server.log_lines("model provider answered 404 for "), 3)
    [warning] = server.log_lines("model provider answered 404 for ")
    assert "WARNING" in warning and "/api/chat/completions: check the base URL" in warning


@pytest.mark.parametrize("folder", FOLDERS)
def test_a_base_url_with_the_endpoint_is_cut_back_with_a_warning(folder, start_server, fake):
    env = {"OPENAI_BASE_URL": fake.base_url + "/chat/completions/"}
    if folder == "openai-advanced":
        env["FALLBACK_BASE_URL"] = fake.base_url + "/chat/completions"
    server = start_server(folder, **env)
    assert f"OPENAI_BASE_URL ends with /chat/completions: using {fake.base_url} " in server.log()
    if folder == "openai-advanced":
        assert "FALLBACK_BASE_URL ends with /chat/completions" in server.log()
    events, done = read_sse(post_chat(server, load_fixture("first-turn.json")))
    assert done and events
    assert [r["path"] for r in fake.requests] == ["/v1/chat/completions"]


# --- what happened inside an openai-advanced turn -------------------------------------------------

advanced_only = pytest.mark.skipif("openai-advanced" not in FOLDERS, reason="no folder yet")


@pytest.fixture(scope="module")
def fallback():
    server = FakeLLM().start()
    yield server
    server.stop()


@advanced_only
@pytest.mark.parametrize("stream", [True, False])
def test_the_primarys_failure_is_in_the_line_when_the_fallback_answers(start_server, fake,
                                                                       fallback, stream):
    fallback.reset()
    server = start_server("openai-advanced", FALLBACK_BASE_URL=fallback.base_url,
                          HEDGE_AFTER_MS="0")
    fake.script({"status": 503})
    body = {**load_fixture("first-turn.json"), "stream": stream}
    before = len(server.log())
    assert post_chat(server, body).status_code == 200
    line = request_line(server, before, body["call"]["id"])
    assert " provider=fallback:failure" in line and " primary=503" in line, line


@advanced_only
def test_a_rewrite_out_of_its_budget_says_so(start_server, fake):
    server = start_server("openai-advanced", REWRITE_ENABLED="1", REWRITE_BUDGET_MS="300")
    fake.responder = lambda body: {"ttft": 3} if "transcripts" in body["messages"][0][
        "content"] else None
    body = phone_call("uh what r ur hours sat")
    before = len(server.log())
    assert read_sse(post_chat(server, body))[1]
    assert " rewrite=timeout" in request_line(server, before, body["call"]["id"])


@advanced_only
def test_passages_and_earlier_turns_are_counted(start_server, fake):
    server = start_server("openai-advanced")
    first = phone_call("What are your hours on Saturday?")
    number = first["call"]["customer"]["number"]
    before = len(server.log())
    assert read_sse(post_chat(server, first))[1]
    line = request_line(server, before, first["call"]["id"])
    assert " passages=" in line and " passages=0" not in line and " earlier_turns=0" in line
    with sqlite3.connect(server.env["MEMORY_DB_PATH"]) as db:  # remembered in the background
        assert wait_for(lambda: db.execute("SELECT count(*) FROM turns WHERE caller = ?",
                                           (number,)).fetchone()[0] == 1)
    second = phone_call("And on Sunday?", number=number)
    before = len(server.log())
    assert read_sse(post_chat(server, second))[1]
    assert " earlier_turns=1" in request_line(server, before, second["call"]["id"])


@advanced_only
def test_a_failed_server_side_tool_warns_naming_it_and_why(start_server, fake, scheduling_api):
    server = start_server("openai-advanced", AVAILABILITY_API_URL=scheduling_api.url)
    scheduling_api.mode = "down"
    fake.script({"tool_calls": [{"name": "open_slots", "arguments": '{"date": "2026-01-06"}'}]})
    before = len(server.log())
    assert read_sse(post_chat(server, phone_call("Any slots on Tuesday?")))[1]
    assert wait_for(lambda: "WARNING custom-llm: server-side tool open_slots failed: "
                    f"{scheduling_api.url}/slots answered HTTP 500" in server.log()[before:])
