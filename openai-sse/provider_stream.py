"""The provider's stream as a `for` loop iterates it: identical in openai-sse/ and openai-advanced/.

Iterating a ProviderStream gives the provider's chunks as they arrive; it raises CallerHungUp when
the caller closes the connection, ProviderFailed when the provider fails, and ProviderSilent (a
ProviderFailed) when it says nothing for OPENAI_TIMEOUT_SECONDS. Behind it, one greenlet reads the
provider's stream into a queue and another waits on the caller's socket: the moment the caller hangs
up, the reader is killed, which closes the provider's connection: the model stops, and its bill too.

Every turn is a new request to the provider, and one that finds no open connection first waits for
a TCP and TLS handshake (two or three round trips of dead air). So idle connections stay open
across a caller's pauses (keepalive_http_client), and WarmConnections opens one when the worker
starts and one in place of each connection closed to stop the model.

It needs gevent's monkey-patching, which gunicorn's gevent worker applies (gunicorn.conf.py).
Without it the reader would hold the whole process until the provider finished.
"""

import dataclasses
import json
import socket
import time

import gevent
import gevent.event
import gevent.monkey
import gevent.queue
import gevent.socket
import openai
from contract import (OPENAI_TIMEOUT_SECONDS, ChatError, ProviderFailed, ask, log,
                      provider_error, setting)

# Configuration: idle connections to the provider
# How long an idle connection stays open. The SDK's 5 s is shorter than most pauses on a call.
# OpenAI's API answers through Cloudflare, which closes an idle HTTP/1.1 connection after 400 s
# (developers.cloudflare.com/fundamentals/reference/connection-limits): this closes it first.
PROVIDER_KEEPALIVE_SECONDS = setting("PROVIDER_KEEPALIVE_SECONDS", 300.0, float, 1)
# After a worker's last turn, one connection is kept open this long (0: none opened in advance).
KEEP_WARM_SECONDS = setting("KEEP_WARM_SECONDS", 600.0, float, 0)
SPARE_CONNECTIONS = 8  # at most this many opened at once, after as many hang-ups
KEPT_WARM = {}  # each client kept warm: its WarmConnections

END = object()  # the reader puts it on the queue after the provider's last line
HUNG_UP = object()  # the watcher puts it on the queue when the caller has closed the connection


class CallerHungUp(Exception):
    """The caller closed the connection: Vapi does that when the caller interrupts or hangs up."""


class ProviderSilent(ProviderFailed):
    """The provider sent nothing for OPENAI_TIMEOUT_SECONDS."""

    def __init__(self):
        super().__init__(504, "The model provider did not answer in time (OPENAI_TIMEOUT_SECONDS).",
                         "timeout_error", code="provider_timeout")


class ProviderStream:
    """One streaming request to the provider, sent at once. Iterate it for (raw, chunk) pairs — the
    text of the provider's `data:` line and the chunk parsed from it — up to the provider's [DONE].
    `caller` is the caller's socket, watched for a hang-up (None: not watched). Use it in a `with`
    block: leaving early (the caller went away, an error) closes the provider's stream."""

    def __init__(self, client, upstream, caller):
        if not gevent.monkey.is_module_patched("socket"):
            raise ChatError(500, "This server streams with gevent: start it with "
                                 "`gunicorn app:app` (or `python app.py`), not `flask run`.",
                            "server_error", code="gevent_required")
        self.warm = KEPT_WARM.get(client)
        if self.warm is not None:
            self.warm.turn_started()
        self.lines = gevent.queue.Queue()
        self.answered = False  # a `data:` line has arrived
        self.finished = False  # the provider's stream has ended
        self.read_out = False  # the reader is done: its connection, if any, went back to the pool
        self.reader = gevent.spawn(self._read, client, upstream)
        self.watcher = gevent.spawn(self._watch, caller) if caller else None

    def _read(self, client, upstream):
        """Send the request; put each `data:` line's payload on the queue, then an exception if it
        failed, then END. Killing this greenlet closes the provider's connection."""
        try:
            # ask() adapts the request to the model. The SDK's low-level post() sends the dict as
            # it is, with the SDK's retries, timeouts and errors. The public create() first walks
            # every message through the SDK's type adapters: 0.55 ms of CPU per message, 8 ms per
            # turn for 15 messages (measured).
            with ask(client, {**upstream, "stream": True}, lambda request: client.post(
                    "/chat/completions", body=request, cast_to=object, stream=True,
                    stream_cls=openai.Stream[object])) as stream:
                for line in stream.response.iter_lines():
                    if line.startswith("data:"):
                        self.lines.put(line[5:].strip())
        except Exception as exc:  # handed to the request, which raises it as a ProviderFailed
            self.lines.put(exc)
        self.read_out = True  # an error answer was read whole too: nothing to replace
        self.lines.put(END)

    def _watch(self, caller):
        """Wait until the caller's socket is readable; if it was closed, stop the reader."""
        try:
            gevent.socket.wait_read(caller.fileno())
            while caller.recv(1, socket.MSG_PEEK):  # the caller sent more (a pipelined request)
                gevent.sleep(0.05)
                gevent.socket.wait_read(caller.fileno())
        except ValueError:  # a TLS socket cannot be peeked at: the next write will tell
            return
        except OSError:  # reset by the caller
            pass
        self.reader.kill(block=False)
        self.lines.put(HUNG_UP)

    def __iter__(self):
        return self

    def __next__(self):
        if self.finished:
            raise StopIteration
        try:
            line = self.lines.get(timeout=OPENAI_TIMEOUT_SECONDS)
        except gevent.queue.Empty:
            raise ProviderSilent() from None
        if line is HUNG_UP:
            raise CallerHungUp()
        if isinstance(line, Exception):
            raise provider_error(line) from line
        if line is END and not self.answered:
            raise ProviderFailed(502, "The model provider ended the stream without an answer.",
                                 "provider_error", code="provider_unavailable")
        if line is END or line == "[DONE]":
            self.finished = True
            raise StopIteration
        self.answered = True
        return line, parse_chunk(line)

    def close(self):
        """Stop the provider's stream, unless it has ended, and stop watching the caller."""
        if not self.finished:
            self.reader.kill(block=False)  # its connection is closed, not reused
            if self.warm is not None and not self.read_out:
                self.warm.replace()  # the next turn finds another open
        if self.watcher is not None:
            self.watcher.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def keepalive_http_client():
    """The SDK's own HTTP client (its defaults), with idle connections kept open
    PROVIDER_KEEPALIVE_SECONDS instead of 5: pass it to openai.OpenAI as `http_client`."""
    return openai.DefaultHttpxClient(limits=dataclasses.replace(
        openai.DEFAULT_CONNECTION_LIMITS, keepalive_expiry=PROVIDER_KEEPALIVE_SECONDS))


def keep_warm(client):
    """Keep connections to this client's provider open for the next turn (WarmConnections)."""
    if KEEP_WARM_SECONDS > 0 and gevent.monkey.is_module_patched("socket"):
        KEPT_WARM[client] = WarmConnections(client)


class WarmConnections:
    """Opens connections to one provider in the background, through the client's own pool, so that
    turns find one open: one when the worker starts, one for each stream closed before its end (at
    most SPARE_CONNECTIONS at once), and one refreshed before it expires, until KEEP_WARM_SECONDS
    after the last turn. Each is a GET /models: no model runs, nothing is billed. A provider that
    does not answer is left alone: the next turn connects as it would have anyway."""

    def __init__(self, client):
        self.client = client.with_options(max_retries=0, timeout=5)
        self.refresh_after = max(1.0, PROVIDER_KEEPALIVE_SECONDS * 0.8)  # 1 s: never a busy loop
        self.last_turn = self.last_sent = time.monotonic()
        self.wanted = 1  # connections to open now: the worker's first
        self.wake = gevent.event.Event()
        self.wake.set()
        gevent.spawn(self.run)

    def turn_started(self):
        """A turn uses a connection: keep one open from now on, for KEEP_WARM_SECONDS."""
        now = time.monotonic()
        if now - self.last_turn > KEEP_WARM_SECONDS:
            self.wake.set()  # the loop waits with no timeout once the worker has been idle
        self.last_turn = now

    def replace(self):
        """A connection was closed to stop a stream: open one in its place."""
        self.wanted = min(self.wanted + 1, SPARE_CONNECTIONS)
        self.wake.set()

    def run(self):
        """Open what is wanted; refresh one connection before it expires while there are turns."""
        while True:
            due = max(self.last_turn, self.last_sent) + self.refresh_after
            idle = time.monotonic() - self.last_turn > KEEP_WARM_SECONDS
            self.wake.wait(timeout=None if idle else max(0.0, due - time.monotonic()))
            self.wake.clear()
            now = time.monotonic()
            if not self.wanted:
                if now < max(self.last_turn, self.last_sent) + self.refresh_after \
                        or now - self.last_turn > KEEP_WARM_SECONDS:
                    continue  # a connection was used recently, or the worker is idle: no request
                self.wanted = 1
            wanted, self.wanted, self.last_sent = self.wanted, 0, now
            gevent.joinall([gevent.spawn(self.open_one) for _ in range(wanted)])

    def open_one(self):
        """One request that leaves a connection open in the pool (a new one if none is idle)."""
        try:
            self.client.models.list()
        except openai.APIError as exc:  # 401 and 404 leave the connection open too
            log.debug("keeping a provider connection open: %s", type(exc).__name__)


def parse_chunk(line):
    """The provider's chunk. One Vapi cannot use (no list of `choices` objects would fail the call)
    raises ProviderFailed, with the provider's own error when it sent one in the stream."""
    try:
        chunk = json.loads(line)
    except ValueError:
        chunk = None
    choices = chunk.get("choices") if isinstance(chunk, dict) else None
    if isinstance(choices, list) and "error" not in chunk and all(
            isinstance(c, dict) and isinstance(c.get("delta", {}), dict) for c in choices):
        return chunk
    error = chunk.get("error") if isinstance(chunk, dict) else None
    if isinstance(error, dict):
        message = str(error.get("message") or "The model provider failed mid-answer.")
        failed = ProviderFailed(502, message, str(error.get("type") or "provider_error"),
                                error.get("param"), error.get("code"))
        failed.provider_code = error.get("code") or error.get("type") or "error_event"
        raise failed
    raise ProviderFailed(502, "The model provider sent a malformed chunk.", "provider_error",
                         code="bad_chunk")


def start_relay(events):
    """Run a relay generator up to its first event before answering Vapi: a failure until then is
    raised here, and still gets a real HTTP status. Returns the whole stream to send: a generator
    itself, so that closing it (the caller went away) closes `events` and the provider's stream."""
    first_event = next(events)

    def stream():
        try:
            yield first_event
            yield from events
        finally:
            events.close()

    return stream()
