"""A Vapi Custom LLM server that shapes the conversation before the model sees it.

What it adds over `openai-sse/`: a system prompt rendered from prompt.md for every turn (the time,
the caller's number, their earlier calls, knowledge for this question), an optional rewrite of the
caller's words, server-side tools with a filler sentence, and an optional second provider.
"""

import dataclasses
import os
import time
import zoneinfo
from pathlib import Path

import openai
from flask import Flask, Response, request

from contract import (OPENAI_API_KEY, OPENAI_BASE_URL, OPENAI_MAX_RETRIES,
                      OPENAI_TIMEOUT_SECONDS, base_url, error_event, flag, init_app,
                      read_chat_request, run_with_gunicorn, setting, sse, warm_up)
from knowledge import Knowledge
from memory import MemoryUnavailable, open_memory, remember_later
from prompt import Prompt, RewriteSkipped, caller_number, rewrite_utterance, text_of
from provider_stream import CallerHungUp, keep_warm, keepalive_http_client, start_relay
from providers import Providers
from tools import RoundCalls, build_tools, server_tools_for, tool_round_messages, with_tools

HERE = Path(__file__).resolve().parent

# Configuration: what this folder adds (contract.py reads the settings every folder has)
BUSINESS_TZ = setting("BUSINESS_TIMEZONE", zoneinfo.ZoneInfo("America/New_York"),
                      zoneinfo.ZoneInfo, expected="a time zone name such as Europe/Paris")
KNOWLEDGE_DIR = HERE / (os.getenv("KNOWLEDGE_DIR") or "knowledge")  # relative to this folder
KNOWLEDGE_MAX_PASSAGES = setting("KNOWLEDGE_MAX_PASSAGES", 3, int, 0)
KNOWLEDGE_MAX_CHARS = setting("KNOWLEDGE_MAX_CHARS", 1500, int, 0)
# memory.py reads where memory is kept and for how long (MEMORY_DATABASE_URL, MEMORY_DB_PATH, ...)
MEMORY_ENABLED = flag("MEMORY_ENABLED", "1")
MEMORY_MAX_TURNS = setting("MEMORY_MAX_TURNS", 5, int, 0)
REWRITE_ENABLED = flag("REWRITE_ENABLED")
REWRITE_MODEL = os.getenv("REWRITE_MODEL", "")  # empty: the turn's own model
REWRITE_BUDGET_MS = setting("REWRITE_BUDGET_MS", 800, int, 1)
AVAILABILITY_API_URL = os.getenv("AVAILABILITY_API_URL", "")  # empty: open_slots is not offered
AVAILABILITY_TIMEOUT_SECONDS = setting("AVAILABILITY_TIMEOUT_SECONDS", 3.0, float, 0.1)
MAX_TOOL_ROUNDS = setting("MAX_TOOL_ROUNDS", 3, int, 0)
TOOL_FILLER = os.getenv("TOOL_FILLER") or "One moment while I check that."
FLUSH_AFTER_FILLER = flag("FLUSH_AFTER_FILLER")  # <flush />: needs voice.chunkPlan.enabled
FALLBACK_BASE_URL = base_url("FALLBACK_BASE_URL")  # None: no second provider (providers.py)
FALLBACK_API_KEY = os.getenv("FALLBACK_API_KEY", "")
FALLBACK_MODEL = os.getenv("FALLBACK_MODEL", "")  # empty: the turn's own model
HEDGE_AFTER_MS = setting("HEDGE_AFTER_MS", 1500, int, 0)  # 0: fall back on failure only

# "not-set": the server starts without a key and answers chat requests with an error naming it.
# ProviderStream watches for silence itself (OPENAI_TIMEOUT_SECONDS); the SDK's timeout: a backstop.
# With a fallback, the primary is not retried: the fallback is asked at once instead.
client = openai.OpenAI(api_key=OPENAI_API_KEY or "not-set", base_url=OPENAI_BASE_URL,
                       timeout=OPENAI_TIMEOUT_SECONDS + 1, http_client=keepalive_http_client(),
                       max_retries=0 if FALLBACK_BASE_URL else OPENAI_MAX_RETRIES)
fallback_client = openai.OpenAI(api_key=FALLBACK_API_KEY or "not-set", base_url=FALLBACK_BASE_URL,
                                timeout=OPENAI_TIMEOUT_SECONDS + 1, max_retries=OPENAI_MAX_RETRIES,
                                http_client=keepalive_http_client()) if FALLBACK_BASE_URL else None
for provider_client in filter(None, (client, fallback_client)):  # at start-up, not on a turn
    warm_up(provider_client)
    keep_warm(provider_client)
providers = Providers(client, fallback_client, FALLBACK_MODEL, HEDGE_AFTER_MS / 1000)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # nginx: do not buffer
prompt = Prompt(HERE / "prompt.md")
knowledge = Knowledge(KNOWLEDGE_DIR)
memory = open_memory() if MEMORY_ENABLED else None
SERVER_TOOLS = build_tools(BUSINESS_TZ.key, AVAILABILITY_API_URL, AVAILABILITY_TIMEOUT_SECONDS)

app = Flask(__name__)
init_app(app, memory=memory and memory.where, knowledge=knowledge.summary(),
         fallback=FALLBACK_BASE_URL, server_tools=MAX_TOOL_ROUNDS and ",".join(SERVER_TOOLS))


@app.post("/chat/completions")
@app.post("/v1/chat/completions")
@app.post("/chat/completions/chat/completions")  # a model URL pasted with /chat/completions
@app.post("/v1/chat/completions/chat/completions")
def chat_completions():
    """Vapi's turn: shape the request, then relay the model's rounds as SSE or JSON."""
    turn = read_chat_request()  # raises ChatError (an OpenAI-shaped 4xx) for a bad request
    answer = shape_request(turn)
    if not turn.stream:
        for _ in tool_loop(turn, answer, fetch_round):
            pass  # fetch_round sends nothing on the way
        turn.completed(answer.completion)
        remember(turn, answer)
        return answer.completion.to_dict()

    try:
        events = start_relay(relay(turn, answer))  # to the first event: errors keep a status
    except CallerHungUp:
        return "", 499  # nobody is listening any more
    return Response(events, mimetype="text/event-stream", headers=SSE_HEADERS)


def relay(turn, answer):
    """The model's rounds as one stream of `data:` events, then `data: [DONE]`. Before the first
    event a failure is raised (the view answers with its status); after, it is one error event."""
    try:
        yield from tool_loop(turn, answer, relay_round)
    except (CallerHungUp, GeneratorExit):  # GeneratorExit: a write to the caller failed
        if not turn.chunks:
            raise
        turn.hung_up = True
        return  # nobody to send [DONE] to
    except Exception as exc:
        if not turn.chunks:
            raise
        yield error_event(turn, exc)
        yield b"data: [DONE]\n\n"
        return
    turn.ended()  # an answer without words is named in the log line
    yield b"data: [DONE]\n\n"
    remember(turn, answer)  # only a whole answer, heard to the end


def tool_loop(turn, answer, ask):
    """Ask the model; while it answers with calls to server-side tools alone, run them, give it the
    results and ask again, at most MAX_TOOL_ROUNDS times. `ask(request, offered, turn, answer)`
    relays (streaming) or fetches (stream: false) one round and returns those calls."""
    while True:
        turn.steps["rounds"] = answer.rounds
        offered = answer.server_tools if answer.rounds < MAX_TOOL_ROUNDS else {}
        calls = yield from ask(with_tools(turn.upstream, offered), offered, turn, answer)
        if not calls:
            return
        answer.rounds += 1
        turn.upstream["messages"] += tool_round_messages(calls, offered)


def relay_round(request, offered, turn, answer):
    """Relay one round of the model's stream. Words and Vapi's tool calls go to the caller as they
    arrive; calls to server-side tools are held back (Vapi's win when an answer calls both kinds).
    Returns the held calls if the round ended with them alone and they were offered: only then,
    certain that the tools will run, does the caller hear TOOL_FILLER."""
    calls, ending, first_words = RoundCalls(answer.server_tools, answer.rounds), None, True
    provider = providers.stream(request, answer.caller_socket)
    try:
        for raw, chunk in provider:
            choice = chunk["choices"][0] if chunk["choices"] else {}
            delta = sent = choice.get("delta") or {}
            answer.completion_id = answer.completion_id or chunk.get("id")
            if delta.get("tool_calls"):
                to_vapi = calls.add(delta["tool_calls"])
                sent = {**delta, "tool_calls": to_vapi} if to_vapi else without(delta, "tool_calls")
            if choice.get("finish_reason") == "tool_calls" and calls.held():
                ending = chunk  # not the end for Vapi while server-side calls are held back
                choice = {**choice, "finish_reason": None}
            if answer.rounds:  # a later round goes on with the first: no second role chunk
                sent = without(sent, "role")
            if isinstance(sent.get("content"), str) and sent["content"]:
                words = answer.say(sent["content"], separate=first_words)
                answer.spoken.append(words)
                sent, first_words = {**sent, "content": words}, False
            if sent == delta and not answer.rounds and ending is not chunk:
                turn.relayed(chunk)
                yield b"data: " + raw.encode() + b"\n\n"  # untouched: the provider's own bytes
            elif choice.get("finish_reason") or any(sent.get(key) for key in sent):
                yield event(turn, {**chunk, "choices": [{**choice, "delta": sent}]}, answer)
    finally:  # whatever happened: stop the provider's stream, and log who answered
        provider.close()
        providers.note(turn.steps, provider)
    held = calls.held()
    if held and not calls.vapi_index and offered:
        if not answer.filler_sent:
            answer.filler_sent = True
            filler = answer.say(TOOL_FILLER + (" <flush />" if FLUSH_AFTER_FILLER else ""), True)
            yield event(turn, {**(ending or chunk), "choices": [
                {"index": 0, "delta": {"content": filler}, "finish_reason": None}]}, answer)
        return held
    answer.vapi_tools = calls.for_vapi()
    if ending:  # the server-side calls were dropped: the turn ends here
        yield event(turn, {**ending, "choices": [{"index": 0, "delta": {}, "finish_reason":
                                                  "tool_calls" if calls.vapi_index else "stop"}]},
                    answer)
    return None


def fetch_round(request, offered, turn, answer):
    """stream: false — one round as a whole chat.completion; returns its server-side calls as
    relay_round does. A mixed answer is sent without them: Vapi's tools win here too."""
    yield from ()  # sends nothing: a generator only so that tool_loop drives it like relay_round
    answer.completion, outcome = providers.create(request)
    providers.note(turn.steps, outcome)
    message = answer.completion.choices[0].message
    calls = message.tool_calls or []
    held = [call for call in calls if call.function.name in answer.server_tools]
    answer.spoken = [message.content or ""]
    if held and len(held) == len(calls) and offered:
        return [{"id": call.id, "name": call.function.name, "arguments": call.function.arguments}
                for call in held]
    if held:
        message.tool_calls = [c for c in calls if c.function.name not in answer.server_tools]
        message.tool_calls = message.tool_calls or None
        answer.completion.choices[0].finish_reason = "tool_calls" if message.tool_calls else "stop"
    answer.vapi_tools = [call.function.name for call in message.tool_calls or []]
    return None


def without(delta, key):
    """The delta without one of its keys."""
    return {name: value for name, value in delta.items() if name != key}


def event(turn, chunk, answer):
    """A chunk of ours as one `data:` event, with the response's one completion id."""
    turn.relayed(chunk)
    return sse({**chunk, "id": answer.completion_id})


@dataclasses.dataclass
class Answer:
    """What this server keeps about one turn's answer while the model's rounds are relayed."""

    server_tools: dict  # the server-side tools this turn may use
    caller_socket: object  # watched for a hang-up in every round
    caller: str | None  # the caller's phone number, for memory
    user_text: str | None  # the caller's own words, to remember the turn by (None: a tool turn)
    spoken: list = dataclasses.field(default_factory=list)  # the model's words the caller heard
    vapi_tools: list = dataclasses.field(default_factory=list)  # Vapi's tools it ended with
    rounds: int = 0  # server-side tool rounds so far
    filler_sent: bool = False
    last_heard: str = ""
    completion_id: str | None = None  # the first round's: every chunk of the response carries it
    completion: object = None  # stream: false — the last round's chat.completion

    def say(self, text, separate):
        """Text for the caller; with a space in front when it must be `separate` from what they
        heard last (the filler, a round's first words): a voice reads "that. We", not "that.We"."""
        if separate and self.last_heard[-1:].strip() and not text[:1].isspace():
            text = " " + text
        self.last_heard = text
        return text

    def remembered(self):
        """The assistant's side of the turn, to remember: its words, and Vapi's tools it called."""
        tools = f"[called {', '.join(self.vapi_tools)}]" if self.vapi_tools else ""
        return " ".join(part for part in ("".join(self.spoken).strip(), tools) if part)


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
        try:
            question = rewrite_utterance(client, prompt, REWRITE_MODEL or turn.upstream["model"],
                                         messages, REWRITE_BUDGET_MS / 1000)
            messages[-1] = {**messages[-1], "content": question}
        except RewriteSkipped as exc:  # the caller's own words go on
            turn.steps["rewrite"] = exc.reason
        turn.steps["rewrite_ms"] = f"{(time.perf_counter() - started) * 1000:.1f}"

    started = time.perf_counter()
    passages = knowledge.search(question, KNOWLEDGE_MAX_PASSAGES, KNOWLEDGE_MAX_CHARS)
    turn.steps.update(knowledge_ms=f"{(time.perf_counter() - started) * 1000:.2f}",
                      passages=len(passages))

    started = time.perf_counter()
    caller, earlier = caller_number(turn.body), []
    if memory and caller:
        try:
            earlier = memory.recall(caller, turn.call_id, MEMORY_MAX_TURNS)
        except MemoryUnavailable:  # logged by memory.py; the call goes on without memory
            pass
    turn.steps.update(memory_ms=f"{(time.perf_counter() - started) * 1000:.2f}",
                      earlier_turns=len(earlier))

    # The assistant's own system prompt from Vapi comes first; the server's context is appended.
    context = prompt.render(BUSINESS_TZ, caller, earlier, passages)
    if messages[0]["role"] == "system" and isinstance(messages[0].get("content"), str):
        messages[0] = {**messages[0], "content": messages[0]["content"] + "\n\n" + context}
    else:
        messages.insert(0, {"role": "system", "content": context})
    return Answer(server_tools_for(turn.upstream, SERVER_TOOLS) if MAX_TOOL_ROUNDS > 0 else {},
                  request.environ.get("gunicorn.socket"), caller, user_text)


def remember(turn, answer):
    """Store a completed turn in the background (memory.py); an empty answer is not worth it."""
    assistant_text = answer.remembered()
    if memory and answer.caller and answer.user_text and assistant_text:
        remember_later(memory, turn.call_id, answer.caller, answer.user_text, assistant_text)


if __name__ == "__main__":
    run_with_gunicorn()
