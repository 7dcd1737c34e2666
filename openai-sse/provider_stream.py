"""The provider's stream as a `for` loop iterates it: identical in openai-sse/ and openai-advanced/.

Iterating a ProviderStream gives the provider's chunks as they arrive; it raises CallerHungUp when
the caller closes the connection, ProviderFailed when the provider fails, and ProviderSilent (a
ProviderFailed) when it says nothing for OPENAI_TIMEOUT_SECONDS. Behind it, one greenlet reads the
provider's stream into a queue and another waits on the caller's socket: the moment the caller hangs
up, the reader is killed, which closes the provider's connection: the model stops, and its bill too.

It needs gevent's monkey-patching, which gunicorn's gevent worker applies (gunicorn.conf.py).
Without it the reader would hold the whole process until the provider finished.
"""

import json
import socket

import gevent
import gevent.monkey
import gevent.queue
import gevent.socket
import openai
from contract import OPENAI_TIMEOUT_SECONDS, ChatError, ProviderFailed, provider_error

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
        self.lines = gevent.queue.Queue()
        self.answered = False  # a `data:` line has arrived
        self.finished = False  # the provider's stream has ended
        self.reader = gevent.spawn(self._read, client, upstream)
        self.watcher = gevent.spawn(self._watch, caller) if caller else None

    def _read(self, client, upstream):
        """Send the request; put each `data:` line's payload on the queue, then an exception if it
        failed, then END. Killing this greenlet closes the provider's connection."""
        try:
            # The SDK's low-level post() sends the dict as it is, with the SDK's retries, timeouts
            # and errors. The public create() first walks every message through the SDK's type
            # adapters: 0.55 ms of CPU per message, 8 ms per turn for 15 messages (measured).
            with client.post("/chat/completions", body={**upstream, "stream": True}, cast_to=object,
                             stream=True, stream_cls=openai.Stream[object]) as stream:
                for line in stream.response.iter_lines():
                    if line.startswith("data:"):
                        self.lines.put(line[5:].strip())
        except Exception as exc:  # handed to the request, which raises it as a ProviderFailed
            self.lines.put(exc)
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
            self.reader.kill(block=False)
        if self.watcher is not None:
            self.watcher.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


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
