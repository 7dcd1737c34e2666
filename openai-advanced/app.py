"""A Vapi Custom LLM server that shapes the conversation before the model sees it.

What it adds over `openai-sse/`: a system prompt rendered for every turn from prompt.md (the time,
the caller's number, what earlier calls from that number said, the knowledge passages for this
question), an optional rewrite of the caller's last words, and server-side tools the model can call
mid-answer while the caller hears a short filler sentence. Every step before the first token is
timed in the log line."""

import dataclasses
import os
import time
import zoneinfo
from pathlib import Path

import gevent
import openai
from flask import Flask, Response, request

from contract import (OPENAI_API_KEY, OPENAI_BASE_URL, OPENAI_MAX_RETRIES,
                      OPENAI_TIMEOUT_SECONDS, ChatError, init_app, log, provider_error,
                      read_chat_request, run_with_gunicorn, sse, warm_up)
from knowledge import Knowledge
from memory import MemoryUnavailable, open_memory
from prompt import Prompt, caller_number, printable, rewrite_utterance, text_of
from provider_stream import CallerHungUp, ProviderStream
from tools import build_tools, server_tools_for, sort_tool_calls, tool_round_messages, with_tools

HERE = Path(__file__).resolve().parent

# Configuration: what this folder adds (contract.py reads the settings every folder has)
BUSINESS_TIMEZONE = os.getenv("BUSINESS_TIMEZONE", "America/New_York")
BUSINESS_TZ = zoneinfo.ZoneInfo(BUSINESS_TIMEZONE)  # a wrong name fails here, at start-up
KNOWLEDGE_DIR = os.getenv("KNOWLEDGE_DIR") or HERE / "knowledge"
KNOWLEDGE_MAX_PASSAGES = int(os.getenv("KNOWLEDGE_MAX_PASSAGES", "3"))
KNOWLEDGE_MAX_CHARS = int(os.getenv("KNOWLEDGE_MAX_CHARS", "1500"))
# memory.py reads where memory is kept and for how long (MEMORY_DATABASE_URL, MEMORY_DB_PATH, ...)
MEMORY_ENABLED = os.getenv("MEMORY_ENABLED", "1") == "1"
MEMORY_MAX_TURNS = int(os.getenv("MEMORY_MAX_TURNS", "5"))
REWRITE_ENABLED = os.getenv("REWRITE_ENABLED", "") == "1"
REWRITE_MODEL = os.getenv("REWRITE_MODEL", "")  # empty: the turn's own model
REWRITE_BUDGET_MS = int(os.getenv("REWRITE_BUDGET_MS", "800"))
AVAILABILITY_API_URL = os.getenv("AVAILABILITY_API_URL", "")  # empty: open_slots is not offered
AVAILABILITY_TIMEOUT_SECONDS = float(os.getenv("AVAILABILITY_TIMEOUT_SECONDS", "3"))
MAX_TOOL_ROUNDS = int(os.getenv("MAX_TOOL_ROUNDS", "3"))
TOOL_FILLER = os.getenv("TOOL_FILLER", "One moment while I check that.")
FLUSH_AFTER_FILLER = os.getenv("FLUSH_AFTER_FILLER", "") == "1"  # needs voice.chunkPlan.enabled

# gunicorn.conf.py runs this app on gevent, as openai-sse; see provider_stream.py.
client = openai.OpenAI(api_key=OPENAI_API_KEY or "not-set", base_url=OPENAI_BASE_URL,
                       timeout=OPENAI_TIMEOUT_SECONDS + 1, max_retries=OPENAI_MAX_RETRIES)
warm_up(client)
# X-Accel: tell nginx not to buffer
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
prompt = Prompt(HERE / "prompt.md")
knowledge = Knowledge(KNOWLEDGE_DIR)
memory = open_memory() if MEMORY_ENABLED else None
SERVER_TOOLS = build_tools(BUSINESS_TIMEZONE, AVAILABILITY_API_URL, AVAILABILITY_TIMEOUT_SECONDS)

app = Flask(__name__)
init_app(app)


@dataclasses.dataclass
class Answer:
    """What this server keeps about one turn's answer while the model's rounds are relayed."""

    server_tools: dict  # the server-side tools this turn may use
    caller_socket: object  # watched for a hang-up in every round
    caller: str | None  # the caller's phone number, for memory
    user_text: str | None  # the caller's own words, to remember the turn by (None: a tool turn)
    spoken: list = dataclasses.field(default_factory=list)  # the model's words the caller heard
    vapi_tools: list = dataclasses.field(default_factory=list)  # Vapi's tools the answer ended with
    rounds: int = 0  # server-side tool rounds so far
    filler_sent: bool = False
    last_heard: str = ""
    completion_id: str | None = None  # the first round's: every chunk of the response carries it
    completion: object = None  # stream: false — the last round's chat.completion

    def say(self, text, separate):
        """Text for the caller; with a space in front when it must be `separate` from what they
        heard last (the filler, the first words of a round), so that a voice reads "that. We", not
        "that.We"."""
        if separate and self.last_heard[-1:].strip() and not text[:1].isspace():
            text = " " + text
        self.last_heard = text
        return text

    def remembered(self):
        """The assistant's side of the turn, to remember: its words, and Vapi's tools it called."""
        tools = f"[called {', '.join(self.vapi_tools)}]" if self.vapi_tools else ""
        return " ".join(part for part in ("".join(self.spoken).strip(), tools) if part)


@app.post("/chat/completions")
@app.post("/v1/chat/completions")
# the model URL was pasted with /chat/completions at the end
@app.post("/chat/completions/chat/completions")
@app.post("/v1/chat/completions/chat/completions")
def chat_completions():
    """Vapi's turn: shape the request, then relay the model's rounds as SSE or JSON."""
    turn = read_chat_request()  # raises ChatError (an OpenAI-shaped 4xx) for a bad request
    answer = shape_request(turn)
    if not turn.stream:
        for _ in tool_loop(turn, answer, fetch_round):
            pass  # fetch_round sends nothing on the way
        turn.first_token_at, turn.chunks = time.perf_counter(), 1
        remember(turn, answer)
        return answer.completion.to_dict()

    events = relay(turn, answer)
    try:
        # runs up to the first event: until then a failure keeps its status
        first_event = next(events)
    except CallerHungUp:
        return "", 499  # nobody is listening any more
    return Response(prepend(first_event, events), mimetype="text/event-stream", headers=SSE_HEADERS)


def relay(turn, answer):
    """The model's rounds as one stream, then `data: [DONE]`. Once something was sent, a failure
    becomes one error event before [DONE]; before that it is raised, so the view can answer with its
    HTTP status."""
    failed = False
    try:
        yield from tool_loop(turn, answer, relay_round)
    except CallerHungUp:
        if turn.chunks:
            return  # nobody to send [DONE] to
        raise
    except Exception as exc:
        if not turn.chunks:
            raise
        if not isinstance(exc, ChatError):  # a bug of ours: the traceback goes to the log only
            log.error("unexpected error while relaying", exc_info=exc)
            exc = ChatError(500, "Internal server error.", "server_error")
        yield sse(exc.body())
        failed = True
    yield b"data: [DONE]\n\n"
    if not failed:
        remember(turn, answer)  # only a whole answer, that the caller heard to the end


def prepend(first_event, events):
    """The stream with its first event in front again."""
    yield first_event
    yield from events


def tool_loop(turn, answer, ask):
    """Ask the model; while it answers with calls to server-side tools alone, run them, give it the
    results and ask again, at most MAX_TOOL_ROUNDS times. `ask(request, offered, turn, answer)`
    relays (streaming) or fetches (stream: false) one round and returns the server-side calls the
    round ended with."""
    while True:
        offered = answer.server_tools if answer.rounds < MAX_TOOL_ROUNDS else {}
        calls = yield from ask(with_tools(turn.upstream, offered), offered, turn, answer)
        if not calls:
            return
        answer.rounds += 1
        turn.steps["rounds"] = answer.rounds
        turn.upstream["messages"] += tool_round_messages(calls, offered)


def relay_round(request, offered, turn, answer):
    """Relay one round of the model's stream. Text and Vapi's tool calls go to the caller as they
    arrive; calls to server-side tools are held back. If one answer calls both kinds, Vapi's tools
    win: the server-side calls are dropped. Returns the held calls when the round ended with them
    alone and they were offered — and only then, certain that the tools will run, the caller hears
    TOOL_FILLER."""
    calls, vapi_index, held_finish, first_words = {}, {}, None, True
    with ProviderStream(client, request, answer.caller_socket) as provider:
        for raw, chunk in provider:
            choice = chunk["choices"][0] if chunk["choices"] else {}
            delta = sent = choice.get("delta") or {}
            answer.completion_id = answer.completion_id or chunk.get("id")
            if delta.get("tool_calls"):
                to_vapi = sort_tool_calls(delta["tool_calls"], calls, vapi_index,
                                          answer.server_tools, answer.rounds)
                sent = {**delta, "tool_calls": to_vapi} if to_vapi else without(delta, "tool_calls")
            elif choice.get("finish_reason") == "tool_calls" and len(vapi_index) < len(calls):
                held_finish = chunk  # the round ends in server-side calls: not the end for Vapi
                continue
            if answer.rounds:  # a later round goes on with the first: no second role chunk
                sent = without(sent, "role")
            if isinstance(sent.get("content"), str) and sent["content"]:
                words = answer.say(sent["content"], separate=first_words)
                answer.spoken.append(words)
                sent, first_words = {**sent, "content": words}, False
            if sent == delta and not answer.rounds:  # untouched: the provider's own bytes
                turn.relayed(chunk)
                yield b"data: " + raw.encode() + b"\n\n"
            elif any(sent.get(key) for key in ("content", "tool_calls", "role")) \
                    or choice.get("finish_reason"):  # one completion id for the whole response
                yield event(turn, {**chunk, "id": answer.completion_id,
                                   "choices": [{**choice, "delta": sent}]})
    server_calls = [call for call in calls.values() if call["name"] in answer.server_tools]
    if server_calls and not vapi_index and offered:
        if not answer.filler_sent:
            answer.filler_sent = True
            filler = answer.say(TOOL_FILLER + (" <flush />" if FLUSH_AFTER_FILLER else ""), True)
            yield event(turn, {**(held_finish or chunk), "id": answer.completion_id, "choices": [
                {"index": 0, "delta": {"content": filler}, "finish_reason": None}]})
        return server_calls
    answer.vapi_tools = [call["name"] for call in calls.values()
                         if call["name"] not in answer.server_tools]
    if held_finish:  # the server-side calls were dropped: end the turn here
        yield event(turn, {**held_finish, "id": answer.completion_id, "choices": [
            {"index": 0, "delta": {}, "finish_reason": "tool_calls" if vapi_index else "stop"}]})
    return None


def without(delta, key):
    return {name: value for name, value in delta.items() if name != key}


def event(turn, chunk):
    """A chunk of ours as one `data:` event, counted for the log line."""
    turn.relayed(chunk)
    return sse(chunk)


def fetch_round(request, offered, turn, answer):
    """stream: false — one round as a whole chat.completion; returns its server-side calls like
    relay_round (when they are all it asks for and they were offered)."""
    try:
        answer.completion = client.chat.completions.create(**request)
    except (openai.OpenAIError, ValueError) as exc:  # ValueError: the provider sent broken JSON
        raise provider_error(exc) from exc
    message = answer.completion.choices[0].message if answer.completion.choices else None
    answer.spoken = [message.content or ""] if message else []
    calls = [{"id": call.id, "name": call.function.name, "arguments": call.function.arguments}
             for call in (message.tool_calls or [])] if message else []
    if calls and offered and all(call["name"] in offered for call in calls):
        return calls
    answer.vapi_tools = [call["name"] for call in calls if call["name"] not in answer.server_tools]
    return None
    yield  # never reached: it makes this a generator, like relay_round, for tool_loop to drive


def shape_request(turn):
    """Rewrite the caller's last words if enabled, and append this turn's context to the system
    prompt. Times each step for the log line; returns the turn's Answer."""
    messages = turn.upstream["messages"]
    last_words = text_of(messages[-1].get("content")) if messages[-1]["role"] == "user" else ""
    user_text = last_words if last_words.strip() else None  # None: the turn ends with a tool result
    question = next((text_of(m.get("content")) for m in reversed(messages) if m["role"] == "user"),
                    "")

    started = time.perf_counter()
    if REWRITE_ENABLED and user_text:
        rewritten = rewrite_utterance(client, prompt, REWRITE_MODEL or turn.upstream["model"],
                                      messages, REWRITE_BUDGET_MS / 1000)
        if rewritten:
            messages[-1] = {**messages[-1], "content": rewritten}
            question = rewritten
        turn.steps["rewrite_ms"] = f"{(time.perf_counter() - started) * 1000:.1f}"

    started = time.perf_counter()
    passages = knowledge.search(question, KNOWLEDGE_MAX_PASSAGES, KNOWLEDGE_MAX_CHARS)
    turn.steps["knowledge_ms"] = f"{(time.perf_counter() - started) * 1000:.2f}"

    started = time.perf_counter()
    caller, earlier = caller_number(turn.body), []
    if memory and caller:
        try:
            earlier = memory.recall(caller, call_id(turn), MEMORY_MAX_TURNS)
        except MemoryUnavailable:  # logged by memory.py; the call goes on without memory
            pass
    turn.steps["memory_ms"] = f"{(time.perf_counter() - started) * 1000:.2f}"
    turn.steps["rounds"] = 0

    # The assistant's own system prompt from Vapi comes first; the server's context is appended.
    context = prompt.render(BUSINESS_TZ, caller, earlier, passages)
    if messages[0]["role"] == "system" and isinstance(messages[0].get("content"), str):
        messages[0] = {**messages[0], "content": messages[0]["content"] + "\n\n" + context}
    else:
        messages.insert(0, {"role": "system", "content": context})
    return Answer(server_tools_for(turn.upstream, SERVER_TOOLS) if MAX_TOOL_ROUNDS > 0 else {},
                  request.environ.get("gunicorn.socket"), caller, user_text)


def call_id(turn):
    """Vapi's call id, as memory stores it ("-" for one that is not printable text)."""
    return turn.call_id if printable(turn.call_id) else "-"


def remember(turn, answer):
    """Store a completed turn in the background. A failed write is logged by memory.py; it never
    reaches the caller."""
    assistant_text = answer.remembered()
    if not (memory and answer.caller and answer.user_text and assistant_text):
        return  # an empty answer is not worth remembering

    def write():
        try:
            memory.remember(call_id(turn), answer.caller, answer.user_text, assistant_text)
        except MemoryUnavailable:  # logged by memory.py
            pass

    # SQLite waits for the disk holding the whole worker: a real thread. psycopg waits for
    # PostgreSQL through gevent, as a socket does: a greenlet.
    if memory.blocking:
        gevent.get_hub().threadpool.spawn(write)
    else:
        gevent.spawn(write)


if __name__ == "__main__":
    run_with_gunicorn()
