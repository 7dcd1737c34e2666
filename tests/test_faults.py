"""The provider fault matrix: for every server and every way a provider fails, what the caller gets,
and that the server is healthy afterwards (the next call works, no provider stream or file
descriptor is left open).

Before the first byte a fault becomes an HTTP status with an OpenAI-shaped body; after it, one
`data: {"error": ...}` event and `data: [DONE]`. The README's fault table is this list.
"""

import os

import pytest
import requests

from conftest import free_port, load_fixture, post_chat, read_sse, streamed_text, wait_for

TOKENS = ["Sure", " thing,", " let", " me", " see", " what", " we", " have."]

# id: (stand-in plan, what a streaming server answers, what basic answers). An answer is ("status",
# code) for an error before the first byte, ("event", code) for an error event after it, ("ok",
# text) for a normal stream, or None where the fault cannot happen to that server.
FAULTS = {
    "http-400": ({"status": 400}, ("status", 400), ("status", 400)),
    "http-401": ({"status": 401}, ("status", 401), ("status", 401)),
    "http-403": ({"status": 403}, ("status", 403), ("status", 403)),
    "http-404-unknown-model": ({"status": 404}, ("status", 404), ("status", 404)),
    "http-429": ({"status": 429}, ("status", 429), ("status", 429)),
    "http-500": ({"status": 500}, ("status", 502), ("status", 502)),
    "http-503": ({"status": 503}, ("status", 502), ("status", 502)),
    "connection-refused": (None, ("status", 502), ("status", 502)),
    "no-answer-until-timeout": ({"hang": True}, ("status", 504), ("status", 504)),
    "stall-mid-stream": ({"tokens": TOKENS, "token_delay": 3}, ("event", "provider_timeout"),
                         ("status", 504)),
    "cut-after-3-chunks": ({"tokens": TOKENS, "cut_after": 3}, ("event", "provider_unavailable"),
                           ("status", 502)),
    "malformed-chunk": ({"tokens": TOKENS, "malformed_after": 3}, ("event", "bad_chunk"),
                        ("status", 502)),
    "in-band-error-event": ({"tokens": TOKENS, "error_event_after": 3}, ("event", None), None),
    "empty-answer": ({"tokens": []}, ("ok", ""), ("ok", "")),
    "only-done": ({"only_done": True}, ("ok", ""), None),
    "no-done": ({"tokens": TOKENS, "no_done": True}, ("ok", "".join(TOKENS)), None),
}


def open_fds(server):
    return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in server.pids()[1:])


@pytest.mark.parametrize("fault", list(FAULTS))
def test_provider_fault(folder, start_server, fake, fault):
    plan, streaming_answer, basic_answer = FAULTS[fault]
    expected = basic_answer if folder == "basic" else streaming_answer
    if expected is None:
        pytest.skip("a non-streaming provider call has no in-band events")
    env = {"OPENAI_TIMEOUT_SECONDS": "1"}
    if plan is None:
        env["OPENAI_BASE_URL"] = f"http://127.0.0.1:{free_port()}/v1"
    server = start_server(folder, **env)
    # warm: pooled connections exist already
    read_sse(post_chat(server, load_fixture("first-turn.json")))
    fds_before = open_fds(server)

    for _ in range(3):  # three times, so that a leak per fault would show
        if plan is not None:
            fake.script(plan)
        response = post_chat(server, load_fixture("first-turn.json"))
        kind, value = expected
        if kind == "status":
            assert response.status_code == value
            error = response.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
        else:
            assert response.status_code == 200
            events, done = read_sse(response)
            assert done, "a stream never just stops"
            errors = [event for event in events if "error" in event]
            if kind == "event":
                assert len(errors) == 1 and events[-1] is errors[0]
                if value:
                    assert errors[0]["error"]["code"] == value
            else:
                assert errors == [] and streamed_text(events) == value

    assert wait_for(lambda: not fake.open_streams(), 5), "no provider stream may be left open"
    # this server's provider cannot be reached: the worker is still up and answering
    if plan is None:
        assert requests.get(server.url + "/health", timeout=5).json() == {"status": "ok"}
    else:
        events, done = read_sse(post_chat(server, load_fixture("first-turn.json")))
        assert done and streamed_text(events).startswith("You said:"), "the next call works"
    assert wait_for(lambda: open_fds(server) <= fds_before + 4, 3), (fds_before, open_fds(server))
