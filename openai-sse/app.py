"""A Vapi Custom LLM server that relays the model's answer token by token as Server-Sent Events.

What it adds over `basic/`: the caller hears the first words as soon as the model writes them, and when the
caller interrupts or hangs up (Vapi closes the request) the provider's stream is closed at once — even while the
model is still thinking — so it stops generating and billing.
Spec followed: https://docs.vapi.ai/customization/custom-llm/using-your-server
"""

import hmac
import json
import logging
import os
import select
import socket
import sys
import time

import gevent
import gevent.queue
import openai
from dotenv import load_dotenv
from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

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
log = logging.getLogger("openai-sse")
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


def log_request(body, model, stream, status, started, first_token_at=None, chunks=0):
    """The one INFO line per request. Never message text, keys or the phoneNumber object."""
    ttft = f"{(first_token_at - started) * 1000:.1f}" if first_token_at else "-"
    log.info("call=%r model=%r stream=%s status=%s ttft_ms=%s total_ms=%.1f chunks=%d", call_id_of(body), model,
             stream, status, ttft, (time.perf_counter() - started) * 1000, chunks)


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


def carries_token(chunk):
    """Whether a chunk holds text or a tool call (the provider's first, role-only chunk does not)."""
    for choice in chunk["choices"]:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict) and (delta.get("content") or delta.get("tool_calls")):
            return True
    return False


def relay(first_line, lines, provider, client_socket, log_done):
    """Yield each provider chunk as one `data:` event as it arrives, then `data: [DONE]`.

    Runs after the headers are sent, so a failure here becomes one error event before [DONE]. When the caller
    goes away, the server closes this generator and `finally` stops the provider request."""
    chunks, first_token_at, line = 0, None, first_line
    try:
        while line is not STREAM_END and line is not None and line != "[DONE]":
            if isinstance(line, Exception):
                yield sse(provider_error(line)[0])
                break
            try:
                chunk = json.loads(line)
            except ValueError:
                chunk = None
            if not isinstance(chunk, dict) or "error" in chunk or not isinstance(chunk.get("choices"), list):
                # Vapi fails a call on a chunk without `choices`: pass an in-band error on as one error event.
                error = chunk.get("error") if isinstance(chunk, dict) else None
                yield sse({"error": error if isinstance(error, dict) else {
                    "message": "The model provider sent a malformed chunk.", "type": "provider_error",
                    "param": None, "code": "bad_chunk"}})
                break
            if first_token_at is None and carries_token(chunk):
                first_token_at = time.perf_counter()
            chunks += 1
            yield b"data: " + line.encode() + b"\n\n"  # the provider's own bytes, not re-serialised
            line = next_line(lines, client_socket)
        if line is not None:
            yield b"data: [DONE]\n\n"
    finally:
        if line is not STREAM_END and line != "[DONE]":
            provider.kill(block=False)  # the caller went away or the stream failed: stop the model now
        log_done(first_token_at, chunks)


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
    """Vapi's turn: relay the provider's stream as SSE (stream: true), or its whole answer as JSON."""
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

    if not stream:
        try:
            completion = completions.create(**upstream)
        except (openai.OpenAIError, ValueError) as exc:  # ValueError: the provider sent broken JSON
            response, status = provider_error(exc)
            log_request(body, upstream["model"], stream, status, started)
            return response, status
        log_request(body, upstream["model"], stream, 200, started, time.perf_counter(), 1)
        return completion.to_dict()

    # Wait for the provider's first line before answering: until then a failure still gets a real HTTP status.
    client_socket = request.environ.get("gunicorn.socket") or request.environ.get("werkzeug.socket")
    lines = gevent.queue.Queue()
    provider = gevent.spawn(read_provider_stream, upstream, lines)
    first_line = next_line(lines, client_socket)
    if first_line is None or isinstance(first_line, Exception) or first_line is STREAM_END:
        provider.kill(block=False)
        if first_line is None:  # the caller hung up before the model said anything
            log_request(body, upstream["model"], stream, 499, started)
            return "", 499
        response, status = provider_error(first_line if first_line is not STREAM_END else
                                          ConnectionError("the provider closed the stream without data"))
        log_request(body, upstream["model"], stream, status, started)
        return response, status

    def log_done(first_token_at, chunks):
        log_request(body, upstream["model"], stream, 200, started, first_token_at, chunks)

    # The generator gets what it needs as arguments: it runs after this view has returned.
    return Response(relay(first_line, lines, provider, client_socket, log_done),
                    mimetype="text/event-stream", headers=SSE_HEADERS)


if __name__ == "__main__":
    # `python app.py` runs what `gunicorn app:app` runs: the gevent workers set up in gunicorn.conf.py.
    os.execvp(sys.executable, [sys.executable, "-m", "gunicorn", "app:app"])
