"""A stand-in OpenAI-compatible provider: chat completions in JSON and SSE on 127.0.0.1, no key.

Run it alone to try any server without a key:

    python tests/fake_llm.py --port 9000
    OPENAI_BASE_URL=http://127.0.0.1:9000/v1 OPENAI_API_KEY=fake gunicorn app:app

It answers POST /v1/chat/completions and /chat/completions, GET /v1/models, and 404 elsewhere, as
OpenAI does (so a base URL with the wrong path fails here as it would there). By default it answers
"You said: <the last user message>" one word per chunk. Tests script it per request
(`fake.script(...)` or `fake.responder = ...`); run alone, POST the same dict to /_fake/script
(examples at the end of --help). Its keys, all optional:

    text / tokens        what to say (a string split into words, or the exact chunks)
    tool_calls           [{"name": ..., "arguments": "...json..."}], streamed in fragments like
                         OpenAI does
    ttft, token_delay    seconds before the first chunk and between chunks (after the headers)
    headers_delay        seconds before even the status line (some providers answer only with the
                         first token)
    status, error        answer with this HTTP status and OpenAI-shaped error body instead
    cut_after            close the connection after this many chunks, mid-stream
    hang                 never answer; wait until the client gives up
    malformed_after      send a line that is not JSON after this many chunks
    error_event_after    send an in-band {"error": ...} event after this many chunks
    no_done              end the stream without the final "data: [DONE]"
    only_done            send nothing but "data: [DONE]"
    finish_reason        overrides "stop" / "tool_calls"
    finish_in_last_delta the finish_reason rides on the last delta, not a chunk of its own

Model names get OpenAI's parameter rules: a reasoning model (gpt-5..., o1 / o3 / o4-mini) refuses
`max_tokens` and a `temperature` other than 1 with OpenAI's exact errors, and answers with no words
(finish_reason "length") when its reasoning effort uses up `max_completion_tokens`.
`fake.refusals = {model: {parameter: name to use instead, or None}}` makes any model refuse more.

It is an asyncio protocol server (no framework) so that it is fast enough for the benchmark: it
records every request it received (`fake.requests`) and every response it streamed (`fake.streams`),
and notices the moment a client closes a connection early. Each request records whether it came on
a connection opened for it: `connection_request` counts the requests on its connection (1: the
connection was opened for this one), `connection_age` is how long the connection had been open.
`fake.connections` holds every connection (`opened_at`, `closed_at`, `served`). With `idle_timeout`
it closes a connection idle that long, as providers and their load balancers do; with
`ssl_context` it speaks HTTPS.
"""

import argparse
import asyncio
import collections
import json
import re
import ssl
import threading
import time

# The parameters OpenAI's chat completions endpoint accepts. Anything else gets OpenAI's own 400, as
# the real API does, so a server that forwards Vapi's extra fields fails here exactly as it would in
# production.
KNOWN_PARAMS = {
    "model", "messages", "stream", "stream_options", "temperature", "top_p", "n", "stop",
    "max_tokens", "max_completion_tokens", "presence_penalty", "frequency_penalty", "logit_bias",
    "logprobs", "top_logprobs", "user", "seed", "tools", "tool_choice", "parallel_tool_calls",
    "response_format", "service_tier", "store", "metadata", "reasoning_effort", "modalities",
    "prediction", "audio",
}


# OpenAI's reasoning models (the GPT-5 family, o1 / o3 / o4-mini, also as "openai/gpt-5") refuse
# `max_tokens` and a `temperature` or `top_p` other than 1, with the errors OpenAI sends, and take
# only their own generation's `reasoning_effort` values. Their reasoning tokens count against
# `max_completion_tokens`: when the effort's reasoning uses the whole budget, the answer is empty,
# with finish_reason "length", as OpenAI's is. OpenAI's other models (gpt-4o, gpt-4.1 ...) refuse
# `reasoning_effort`. https://platform.openai.com/docs/guides/reasoning
# Listed by name, not by a pattern, so that the stand-in does not share the servers' rule.
REASONING_MODELS = {"gpt-5", "gpt-5-mini", "gpt-5-nano", "gpt-5.1", "gpt-5.2", "o1", "o1-mini",
                    "o3", "o3-mini", "o3-pro", "o4-mini"}
REASONING_TOKENS = {"none": 0, "minimal": 16, "low": 150, "medium": 600, "high": 2000}


def reasoning_model(model):
    """The name of OpenAI's reasoning model that `model` is ("openai/gpt-5-mini", a dated snapshot
    such as "o4-mini-2025-04-16"), or None."""
    name = re.sub(r"-\d{4}-\d{2}-\d{2}$", "", model.rsplit("/", 1)[-1])
    return name if name in REASONING_MODELS else None


def efforts(model):
    """(the default reasoning_effort, the values the model takes) of a reasoning model."""
    if model.startswith("gpt-5."):  # gpt-5.1 and later
        return "none", ("none", "low", "medium", "high")
    if model.startswith("gpt-5"):
        return "medium", ("minimal", "low", "medium", "high")
    return "medium", ("low", "medium", "high")  # the o-series


def refusal(body, refusals):
    """OpenAI's 400 body for a parameter the model does not take, or None. `refusals`: more, for
    other models ({model: {parameter: the name to use instead, or None}})."""
    model = str(body.get("model"))
    for name, instead in refusals.get(model, {}).items():
        if name in body:
            use = f" Use '{instead}' instead." if instead else ""
            return error_body(f"Unsupported parameter: '{name}' is not supported with this model."
                              f"{use}", code="unsupported_parameter", param=name)
    reasoning = reasoning_model(model)
    if not reasoning:
        if model.startswith("gpt-") and "reasoning_effort" in body:
            return error_body("Unsupported parameter: 'reasoning_effort' is not supported with "
                              "this model.", code="unsupported_parameter", param="reasoning_effort")
        return None
    if "max_tokens" in body:
        return error_body("Unsupported parameter: 'max_tokens' is not supported with this model. "
                          "Use 'max_completion_tokens' instead.", code="unsupported_parameter",
                          param="max_tokens")
    for name in ("temperature", "top_p"):
        if body.get(name, 1) != 1:
            return error_body(f"Unsupported value: '{name}' does not support {body[name]} with "
                              "this model. Only the default (1) value is supported.",
                              code="unsupported_value", param=name)
    default, allowed = efforts(reasoning)
    if body.get("reasoning_effort", default) not in allowed:
        listed = ", ".join(f"'{value}'" for value in allowed[:-1]) + f", and '{allowed[-1]}'"
        return error_body(f"Unsupported value: 'reasoning_effort' does not support "
                          f"'{body['reasoning_effort']}' with this model. Supported values are: "
                          f"{listed}.", code="unsupported_value", param="reasoning_effort")
    return None


def reasoning_used_the_budget(body):
    """Whether a reasoning model's thinking at this effort leaves no tokens for words."""
    reasoning = reasoning_model(str(body.get("model")))
    if not reasoning or "max_completion_tokens" not in body:
        return False
    effort = body.get("reasoning_effort") or efforts(reasoning)[0]
    return body["max_completion_tokens"] <= REASONING_TOKENS[effort]


# The paths of the chat endpoint: OPENAI_BASE_URL .../v1 (OpenAI's), or a base URL without /v1.
CHAT_PATHS = ("/v1/chat/completions", "/chat/completions")

SCRIPTING_HELP = """\
scripting, while it runs (each POST answers the next chat request; the keys are listed above):
  curl -X POST http://127.0.0.1:9000/_fake/script \\
       -d '{"tool_calls": [{"name": "local_time", "arguments": "{}"}]}'   # call a tool
  curl -X POST http://127.0.0.1:9000/_fake/script -d '{"status": 503}'    # fail with a 503
  curl -X POST http://127.0.0.1:9000/_fake/script -d '{"hang": true}'     # never answer
  curl http://127.0.0.1:9000/_fake/requests   # the last requests it received, with their bodies
  curl -X POST http://127.0.0.1:9000/_fake/reset                          # forget everything
"""


class Stream:
    """What the stand-in knows about one response it is sending."""

    def __init__(self, body):
        self.body = body
        self.opened_at = time.monotonic()
        self.closed_at = None          # when the connection or the response ended
        self.finished = False          # the response was sent completely
        self.client_closed = False     # the client went away before the end
        self.chunks_sent = 0

    @property
    def open(self):
        return self.closed_at is None


def error_body(message, type_="invalid_request_error", code=None, param=None):
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


STATUS_TEXT = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
               404: "Not Found", 405: "Method Not Allowed", 429: "Too Many Requests",
               500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}


class Connection(asyncio.Protocol):
    """One HTTP/1.1 keep-alive connection: parses requests and hands each to the server."""

    def __init__(self, server):
        self.server = server
        self.buffer = b""
        self.transport = None
        self.closed = asyncio.Event()
        self.busy = False
        self.stream = None
        self.opened_at = time.monotonic()
        self.closed_at = None
        self.served = 0                # requests received on this connection
        self.idle_timer = None

    def connection_made(self, transport):
        self.transport = transport
        self.server.connections.append(self)
        self.idle()

    def idle(self):
        """Between requests: with the server's idle_timeout, close the connection after it."""
        if self.server.idle_timeout:
            self.idle_timer = asyncio.get_running_loop().call_later(
                self.server.idle_timeout, self.transport.close)

    def connection_lost(self, exc):
        self.closed.set()
        self.closed_at = time.monotonic()
        if self.idle_timer:
            self.idle_timer.cancel()
        if self.stream is not None and self.stream.open:
            self.stream.client_closed = True
            self.stream.closed_at = time.monotonic()

    def data_received(self, data):
        if self.idle_timer:
            self.idle_timer.cancel()
        self.buffer += data
        if not self.busy:
            self.next_request()

    def next_request(self):
        head, sep, rest = self.buffer.partition(b"\r\n\r\n")
        if not sep:
            return
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = (lines[0].split(" ") + ["", ""])[:3]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length") or 0)
        if len(rest) < length:
            return
        body, self.buffer = rest[:length], rest[length:]
        self.busy = True
        self.served += 1
        asyncio.ensure_future(self.serve(method, path, headers, body))

    async def serve(self, method, path, headers, raw_body):
        try:
            keep_alive = await self.server.respond(self, method, path, headers, raw_body)
        except ConnectionError:
            keep_alive = False
        self.busy = False
        if not keep_alive or self.transport.is_closing():
            self.transport.close()
        elif self.buffer:
            self.next_request()
        else:
            self.idle()

    def write(self, data):
        if not self.transport.is_closing():
            self.transport.write(data)

    def send_json(self, status, payload):
        data = json.dumps(payload).encode()
        self.write(
            f"HTTP/1.1 {status} {STATUS_TEXT.get(status, 'Status')}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode() + data
        )


class FakeLLM:
    """The stand-in server: in a background thread with start(), or in the foreground, serve()."""

    def __init__(self, host="127.0.0.1", port=0, ttft=0.0, token_delay=0.0, api_key=None,
                 keep=None, idle_timeout=None, ssl_context=None):
        self.host, self.port = host, port
        self.idle_timeout = idle_timeout  # seconds an idle connection is kept (None: for ever)
        self.ssl_context = ssl_context
        self.connections = []           # every connection, as Connection objects
        self.ttft, self.token_delay = ttft, token_delay
        self.keep = keep                # keep only the last `keep` requests and streams
        self.api_key = api_key          # when set, requests must carry it as a bearer token
        self.requests = []              # every request: {"path", "headers", "body", "at"}
        self.streams = []               # every response to a chat request, as Stream objects
        self.scripts = collections.deque()
        self.responder = None           # optional function(body) -> script dict or None
        self.refusals = {}              # {model: {parameter: name to use instead, or None}}
        self.loop = None
        self._server = None
        self._ids = 0

    # --- control, from any thread -----------------------------------------------------------------

    @property
    def base_url(self):
        return f"{'https' if self.ssl_context else 'http'}://{self.host}:{self.port}/v1"

    def script(self, *responses):
        """Queue scripted responses: each one answers the next chat request."""
        self.scripts.extend(responses)

    def reset(self):
        self.requests.clear()
        self.streams.clear()
        self.scripts.clear()
        self.responder = None
        self.refusals = {}
        self.ttft = self.token_delay = 0.0

    def open_streams(self):
        return [s for s in self.streams if s.open]

    def open_connections(self):
        return [c for c in self.connections if c.closed_at is None]

    def chat_bodies(self):
        return [r["body"] for r in self.requests if r["path"].endswith("/chat/completions")]

    def start(self):
        """Run the server on its own event loop in a daemon thread; returns once it is listening."""
        ready = threading.Event()

        def run():
            self.loop = asyncio.new_event_loop()
            self.loop.run_until_complete(self._listen())
            ready.set()
            self.loop.run_forever()

        threading.Thread(target=run, name="fake-llm", daemon=True).start()
        ready.wait(10)
        return self

    def stop(self):
        if self.loop:
            self.loop.call_soon_threadsafe(self._server.close)
            self.loop.call_soon_threadsafe(self.loop.stop)

    async def _listen(self):
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: Connection(self), self.host, self.port,
                                                backlog=2048, ssl=self.ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]

    def serve(self):
        """Run in the foreground until interrupted."""
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self._listen())
        print(f"fake LLM listening on {self.base_url}", flush=True)
        try:
            self.loop.run_forever()
        except KeyboardInterrupt:
            pass

    # --- the HTTP side ----------------------------------------------------------------------------

    async def respond(self, conn, method, path, headers, raw_body):
        """Answer one request; returns whether the connection may be kept alive."""
        route = path.split("?")[0].rstrip("/")
        if route.startswith("/_fake/"):
            return self.control(conn, route, raw_body)
        if method == "GET" and route == "/v1/models":
            conn.send_json(200, {"object": "list",
                                 "data": [{"id": "fake-model", "object": "model"}]})
            return True
        if route not in CHAT_PATHS:  # OpenAI's own answer to a path it does not serve
            conn.send_json(404, error_body(f"Invalid URL ({method} {route})"))
            return True
        try:
            body = json.loads(raw_body or b"null")
        except ValueError:
            body = None
        self.requests.append({"path": route, "headers": headers, "body": body,
                              "at": time.monotonic(), "connection_request": conn.served,
                              "connection_age": time.monotonic() - conn.opened_at})
        if method != "POST":
            conn.send_json(405, error_body("Use POST"))
            return True
        if self.api_key and headers.get("authorization") != f"Bearer {self.api_key}":
            conn.send_json(401, error_body("Incorrect API key provided.", code="invalid_api_key"))
            return True
        if not isinstance(body, dict):
            conn.send_json(400, error_body("We could not parse the JSON body of your request."))
            return True
        unknown = sorted(set(body) - KNOWN_PARAMS)
        if unknown:
            conn.send_json(400, error_body(f"Unrecognized request argument supplied: {unknown[0]}"))
            return True
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            conn.send_json(400, error_body("'messages' must be a non-empty array",
                                           param="messages"))
            return True
        refused = refusal(body, self.refusals)
        if refused:
            conn.send_json(400, refused)
            return True

        plan = self._plan_for(body)
        if reasoning_used_the_budget(body):
            plan.update(tokens=[], text="", tool_calls=None, finish_reason="length")
        stream = Stream(body)
        conn.stream = stream
        self.streams.append(stream)
        if self.keep and len(self.streams) > 2 * self.keep:
            del self.streams[:-self.keep], self.requests[:-self.keep]
            self.connections = [c for n, c in enumerate(reversed(self.connections))
                                if n < self.keep or c.closed_at is None][::-1]
        try:
            return await self._answer(conn, body, plan, stream)
        finally:
            if stream.open:
                stream.closed_at = time.monotonic()
            conn.stream = None

    def control(self, conn, route, raw_body):
        """For a stand-in in its own process: /_fake/stats, streams, requests, script, reset."""
        if route == "/_fake/stats":
            conn.send_json(200, {"open": len(self.open_streams()), "streams": len(self.streams)})
        elif route == "/_fake/streams":
            conn.send_json(200, [{"opened_at": s.opened_at, "closed_at": s.closed_at,
                                  "finished": s.finished, "client_closed": s.client_closed,
                                  "chunks_sent": s.chunks_sent}
                                 for s in self.streams[-100:]])
        elif route == "/_fake/requests":  # what it received: e.g. the system prompt a server sent
            conn.send_json(200, [{"path": r["path"], "body": r["body"],
                                  "connection_request": r["connection_request"],
                                  "connection_age": r["connection_age"]}
                                 for r in self.requests[-20:]])
        elif route == "/_fake/script":
            self.script(json.loads(raw_body))
            conn.send_json(200, {"queued": len(self.scripts)})
        elif route == "/_fake/reset":
            self.requests.clear()
            self.streams.clear()
            self.scripts.clear()
            conn.send_json(200, {"reset": True})
        else:
            conn.send_json(404, error_body("Unknown control path"))
        return True

    def _plan_for(self, body):
        plan = None
        if self.responder is not None:
            plan = self.responder(body)
        if plan is None and self.scripts:
            plan = self.scripts.popleft()
        plan = dict(plan or {})
        if "text" not in plan and "tokens" not in plan and "tool_calls" not in plan:
            plan["text"] = "You said: " + last_user_text(body["messages"])
        plan.setdefault("ttft", self.ttft)
        plan.setdefault("token_delay", self.token_delay)
        return plan

    async def _wait(self, conn, seconds):
        """Sleep, waking early if the client hangs up. Returns whether the client is still there."""
        if seconds > 0 and not conn.closed.is_set():
            try:
                await asyncio.wait_for(conn.closed.wait(), seconds)
            except asyncio.TimeoutError:
                pass
        return not conn.closed.is_set()

    async def _answer(self, conn, body, plan, stream):
        if plan.get("hang"):
            await conn.closed.wait()
            return False
        if not await self._wait(conn, plan.get("headers_delay", 0)):
            return False
        if plan.get("status"):
            status = plan["status"]
            conn.send_json(status, plan.get("error") or error_body(
                f"Scripted error {status}", type_="api_error", code=str(status)))
            stream.finished = True
            return True

        self._ids += 1
        completion_id = f"chatcmpl-fake{self._ids:06d}"
        model = body.get("model") or "fake-model"
        tokens = plan.get("tokens") or (words(plan["text"]) if plan.get("text") else [])
        tool_calls = [dict(call, id=call.get("id") or f"call_fake{self._ids:06d}_{i}")
                      for i, call in enumerate(plan.get("tool_calls") or [])]
        finish_reason = plan.get("finish_reason") or ("tool_calls" if tool_calls else "stop")

        if not body.get("stream"):  # the whole answer takes as long as streaming it would
            if not await self._wait(conn, plan["ttft"] + plan["token_delay"] * len(tokens)):
                return False
            if plan.get("cut_after") is not None:
                conn.transport.abort()
                return False
            if plan.get("malformed_after") is not None:
                conn.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                           b"Content-Length: 28\r\n\r\n"
                           b'{"id": "broken", "choices": ')
                stream.finished = True
                return True
            message = {"role": "assistant",
                       "content": "".join(tokens) if tokens or not tool_calls else None}
            if tool_calls:
                message["tool_calls"] = [
                    {"id": c["id"], "type": "function",
                     "function": {"name": c["name"], "arguments": c["arguments"]}}
                    for c in tool_calls]
            conn.send_json(200, {
                "id": completion_id, "object": "chat.completion", "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
                "usage": {"prompt_tokens": 10, "completion_tokens": len(tokens),
                          "total_tokens": 10 + len(tokens)},
            })
            stream.finished = True
            return True

        conn.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                   b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n")
        head = {"id": completion_id, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": model}

        def event(payload):
            data = b"data: " + payload + b"\n\n"
            return b"%x\r\n%s\r\n" % (len(data), data)

        def chunk(delta, finish=None):
            choices = [{"index": 0, "delta": delta, "finish_reason": finish}]
            return event(json.dumps({**head, "choices": choices}, separators=(",", ":")).encode())

        deltas = [{"role": "assistant", "content": ""}]
        deltas += [{"content": token} for token in tokens]
        for i, call in enumerate(tool_calls):
            deltas.append({"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                           "function": {"name": call["name"], "arguments": ""}}]})
            arguments = call["arguments"]
            for start in range(0, len(arguments), 8):
                fragment = arguments[start:start + 8]
                deltas.append({"tool_calls": [{"index": i, "function": {"arguments": fragment}}]})

        if not await self._wait(conn, plan["ttft"]):
            return False
        if plan.get("only_done"):
            deltas = []
        for n, delta in enumerate(deltas):
            if n and plan["token_delay"]:
                await asyncio.sleep(plan["token_delay"])
            if conn.closed.is_set():
                return False
            if plan.get("cut_after") == n:
                conn.transport.abort()
                return False
            if plan.get("malformed_after") == n:
                conn.write(event(b'{"id": "broken", "choices": [{"delta": {"content": "oops'))
            if plan.get("error_event_after") == n:
                error = error_body("The model crashed mid-answer.", type_="server_error")
                conn.write(event(json.dumps(error).encode()))
                conn.write(event(b"[DONE]") + b"0\r\n\r\n")
                stream.finished = True
                return True
            last = n == len(deltas) - 1 and plan.get("finish_in_last_delta")
            conn.write(chunk(delta, finish_reason if last else None))
            stream.chunks_sent += 1
        if not plan.get("only_done") and not plan.get("finish_in_last_delta"):
            conn.write(chunk({}, finish_reason))
        if not plan.get("no_done"):
            conn.write(event(b"[DONE]"))
        conn.write(b"0\r\n\r\n")
        stream.finished = True
        return True


def last_user_text(messages):
    """The text of the last user message, or "" if there is none."""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return " ".join(p["text"] for p in content
                                if isinstance(p, dict) and isinstance(p.get("text"), str))
            return content if isinstance(content, str) else ""
    return ""


def words(text):
    """Split text into chunks the way a model streams it: each word with its leading space."""
    parts = text.split(" ")
    return [parts[0]] + [" " + p for p in parts[1:]]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\nIt is an asyncio")[0],
                                     epilog=SCRIPTING_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    parser.add_argument("--ttft", type=float, default=0.2, help="seconds before the first chunk")
    parser.add_argument("--token-delay", type=float, default=0.025, help="seconds between chunks")
    parser.add_argument("--keep", type=int, default=1000,
                        help="how many requests and streams to remember")
    parser.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM) ...")
    parser.add_argument("--tls-key", help="... and this private key (PEM)")
    args = parser.parse_args()
    context = None
    if args.tls_cert:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.tls_cert, args.tls_key)
    FakeLLM(args.host, args.port, ttft=args.ttft, token_delay=args.token_delay,
            keep=args.keep, ssl_context=context).serve()
