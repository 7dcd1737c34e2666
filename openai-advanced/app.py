"""A Vapi Custom LLM server that shapes the conversation before the model sees it.

What it adds over `openai-sse/`: a system prompt rendered for every turn from prompt.md (the time,
the caller's number, what earlier calls from that number said, the knowledge passages for this
question), an optional rewrite of the caller's last words, and server-side tools the model can call
mid-answer while the caller hears a short filler sentence. Every step before the first token is
timed in the log line."""

import dataclasses
import os
import sqlite3
import string
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
from memory import Memory
from prompt import caller_number, render_context, rewrite_utterance, text_of
from provider_stream import CallerHungUp, ProviderStream
from tools import build_tools, server_tools_for, sort_tool_calls, tool_round_messages, with_tools

HERE = Path(__file__).resolve().parent

# Configuration: what this folder adds (see README.md; contract.py reads the settings every folder
# has)
CLINIC_TIMEZONE = os.getenv("CLINIC_TIMEZONE", "America/New_York")
CLINIC_TZ = zoneinfo.ZoneInfo(CLINIC_TIMEZONE)  # a wrong name fails here, at start-up
KNOWLEDGE_DIR = os.getenv("KNOWLEDGE_DIR") or HERE / "knowledge"
KNOWLEDGE_MAX_PASSAGES = int(os.getenv("KNOWLEDGE_MAX_PASSAGES", "3"))
KNOWLEDGE_MAX_CHARS = int(os.getenv("KNOWLEDGE_MAX_CHARS", "1500"))
MEMORY_ENABLED = os.getenv("MEMORY_ENABLED", "1") == "1"
MEMORY_DB_PATH = os.getenv("MEMORY_DB_PATH") or HERE / "memory.sqlite3"
MEMORY_RETENTION_DAYS = float(os.getenv("MEMORY_RETENTION_DAYS", "30"))
MEMORY_MAX_TURNS = int(os.getenv("MEMORY_MAX_TURNS", "5"))
REWRITE_ENABLED = os.getenv("REWRITE_ENABLED", "") == "1"
REWRITE_MODEL = os.getenv("REWRITE_MODEL", "")  # empty: the turn's own model
REWRITE_BUDGET_MS = int(os.getenv("REWRITE_BUDGET_MS", "800"))
# empty: clinic_open_slots is not offered
AVAILABILITY_API_URL = os.getenv("AVAILABILITY_API_URL", "")
AVAILABILITY_TIMEOUT_SECONDS = float(os.getenv("AVAILABILITY_TIMEOUT_SECONDS", "3"))
MAX_TOOL_ROUNDS = int(os.getenv("MAX_TOOL_ROUNDS", "3"))
TOOL_FILLER = os.getenv("TOOL_FILLER", "One moment while I check that.")
# needs voice.chunkPlan.enabled in Vapi
FLUSH_AFTER_FILLER = os.getenv("FLUSH_AFTER_FILLER", "") == "1"

# gunicorn.conf.py runs this app on gevent, as openai-sse; see provider_stream.py.
client = openai.OpenAI(api_key=OPENAI_API_KEY or "not-set", base_url=OPENAI_BASE_URL,
                       timeout=OPENAI_TIMEOUT_SECONDS + 1, max_retries=OPENAI_MAX_RETRIES)
warm_up(client)
# X-Accel: tell nginx not to buffer
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
PROMPT_TEMPLATE = string.Template((HERE / "prompt.md").read_text(encoding="utf-8"))
knowledge = Knowledge(KNOWLEDGE_DIR)
memory = Memory(MEMORY_DB_PATH, MEMORY_RETENTION_DAYS) if MEMORY_ENABLED else None
SERVER_TOOLS = build_tools(CLINIC_TIMEZONE, AVAILABILITY_API_URL, AVAILABILITY_TIMEOUT_SECONDS)

app = Flask(__name__)
init_app(app)


@dataclasses.dataclass
class Answer:
    """What this server keeps about one turn's answer while the model's rounds are relayed."""

    server_tools: dict  # the server-side tools this turn may use
    caller_socket: object  # watched for a hang-up in every round
    caller: str | None  # the caller's phone number, for memory
    # the caller's own words, to remember the turn by (None: not a caller's turn)
    user_text: str | None
    spoken: list = dataclasses.field(default_factory=list)  # the text the caller heard
    rounds: int = 0  # server-side tool rounds so far
    filler_sent: bool = False
    completion: object = None  # stream: false — the last round's chat.completion


@app.post("/chat/completions")
@app.post("/v1/chat/completions")
# the model URL was pasted with /chat/completions at the end
@app.post("/chat/completions/chat/completions")
@app.post("/v1/chat/completions/chat/completions")
def chat_completions():
    """Vapi's turn: shape the request, then relay the model's rounds as SSE (stream: true) or JSON.
    """
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
    try:
        yield from tool_loop(turn, answer, relay_round)
    except CallerHungUp:
        if turn.chunks:
            return  # nobody to send [DONE] to
        raise
    except Exception as exc:
        if not turn.chunks:
            raise
        # a bug of ours: its traceback goes to the log, not to the caller
        if not isinstance(exc, ChatError):
            log.error("unexpected error while relaying", exc_info=exc)
            exc = ChatError(500, "Internal server error.", "server_error")
        yield sse(exc.body())
        yield b"data: [DONE]\n\n"
        return
    yield b"data: [DONE]\n\n"
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
    arrive; calls to server-side tools are held back, and the caller hears TOOL_FILLER while they
    wait. If one answer calls both kinds, Vapi's tools win: the server-side calls are dropped.
    Returns the held calls when the round ended with them alone and they were offered."""
    calls, vapi_index, held_finish = {}, {}, None
    with ProviderStream(client, request, answer.caller_socket) as provider:
        for raw, chunk in provider:
            choice = chunk["choices"][0] if chunk["choices"] else {}
            delta = choice.get("delta") or {}
            if isinstance(delta.get("content"), str):
                answer.spoken.append(delta["content"])
            if delta.get("tool_calls"):
                to_vapi = sort_tool_calls(delta["tool_calls"], calls, vapi_index,
                                          answer.server_tools, answer.rounds)
                if len(vapi_index) < len(calls) and not answer.filler_sent:  # no dead air meanwhile
                    filler = TOOL_FILLER + (" <flush />" if FLUSH_AFTER_FILLER else "")
                    answer.filler_sent = True
                    yield event(turn, {**chunk, "choices": [
                        {"index": 0, "delta": {"content": filler}, "finish_reason": None}]})
                if to_vapi or delta.get("content"):
                    passed = ({**delta, "tool_calls": to_vapi} if to_vapi
                              else {"content": delta["content"]})
                    yield event(turn, {**chunk, "choices": [{**choice, "delta": passed}]})
            elif choice.get("finish_reason") == "tool_calls" and len(vapi_index) < len(calls):
                held_finish = chunk  # the round ends in server-side calls: not the end for Vapi
            else:
                turn.relayed(chunk)
                yield b"data: " + raw.encode() + b"\n\n"  # the provider's own bytes
    server_calls = [call for call in calls.values() if call["name"] in answer.server_tools]
    if server_calls and not vapi_index and offered:
        return server_calls
    if held_finish:  # the server-side calls were dropped: end the turn here
        yield event(turn, {**held_finish, "choices": [
            {"index": 0, "delta": {}, "finish_reason": "tool_calls" if vapi_index else "stop"}]})
    return None


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
        rewritten = rewrite_utterance(client, REWRITE_MODEL or turn.upstream["model"], messages,
                                      REWRITE_BUDGET_MS / 1000)
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
            earlier = memory.recall(caller, turn.call_id, MEMORY_MAX_TURNS)
        except sqlite3.Error as exc:  # a broken memory file must not break the call
            log.error("memory read failed: %s", exc)
    turn.steps["memory_ms"] = f"{(time.perf_counter() - started) * 1000:.2f}"
    turn.steps["rounds"] = 0

    # The assistant's own system prompt from Vapi comes first; the server's context is appended to
    # it.
    context = render_context(PROMPT_TEMPLATE, CLINIC_TZ, caller, earlier, passages)
    if messages[0]["role"] == "system" and isinstance(messages[0].get("content"), str):
        messages[0] = {**messages[0], "content": messages[0]["content"] + "\n\n" + context}
    else:
        messages.insert(0, {"role": "system", "content": context})
    return Answer(server_tools_for(turn.upstream, SERVER_TOOLS) if MAX_TOOL_ROUNDS > 0 else {},
                  request.environ.get("gunicorn.socket"), caller, user_text)


def remember(turn, answer):
    """Store a completed turn on a real thread: a SQLite write that waits for the disk would stall
    every call this gevent worker serves. A failed write is logged; it never reaches the caller."""
    if not (memory and answer.caller and answer.user_text):
        return

    def write():
        try:
            memory.remember(turn.call_id, answer.caller, answer.user_text, "".join(answer.spoken))
        except sqlite3.Error as exc:
            log.error("memory write failed: %s", exc)

    gevent.get_hub().threadpool.spawn(write)


if __name__ == "__main__":
    run_with_gunicorn()
