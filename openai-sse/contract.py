"""What every server folder does the same way: identical in basic/, openai-sse/, openai-advanced/.

Settings from the environment and .env, the bearer check, the request checks and the allow-list of
OpenAI parameters, errors in OpenAI's shape, and one log line per request live here, so that each
app.py can start with its lesson. Change it in one folder, copy it to the others (a test compares).
Spec followed: https://docs.vapi.ai/customization/custom-llm/using-your-server
"""

import dataclasses
import hmac
import json
import logging
import os
import sys
import threading
import time
import uuid
from pathlib import Path

import openai
from dotenv import load_dotenv
from flask import Response, g, request
from werkzeug.exceptions import ClientDisconnected, HTTPException

HERE = Path(__file__).resolve().parent
load_dotenv(HERE / ".env")  # variables already set in the environment win over the file


def flag(name, default=""):
    """A yes/no setting: 1, true or yes (any case) mean yes."""
    return os.getenv(name, default).strip().lower() in ("1", "true", "yes")


# Configuration (every variable is explained in .env.example)
OPENAI_API_KEY = os.getenv("OPENAI_API_KEY", "")
OPENAI_BASE_URL = os.getenv("OPENAI_BASE_URL") or None  # None: api.openai.com
OPENAI_MODEL = os.getenv("OPENAI_MODEL", "")  # when set, replaces the model name Vapi sends
OPENAI_TIMEOUT_SECONDS = float(os.getenv("OPENAI_TIMEOUT_SECONDS", "15"))  # longest silence
OPENAI_MAX_RETRIES = int(os.getenv("OPENAI_MAX_RETRIES", "1"))
CUSTOM_LLM_API_KEY = os.getenv("CUSTOM_LLM_API_KEY", "")  # the bearer token Vapi must send
MAX_BODY_BYTES = int(os.getenv("MAX_BODY_BYTES", str(1024 * 1024)))
LOG_LEVEL = os.getenv("LOG_LEVEL", "INFO").upper()
FLASK_DEBUG = flag("FLASK_DEBUG")  # never on a server exposed through ngrok
BODY_TIMEOUT_SECONDS = float(os.getenv("BODY_TIMEOUT_SECONDS", "5"))  # then 408
MAX_CONCURRENT_CALLS = int(os.getenv("MAX_CONCURRENT_CALLS", "25"))  # per worker; 0: no limit
OVERLOAD_MESSAGE = os.getenv("OVERLOAD_MESSAGE", "")  # empty: a call over the limit gets 503

# The OpenAI chat parameters sent on to the provider. Everything else Vapi adds (call, customer,
# phoneNumber, metadata, ...) stays here: OpenAI rejects unknown parameters, and phoneNumber can
# hold a Twilio auth token. https://platform.openai.com/docs/api-reference/chat/create
FORWARDED_PARAMS = ("messages", "temperature", "top_p", "max_tokens", "max_completion_tokens",
                    "stop", "seed", "presence_penalty", "frequency_penalty", "logit_bias", "tools",
                    "tool_choice", "parallel_tool_calls", "response_format", "user")
# The keys a message may carry; Vapi adds others (transcriber `metadata`) that OpenAI rejects.
MESSAGE_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id", "function_call")

logging.basicConfig(level=LOG_LEVEL, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
logging.getLogger("httpx2").setLevel(logging.WARNING)  # the SDK's HTTP client: a line per request
log = logging.getLogger("custom-llm")


class ChatError(Exception):
    """An error for the caller: an HTTP status and OpenAI's error fields. Raised before a stream has
    started, it is the response; after, the stream ends with it as one event (error_event)."""

    def __init__(self, status, message, type_="invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status = status
        self.error = {"message": message, "type": type_, "param": param, "code": code}

    def body(self):
        """The JSON body: {"error": {"message", "type", "param", "code"}}."""
        return {"error": self.error}


class ProviderFailed(ChatError):
    """The model provider failed: its own 4xx, 502 for a 5xx or no answer, 504 when too slow."""


class Overloaded(ChatError):
    """This worker already serves MAX_CONCURRENT_CALLS calls: answered at once, so that the calls
    it serves keep their speed (Vapi: pipeline-error-custom-llm-503-server-overloaded-error)."""

    def __init__(self):
        super().__init__(503, "The server is at its limit of simultaneous calls; retry shortly.",
                         "server_error", code="server_overloaded")


class ServerShuttingDown(ChatError):
    """The server is stopping and this call outlasted its drain (gunicorn's graceful_timeout)."""

    def __init__(self):
        super().__init__(503, "The server is shutting down; the answer was cut short.",
                         "server_error", code="server_shutting_down")


@dataclasses.dataclass
class Turn:
    """One request: Vapi's body, the provider request built from it, what its log line says."""

    started: float
    path: str  # method and path, for the log line
    body: dict | None = None
    upstream: dict | None = None  # what goes to the provider: the allow-listed parameters only
    stream: bool | None = None
    call_id: str = "-"
    first_token_at: float | None = None
    chunks: int = 0
    steps: dict = dataclasses.field(default_factory=dict)  # more `name=value` for the log line

    def relayed(self, chunk):
        """Count a chunk sent to the caller; note when the first token went out."""
        self.chunks += 1
        if self.first_token_at is None and carries_token(chunk):
            self.first_token_at = time.perf_counter()


def carries_token(chunk):
    """Whether a chunk holds words or a tool call (a provider's first, role-only chunk does not)."""
    return any(isinstance(choice, dict) and isinstance(choice.get("delta"), dict)
               and (choice["delta"].get("content") or choice["delta"].get("tool_calls"))
               for choice in chunk["choices"])


def read_chat_request():
    """Check the bearer token and Vapi's body; returns this request's Turn, or raises ChatError.
    Lenient about what Vapi adds, strict about what goes on: the allow-list builds the request."""
    turn = g.turn
    if not authorized(request.headers.get("Authorization", "")):
        raise ChatError(401, "Missing or wrong bearer token (CUSTOM_LLM_API_KEY).",
                        code="invalid_api_key")
    if not request.is_json:
        raise ChatError(400, "Content-Type must be application/json.")
    try:
        body = json.loads(read_body(), parse_constant=reject_constant)
    except (ValueError, RecursionError):
        raise ChatError(400, "The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise ChatError(400, "The request body must be a JSON object.")
    call = body.get("call")
    call_id = call.get("id") if isinstance(call, dict) else None
    printable = isinstance(call_id, str) and call_id.isprintable()  # not '\ud800', not a newline
    turn.call_id = call_id[:64] if printable else "-"  # web tests send none
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ChatError(400, "'messages' must be a non-empty list.", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ChatError(400, f"messages[{i}] must be an object with a string 'role'.",
                            param=f"messages[{i}].role")
    model = OPENAI_MODEL or body.get("model")
    if not isinstance(model, str) or not model:
        raise ChatError(400, "'model' must be a non-empty string.", param="model")
    if not isinstance(body.get("stream", False), bool):
        raise ChatError(400, "'stream' must be true or false.", param="stream")
    turn.stream = body.get("stream", False)
    upstream = {key: body[key] for key in FORWARDED_PARAMS if body.get(key) is not None}
    upstream["model"] = model
    upstream["messages"] = [{k: m[k] for k in MESSAGE_KEYS if k in m} for m in messages]
    turn.body, turn.upstream = body, upstream
    if not OPENAI_API_KEY:
        raise ChatError(500, "OPENAI_API_KEY is not set on this server.", "server_error",
                        code="missing_api_key")
    CALLS.admit(turn)  # raises Overloaded
    return turn


def read_body():
    """The request body, or ChatError 408 when it stops arriving for BODY_TIMEOUT_SECONDS: a flood
    of requests that never finish must not hold the worker. gunicorn then closes the connection."""
    sock = request.environ.get("gunicorn.socket")
    if sock is None:  # not under gunicorn
        return request.get_data()
    previous = sock.gettimeout()
    sock.settimeout(BODY_TIMEOUT_SECONDS)  # for each read: a trickle of bytes keeps it going
    try:
        return request.get_data()
    except ClientDisconnected as exc:
        if isinstance(exc.__context__, TimeoutError):
            raise ChatError(408, "The request body did not arrive in time (BODY_TIMEOUT_SECONDS).",
                            code="request_timeout") from None
        raise
    finally:
        sock.settimeout(previous)


class Calls:
    """The calls this worker process is answering: admission control, and the calls to cut when a
    shutdown outlasts its drain (gunicorn.conf.py)."""

    def __init__(self, limit):
        self.limit = limit
        self.running = {}  # id(turn): (turn, the greenlet or thread answering it)
        self.lock = threading.Lock()

    def admit(self, turn):
        """Count the call in, or raise Overloaded when MAX_CONCURRENT_CALLS are running."""
        gevent = sys.modules.get("gevent")  # loaded by gunicorn's gevent worker, not by gthread
        task = gevent.getcurrent() if gevent else threading.current_thread()
        with self.lock:
            if self.limit and len(self.running) >= self.limit:
                raise Overloaded()
            self.running[id(turn)] = (turn, task)

    def release(self, turn):
        """Count the call out, once its answer has been sent or has failed."""
        with self.lock:
            self.running.pop(id(turn), None)

    def cut(self):
        """End every call still running: a greenlet gets ServerShuttingDown where it waits (its
        stream ends with an error event and [DONE]); a thread cannot be interrupted, so its log line
        is written now. Either way the log line says cut_by=shutdown."""
        for turn, task in list(self.running.values()):
            turn.steps["cut_by"] = "shutdown"
            if hasattr(task, "kill"):
                task.kill(ServerShuttingDown(), block=False)
            else:
                log_line(turn, 503)
        return len(self.running)


CALLS = Calls(MAX_CONCURRENT_CALLS)


def authorized(authorization):
    """Check `Authorization: Bearer <CUSTOM_LLM_API_KEY>` in constant time; open without a key."""
    if not CUSTOM_LLM_API_KEY:
        return True
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(),
                                                              CUSTOM_LLM_API_KEY.encode())


def reject_constant(name):
    """NaN and Infinity are not JSON: Python would accept them, the provider would not."""
    raise ValueError(f"{name} is not valid JSON")


def provider_error(exc):
    """The ProviderFailed for an exception from the provider call (the SDK's, a broken answer)."""
    if isinstance(exc, UnicodeEncodeError):  # the SDK could not encode a lone surrogate
        return ProviderFailed(400, "The request contains text that is not valid Unicode.")
    if isinstance(exc, openai.APITimeoutError):
        return ProviderFailed(504, "The model provider did not answer in time "
                              "(OPENAI_TIMEOUT_SECONDS).", "timeout_error", code="provider_timeout")
    if isinstance(exc, openai.APIStatusError) and exc.status_code < 500:
        error = exc.body if isinstance(exc.body, dict) else {}
        message = str(error.get("message") or exc.message)
        if OPENAI_API_KEY:
            message = message.replace(OPENAI_API_KEY, "[redacted]")
        return ProviderFailed(exc.status_code, f"Model provider: {message}",
                              error.get("type") or "provider_error", error.get("param"),
                              error.get("code"))
    if not isinstance(exc, (openai.OpenAIError, OSError, ValueError)):  # e.g. the HTTP client's
        log.error("unexpected error from the provider call", exc_info=exc)  # (or a bug): logged
    return ProviderFailed(502, "The model provider failed or could not be reached.",
                          "provider_error", code="provider_unavailable")


def complete(client, request):
    """The provider's whole answer, a chat.completion (stream: false); raises ProviderFailed."""
    try:
        completion = client.chat.completions.create(**request)
    except (openai.OpenAIError, ValueError) as exc:  # ValueError: the provider sent broken JSON
        raise provider_error(exc) from exc
    if not completion.choices:
        raise ProviderFailed(502, "The model provider sent no choices.", "provider_error")
    return completion


def sse(payload):
    """One Server-Sent Event: JSON on one `data:` line, so a newline cannot break the framing."""
    return f"data: {json.dumps(payload)}\n\n".encode()


def error_event(exc):
    """The event that ends a stream after a failure: the ChatError's, or for a bug of ours (its
    traceback goes to the log, not to the caller) a plain 500."""
    if not isinstance(exc, ChatError):
        log.error("unexpected error while streaming", exc_info=exc)
        exc = ChatError(500, "Internal server error.", "server_error")
    return sse(exc.body())


def warm_up(client):
    """Load the SDK's lazy modules (40 ms) and work out its platform headers (a `uname -p`
    subprocess, 2 ms; measured) at start-up: not on the first callers' turns, once each."""
    _ = client.chat.completions
    client.platform_headers()


def init_app(app):
    """What every folder's app has: the body limit, debug mode only when asked, OpenAI-shaped
    errors, one log line per request (for a stream, written after its last byte), GET /health."""
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES  # larger bodies get 413
    app.debug = FLASK_DEBUG  # Flask's debugger would show code to anyone who can reach the server
    if FLASK_DEBUG:
        log.warning("Flask debug mode is ON (FLASK_DEBUG=%s): never expose this server to the "
                    "internet", os.getenv("FLASK_DEBUG"))
    if not OPENAI_API_KEY:
        log.warning("OPENAI_API_KEY is not set: chat requests will fail until it is (.env.example)")
    if not CUSTOM_LLM_API_KEY:
        log.warning("CUSTOM_LLM_API_KEY is not set: anyone who knows this URL can use your "
                    "provider account")

    @app.errorhandler(ChatError)
    def chat_error(exc):
        """A bad request or a failed provider, before anything was sent: its status and body."""
        return exc.body(), exc.status

    @app.errorhandler(Overloaded)
    def overloaded(exc):
        """503 with Retry-After; with OVERLOAD_MESSAGE, a stream says it instead, then [DONE]."""
        turn = g.turn
        if not (OVERLOAD_MESSAGE and turn.stream):
            return exc.body(), exc.status, {"Retry-After": "1"}
        turn.steps["overloaded"] = "spoken"
        turn.first_token_at, turn.chunks = time.perf_counter(), 2
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": turn.upstream["model"]}
        events = [sse({**head, "choices": [{"index": 0, "finish_reason": None, "delta": {
                      "role": "assistant", "content": OVERLOAD_MESSAGE}}]}),
                  sse({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
                  b"data: [DONE]\n\n"]
        return Response(events, mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.errorhandler(HTTPException)
    def http_error(exc):
        """404, 405, 413 ... as OpenAI-shaped JSON instead of Flask's HTML page."""
        return ChatError(exc.code, exc.description).body(), exc.code

    @app.errorhandler(Exception)
    def unexpected_error(exc):
        """A bug must not send a traceback to the caller; the log keeps it."""
        log.error("unexpected error", exc_info=exc)
        return ChatError(500, "Internal server error.", "server_error").body(), 500

    @app.before_request
    def start_turn():
        """Every request has a Turn from the start, so that even a 404 gets its log line."""
        g.turn = Turn(time.perf_counter(), f"{request.method} {request.path[:100]}")

    @app.after_request
    def log_request(response):
        """Write the log line now; for a stream, once the server closes it after its last byte."""
        turn = g.turn
        if request.endpoint != "health" and response.is_streamed:
            response.call_on_close(lambda: log_line(turn, response.status_code))
        elif request.endpoint != "health":
            log_line(turn, response.status_code)
        return response

    @app.after_request
    def release_call(response):
        """An admitted call counts until its answer has been sent (or the caller went away)."""
        turn = g.turn
        if id(turn) in CALLS.running:
            response.call_on_close(lambda: CALLS.release(turn))
        return response

    @app.get("/health")
    def health():
        """Liveness check for load balancers and uptime monitors; does not call the provider."""
        return {"status": "ok"}


def log_line(turn, status):
    """The one INFO line per request. Never message text, keys or the phoneNumber object."""
    ttft = f"{(turn.first_token_at - turn.started) * 1000:.1f}" if turn.first_token_at else "-"
    model = turn.upstream["model"] if turn.upstream else None
    log.info("%s call=%r model=%r stream=%s status=%s ttft_ms=%s total_ms=%.1f chunks=%d%s",
             turn.path, turn.call_id, model, turn.stream, status, ttft,
             (time.perf_counter() - turn.started) * 1000, turn.chunks,
             "".join(f" {name}={value}" for name, value in turn.steps.items()))


def run_with_gunicorn():
    """`python app.py`: run exactly what `gunicorn app:app` runs here (with gunicorn.conf.py)."""
    os.chdir(HERE)
    os.execvp(sys.executable, [sys.executable, "-m", "gunicorn", "app:app"])
