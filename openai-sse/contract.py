"""What every server folder does the same way: identical in basic/, openai-sse/, openai-advanced/.

Settings from the environment and .env, the bearer check, the request checks and the allow-list of
OpenAI parameters, the request as each model takes it, errors in OpenAI's shape, the request body's
time limit, the limit of calls a worker answers at once and the calls cut by a shutdown, and one log
line per request live here, so that each app.py can start with its lesson. Change it in one
folder, copy it to the others (a test compares).
Spec followed: https://docs.vapi.ai/customization/custom-llm/using-your-server
"""

import dataclasses
import hmac
import json
import logging
import math
import os
import re
import socket
import ssl
import sys
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import openai
from dotenv import load_dotenv
from flask import Response, g, request
from werkzeug.exceptions import ClientDisconnected, HTTPException

HERE = Path(__file__).resolve().parent
load_dotenv(HERE / ".env")  # variables already set in the environment win over the file


# --- Settings -------------------------------------------------------------------------------------

# Under gunicorn, whether this is the first worker process of a start or a reload (gunicorn.conf.py
# sets it). Without gunicorn there is one process, which counts as the first.
FIRST_WORKER = os.getenv("GUNICORN_FIRST_WORKER", "1") == "1"
START_UP_WARNINGS = []  # said once per server, at start-up (log_start_up)


def stop_start_up(message):
    """Stop the server with one line saying why, instead of a traceback. Under gunicorn only the
    first worker says it and exits with 4, gunicorn's "App failed to load", which stops gunicorn;
    any other worker leaves quietly: a second exit with 4 makes gunicorn's shutdown crash."""
    if FIRST_WORKER:
        print(f"Cannot start: {message}", file=sys.stderr, flush=True)
        os._exit(4)
    os._exit(0)  # os._exit, not sys.exit: gunicorn would log "Worker exiting" for nothing


def setting(name, default, kind=str, minimum=None, maximum=None, expected=None):
    """A setting from the environment or .env, as `kind` (int, float, a class ...). Empty or unset
    means `default`; a value that cannot be used stops start-up, naming it and what is expected."""
    text = os.getenv(name, "").strip()
    if not text:
        return default
    try:
        value = kind(text)
        usable = kind not in (int, float) or (math.isfinite(value) and (
            minimum is None or value >= minimum) and (maximum is None or value <= maximum))
    except (ValueError, LookupError):  # a time zone name that does not exist is a LookupError
        usable = False
    if usable:
        return value
    if expected is None:
        expected = {int: "a whole number", float: "a number"}.get(kind, kind.__name__)
        expected += "".join((f" from {minimum}" if minimum is not None else "",
                             f" to {maximum}" if maximum is not None else ""))
    stop_start_up(f"{name}={text!r} in .env or the environment: expected {expected} "
                  f"(empty means the default, {default})")


def log_level(text):
    """A logging level's name, in any case: DEBUG, INFO ... (ValueError for another word)."""
    if text.upper() not in logging.getLevelNamesMapping():
        raise ValueError(text)
    return text.upper()


def flag(name, default=""):
    """A yes/no setting: 1, true or yes (any case) mean yes."""
    return (os.getenv(name) or default).strip().lower() in ("1", "true", "yes")


def base_url(name):
    """A provider's base URL; one pasted with the endpoint's /chat/completions is cut back to the
    base (the SDK appends /chat/completions itself), with a warning at start-up."""
    url = os.getenv(name, "").strip().rstrip("/")
    if url and not url.startswith(("http://", "https://")):
        stop_start_up(f"{name}={url!r} in .env or the environment: expected a URL that starts "
                      "with http:// or https:// (empty means the default)")
    if url.endswith("/chat/completions"):
        url = url.removesuffix("/chat/completions")
        START_UP_WARNINGS.append(f"{name} ends with /chat/completions: using {shown_url(url)} "
                                 "(the base URL, without the endpoint)")
    return url or None


def shown_url(url):
    """A URL for the log: scheme, host, port and path; never a user name or password in it."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path}"


# Configuration (every variable is explained in .env.example)
OPENAI_API_KEY = os.getenv("OPENAI_API_KEY", "")
OPENAI_BASE_URL = base_url("OPENAI_BASE_URL")  # None: api.openai.com
OPENAI_MODEL = os.getenv("OPENAI_MODEL", "")  # when set, replaces the model name Vapi sends
OPENAI_TIMEOUT_SECONDS = setting("OPENAI_TIMEOUT_SECONDS", 15.0, float, 0.1)  # longest silence
OPENAI_MAX_RETRIES = setting("OPENAI_MAX_RETRIES", 1, int, 0)
OPENAI_REASONING_EFFORT = setting("OPENAI_REASONING_EFFORT", "")  # empty: not sent
# The bearer token Vapi must send; several, separated by commas, while a new one replaces the old.
CUSTOM_LLM_API_KEYS = [key.strip().encode()
                       for key in os.getenv("CUSTOM_LLM_API_KEY", "").split(",") if key.strip()]
MAX_BODY_BYTES = setting("MAX_BODY_BYTES", 1024 * 1024, int, 1)
LOG_LEVEL = setting("LOG_LEVEL", "INFO", log_level, expected="DEBUG, INFO, WARNING or ERROR")
FLASK_DEBUG = flag("FLASK_DEBUG")  # never on a server exposed through ngrok
BODY_TIMEOUT_SECONDS = setting("BODY_TIMEOUT_SECONDS", 5.0, float, 0.1)  # then 408
MAX_CONCURRENT_CALLS = setting("MAX_CONCURRENT_CALLS", 25, int, 0)  # per worker; 0: no limit
OVERLOAD_MESSAGE = setting("OVERLOAD_MESSAGE", "")  # empty: a call over the limit gets 503

# The OpenAI chat parameters sent on to the provider. Everything else Vapi adds (call, customer,
# phoneNumber, metadata, ...) stays here: OpenAI rejects unknown parameters, and phoneNumber can
# hold a Twilio auth token. https://platform.openai.com/docs/api-reference/chat/create
FORWARDED_PARAMS = ("messages", "temperature", "top_p", "max_tokens", "max_completion_tokens",
                    "stop", "seed", "presence_penalty", "frequency_penalty", "logit_bias", "tools",
                    "tool_choice", "parallel_tool_calls", "response_format", "user")
# The keys a message may carry; Vapi adds others (transcriber `metadata`) that OpenAI rejects.
MESSAGE_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id", "function_call")
# OpenAI's reasoning models, the GPT-5 family and the o-series (also as "openai/gpt-5-mini"),
# refuse `max_tokens` (they take `max_completion_tokens`) and any `temperature` or `top_p` but 1;
# Vapi sends both on every turn. https://platform.openai.com/docs/guides/reasoning
REASONING_MODEL = re.compile(r"(?:^|/)(?:gpt-5|o[134])(?:$|[-.])", re.IGNORECASE)
# A parameter a provider refuses with OpenAI's error, sent again at once without it (or under the
# name the error says to use instead), and never again to that model by this worker.
OPTIONAL_PARAMS = {*FORWARDED_PARAMS, "reasoning_effort"} - {"messages", "tools"}
REFUSAL_CODES = ("unsupported_parameter", "unsupported_value")
refused = {}  # (provider URL, model) -> {parameter: the name to send it under, or None}
SERVER_MESSAGES_SEEN = set()  # the types of Vapi server messages this worker warned about

logging.basicConfig(level=LOG_LEVEL, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
logging.getLogger("httpx2").setLevel(logging.WARNING)  # the SDK's HTTP client: a line per request
log = logging.getLogger("custom-llm")


# --- Errors in OpenAI's shape, and the turn -------------------------------------------------------

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

    def logged(self):
        """What the log line's `error=` says: the code the caller gets."""
        return self.error["code"] or f"http_{self.status}"


class ProviderFailed(ChatError):
    """The model provider failed: its own 4xx, 502 for a 5xx or no answer, 504 when too slow.
    `provider_status` and `provider_code` are the provider's own, when it answered with an error."""

    provider_status = provider_code = None

    def logged(self):
        """`provider:<its code>` when the provider said why, so that its rejection (a wrong
        OPENAI_API_KEY) and ours (a wrong CUSTOM_LLM_API_KEY) can never be confused."""
        return f"provider:{self.provider_code}" if self.provider_code else super().logged()


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
    finish_reason: str | None = None  # the provider's last one
    chunks: int = 0
    error: str | None = None  # why it failed, for the log line: ChatError.logged()
    hung_up: bool = False  # the caller went away mid-answer (status 499: before it)
    steps: dict = dataclasses.field(default_factory=dict)  # more `name=value` for the log line

    def relayed(self, chunk):
        """Count a chunk sent to the caller; note when the first token went out."""
        self.chunks += 1
        if self.first_token_at is None and carries_token(chunk):
            self.first_token_at = time.perf_counter()
        self.finish_reason = next((choice["finish_reason"] for choice in chunk["choices"]
                                   if isinstance(choice, dict) and choice.get("finish_reason")),
                                  self.finish_reason)

    def completed(self, completion):
        """Note a whole answer (stream: false, or basic's): its time, and whether it had words."""
        self.chunks = 1
        if has_words(completion):
            self.first_token_at = time.perf_counter()
        self.ended(completion.choices[0].finish_reason)

    def ended(self, finish_reason=None):
        """The provider's answer is complete. One without words is silence for the caller: the log
        line says why, and a budget used up by reasoning names the fix."""
        if self.first_token_at is not None:
            return
        reason = self.steps["no_words"] = finish_reason or self.finish_reason or "empty"
        if reason == "length":
            log.warning("model %r used its whole token budget before saying a word: raise the "
                        "assistant's Max Tokens in Vapi, or set OPENAI_REASONING_EFFORT lower "
                        "(minimal on gpt-5, none from gpt-5.1, low on the o-series)",
                        self.upstream["model"])


def carries_token(chunk):
    """Whether a chunk holds words or a tool call (a provider's first, role-only chunk does not)."""
    return any(isinstance(choice, dict) and isinstance(choice.get("delta"), dict)
               and (choice["delta"].get("content") or choice["delta"].get("tool_calls"))
               for choice in chunk["choices"])


def has_words(completion):
    """Whether a whole answer says something or calls a tool (one whose token budget went on
    reasoning does not: finish_reason "length", no content)."""
    message = completion.choices[0].message
    return bool(message.content or message.tool_calls)


# --- The request ----------------------------------------------------------------------------------

def read_chat_request():
    """Check the bearer token and Vapi's body; returns this request's Turn, or raises ChatError.
    Lenient about what Vapi adds, strict about what goes on: the allow-list builds the request."""
    turn = g.turn
    if not authorized(request.headers.get("Authorization", "")):
        raise ChatError(401, "Missing or wrong bearer token (CUSTOM_LLM_API_KEY).",
                        code="invalid_api_key")
    if not request.is_json:
        raise ChatError(400, "Content-Type must be application/json.", code="invalid_content_type")
    try:
        body = json.loads(read_body(), parse_constant=reject_constant)
    except (ValueError, RecursionError):
        raise ChatError(400, "The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ChatError(400, "The request body must be a JSON object.", code="invalid_json")
    # Vapi's chat and SMS channels send a `chat` object instead of `call`; web tests send neither.
    ids = [source.get("id") for source in (body.get("call"), body.get("chat"))
           if isinstance(source, dict)]
    ids = [id_ for id_ in ids if isinstance(id_, str) and id_ and id_.isprintable()]  # no newline
    turn.call_id = ids[0][:64] if ids else "-"
    messages = body.get("messages")
    server_message = body.get("message")
    if messages is None and isinstance(server_message, dict) and "type" in server_message:
        # Vapi posts its server messages (status-update, end-of-call-report, ...) to an
        # assistant's Server URL: this one was pasted there too.
        kind = str(server_message["type"])[:64]  # repr(): no newline in the log
        if kind not in SERVER_MESSAGES_SEEN:  # Vapi sends dozens a call: one warning per type
            SERVER_MESSAGES_SEEN.add(kind)
            log.warning("a Vapi server message (type %r) was posted to the chat URL: set the "
                        "assistant's Server URL to your webhook, not to this server", kind)
        raise ChatError(400, f"This is a Vapi server message (type {kind!r}), not a chat request: "
                        "this URL is the Custom LLM URL, not the assistant's Server URL.",
                        param="message", code="vapi_server_message")
    if not isinstance(messages, list) or not messages:
        raise ChatError(400, "'messages' must be a non-empty list.", param="messages",
                        code="missing_messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ChatError(400, f"messages[{i}] must be an object with a string 'role'.",
                            param=f"messages[{i}].role", code="invalid_message")
    model = OPENAI_MODEL or body.get("model")
    if not isinstance(model, str) or not model:
        raise ChatError(400, "'model' must be a non-empty string.", param="model",
                        code="missing_model")
    if not isinstance(body.get("stream", False), bool):
        raise ChatError(400, "'stream' must be true or false.", param="stream",
                        code="invalid_stream")
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


def authorized(authorization):
    """Check `Authorization: Bearer <key>` against each key of CUSTOM_LLM_API_KEY (comma-separated,
    so a new key can be added in Vapi before the old one goes), in constant time; open without."""
    if not CUSTOM_LLM_API_KEYS:
        return True
    scheme, _, token = authorization.partition(" ")
    token = token.strip().encode()
    matches = [hmac.compare_digest(token, key) for key in CUSTOM_LLM_API_KEYS]  # each, always
    return scheme.lower() == "bearer" and any(matches)


def reject_constant(name):
    """NaN and Infinity are not JSON: Python would accept them, the provider would not."""
    raise ValueError(f"{name} is not valid JSON")


# --- Floods, overload and shutdown ----------------------------------------------------------------

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
        stream ends with an error event and [DONE]; its log line says cut_by=shutdown). A thread
        cannot be interrupted: a WARNING says how many calls the worker's exit will cut."""
        with self.lock:
            running = list(self.running.values())
        threads = 0
        for turn, task in running:
            turn.steps["cut_by"] = "shutdown"
            if hasattr(task, "kill"):
                task.kill(ServerShuttingDown(), block=False)
            else:
                threads += 1
        if threads:
            log.warning("%d calls still running at the end of the drain (graceful_timeout): the "
                        "worker's exit cuts them", threads)


CALLS = Calls(MAX_CONCURRENT_CALLS)


# --- The provider ---------------------------------------------------------------------------------

def provider_error(exc):
    """The ProviderFailed for an exception from the provider call (the SDK's, a broken answer)."""
    if isinstance(exc, UnicodeEncodeError):  # the SDK could not encode a lone surrogate
        return ProviderFailed(400, "The request contains text that is not valid Unicode.",
                              code="invalid_unicode")
    if isinstance(exc, openai.APIConnectionError):  # APITimeoutError too
        log.warning("model provider at %s: %s", host_port(exc.request.url), unreachable(exc))
    if isinstance(exc, openai.APITimeoutError):
        return ProviderFailed(504, "The model provider did not answer in time "
                              "(OPENAI_TIMEOUT_SECONDS).", "timeout_error", code="provider_timeout")
    if isinstance(exc, openai.APIStatusError):
        error = exc.body if isinstance(exc.body, dict) else {}
        failed = ProviderFailed(502, "The model provider failed or could not be reached.",
                                "provider_error", code="provider_unavailable")
        if exc.status_code < 500:
            message = str(error.get("message") or exc.message)
            if OPENAI_API_KEY:
                message = message.replace(OPENAI_API_KEY, "[redacted]")
            failed = ProviderFailed(exc.status_code, f"Model provider: {message}",
                                    error.get("type") or "provider_error", error.get("param"),
                                    error.get("code"))
        failed.provider_status = exc.status_code
        failed.provider_code = error.get("code") or error.get("type") or exc.status_code
        if exc.status_code == 404 and error.get("code") != "model_not_found":
            log.warning("model provider answered 404 for %s: check the base URL (OpenAI's is "
                        "https://api.openai.com/v1)", shown_url(str(exc.request.url)))
        return failed
    if not isinstance(exc, (openai.OpenAIError, OSError, ValueError)):  # e.g. the HTTP client's
        log.error("unexpected error from the provider call", exc_info=exc)  # (or a bug): logged
    return ProviderFailed(502, "The model provider failed or could not be reached.",
                          "provider_error", code="provider_unavailable")


def for_model(client, request):
    """The request as this provider's model takes it: OPENAI_REASONING_EFFORT, the rules of OpenAI's
    reasoning models, then what the model refused before. Every other model gets it as it is."""
    request = dict(request)
    if OPENAI_REASONING_EFFORT:
        request["reasoning_effort"] = OPENAI_REASONING_EFFORT
    if REASONING_MODEL.search(request["model"]):
        rename(request, "max_tokens", "max_completion_tokens")
        for name in ("temperature", "top_p"):
            if request.get(name, 1) != 1:
                del request[name]
    for name, new_name in refused.get((str(client.base_url), request["model"]), {}).items():
        rename(request, name, new_name)
    return request


def rename(request, name, new_name):
    """Send a parameter under another name (new_name None: leave it out)."""
    value = request.pop(name, None)
    if value is not None and new_name and new_name not in request:
        request[new_name] = value


def learned_refusal(client, request, exc):
    """Whether `exc` (a 400) is the provider refusing one optional parameter of `request` with
    OpenAI's error (code unsupported_parameter or unsupported_value); if so, it is remembered for
    the model (once, with a WARNING), so that the request can go again at once without it."""
    error = exc.body if isinstance(exc.body, dict) else {}
    name, key = error.get("param"), (str(client.base_url), request["model"])
    if error.get("code") not in REFUSAL_CODES or name not in OPTIONAL_PARAMS \
            or name not in request or name in refused.get(key, {}):
        return False
    instead = re.search(r"[Uu]se '(\w+)' instead", str(error.get("message")))
    new_name = instead[1] if instead and instead[1] in OPTIONAL_PARAMS else None
    refused.setdefault(key, {})[name] = new_name
    log.warning("model %r refuses %r (%s): sent %s from now on", request["model"], name,
                error["code"], f"as {new_name!r}" if new_name else "without it")
    return True


def ask(client, request, send):
    """send(request) as the provider's model takes it; once more at once for each parameter it
    refuses. Raises what send raises (every other 400 included: never retried)."""
    while True:
        sent = for_model(client, request)
        try:
            return send(sent)
        except openai.BadRequestError as exc:
            if not learned_refusal(client, sent, exc):
                raise


def host_port(url):
    """host:port of a URL (the SDK's), the port given even when it is the scheme's default."""
    return f"{url.host}:{url.port or {'https': 443, 'http': 80}.get(url.scheme, '?')}"


def unreachable(exc):
    """Why the SDK could not reach the provider, from the exceptions it wraps (`__cause__`), or
    that were being handled when it was raised (`__context__`)."""
    while (exc.__cause__ or exc.__context__) is not None:
        exc = exc.__cause__ or exc.__context__  # the SDK's, the HTTP client's, the socket's own
        if isinstance(exc, socket.gaierror):
            return f"DNS lookup failed ({exc.strerror}): check the host name in the base URL"
        if isinstance(exc, ssl.SSLError):
            return f"TLS failed ({exc.reason or exc}): is it http:// rather than https://?"
        if isinstance(exc, ConnectionRefusedError):
            return "connection refused: nothing listens on that port (check the base URL)"
        if isinstance(exc, TimeoutError):
            return f"timed out ({exc}); OPENAI_TIMEOUT_SECONDS={OPENAI_TIMEOUT_SECONDS:g}"
    return f"could not be reached ({exc})"


def complete(client, request):
    """The provider's whole answer, a chat.completion (stream: false); raises ProviderFailed."""
    try:
        completion = ask(client, request, lambda sent: client.chat.completions.create(**sent))
    except (openai.OpenAIError, ValueError) as exc:  # ValueError: the provider sent broken JSON
        raise provider_error(exc) from exc
    if not completion.choices:
        raise ProviderFailed(502, "The model provider sent no choices.", "provider_error",
                             code="bad_answer")
    return completion


# --- The stream, the app and its log line ---------------------------------------------------------

def sse(payload):
    """One Server-Sent Event: JSON on one `data:` line, so a newline cannot break the framing."""
    return f"data: {json.dumps(payload)}\n\n".encode()


def error_event(turn, exc):
    """The event that ends a stream after a failure: the ChatError's, or for a bug of ours (its
    traceback goes to the log, not to the caller) a plain 500."""
    if not isinstance(exc, ChatError):
        log.error("unexpected error while streaming", exc_info=exc)
        exc = ChatError(500, "Internal server error.", "server_error", code="internal_error")
    turn.error = exc.logged()
    return sse(exc.body())


def warm_up(client):
    """Load the SDK's lazy modules (40 ms) and work out its platform headers (a `uname -p`
    subprocess, 2 ms; measured) at start-up: not on the first callers' turns, once each."""
    _ = client.chat.completions
    client.platform_headers()


def init_app(app, **summary):
    """What every folder's app has: the body limit, debug mode only when asked, OpenAI-shaped
    errors, one log line per request (for a stream, written after its last byte), GET /health.
    `summary`: what this folder adds to the start-up line (memory, knowledge ...)."""
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES  # larger bodies get 413
    app.debug = FLASK_DEBUG  # Flask's debugger would show code to anyone who can reach the server
    # Every worker would say the same: the first speaks for the server. `python app.py` (app.py
    # as __main__) stays quiet too: it is about to run gunicorn, whose first worker will say it.
    if FIRST_WORKER and app.import_name != "__main__":
        log_start_up(summary)

    @app.errorhandler(ChatError)
    def chat_error(exc):
        """A bad request or a failed provider, before anything was sent: its status and body."""
        g.turn.error = exc.logged()
        return exc.body(), exc.status

    @app.errorhandler(Overloaded)
    def overloaded(exc):
        """503 with Retry-After; with OVERLOAD_MESSAGE, a stream says it instead, then [DONE]."""
        turn = g.turn
        if not (OVERLOAD_MESSAGE and turn.stream):
            return *chat_error(exc), {"Retry-After": "1"}
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
        code = exc.name.lower().replace(" ", "_")  # not_found, method_not_allowed ...
        return chat_error(ChatError(exc.code, exc.description, code=code))

    @app.errorhandler(Exception)
    def unexpected_error(exc):
        """A bug must not send a traceback to the caller; the log keeps it."""
        log.error("unexpected error", exc_info=exc)
        return chat_error(ChatError(500, "Internal server error.", "server_error",
                                    code="internal_error"))

    @app.before_request
    def start_turn():
        """Every request has a Turn from the start, so that even a 404 gets its log line."""
        g.turn = Turn(time.perf_counter(), f"{request.method} {request.path[:100]}")

    @app.after_request
    def finish_turn(response):
        """Count the call out and write its log line: now, or for a stream once the server closes
        it after its last byte (or the caller went away)."""
        turn = g.turn

        def finish():
            CALLS.release(turn)
            log_line(turn, response.status_code)

        if request.endpoint == "health":
            pass
        elif response.is_streamed:
            response.call_on_close(finish)
        else:
            finish()
        return response

    @app.get("/health")
    def health():
        """Liveness check for load balancers and uptime monitors; does not call the provider."""
        return {"status": "ok"}


def log_line(turn, status):
    """The one INFO line per request. Never message text, keys or the phoneNumber object."""
    ttft = f"{(turn.first_token_at - turn.started) * 1000:.1f}" if turn.first_token_at else "-"
    model = turn.upstream["model"] if turn.upstream else None
    log.info("%s call=%r model=%r stream=%s status=%s ttft_ms=%s total_ms=%.1f chunks=%d%s%s%s",
             turn.path, turn.call_id, model, turn.stream, status, ttft,
             (time.perf_counter() - turn.started) * 1000, turn.chunks,
             f" error={turn.error}" if turn.error else "",
             " hung_up=1" if turn.hung_up or status == 499 else "",
             "".join(f" {name}={value}" for name, value in turn.steps.items()))


def log_start_up(summary):
    """What this server runs with, in one line (never a key), then what it should warn about."""
    settings = {"provider": OPENAI_BASE_URL or "https://api.openai.com/v1",
                "model": OPENAI_MODEL or "as Vapi sends it", **summary}
    log.info("starting with %s", ", ".join(
        f"{name}={shown_url(value) if '://' in str(value) else value or 'none'}"
        for name, value in settings.items()))
    for warning in START_UP_WARNINGS:
        log.warning("%s", warning)
    if FLASK_DEBUG:
        log.warning("Flask debug mode is ON (FLASK_DEBUG=%s): never expose this server to the "
                    "internet", os.getenv("FLASK_DEBUG"))
    if not OPENAI_API_KEY:
        log.warning("OPENAI_API_KEY is not set: chat requests will fail until it is (.env.example)")
    if not CUSTOM_LLM_API_KEYS:
        log.warning("CUSTOM_LLM_API_KEY is not set: anyone who knows this URL can use your "
                    "provider account")


def run_with_gunicorn():
    """`python app.py`: run exactly what `gunicorn app:app` runs here (with gunicorn.conf.py)."""
    os.chdir(HERE)
    os.execvp(sys.executable, [sys.executable, "-m", "gunicorn", "app:app"])
