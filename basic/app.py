"""A Vapi Custom LLM server, the simplest version: ask the model, wait for the whole answer, send it back.

Vapi always asks for a stream (`stream: true`), so the finished answer goes back as Server-Sent Events. The
caller hears nothing until the model has written its last word; `openai-sse/` relays it word by word instead.
Spec followed: https://docs.vapi.ai/customization/custom-llm/using-your-server
"""

import hmac
import json
import logging
import os
import time

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
OPENAI_TIMEOUT_SECONDS = float(os.getenv("OPENAI_TIMEOUT_SECONDS", "15"))
OPENAI_MAX_RETRIES = int(os.getenv("OPENAI_MAX_RETRIES", "1"))
MAX_BODY_BYTES = int(os.getenv("MAX_BODY_BYTES", str(1024 * 1024)))
LOG_LEVEL = os.getenv("LOG_LEVEL", "INFO").upper()
FLASK_DEBUG = os.getenv("FLASK_DEBUG", "").lower() in ("1", "true", "yes")  # never on a server ngrok exposes

# The OpenAI chat parameters sent on to the provider. Everything else Vapi adds (call, customer, phoneNumber,
# metadata, ...) stays here: OpenAI rejects unknown parameters, and phoneNumber can hold a Twilio auth token.
# https://platform.openai.com/docs/api-reference/chat/create
FORWARDED_PARAMS = ("messages", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed",
                    "presence_penalty", "frequency_penalty", "logit_bias", "tools", "tool_choice",
                    "parallel_tool_calls", "response_format", "user")
# The keys a message may carry; Vapi adds others (e.g. transcriber `metadata`) that OpenAI would reject.
MESSAGE_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id", "function_call")

logging.basicConfig(level=LOG_LEVEL, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
logging.getLogger("httpx2").setLevel(logging.WARNING)  # the SDK's HTTP client logs every request at INFO
log = logging.getLogger("basic")
if not OPENAI_API_KEY:
    log.warning("OPENAI_API_KEY is not set: chat requests will fail until it is (see .env.example)")
if not CUSTOM_LLM_API_KEY:
    log.warning("CUSTOM_LLM_API_KEY is not set: anyone who knows this URL can use your model provider account")

client = openai.OpenAI(api_key=OPENAI_API_KEY or "not-set", base_url=OPENAI_BASE_URL,
                       timeout=OPENAI_TIMEOUT_SECONDS, max_retries=OPENAI_MAX_RETRIES)
# Warm the SDK up now, not on the first caller's turn: its lazily loaded modules, and its platform headers
# (worked out once with a `uname -p` subprocess, which a burst of first calls would otherwise each start).
completions = client.chat.completions
client.platform_headers()

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
    if isinstance(exc, openai.APITimeoutError):
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


def log_request(body, model, stream, status, started, first_byte_at=None, chunks=0):
    """The one INFO line per request. Never message text, keys or the phoneNumber object."""
    ttft = f"{(first_byte_at - started) * 1000:.1f}" if first_byte_at else "-"
    log.info("call=%r model=%r stream=%s status=%s ttft_ms=%s total_ms=%.1f chunks=%d", call_id_of(body), model,
             stream, status, ttft, (time.perf_counter() - started) * 1000, chunks)


def sse(payload):
    """One Server-Sent Event: JSON on one `data:` line, so a newline in the text cannot break the framing."""
    return f"data: {json.dumps(payload)}\n\n"


def completion_as_sse(completion):
    """The finished answer as the stream Vapi expects: role, content or tool calls, finish_reason, [DONE]."""
    choice = completion.choices[0]
    head = {"id": completion.id, "object": "chat.completion.chunk", "created": completion.created,
            "model": completion.model}

    def chunk(delta, finish_reason=None):
        return sse({**head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]})

    events = [chunk({"role": "assistant", "content": ""})]
    if choice.message.content:
        events.append(chunk({"content": choice.message.content}))
    if choice.message.tool_calls:
        events.append(chunk({"tool_calls": [
            {"index": i, "id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments}}
            for i, call in enumerate(choice.message.tool_calls)]}))
    events.append(chunk({}, choice.finish_reason or "stop"))
    events.append("data: [DONE]\n\n")
    return events


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
    """Vapi's turn: ask the provider for the whole answer, then send it as SSE (stream: true) or JSON."""
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

    try:
        completion = completions.create(**upstream)
    except (openai.OpenAIError, ValueError) as exc:  # ValueError: the provider sent broken JSON
        error = provider_error(exc)
    else:
        error = None if completion.choices else error_response(502, "The model provider sent no choices.",
                                                               "provider_error")
    if error:
        log_request(body, upstream["model"], stream, error[1], started)
        return error

    first_byte_at = time.perf_counter()
    if not stream:
        log_request(body, upstream["model"], stream, 200, started, first_byte_at, 1)
        return completion.to_dict()
    events = completion_as_sse(completion)
    log_request(body, upstream["model"], stream, 200, started, first_byte_at, len(events))
    return Response(events, mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})


if __name__ == "__main__":
    app.run(host="0.0.0.0", port=int(os.getenv("PORT", "8000")), debug=FLASK_DEBUG)
