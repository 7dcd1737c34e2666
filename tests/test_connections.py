"""Connections to the provider (openai-sse, openai-advanced): no turn of a call waits for a new one
(a TCP and TLS handshake) — not after a pause, not after a hang-up, not the first of a worker."""

import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import (BASE_ENV, STREAMING_FOLDERS, Server, hang_up, load_fixture, open_raw_stream,
                      post_chat, read_sse, streamed_text, wait_for)
from fake_llm import FakeLLM


@pytest.fixture
def stand_in():
    """A stand-in provider of this test's own: only its server's connections reach it."""
    fake = FakeLLM().start()
    yield fake
    fake.stop()


@pytest.fixture
def start(tmp_path):
    """start(folder, base_url, **env): a fresh server (one worker) for this test alone."""
    servers = []

    def start_one(folder, base_url, **env):
        config = {**BASE_ENV, "OPENAI_BASE_URL": base_url,
                  "MEMORY_DB_PATH": str(tmp_path / f"memory-{len(servers)}.sqlite3"), **env}
        servers.append(Server.in_repo(folder, config, tmp_path))
        return servers[-1]

    yield start_one
    for server in servers:
        server.stop()


def idle_connection(fake):
    """Whether the stand-in holds a connection that has served a request and waits for the next."""
    return any(c.served and not c.busy and c.closed_at is None for c in fake.connections)


def turn(server, fake):
    """One streamed turn; whether its provider request came on a connection opened for it."""
    events, done = read_sse(post_chat(server, load_fixture("first-turn.json")))
    assert done and streamed_text(events).startswith("You said:")
    return fake.requests[-1]["connection_request"] == 1


def a_call(folder, start):
    """A call with pauses of 1 to 30 s and a barge-in, against a fresh worker: for each turn,
    whether it waited for a new connection; and how fast the hang-up reached the provider."""
    fake = FakeLLM().start()
    try:
        server = start(folder, fake.base_url)
        # the worker opens its first connection on its own, before any call
        assert wait_for(lambda: idle_connection(fake), 5), "no connection opened at start-up"
        opened_for = {"first turn": turn(server, fake)}
        for pause in (1, 6, 12):
            time.sleep(pause)
            opened_for[f"after a {pause} s pause"] = turn(server, fake)
        hang_up_seconds = hang_up(server, fake)
        time.sleep(1)
        opened_for["1 s after the hang-up"] = turn(server, fake)
        time.sleep(30)
        opened_for["after a 30 s pause"] = turn(server, fake)
        return opened_for, hang_up_seconds
    finally:
        fake.stop()


def test_no_turn_of_a_call_waits_for_a_new_connection(start):
    # both folders at once: the call lasts about 50 s
    with ThreadPoolExecutor(len(STREAMING_FOLDERS)) as pool:
        calls = dict(zip(STREAMING_FOLDERS,
                         pool.map(lambda folder: a_call(folder, start), STREAMING_FOLDERS)))
    for folder, (opened_for, hang_up_seconds) in calls.items():
        assert not any(opened_for.values()), (folder, opened_for)
        # a few ms when the machine is quiet (tests/README.md): generous margins here
        assert hang_up_seconds < 0.5, (folder, hang_up_seconds)


@pytest.mark.parametrize("folder", STREAMING_FOLDERS)
def test_turns_after_hang_ups_find_a_connection_open(folder, start, stand_in):
    server = start(folder, stand_in.base_url)
    assert wait_for(lambda: idle_connection(stand_in), 5)
    for _ in range(3):
        assert hang_up(server, stand_in) < 0.5
        assert wait_for(lambda: idle_connection(stand_in), 2), "no connection replaced it"
        assert not turn(server, stand_in), "the turn after a hang-up waited for a connection"


@pytest.mark.parametrize("folder", STREAMING_FOLDERS)
def test_a_connection_the_provider_closed_fails_no_turn(folder, start):
    fake = FakeLLM(idle_timeout=0.5).start()  # like a provider that closes idle ones quickly
    try:
        server = start(folder, fake.base_url)
        for _ in range(3):
            turn(server, fake)
            time.sleep(1)
            assert fake.open_connections() == [], "the stand-in closed every idle connection"
    finally:
        fake.stop()


@pytest.mark.parametrize("folder", STREAMING_FOLDERS)
def test_a_provider_down_at_start_up_delays_nothing(folder, start):
    # A provider that accepts a connection and never answers: a worker waiting for it at start-up
    # would not answer /health until the request to it had timed out (5 s).
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        silent.settimeout(10)
        started = time.monotonic()
        server = start(folder, f"http://127.0.0.1:{silent.getsockname()[1]}/v1")
        healthy_after = time.monotonic() - started
        connection, _ = silent.accept()  # the worker's first connection: waiting for an answer
        with connection:
            assert requests.get(server.url + "/health", timeout=2).json() == {"status": "ok"}
            time.sleep(6)  # its request times out
            assert requests.get(server.url + "/health", timeout=2).json() == {"status": "ok"}
    assert healthy_after < 5, healthy_after
    for level in ("WARNING", "ERROR", "Traceback"):
        assert not [line for line in server.log_lines(level) if "not set" not in line], \
            server.log()


@pytest.mark.parametrize("folder", STREAMING_FOLDERS)
def test_background_requests_stop_when_the_worker_is_idle(folder, start, stand_in):
    # one connection refreshed every 0.8 s (4/5 of its keep-alive) until 3 s after the last turn
    server = start(folder, stand_in.base_url, PROVIDER_KEEPALIVE_SECONDS="1",
                   KEEP_WARM_SECONDS="3")
    turn(server, stand_in)
    last_turn = time.monotonic()

    def sent():
        return sum(c.served for c in stand_in.connections) - len(stand_in.requests)

    during = sent()
    time.sleep(2.5)
    assert sent() > during, "the connection is refreshed while the worker has calls"
    time.sleep(max(0.0, last_turn + 4.5 - time.monotonic()))
    idle = sent()
    time.sleep(3)
    assert sent() == idle, "nothing is sent once the worker has been idle KEEP_WARM_SECONDS"
    assert len(stand_in.open_connections()) <= 2


@pytest.mark.parametrize("folder", STREAMING_FOLDERS)
def test_connections_opened_after_many_hang_ups_are_bounded(folder, start, stand_in):
    server = start(folder, stand_in.base_url)
    assert wait_for(lambda: idle_connection(stand_in), 5)
    stand_in.script(*[{"ttft": 5}] * 12)
    callers = [open_raw_stream(server, load_fixture("first-turn.json")) for _ in range(12)]
    assert wait_for(lambda: len(stand_in.streams) == 12, 5)
    hung_up_at = time.monotonic()
    for caller in callers:
        caller.close()
    assert wait_for(lambda: not stand_in.open_streams(), 2)
    time.sleep(1)
    opened = [c for c in stand_in.connections if c.opened_at > hung_up_at]
    assert 1 <= len(opened) <= 8, len(opened)  # SPARE_CONNECTIONS in provider_stream.py


@pytest.mark.skipif("openai-advanced" not in STREAMING_FOLDERS, reason="no folder yet")
def test_both_providers_are_kept_warm_through_hedges(start, stand_in):
    fallback = FakeLLM().start()
    try:
        server = start("openai-advanced", stand_in.base_url, FALLBACK_BASE_URL=fallback.base_url,
                       FALLBACK_API_KEY="sk-fallback-key", HEDGE_AFTER_MS="300")
        assert wait_for(lambda: idle_connection(stand_in) and idle_connection(fallback), 5)
        for _ in range(3):
            stand_in.script({"ttft": 2})  # hedged after 300 ms: the fallback wins
            assert not turn(server, fallback), "the fallback's request waited for a connection"
            assert stand_in.requests[-1]["connection_request"] > 1
            assert wait_for(lambda: not stand_in.open_streams(), 2), "the loser is closed"
            assert wait_for(lambda: idle_connection(stand_in), 2), "and its connection replaced"
    finally:
        fallback.stop()
