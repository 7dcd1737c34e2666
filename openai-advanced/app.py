"""A Vapi Custom LLM server that shapes the conversation before the model sees it.

What it adds over `openai-sse/`: a system prompt rendered for every turn from prompt.md (the time at the clinic,
the caller's number, what earlier calls from that number said, the knowledge passages for this question); an
optional rewrite of the caller's last utterance; and server-side tools the model can call mid-answer while the
caller hears a short filler sentence. Every step before the first token is timed in the log line.
Spec followed: https://docs.vapi.ai/customization/custom-llm/using-your-server
"""

import hmac
import json
import logging
import os
import select
import socket
import sqlite3
import string
import sys
import time
import zoneinfo
from pathlib import Path

import gevent
import gevent.queue
import openai
from dotenv import load_dotenv
from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from knowledge import Knowledge
from memory import Memory
from prompt import caller_number, render_context, rewrite_utterance, text_of
from tools import build_tools, run_tool, server_tools_for, tool_round_messages, with_tools

HERE = Path(__file__).resolve().parent
load_dotenv()

# Configuration
OPENAI_API_KEY = os.getenv("OPENAI_API_KEY", "")
OPENAI_BASE_URL = os.getenv("OPENAI_BASE_URL") or None  # None: api.openai.com
OPENAI_MODEL = os.getenv("OPENAI_MODEL", "")  # when set, replaces the model name Vapi sends
CUSTOM_LLM_API_KEY = os.getenv("CUSTOM_LLM_API_KEY", "")  # the bearer token Vapi must send
OPENAI_TIMEOUT_SECONDS = float(os.getenv("OPENAI_TIMEOUT_SECONDS", "15"))  # longest silence from the provider
OPENAI_MAX_RETRIES = int(os.getenv("OPENAI_MAX_RETRIES", "1"))
MAX_BODY_BYTES = int(os.getenv("MAX_BODY_BYTES", str(1024 * 1024)))
LOG_LEVEL = os.getenv("LOG_LEVEL", "INFO").upper()
FLASK_DEBUG = os.getenv("FLASK_DEBUG", "").lower() in ("1", "true", "yes")  # never on a server ngrok exposes
CALLER_CHECK_SECONDS = 0.05  # while the provider is silent, how often to look whether the caller hung up
# What this server adds (see README.md)
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
AVAILABILITY_API_URL = os.getenv("AVAILABILITY_API_URL", "")  # empty: the clinic_open_slots tool is not offered
AVAILABILITY_TIMEOUT_SECONDS = float(os.getenv("AVAILABILITY_TIMEOUT_SECONDS", "3"))
MAX_TOOL_ROUNDS = int(os.getenv("MAX_TOOL_ROUNDS", "3"))
TOOL_FILLER = os.getenv("TOOL_FILLER", "One moment while I check that.")
FLUSH_AFTER_FILLER = os.getenv("FLUSH_AFTER_FILLER", "") == "1"  # needs voice.chunkPlan.enabled in Vapi

# The OpenAI chat parameters sent on to the provider. Everything else Vapi adds (call, customer, phoneNumber,
# metadata, ...) stays here: OpenAI rejects unknown parameters, and phoneNumber can hold a Twilio auth token.
# https://platform.openai.com/docs/api-reference/chat/create
FORWARDED_PARAMS = ("messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed",
                    "presence_penalty", "frequency_penalty", "logit_bias", "tools", "tool_choice",
                    "parallel_tool_calls", "response_format", "user")
# The keys a message may carry; Vapi adds others (e.g. transcriber `metadata`) that OpenAI would reject.
MESSAGE_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id", "function_call")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # X-Accel: tell nginx not to buffer

logging.basicConfig(level=LOG_LEVEL, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
logging.getLogger("httpx2").setLevel(logging.WARNING)  # the SDK's HTTP client logs every request at INFO
log = logging.getLogger("openai-advanced")
if not OPENAI_API_KEY:
    log.warning("OPENAI_API_KEY is not set: chat requests will fail until it is (see .env.example)")
if not CUSTOM_LLM_API_KEY:
    log.warning("CUSTOM_LLM_API_KEY is not set: anyone who knows this URL can use your model provider account")

# gunicorn.conf.py runs this app on gevent: every call is a greenlet, not a thread, and its sockets cooperate.
# Each provider stream is read by a small greenlet of its own that hands the lines over through a queue, so the
# request can keep an eye on the caller while the model is silent, and kill the reader the moment the caller
# hangs up — which closes the provider's connection even before its first token.
# Our own silence watch (next_line) gives up after OPENAI_TIMEOUT_SECONDS; the SDK's timeout is the backstop.
client = openai.OpenAI(api_key=OPENAI_API_KEY or "not-set", base_url=OPENAI_BASE_URL,
                       timeout=OPENAI_TIMEOUT_SECONDS + 1, max_retries=OPENAI_MAX_RETRIES)
# Warm the SDK up now, not on the first caller's turn: its lazily loaded modules, and its platform headers
# (worked out once with a `uname -p` subprocess, which a burst of first calls would otherwise each start).
completions = client.chat.completions
client.platform_headers()
STREAM_END = object()  # put on a line queue after the provider's last line

PROMPT_TEMPLATE = string.Template((HERE / "prompt.md").read_text(encoding="utf-8"))
knowledge = Knowledge(KNOWLEDGE_DIR)
memory = Memory(MEMORY_DB_PATH, MEMORY_RETENTION_DAYS) if MEMORY_ENABLED else None
SERVER_TOOLS = build_tools(CLINIC_TIMEZONE, AVAILABILITY_API_URL, AVAILABILITY_TIMEOUT_SECONDS)

app = Flask(__name__)
app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES  # larger bodies get 413
app.debug = FLASK_DEBUG  # only when asked for; Flask's debugger would show code to anyone who can reach it
if FLASK_DEBUG:
    log.warning("Flask debug mode is ON (FLASK_DEBUG=%s): never expose this server to the internet",
                os.getenv("FLASK_DEBUG"))


def error_response(status, message, type_="invalid_request_error", param=None, code=None):
    """An OpenAI-shaped error: Vapi puts the status into the call's ended reason, a developer reads the message."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}, status


def provider_error(exc):
    """The status and error body for a failed provider call: its own 4xx, 502 for 5xx or no answer, 504 for slow."""
    if isinstance(exc, UnicodeEncodeError):  # the SDK could not encode the request: a lone surrogate (\ud800)
        return error_response(400, "The request contains text that is not valid Unicode.")
    if isinstance(exc, (openai.APITimeoutError, TimeoutError)):
        return error_response(504, "The model provider did not answer in time (OPENAI_TIMEOUT_SECONDS).",
                              "timeout_error", code="provider_timeout")
    if isinstance(exc, openai.APIStatusError) and exc.status_code < 500:
        error = exc.body if isinstance(exc.body, dict) else {}
        message = str(error.get("message") or exc.message)
        if OPENAI_API_KEY:
            message = message.replace(OPENAI_API_KEY, "[redacted]")
        return error_response(exc.status_code, f"Model provider: {message}", error.get("type") or "provider_error",
                              error.get("param"), error.get("code"))
    return error_response(502, "The model provider failed or could not be reached.", "provider_error",
                          code="provider_unavailable")


def authorized(authorization):
    """Check `Authorization: Bearer <CUSTOM_LLM_API_KEY>` in constant time; open when no key is configured."""
    if not CUSTOM_LLM_API_KEY:
        return True
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), CUSTOM_LLM_API_KEY.encode())


def reject_constant(name):
    """NaN and Infinity are not JSON: Python would accept them, the provider would not."""
    raise ValueError(f"{name} is not valid JSON")


def parse_chat_request():
    """Read Vapi's body leniently and build the provider request strictly; returns (body, upstream, error)."""
    if not request.is_json:
        return None, None, error_response(400, "Content-Type must be application/json.")
    try:
        body = json.loads(request.get_data(), parse_constant=reject_constant)
    except (ValueError, RecursionError):
        return None, None, error_response(400, "The request body is not valid JSON.")
    if not isinstance(body, dict):
        return None, None, error_response(400, "The request body must be a JSON object.")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return None, None, error_response(400, "'messages' must be a non-empty list.", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return None, None, error_response(400, f"messages[{i}] must be an object with a string 'role'.",
                                              param=f"messages[{i}].role")
    model = OPENAI_MODEL or body.get("model")
    if not isinstance(model, str) or not model:
        return None, None, error_response(400, "'model' must be a non-empty string.", param="model")
    if not isinstance(body.get("stream", False), bool):
        return None, None, error_response(400, "'stream' must be true or false.", param="stream")

    upstream = {key: body[key] for key in FORWARDED_PARAMS if body.get(key) is not None}
    upstream["model"] = model
    upstream["messages"] = [{k: m[k] for k in MESSAGE_KEYS if k in m} for m in messages]
    return body, upstream, None


def call_id_of(body):
    """Vapi's call id, for the log line, or '-' (web tests and other clients send none)."""
    call = body.get("call") if isinstance(body, dict) else None
    call_id = call.get("id") if isinstance(call, dict) else None
    return call_id[:64] if isinstance(call_id, str) else "-"


def log_request(body, model, stream, status, started, first_token_at=None, chunks=0, steps=None):
    """The one INFO line per request, with the milliseconds of each step before the provider call (`steps`).
    Never message text, keys or the phoneNumber object."""
    ttft = f"{(first_token_at - started) * 1000:.1f}" if first_token_at else "-"
    log.info("call=%r model=%r stream=%s status=%s ttft_ms=%s total_ms=%.1f chunks=%d%s", call_id_of(body), model,
             stream, status, ttft, (time.perf_counter() - started) * 1000, chunks,
             "".join(f" {name}={value}" for name, value in (steps or {}).items()))


def sse(payload):
    """One Server-Sent Event: JSON on one `data:` line, so a newline in the text cannot break the framing."""
    return f"data: {json.dumps(payload)}\n\n".encode()


def read_provider_stream(upstream, lines):
    """Send the streaming request and put the payload of each `data:` line into `lines`, then an exception if
    it failed, then STREAM_END. Runs in its own greenlet; killing that greenlet closes the provider request."""
    try:
        # The SDK's low-level post() sends the dict as it is (chat.completions.create would first walk every
        # message through its type adapters: ~2 ms per turn). Its raw response is relayed line by line, not
        # parsed into objects and re-serialised. Retries, timeouts and error types are the SDK's as usual.
        stream = client.post("/chat/completions", body={**upstream, "stream": True}, cast_to=object, stream=True,
                             stream_cls=openai.Stream[object])
        try:
            for line in stream.response.iter_lines():
                if line.startswith("data:"):
                    lines.put(line[5:].strip())
        finally:
            stream.close()
    except Exception as exc:  # handed to the request, which answers with the right status or error event
        lines.put(exc)
    lines.put(STREAM_END)


def caller_hung_up(client_socket):
    """True if the caller closed the connection: its socket is readable and a peek reads 0 bytes."""
    if client_socket is None:  # a server that does not expose the socket: the next write will tell
        return False
    try:
        if not select.select([client_socket], [], [], 0)[0]:
            return False  # nothing to read: still connected
        return client_socket.recv(1, socket.MSG_PEEK) == b""
    except ValueError:  # a TLS socket cannot peek: cannot tell
        return False
    except OSError:  # connection reset, or the socket is already closed
        return True


def next_line(lines, client_socket):
    """The provider's next line, exception or STREAM_END; None if the caller hung up while we waited.

    Waits at most OPENAI_TIMEOUT_SECONDS; checks the caller's socket every CALLER_CHECK_SECONDS meanwhile."""
    deadline = time.monotonic() + OPENAI_TIMEOUT_SECONDS
    while True:
        try:
            return lines.get(timeout=CALLER_CHECK_SECONDS)
        except gevent.queue.Empty:
            if caller_hung_up(client_socket):
                return None
            if time.monotonic() > deadline:
                return TimeoutError(f"no data from the provider for {OPENAI_TIMEOUT_SECONDS} s")


def shape_request(body, upstream, steps):
    """Rewrite the last utterance if enabled, and append this turn's context to the system prompt.
    Records the milliseconds of each step in `steps`; returns the caller's original words (to remember the turn
    by), or None when the turn does not end with the caller speaking."""
    messages = upstream["messages"]
    last_is_user = messages[-1]["role"] == "user" and bool(text_of(messages[-1].get("content")).strip())
    user_text = text_of(messages[-1].get("content")) if last_is_user else None
    question = next((text_of(m.get("content")) for m in reversed(messages) if m["role"] == "user"), "")

    started = time.perf_counter()
    if REWRITE_ENABLED and last_is_user:
        rewritten = rewrite_utterance(client, REWRITE_MODEL or upstream["model"], messages,
                                      REWRITE_BUDGET_MS / 1000)
        if rewritten:
            messages[-1] = {**messages[-1], "content": rewritten}
            question = rewritten
        steps["rewrite_ms"] = f"{(time.perf_counter() - started) * 1000:.1f}"

    started = time.perf_counter()
    passages = knowledge.search(question, KNOWLEDGE_MAX_PASSAGES, KNOWLEDGE_MAX_CHARS)
    steps["knowledge_ms"] = f"{(time.perf_counter() - started) * 1000:.2f}"

    started = time.perf_counter()
    caller, earlier = caller_number(body), []
    if memory and caller:
        try:
            earlier = memory.recall(caller, call_id_of(body), MEMORY_MAX_TURNS)
        except sqlite3.Error as exc:  # a broken memory file must not break the call
            log.error("memory read failed: %s", exc)
    steps["memory_ms"] = f"{(time.perf_counter() - started) * 1000:.2f}"

    # The assistant's own system prompt from Vapi comes first; the server's context is appended to it.
    context = render_context(PROMPT_TEMPLATE, CLINIC_TZ, caller, earlier, passages)
    if messages[0]["role"] == "system" and isinstance(messages[0].get("content"), str):
        messages[0] = {**messages[0], "content": messages[0]["content"] + "\n\n" + context}
    else:
        messages.insert(0, {"role": "system", "content": context})
    return user_text


def remember_turn(call_id, caller, user_text, assistant_text):
    """Store a turn on a real thread: a SQLite write that waits for the disk would stall every call that this
    gevent worker serves. A failed write is logged; it never reaches the caller."""
    def write():
        try:
            memory.remember(call_id, caller, user_text, assistant_text)
        except sqlite3.Error as exc:
            log.error("memory write failed: %s", exc)

    gevent.get_hub().threadpool.spawn(write)


def start_round(upstream, server_tools):
    """Start one streaming provider request in its reader greenlet; returns (greenlet, line queue)."""
    lines = gevent.queue.Queue()
    return gevent.spawn(read_provider_stream, with_tools(upstream, server_tools), lines), lines


def malformed_chunk_error(chunk):
    """The error event for a chunk Vapi cannot use: the provider's in-band error, or a generic one."""
    error = chunk.get("error") if isinstance(chunk, dict) else None
    return {"error": error if isinstance(error, dict) else {
        "message": "The model provider sent a malformed chunk.", "type": "provider_error", "param": None,
        "code": "bad_chunk"}}


def sort_tool_calls(call_deltas, calls, vapi_index, server_tools, rounds):
    """Add streamed tool-call fragments to `calls` (by index). Returns the fragments of Vapi's tools, renumbered
    from 0 (a server-side call may have taken index 0), and whether a server-side call is among them."""
    to_vapi, ours = [], False
    for call_delta in call_deltas:
        function = call_delta.get("function") or {}
        index = call_delta.get("index", 0)
        call = calls.setdefault(index, {"id": call_delta.get("id") or f"call_{rounds}_{index}",
                                        "name": function.get("name") or "", "arguments": ""})
        call["arguments"] += function.get("arguments") or ""
        if call["name"] in server_tools:
            ours = True
        else:
            to_vapi.append({**call_delta, "index": vapi_index.setdefault(index, len(vapi_index))})
    return to_vapi, ours


def relay_with_tools(first_line, lines, provider, upstream, server_tools, client_socket, turn, turn_done):
    """Relay the provider's stream like openai-sse, and run server-side tools between rounds.

    Text and Vapi's tool calls go to the caller as they arrive. A tool call for a server-side tool is held
    back: the caller hears TOOL_FILLER, the tool runs here, its result goes back to the model, and the model's
    next round is relayed in the same response. If one answer calls both kinds, Vapi's tools win: they pass
    through, the server-side calls are dropped. After MAX_TOOL_ROUNDS the server-side tools are not offered."""
    line, rounds, spoken, filler_sent, failed = first_line, 0, [], False, False
    try:
        try:
            while True:  # one provider round per iteration
                calls, vapi_index, held_finish, error_event = {}, {}, None, None
                while line is not STREAM_END and line is not None and line != "[DONE]":
                    if isinstance(line, Exception):
                        error_event = provider_error(line)[0]
                        break
                    try:
                        chunk = json.loads(line)
                    except ValueError:
                        chunk = None
                    if not isinstance(chunk, dict) or "error" in chunk or not isinstance(chunk.get("choices"), list):
                        error_event = malformed_chunk_error(chunk)  # Vapi fails a call on a chunk without choices
                        break
                    choice = chunk["choices"][0] if chunk["choices"] else {}
                    delta = choice.get("delta") or {}
                    if not turn["first_token_at"] and (delta.get("content") or delta.get("tool_calls")):
                        turn["first_token_at"] = time.perf_counter()
                    if isinstance(delta.get("content"), str):
                        spoken.append(delta["content"])
                    if delta.get("tool_calls"):
                        to_vapi, ours = sort_tool_calls(delta["tool_calls"], calls, vapi_index, server_tools, rounds)
                        if ours and not filler_sent:  # no dead air while the tool runs
                            filler = TOOL_FILLER + (" <flush />" if FLUSH_AFTER_FILLER else "")
                            yield sse({**chunk, "choices": [{"index": 0, "delta": {"content": filler},
                                                             "finish_reason": None}]})
                            filler_sent = True
                        if to_vapi or delta.get("content"):
                            yield sse({**chunk, "choices": [{**choice, "delta": {**delta, "tool_calls": to_vapi}
                                                             if to_vapi else {"content": delta["content"]}}]})
                    elif choice.get("finish_reason") == "tool_calls" and len(vapi_index) < len(calls):
                        held_finish = chunk  # the round ends in server-side tool calls: not the end for Vapi
                    else:
                        yield b"data: " + line.encode() + b"\n\n"  # the provider's own bytes
                    turn["chunks"] += 1
                    line = next_line(lines, client_socket)

                if line is None:  # the caller hung up
                    return
                if error_event:
                    failed = True
                    yield sse(error_event)
                    break
                server_calls = [call for call in calls.values() if call["name"] in server_tools]
                if server_calls and not vapi_index and rounds < MAX_TOOL_ROUNDS:
                    rounds += 1
                    upstream["messages"] += tool_round_messages(server_calls, server_tools)
                    provider, lines = start_round(upstream, server_tools if rounds < MAX_TOOL_ROUNDS else {})
                    line = next_line(lines, client_socket)
                    continue
                if held_finish:  # server-side calls dropped (Vapi tools won, or the round limit): end the turn
                    finish = "tool_calls" if vapi_index else "stop"
                    yield sse({**held_finish, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
                break
        except (AttributeError, TypeError) as exc:  # a chunk of a shape nobody expected: end the turn cleanly
            log.error("unusable chunk from the provider: %s", type(exc).__name__)
            line, failed = exc, True
            yield sse(malformed_chunk_error(None))
        yield b"data: [DONE]\n\n"
        turn["completed"] = not failed  # only a whole answer is remembered
    finally:
        if line is not STREAM_END and line != "[DONE]":
            provider.kill(block=False)  # the caller went away or the stream failed: stop the model now
        turn["rounds"], turn["assistant_text"] = rounds, "".join(spoken)
        turn_done(turn)


@app.errorhandler(HTTPException)
def http_error(exc):
    """404, 405, 413 ... as OpenAI-shaped JSON instead of Flask's HTML page."""
    log.info("path=%r status=%s", request.path[:100], exc.code)
    return error_response(exc.code, exc.description)


@app.errorhandler(Exception)
def unexpected_error(exc):
    """A bug must not send a traceback to the caller; the log keeps it."""
    log.error("unexpected error", exc_info=exc)
    return error_response(500, "Internal server error.", "server_error")


@app.get("/health")
def health():
    """Liveness check for load balancers and uptime monitors; does not call the provider."""
    return {"status": "ok"}


@app.post("/chat/completions")
@app.post("/v1/chat/completions")
@app.post("/chat/completions/chat/completions")  # the model URL was pasted with /chat/completions at the end
@app.post("/v1/chat/completions/chat/completions")
def chat_completions():
    """Vapi's turn: shape the request, then relay the provider's rounds as SSE (stream: true) or JSON."""
    started = time.perf_counter()
    if not authorized(request.headers.get("Authorization", "")):
        log_request(None, None, None, 401, started)
        return error_response(401, "Missing or wrong bearer token (CUSTOM_LLM_API_KEY).", code="invalid_api_key")
    body, upstream, error = parse_chat_request()
    if error:
        log_request(body, None, None, error[1], started)
        return error
    stream = body.get("stream", False)
    if not OPENAI_API_KEY:
        log_request(body, upstream["model"], stream, 500, started)
        return error_response(500, "OPENAI_API_KEY is not set on this server.", "server_error",
                              code="missing_api_key")

    steps = {}
    user_text = shape_request(body, upstream, steps)
    server_tools = server_tools_for(upstream, SERVER_TOOLS)
    turn = {"first_token_at": None, "chunks": 0, "rounds": 0, "completed": False, "assistant_text": ""}

    def turn_done(turn):
        """After the last byte: remember a completed turn (an interrupted one is not stored), log the line."""
        caller = caller_number(body)
        if memory and turn["completed"] and user_text and caller:
            remember_turn(call_id_of(body), caller, user_text, turn["assistant_text"])
        log_request(body, upstream["model"], stream, 200, started, turn["first_token_at"], turn["chunks"],
                    {**steps, "rounds": turn["rounds"]})

    if not stream:
        try:
            completion = answer_whole(upstream, server_tools, turn)
        except (openai.OpenAIError, ValueError) as exc:  # ValueError: the provider sent broken JSON
            response, status = provider_error(exc)
            log_request(body, upstream["model"], stream, status, started, steps=steps)
            return response, status
        turn.update(completed=True, first_token_at=time.perf_counter(), chunks=1)
        turn_done(turn)
        return completion.to_dict()

    # Wait for the provider's first line before answering: until then a failure still gets a real HTTP status.
    client_socket = request.environ.get("gunicorn.socket") or request.environ.get("werkzeug.socket")
    provider, lines = start_round(upstream, server_tools if MAX_TOOL_ROUNDS > 0 else {})
    first_line = next_line(lines, client_socket)
    if first_line is None or isinstance(first_line, Exception) or first_line is STREAM_END:
        provider.kill(block=False)
        if first_line is None:  # the caller hung up before the model said anything
            log_request(body, upstream["model"], stream, 499, started, steps=steps)
            return "", 499
        response, status = provider_error(first_line if first_line is not STREAM_END else
                                          ConnectionError("the provider closed the stream without data"))
        log_request(body, upstream["model"], stream, status, started, steps=steps)
        return response, status

    # The generator gets what it needs as arguments: it runs after this view has returned.
    return Response(relay_with_tools(first_line, lines, provider, upstream, server_tools, client_socket, turn,
                                     turn_done), mimetype="text/event-stream", headers=SSE_HEADERS)


def answer_whole(upstream, server_tools, turn):
    """stream: false — the same tool rounds without streaming; returns the final chat.completion."""
    for rounds in range(MAX_TOOL_ROUNDS + 1):
        offered = server_tools if rounds < MAX_TOOL_ROUNDS else {}
        completion = completions.create(**with_tools(upstream, offered))
        message = completion.choices[0].message if completion.choices else None
        calls = (message.tool_calls or []) if message else []
        if not calls or any(call.function.name not in offered for call in calls):
            break  # words, or Vapi's tools (which win): this is the answer
        upstream["messages"] += [message.to_dict(exclude_unset=True)] + [
            {"role": "tool", "tool_call_id": call.id, "content": run_tool(offered, call.function.name,
                                                                            call.function.arguments)}
            for call in calls]
        turn["rounds"] = rounds + 1
    turn["assistant_text"] = (message.content or "") if message else ""
    return completion


if __name__ == "__main__":
    # `python app.py` runs what `gunicorn app:app` runs: the gevent workers set up in gunicorn.conf.py.
    os.execvp(sys.executable, [sys.executable, "-m", "gunicorn", "app:app"])
