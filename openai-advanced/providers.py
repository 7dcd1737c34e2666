"""A second provider before the first word: fall back when the first fails, hedge when it is slow.

With FALLBACK_BASE_URL set, each round's request goes to the primary provider as usual. If the
primary fails before its first token (unreachable, any error status, silence, an answer without
words), the same request goes to the fallback at once. If it has produced no token — words or a
tool call; a role chunk does not count — HEDGE_AFTER_MS after the request, the request goes to the
fallback too, and whichever produces a token first is relayed; the other stream is closed at once,
so that its provider stops generating and billing. Nothing reaches the caller before that first
token, so a caller never hears two answers; after it, a failure is an error event, as without a
fallback. When both fail, the caller gets the fallback's error.
"""

import collections
import dataclasses
import time

import gevent
import gevent.queue

from contract import ProviderFailed, carries_token, complete, has_words
from provider_stream import ProviderStream


def no_words():
    """The failure of a primary whose answer ended without a word or a tool call."""
    return ProviderFailed(502, "The model provider ended its answer without words.",
                          "provider_error", code="no_words")


class Providers:
    """Where a round's request goes: the primary provider, and the fallback if one is set."""

    def __init__(self, primary, fallback, fallback_model, hedge_after_seconds):
        self.primary, self.fallback = primary, fallback  # OpenAI clients; fallback: None or one
        self.fallback_model, self.hedge_after_seconds = fallback_model, hedge_after_seconds

    def fallback_request(self, request):
        """The round's request as the fallback gets it: its own model name, when one is set."""
        return {**request, "model": self.fallback_model or request["model"]}

    def stream(self, request, caller):
        """The round's stream: a ProviderStream, or a RacedStream when there is a fallback."""
        if self.fallback is None:
            return ProviderStream(self.primary, request, caller)
        return RacedStream(self, request, caller)

    def create(self, request):
        """stream: false — (the whole chat.completion, its Outcome); the fallback answers when
        the primary fails. Raises the ProviderFailed of the last provider asked."""
        try:
            completion = complete(self.primary, request)
            if self.fallback is None or has_words(completion):
                return completion, Outcome("primary")
            primary_failure = no_words()
        except ProviderFailed as failure:
            if self.fallback is None:
                raise
            primary_failure = failure
        return (complete(self.fallback, self.fallback_request(request)),
                Outcome("fallback:failure", primary_failure))

    def note(self, steps, outcome):
        """With a fallback, the log line says who answered each round and why (an Outcome or a
        RacedStream), and how the primary failed when it did: `primary=503`, `primary=<code>`."""
        if self.fallback is None:
            return
        steps["provider"] = "+".join(filter(None, (steps.get("provider"), outcome.answered_by)))
        if outcome.primary_failure:
            failure = outcome.primary_failure
            steps["primary"] = failure.provider_status or failure.error["code"]


@dataclasses.dataclass
class Outcome:
    """Who answered a round ("primary", "fallback:failure" ...), and the primary's failure."""

    answered_by: str
    primary_failure: ProviderFailed | None = None


class RacedStream:
    """A round's stream from the primary, or from the fallback when the primary fails or is slow
    before its first token. Iterates and closes like a ProviderStream; `answered_by` says who
    answered and why the fallback was asked: "primary", "fallback:failure", "fallback:hedge",
    "primary:hedge"."""

    def __init__(self, providers, request, caller):
        self.providers, self.request, self.caller = providers, request, caller
        self.results = gevent.queue.Queue()  # (name, item) from each racer, up to its first token
        self.streams, self.racers, self.failures = {}, {}, {}
        self.hedge_at = time.monotonic() + providers.hedge_after_seconds \
            if providers.hedge_after_seconds > 0 else None
        self.reason = None  # why the fallback was asked: "failure" or "hedge"
        self.winner, self.buffered = None, collections.deque()
        self.start("primary", providers.primary, request)

    @property
    def answered_by(self):
        """Who answered, and why the fallback was asked: e.g. "primary", "fallback:hedge"."""
        return f"{self.winner or 'nobody'}:{self.reason}" if self.reason else "primary"

    @property
    def primary_failure(self):
        """The primary's ProviderFailed, if it failed before its first token; else None."""
        return self.failures.get("primary")

    def start(self, name, client, request):
        """Send the request to one provider, and race its stream to a first token."""
        self.streams[name] = stream = ProviderStream(client, request, self.caller)
        self.racers[name] = gevent.spawn(self.race, name, stream)

    def race(self, name, stream):
        """Read one stream up to its first token, handing each chunk (or failure) to `results`."""
        try:
            for raw, chunk in stream:
                self.results.put((name, (raw, chunk)))
                if carries_token(chunk):
                    return
            self.results.put((name, None))  # it ended without a token: an empty answer
        except Exception as exc:  # CallerHungUp, ProviderFailed ...: the request decides
            self.results.put((name, exc))

    def ask_fallback(self, reason):
        """The primary failed ("failure") or is slow ("hedge"): ask the fallback too."""
        self.reason = reason
        self.start("fallback", self.providers.fallback,
                   self.providers.fallback_request(self.request))

    def pick(self):
        """Wait for the first token from either provider; returns the name of the one to relay."""
        chunks = {"primary": [], "fallback": []}
        while True:
            hedging = self.hedge_at is not None and "fallback" not in self.streams
            try:
                name, item = self.results.get(
                    timeout=max(0.0, self.hedge_at - time.monotonic()) if hedging else None)
            except gevent.queue.Empty:  # no token from the primary in HEDGE_AFTER_MS
                self.ask_fallback("hedge")
                continue
            if isinstance(item, Exception) and not isinstance(item, ProviderFailed):
                raise item  # the caller went away (CallerHungUp), or a bug of ours
            if item is None and name == "primary":  # an answer without words: a failure too
                item = no_words()
            if isinstance(item, ProviderFailed):
                self.failures[name] = item
                if "fallback" not in self.streams:
                    self.ask_fallback("failure")
                elif len(self.failures) == 2:
                    raise self.failures["fallback"]
                continue  # the other one may still answer
            if item is not None:
                chunks[name].append(item)
            if item is None or carries_token(item[1]):  # a token, or an answer without one
                self.buffered.extend(chunks[name])
                return name

    def __iter__(self):
        return self

    def __next__(self):
        if self.winner is None:
            self.winner = self.pick()
            for name in self.streams.keys() - {self.winner}:  # stop the other one at once
                self.racers[name].kill(block=False)
                self.streams[name].close()
        if self.buffered:
            return self.buffered.popleft()
        return next(self.streams[self.winner])  # the winner's racer has stopped: read it here

    def close(self):
        """Stop both providers' streams (a finished one is left as it is)."""
        for name, stream in self.streams.items():
            self.racers[name].kill(block=False)
            stream.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()
