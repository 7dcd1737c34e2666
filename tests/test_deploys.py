"""Deploys, floods and overload: a reload or a stop cuts no turn, a request body that never
arrives gets 408, a flood of unfinished requests does not keep callers out, and a worker at
MAX_CONCURRENT_CALLS answers the next call at once (gunicorn.conf.py, contract.py).

Tests that send signals start a server of their own (two workers, as deployed)."""

import json
import resource
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from conftest import (BASE_ENV, ROOT, Server, child_pids, free_port, load_fixture, open_raw_stream,
                      post_chat, read_sse, run_at_once, streamed_text, time_to_first_words,
                      wait_for)

# Shorter than in production (60 s), so that a turn a drain would cut is cut within the test.
GRACEFUL = 8
FIGURES = {}  # printed at the end with -s: the figures tests/README.md quotes


def own_server(folder, fake, log_dir, *options, **env):
    """A server of this test's own, with two workers: `kill -HUP` and `-TERM` are this test's."""
    port = free_port()
    config = {**BASE_ENV, "OPENAI_BASE_URL": fake.base_url, "WEB_CONCURRENCY": "2",
              "MEMORY_DB_PATH": str(log_dir / f"memory-{port}.sqlite3"), **env, "PORT": str(port)}
    command = [sys.executable, "-m", "gunicorn", "app:app", "--bind", f"127.0.0.1:{port}",
               *options]
    server = Server(folder, command, ROOT / folder, config, port, log_dir)
    assert wait_for(lambda: len(server.log_lines("Booting worker")) == 2, 20)
    return server


def body(text):
    call = load_fixture("first-turn.json")
    call["messages"][-1]["content"] = text
    return call


def turn(session, server, text):
    """One streamed turn on the caller's kept-alive session: 'done' (200 and [DONE] with the right
    words), 'refused' (no answer at all: the server had stopped), or what went wrong."""
    try:
        with post_chat_on(session, server, body(text)) as response:
            events, done = read_sse(response)
            for _ in response.iter_content(65536):  # to its end, so the connection is reused
                pass
            if response.status_code != 200:
                return f"status {response.status_code}"
            if not done or not streamed_text(events).endswith(text):
                return "cut"
            return "done"
    except requests.ConnectionError:
        # requests raises it only before the answer's first byte: the connection was refused, or
        # reset as the draining worker closed it just as the turn was sent. Either way the turn
        # never started (the OpenAI SDKs retry connection errors); one cut mid-answer is a
        # ChunkedEncodingError or a timeout, below.
        return "refused"
    except requests.RequestException as exc:
        return f"cut: {exc!r}"


def post_chat_on(session, server, payload):
    """post_chat through a requests.Session, whose connections are kept alive between turns."""
    return session.post(server.url + "/chat/completions", json=payload, stream=True, timeout=30)


def calls_with_next_turns(server, count, signal_after, send_signal, gaps, sessions):
    """`count` callers, each on its own kept-alive connection: a turn, then `gaps` seconds later
    the next one on the same connection, which then stays open (in `sessions`) as Vapi keeps it.
    The signal goes out `signal_after` s in. Returns the outcomes of every turn (first turns
    first), and when the signal went out."""
    outcomes = [[None, None] for _ in range(count)]
    signalled = {}

    def caller(i):
        session = requests.Session()
        sessions.append(session)
        outcomes[i][0] = turn(session, server, f"first {i}")
        time.sleep(gaps[i])
        outcomes[i][1] = turn(session, server, f"next {i}")

    def signaller():
        time.sleep(signal_after)
        signalled["at"] = time.monotonic()
        send_signal()

    signalling = threading.Thread(target=signaller)
    signalling.start()
    errors = run_at_once(caller, range(count), seconds=60)
    signalling.join(30)
    assert not errors
    return [first for first, _ in outcomes] + [next_ for _, next_ in outcomes], signalled["at"]


@pytest.fixture
def sessions():
    """The callers' kept-alive sessions, closed when the test ends."""
    opened = []
    yield opened
    for session in opened:
        session.close()


@pytest.fixture(scope="module", autouse=True)
def print_figures():
    yield
    for name, figure in FIGURES.items():
        print(f"\n{name}: {figure}")


@pytest.fixture(autouse=True)
def a_turn_takes_a_second(fake):
    """The stand-in speaks like a model: 200 ms to the first word, then 25 ms per word."""
    fake.ttft, fake.token_delay = 0.2, 0.025


@pytest.fixture
def log_dir(tmp_path):
    return tmp_path


@pytest.mark.parametrize("folder", ["openai-sse", "basic"])
def test_reload_cuts_no_turn_and_new_callers_hear_no_silence(folder, fake, log_dir, sessions):
    server = own_server(folder, fake, log_dir, "--graceful-timeout", str(GRACEFUL))
    try:
        old_workers = set(child_pids(server.process.pid))
        gaps = [0.2 + 5.5 * i / 30 for i in range(30)]  # next turns before, during and after
        probes, old_gone = [], {}

        def reload_and_probe():
            server.process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 6  # new callers on new connections, while it reloads
            while time.monotonic() < deadline:
                probes.append(time_to_first_words(server, body("probe"))[0])
                if not old_workers & set(child_pids(server.process.pid)):
                    old_gone.setdefault("at", time.monotonic())
                time.sleep(0.05)

        outcomes, hup_at = calls_with_next_turns(server, 30, 2.0, reload_and_probe, gaps,
                                                 sessions)
        assert outcomes.count("done") == 60, outcomes
        assert wait_for(lambda: not old_workers & set(child_pids(server.process.pid)), 20), \
            "the old workers must exit once their last call has ended"
        old_gone = old_gone.get("at", time.monotonic()) - hup_at
        assert len(child_pids(server.process.pid)) == 2
        assert max(probes) < 1.5, f"a new caller waited {max(probes):.2f} s for the first words"
        assert len(server.log_lines("starting with ")) == 2, \
            "the first worker of the start and the first of the reload each say what they run with"
        FIGURES[f"reload {folder}"] = (
            f"60 of 60 turns done; new callers' first words during the reload: median "
            f"{sorted(probes)[len(probes) // 2] * 1000:.0f} ms, max {max(probes) * 1000:.0f} ms "
            f"({len(probes)} probes); old workers gone {old_gone:.1f} s after HUP")
    finally:
        server.stop()


@pytest.mark.parametrize("folder", ["openai-sse", "basic"])
def test_stop_cuts_no_turn_and_the_master_exits_promptly(folder, fake, log_dir, sessions):
    server = own_server(folder, fake, log_dir, "--graceful-timeout", str(GRACEFUL))
    exited = {}

    def stop():
        server.process.send_signal(signal.SIGTERM)
        server.process.wait(30)
        exited["at"] = time.monotonic()

    try:
        gaps = [0.2 + 5.5 * i / 30 for i in range(30)]
        outcomes, term_at = calls_with_next_turns(server, 30, 2.0, stop, gaps, sessions)
        took = exited["at"] - term_at
        assert outcomes[:30].count("done") == 30, outcomes
        assert set(outcomes) <= {"done", "refused"}, outcomes  # a turn never starts to be cut
        assert took < GRACEFUL - 3, f"the master took {took:.1f} s to exit"
        FIGURES[f"stop {folder}"] = (
            f"{outcomes.count('done')} of 60 turns done, {outcomes.count('refused')} refused "
            f"before any byte, none cut; master exited {took:.1f} s after TERM")
    finally:
        server.stop()


def test_a_stream_longer_than_the_drain_ends_with_an_error_event(fake, log_dir):
    server = own_server("openai-sse", fake, log_dir, "--graceful-timeout", str(GRACEFUL))
    try:
        fake.script({"text": " ".join(["word"] * 400), "token_delay": 0.05})  # 20 s of words
        with post_chat(server, body("talk"), timeout=30) as response:
            lines = response.iter_lines(decode_unicode=True)
            assert next(line for line in lines if line.startswith("data: {"))
            term_at = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            events, done = read_sse("\n".join(lines))
            cut_after = time.monotonic() - term_at
        assert done, "the stream must end with [DONE]"
        assert events[-1]["error"]["code"] == "server_shutting_down"
        assert GRACEFUL - 4 < cut_after < GRACEFUL, cut_after
        server.process.wait(10)
        assert time.monotonic() - term_at < GRACEFUL + 1
        [line] = server.log_lines("POST /chat/completions")
        assert "cut_by=shutdown" in line
        assert wait_for(lambda: not fake.open_streams(), 2), "the provider's stream must be closed"
    finally:
        server.stop()


LIMITS = {"BODY_TIMEOUT_SECONDS": "1", "MAX_CONCURRENT_CALLS": "4"}


@pytest.mark.parametrize("sent", [b"", b'{"model": "m", "mess'], ids=["headers-only", "half-body"])
def test_a_body_that_does_not_arrive_gets_408_and_the_connection_closed(folder, start_server,
                                                                         sent):
    server = start_server(folder, **LIMITS)
    before = len(server.log_lines("status=408"))
    started = time.monotonic()
    with open_raw_stream(server, sent, content_length=400) as sock:
        answer = b""
        while piece := sock.recv(65536):  # to the end: the server closes the connection
            answer += piece
    took = time.monotonic() - started
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), head
    assert json.loads(payload)["error"]["code"] == "request_timeout"
    assert 0.9 < took < 4, took
    assert wait_for(lambda: len(server.log_lines("status=408")) == before + 1, 3), \
        "this request's own log line"


def flood(server, count):
    """`count` connections that each send a chat request's headers, and never its body."""
    head = (b"POST /chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 400\r\n\r\n")
    sockets = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        sock.sendall(head)
        sockets.append(sock)
    return sockets


def open_connections(pid):
    """The TCP sockets a process holds, from /proc."""
    return sum(1 for fd in Path(f"/proc/{pid}/fd").iterdir()
               if fd.exists() and "socket:" in str(fd.readlink()))


@pytest.mark.parametrize("folder", ["openai-sse", "basic"])
def test_a_flood_of_unfinished_requests_does_not_keep_callers_out(folder, fake, log_dir):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2400:  # this process holds the flood's 2,000 sockets
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    server = own_server(folder, fake, log_dir, BODY_TIMEOUT_SECONDS="8")
    attackers = []
    try:
        unloaded = [time_to_first_words(server, body("alone"))[0] for _ in range(3)]
        started = time.monotonic()
        attackers = flood(server, 2000)
        during = [time_to_first_words(server, body("during"))[0] for _ in range(6)]
        held = [open_connections(pid) for pid in child_pids(server.process.pid)]
        assert time.monotonic() - started < 8, "measured before the flood's bodies time out"
        assert sum(held) >= 1900, f"the workers hold (nearly) the whole flood: {held}"
        # the first call may wait while the workers take the flood in; the next ones do not
        assert max(during) < 3 and sorted(during)[3] < max(unloaded) + 0.3, (unloaded, during)
        timed_out = 0
        for sock in attackers[:50]:
            sock.settimeout(15)
            timed_out += sock.recv(12).startswith(b"HTTP/1.1 408")
        assert timed_out == 50
        FIGURES[f"flood {folder}"] = (
            f"2,000 connections sending headers only: workers held {held} sockets; a normal "
            f"call's first words during the flood {[round(t * 1000) for t in during]} ms, before "
            f"{[round(t * 1000) for t in unloaded]} ms; the unfinished requests got 408")
    finally:
        for sock in attackers:
            sock.close()
        server.stop()


def timed_call(server):
    """(status, seconds to the status or the first words, the answer's events, [DONE] seen,
    Retry-After) for one streamed call."""
    started = time.monotonic()
    with post_chat(server, body("hello"), timeout=30) as response:
        if response.status_code != 200:
            return (response.status_code, time.monotonic() - started, response.json(), False,
                    response.headers.get("Retry-After"))
        events, first = [], None
        for line in response.iter_lines(decode_unicode=True):
            if line == "data: [DONE]":
                return 200, first, events, True, None
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
                if first is None and streamed_text(events[-1:]):
                    first = time.monotonic() - started
        return 200, first, events, False, None


def test_over_max_concurrent_calls_a_call_is_answered_503_at_once(folder, start_server):
    server = start_server(folder, **LIMITS)  # one worker, MAX_CONCURRENT_CALLS=4
    unloaded = [timed_call(server)[1] for _ in range(3)]
    results, health = [], []

    def caller(i):
        if i < 16:
            results.append(timed_call(server))
            return
        time.sleep(0.3)  # /health, while the worker is full
        started = time.monotonic()
        health.append((requests.get(server.url + "/health", timeout=5).status_code,
                       time.monotonic() - started))

    assert not run_at_once(caller, range(17))
    [(health_status, health_took)] = health
    assert health_status == 200 and health_took < 0.5
    admitted = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] != 200]
    assert 4 <= len(admitted) <= 6 and len(refused) >= 8, [r[:2] for r in results]
    assert all(done for _, _, _, done, _ in admitted)
    assert max(r[1] for r in admitted) < max(unloaded) + 0.5, (unloaded, admitted)
    for status, took, answer, _, retry_after in refused:
        assert (status, answer["error"]["code"], retry_after) == (503, "server_overloaded", "1")
        assert took < 0.5
    FIGURES.setdefault(f"overload {folder}", (
        f"16 callers at once, MAX_CONCURRENT_CALLS=4: {len(admitted)} admitted, first words "
        f"{max(r[1] for r in admitted) * 1000:.0f} ms at most (alone "
        f"{max(unloaded) * 1000:.0f} ms); {len(refused)} got 503 within "
        f"{max(r[1] for r in refused) * 1000:.0f} ms"))


def test_overload_message_is_spoken_instead(fake, start_server):
    server = start_server("openai-sse", MAX_CONCURRENT_CALLS="1",
                          OVERLOAD_MESSAGE="Sorry, all our lines are busy. Please call back.")
    fake.script({"text": "a long answer " * 20, "token_delay": 0.05})
    with post_chat(server, body("first")) as busy:
        assert busy.status_code == 200
        status, took, events, done, _ = timed_call(server)
    assert (status, done) == (200, True)
    assert streamed_text(events) == "Sorry, all our lines are busy. Please call back."
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert took < 0.5
    assert len(server.log_lines("overloaded=spoken")) == 1
