"""tests/vapi_check.py run as a user runs it: against every folder (through the stand-in, with
CUSTOM_LLM_API_KEY set) it passes; against small servers with one defect each it names that defect;
over https:// with a test CA; and an unreachable URL is a failed `reachable`, not a traceback."""

import http.server
import json
import os
import shutil
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import vapi_check as checker
from conftest import FOLDERS, free_port, wait_for

SCRIPT = Path(__file__).parent / "vapi_check.py"
KEY = "vapi-secret-123"  # the key test_contract.py's servers use: the same servers serve both
CHECK_NAMES = ["reachable", "auth", "stream_content_type", "stream_framing", "stream_accumulates",
               "streams_live", "first_token", "metadata_modes", "tool_turn", "vapi_tools",
               "model_first_message", "non_streaming", "bad_request", "survives_hangup"]


def vapi_check(url, *args, env=None):
    """Run the script as a user does, from another directory and in isolated mode (so that nothing
    next to it is importable), with --json. Returns (exit code, {name: (status, detail)})."""
    done = subprocess.run([sys.executable, "-I", str(SCRIPT), url, "--json", *args], cwd="/",
                          env=env or os.environ, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    assert "model calls" in done.stderr, "it says first how many model calls it will make"
    report = json.loads(done.stdout)
    assert report["url"] == url
    assert [check["name"] for check in report["checks"]] == CHECK_NAMES
    assert {check["status"] for check in report["checks"]} <= {"pass", "warn", "fail", "skip"}
    return done.returncode, {check["name"]: (check["status"], check["detail"])
                             for check in report["checks"]}


def flagged(checks):
    """The checks that did not pass or skip: {name: status}."""
    return {name: status for name, (status, _) in checks.items() if status in ("warn", "fail")}


@pytest.mark.parametrize("folder", FOLDERS)
def test_every_folder_passes(folder, start_server, fake):
    server = start_server(folder, CUSTOM_LLM_API_KEY=KEY)
    fake.token_delay = 0.02  # the words of an answer spread over ~0.5 s, so streaming shows
    code, checks = vapi_check(server.url, "--api-key", KEY)
    assert wait_for(lambda: not fake.open_streams()), "the hung-up turn's provider stream closed"
    if folder == "basic":  # it waits for the whole answer by design, and the check says so
        assert flagged(checks) == {"streams_live": "warn"}, checks
        assert "basic/" in checks["streams_live"][1]
    else:
        assert flagged(checks) == {}, checks
    assert code == 0
    assert [status for status, _ in checks.values()].count("skip") == 0, checks


# --- small servers with one defect each ----------------------------------------------------------

ANSWER = "Sure, a first cleaning takes about an hour, and it needs no preparation at all."
OPENAI_FIELDS = {"model", "messages", "temperature", "max_tokens", "tools", "stream"}
WORD_DELAY = 0.015
SLOW_FIRST_TOKEN = 1.6  # over the 1.5 s that warns; on the first streamed turn, as a cold start


class FlawedServer(http.server.ThreadingHTTPServer):
    """A tiny Custom LLM server on 127.0.0.1 that answers every turn with ANSWER, word by word,
    correctly but for one `defect` (None: none). It records the paths it was asked."""

    daemon_threads = True

    def __init__(self, defect, tls_context=None):
        super().__init__(("127.0.0.1", 0), FlawedHandler)
        self.defect, self.paths, self.streams = defect, [], 0
        scheme = "https" if tls_context else "http"
        if tls_context:
            self.socket = tls_context.wrap_socket(self.socket, server_side=True,
                                                  do_handshake_on_connect=False)  # in the thread
        self.url = f"{scheme}://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def handle_error(self, request, client_address):
        """A caller that hangs up or refuses the certificate is part of the test: no output."""


class FlawedHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        defect = self.server.defect
        self.server.paths.append(self.path)
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if defect != "open" and self.headers.get("Authorization") != f"Bearer {KEY}":
            return self.reply(401, {"error": {"message": "Wrong key", "type": "auth",
                                              "param": None, "code": "invalid_api_key"}})
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            if defect == "html_errors":
                return self.reply(400, "<html><body><h1>400 Bad Request</h1></body></html>")
            return self.reply(400, {"error": {"message": "Not a chat request", "type": "invalid",
                                              "param": None, "code": None}})
        if defect == "strict_schema" and set(body) - OPENAI_FIELDS:
            return self.reply(422, {"detail": [{"loc": ["body", key], "msg": "extra fields not "
                                                "permitted"} for key in set(body) - OPENAI_FIELDS]})
        if not body.get("stream") or defect == "json_for_stream":
            return self.reply(200, {"id": "chatcmpl-1", "object": "chat.completion",
                                    "created": 1, "model": "m", "choices": [{
                                        "index": 0, "finish_reason": "stop",
                                        "message": {"role": "assistant", "content": ANSWER}}]})
        self.stream(defect)

    def reply(self, status, payload):
        data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/html" if isinstance(payload, str)
                         else "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def stream(self, defect):
        def event(payload):
            return f"data: {json.dumps(payload)}\n\n".encode()

        def chunk(delta, finish=None):
            return event({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1,
                          "model": "m", "choices": [{"index": 0, "delta": delta,
                                                     "finish_reason": finish}]})

        words = ANSWER.split(" ")
        deltas = [{"content": word if not n else " " + word} for n, word in enumerate(words)]
        if defect == "tool_call_without_id":  # every turn is a transfer, its id left out
            first = {"index": 0, "type": "function",
                     "function": {"name": "transferCall", "arguments": ""}}
            rest = {"index": 0, "function": {"arguments": '{"destination": "+15555550188"}'}}
            deltas = [{"content": None}, {"tool_calls": [first]}, {"tool_calls": [rest]}]
        if defect != "no_role":
            deltas[0]["role"] = "assistant"
        events = [chunk(delta) for delta in deltas]
        if defect == "no_choices":  # a usage chunk without `choices`
            events.append(event({"id": "chatcmpl-1", "object": "chat.completion.chunk",
                                 "usage": {"prompt_tokens": 9, "completion_tokens": 15}}))
        events.append(chunk({}, "tool_calls" if defect == "tool_call_without_id" else "stop"))
        if defect != "no_done":
            events.append(b"data: [DONE]\n\n")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()  # HTTP/1.0: the body ends when the connection closes
        self.server.streams += 1
        try:
            if defect == "slow_first_token" and self.server.streams == 1:
                time.sleep(SLOW_FIRST_TOKEN)
            if defect == "buffered":  # a proxy that holds the body until it has all of it
                time.sleep(WORD_DELAY * len(events))
                self.wfile.write(b"".join(events))
                return
            for n, data in enumerate(events):
                time.sleep(WORD_DELAY if n else 0)
                self.wfile.write(data)
        except OSError:  # the caller hung up
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def flawed_server(request):
    server = FlawedServer(request.param)
    yield server
    server.shutdown()
    server.server_close()


DEFECTS = {  # defect: what vapi_check must flag, and words its detail must contain
    None: ({}, ""),
    "json_for_stream": ({"stream_content_type": "fail"}, "application/json"),
    "no_done": ({"stream_framing": "fail"}, "[DONE]"),
    "no_role": ({"stream_accumulates": "fail"}, "missing role for choice 0"),
    "tool_call_without_id": ({"stream_accumulates": "fail"},
                             "missing choices[0].tool_calls[0].id on its first fragment"),
    "no_choices": ({"stream_framing": "fail"}, "chunk.choices is not iterable"),
    "buffered": ({"streams_live": "fail"}, "holds the stream back"),
    "open": ({"auth": "fail"}, "does not check it"),
    "html_errors": ({"bad_request": "fail"}, "HTML"),
    "strict_schema": ({"metadata_modes": "fail"}, "extra fields not permitted"),
    "slow_first_token": ({"first_token": "warn"}, "s to the first word"),
}


@pytest.mark.parametrize("flawed_server", list(DEFECTS), indirect=True,
                         ids=[str(defect) for defect in DEFECTS])
def test_the_defect_of_each_server_is_named(flawed_server):
    expected, words = DEFECTS[flawed_server.defect]
    code, checks = vapi_check(flawed_server.url, "--api-key", KEY)
    assert flagged(checks) == expected, checks
    for name in expected:
        assert words in checks[name][1], checks[name]
        assert "fix:" in checks[name][1], "a flagged check names the fix"
    assert code == (1 if "fail" in expected.values() else 0)


@pytest.mark.parametrize("flawed_server", ["open"], indirect=True)
def test_an_open_endpoint_without_a_key_is_a_warning(flawed_server):
    code, checks = vapi_check(flawed_server.url)
    assert flagged(checks) == {"auth": "warn"}, checks
    assert code == 0


@pytest.mark.parametrize("flawed_server", [None], indirect=True)
def test_a_key_the_server_wants_but_was_not_given(flawed_server):
    code, checks = vapi_check(flawed_server.url)
    assert checks["auth"][0] == "fail" and "--api-key" in checks["auth"][1]
    assert {status for name, (status, _) in checks.items() if name not in ("reachable", "auth")} \
        == {"skip"}
    assert code == 1


@pytest.mark.parametrize("flawed_server", [None], indirect=True)
def test_a_url_ending_in_chat_completions_gets_it_appended_as_vapi_does(flawed_server):
    code, checks = vapi_check(flawed_server.url + "/chat/completions", "--api-key", KEY)
    assert code == 0, checks
    assert set(flawed_server.paths) == {"/chat/completions/chat/completions"}
    assert "appends it again" in checks["reachable"][1]


@pytest.mark.parametrize("url, reason", [
    (None, "cannot connect"), ("not a url", "not an http:// or https:// URL"),
    ("ftp://127.0.0.1/", "not an http:// or https:// URL"), ("http://127.0.0.1:99999", "port"),
])
def test_an_unreachable_url_fails_reachable_and_skips_the_rest(url, reason):
    url = url or f"http://127.0.0.1:{free_port()}"
    code, checks = vapi_check(url)
    assert checks["reachable"][0] == "fail" and reason in checks["reachable"][1], checks
    assert {status for status, _ in list(checks.values())[1:]} == {"skip"}
    assert code == 1


def make_certificate(folder):
    """A throwaway certificate for 127.0.0.1, made by the openssl CLI; (cert, key) paths."""
    if not shutil.which("openssl"):
        pytest.skip("the openssl command is not installed")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext",
                    "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    return cert, key


def test_https_with_a_test_ca(tmp_path):
    cert, key = make_certificate(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = FlawedServer(None, context)
    try:
        env = {name: value for name, value in os.environ.items()
               if name not in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")}
        code, checks = vapi_check(server.url, "--api-key", KEY, env=env)
        assert checks["reachable"][0] == "fail" and "TLS" in checks["reachable"][1], checks
        assert code == 1
        code, checks = vapi_check(server.url, "--api-key", KEY,
                                  env={**env, "REQUESTS_CA_BUNDLE": str(cert)})
        assert flagged(checks) == {}, checks
        assert code == 0
    finally:
        server.shutdown()
        server.server_close()


def chunk(delta=None, finish=None, id_="chatcmpl-1", **choice):
    return {"id": id_, "choices": [{"index": 0, "delta": delta or {}, "finish_reason": finish,
                                    **choice}]}


ROLE = {"role": "assistant", "content": ""}
CALL = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "endCall",
                                                                     "arguments": ""}}


@pytest.mark.parametrize("chunks, problem", [
    ([chunk(ROLE), chunk({"content": "Hi"}), chunk(finish="stop")], None),
    ([chunk(ROLE), chunk({"tool_calls": [CALL]}),
      chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}),
      chunk(finish="tool_calls")], None),
    ([], "request ended without sending any chunks"),
    ([chunk({"content": "Hi"}), chunk(finish="stop")], "missing role for choice 0"),
    ([chunk({"role": "user"}), chunk(finish="stop")], "role 'user' for choice 0"),
    ([chunk(ROLE), chunk({"content": "Hi"})], "missing finish_reason for choice 0"),
    ([chunk(ROLE), chunk(finish="stop", id_="chatcmpl-2")], "2 different ids"),
    ([chunk(ROLE, id_=""), chunk(finish="stop", id_="")], "no chunk carries an `id`"),
    ([{"id": "c", "choices": [{"delta": ROLE, "finish_reason": "stop"}]}],
     "invalid choice index: None"),
    ([chunk(ROLE), chunk({"tool_calls": [{**CALL, "index": None}]}), chunk(finish="tool_calls")],
     "invalid tool call index: None"),
    ([chunk(ROLE), chunk({"tool_calls": [{**CALL, "function": {"arguments": "{}"}}]}),
      chunk(finish="tool_calls")], "missing choices[0].tool_calls[0].function.name"),
    ([chunk(ROLE), chunk({"tool_calls": [{**CALL, "type": None}]}), chunk(finish="tool_calls")],
     "missing choices[0].tool_calls[0].type"),
    ([chunk(ROLE), chunk({"tool_calls": {"index": 0}}), chunk(finish="tool_calls")],
     "tool_calls is not a list"),
    ([{"id": "c", "choices": []}], "no chunk carries a choice"),
])
def test_the_stream_accumulator_rules(chunks, problem):
    """The rules of the OpenAI Node SDK's accumulator, one broken at a time (the servers with a
    defect above reach the same code through HTTP)."""
    problems = checker.accumulate(chunks)
    assert problems == [] if problem is None else problem in "; ".join(problems), problems

