"""Check a deployed Custom LLM URL the way Vapi will call it, from the public side.

    python tests/vapi_check.py https://abc123.ngrok-free.app --api-key KEY [--model NAME] [--json]

URL is what you paste into Vapi. The check sends Vapi's request bodies (read from fixtures/ next to
this file) through the tunnel or proxy in front of the server, and prints one line per check (pass,
warn, fail or skip) with a hint that names the fix. Exit code 0 when nothing failed, 1 otherwise.
It works for any server, not only this repository's: it needs Python and `requests`, no provider
key. A private test CA: set REQUESTS_CA_BUNDLE=ca.pem, as for any `requests` program.
"""

import argparse
import copy
import dataclasses
import http.client
import json
import os
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

try:
    import requests
    import urllib3
except ImportError:  # a server folder's own virtualenv has no requests
    sys.exit("vapi_check.py needs the requests package: pip install requests")

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FIXTURE_NAMES = ("metadata-off.json", "first-turn.json", "metadata-destructured.json",
                 "after-tool-call.json", "with-vapi-tools.json", "web-call-first-turn.json")
OPENAI_FIELDS = ("model", "messages", "temperature", "max_tokens", "tools", "stream")  # mode `off`
CONNECT_SECONDS = 10
READ_SECONDS = 25          # longest silence; Vapi waits 20 s for the first token (timeoutSeconds)
STREAM_SECONDS = 60        # longest a whole answer may take here
MAX_BYTES = 4 * 1024 * 1024
FIRST_TOKEN_WARN, FIRST_TOKEN_FAIL = 1.5, 20.0
MODEL_CALLS = 10           # turns a server may answer with the model: the first turn, two more
#                            metadata modes, tool turn, tools, first message, stream: false, the
#                            hung-up turn and the one after it; the turn without a key if it is open
LONG_QUESTION = ("Please tell me, in about a hundred words, what happens at a first dental "
                 "cleaning appointment and how I should prepare for it.")
BUFFERING_FIX = ("nginx: `X-Accel-Buffering: no` or `proxy_buffering off`; Cloudflare: DNS only, "
                 "no orange-cloud proxying; no response compression on text/event-stream")


@dataclasses.dataclass
class Result:
    """What one check found: pass, warn, fail or skip, what it saw, and the fix."""

    status: str
    detail: str
    hint: str = ""


@dataclasses.dataclass
class Answer:
    """One HTTP answer, each line of its body with the time it arrived (seconds after sending)."""

    status: int
    headers: dict
    headers_at: float
    lines: list = dataclasses.field(default_factory=list)  # (seconds, text)
    broke_off: str | None = None  # why the body ended early: a timeout, a cut connection

    @property
    def content_type(self):
        return self.headers.get("Content-Type", "").split(";")[0].strip().lower()

    def text(self):
        return "\n".join(line for _, line in self.lines)

    def json(self):
        """The body as JSON, or None if it is not."""
        try:
            return json.loads(self.text())
        except ValueError:
            return None

    def error(self):
        """A short description of an error answer: its status and message, or what it is."""
        body = self.json()
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            return f"HTTP {self.status}: {str(body['error'].get('message'))[:160]}"
        if isinstance(body, dict):
            return f"HTTP {self.status}: {json.dumps(body)[:160]}"
        if "<html" in self.text()[:1000].lower():
            return f"HTTP {self.status} (an HTML page)"
        return f"HTTP {self.status}: {self.text()[:80]!r}"


class Unreachable(Exception):
    """No HTTP answer at all: a bad URL, DNS, TLS, the connection, or no status line in time."""

    def __init__(self, reason, hint):
        super().__init__(reason)
        self.hint = hint


class BrokeOff(Exception):
    """The body stopped early: a timeout, a cut connection, or too much of it."""


@dataclasses.dataclass
class Run:
    """One run of the checks: where they go, the key, and what earlier checks learnt."""

    url: str
    target: str
    key: str | None
    model: str | None
    fixtures: dict
    call_id: str = dataclasses.field(default_factory=lambda: f"vapi-check-{uuid.uuid4().hex}")
    results: dict = dataclasses.field(default_factory=dict)
    first: Answer | None = None  # the first turn, which the stream checks read
    unreadable: bool = False     # its stream has events the client cannot read
    blocked: str | None = None   # why the remaining checks cannot run

    def turn(self, name, mode="off", **changes):
        """A Vapi body from fixtures/. In metadataSendMode `off` (OpenAI's fields only) unless
        asked, so that each check changes one thing; a fresh call id; --model when given."""
        body = copy.deepcopy(self.fixtures[name])
        if mode == "off":
            body = {key: value for key, value in body.items() if key in OPENAI_FIELDS}
        elif isinstance(body.get("call"), dict):
            body["call"]["id"] = self.call_id
        if self.model:
            body["model"] = self.model
        return {**body, **changes}

    def long_turn(self):
        """The off-mode turn with a question asking for a longer answer, so that the time between
        its words is measurable (the fixture's prompt asks for one or two short sentences)."""
        body = self.turn("metadata-off.json")
        body["messages"] = [{"role": "system", "content": "You are a friendly phone assistant."},
                            body["messages"][1], {"role": "user", "content": LONG_QUESTION}]
        return body


# --- talking to the server ------------------------------------------------------------------------

def target_url(url):
    """Where Vapi POSTs for this URL: the URL is the OpenAI client's base URL, and the client
    appends /chat/completions (https://docs.vapi.ai/customization/custom-llm/using-your-server).
    Vapi documents no exception for a URL that already ends in /chat/completions, so it is
    appended to that one too, and the check goes to .../chat/completions/chat/completions."""
    hint = "pass the URL you paste into Vapi, e.g. https://abc123.ngrok-free.app"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise Unreachable(f"{url!r} is not an http:// or https:// URL", hint)
    try:
        parts.port
    except ValueError:
        raise Unreachable(f"{url!r} has no valid port", hint) from None
    return url.rstrip("/") + "/chat/completions"


def send(run, body, authorized=True):
    """POST a body as Vapi's client does (JSON, `Accept: application/json`, the bearer key);
    returns (the response with only its headers read, the time it was sent)."""
    headers = {"Content-Type": "application/json", "Accept": "application/json",
               "User-Agent": "vapi_check.py"}
    if authorized and run.key:
        headers["Authorization"] = f"Bearer {run.key}"
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    sent = time.monotonic()
    try:
        response = requests.post(run.target, data=data, headers=headers, stream=True,
                                 timeout=(CONNECT_SECONDS, READ_SECONDS), allow_redirects=False)
    except requests.exceptions.SSLError as exc:
        raise Unreachable(f"TLS failed: {reason(exc)}",
                          "Vapi needs a certificate from a public CA for this host name; for a "
                          "private test CA set REQUESTS_CA_BUNDLE=ca.pem") from None
    except requests.exceptions.ConnectTimeout:
        raise Unreachable(f"no connection within {CONNECT_SECONDS} s",
                          "check the host and port, and that a firewall lets it in") from None
    except requests.exceptions.ReadTimeout:
        raise Unreachable(f"connected, but no HTTP answer within {READ_SECONDS} s (Vapi gives "
                          "up after 20 s)", "the server or the tunnel accepts connections but "
                          "does not answer: check the server's log") from None
    except requests.exceptions.ConnectionError as exc:
        why = reason(exc)
        if "resolve" in why.lower() or "name or service" in why.lower():
            raise Unreachable(f"DNS: cannot resolve {urlsplit(run.target).hostname}",
                              "check the host name; a tunnel's URL changes when it restarts "
                              "(ngrok: paste the new one into Vapi)") from None
        raise Unreachable(f"cannot connect: {why}", "start the server, and point the tunnel at "
                          "its port (`ngrok http 8000`)") from None
    except (requests.RequestException, ValueError) as exc:  # InvalidURL, a bad port, ...
        raise Unreachable(f"cannot send the request: {reason(exc)}",
                          "pass the URL you paste into Vapi") from None
    return response, sent


def reason(exc):
    """The most specific part of a requests exception: urllib3's reason, without the object."""
    inner = exc.args[0] if exc.args else exc
    inner = getattr(inner, "reason", inner)  # MaxRetryError: NewConnectionError, SSLError, ...
    return str(inner).split(">: ", 1)[-1].split("): ", 1)[-1][:200]


def read_lines(response, sent):
    """Yield (seconds since sent, line) for each line of the body as it arrives; BrokeOff if it
    stops early. read1 returns what has arrived instead of waiting for a full buffer."""
    buffer, total, at = b"", 0, time.monotonic() - sent
    try:
        while True:
            data = response.raw.read1(65536, decode_content=True)
            if not data:
                break
            at = time.monotonic() - sent
            total += len(data)
            *lines, buffer = (buffer + data).split(b"\n")
            for line in lines:
                yield at, line.rstrip(b"\r").decode("utf-8", "replace")
            if total > MAX_BYTES:
                raise BrokeOff(f"over {MAX_BYTES // 1024 // 1024} MB")
            if at > STREAM_SECONDS:
                raise BrokeOff(f"still going after {STREAM_SECONDS} s")
    except (requests.RequestException, urllib3.exceptions.HTTPError, http.client.HTTPException,
            OSError) as exc:
        raise BrokeOff(f"{type(exc).__name__} after {at:.1f} s: {str(exc)[:120]}") from None
    if buffer:
        yield at, buffer.rstrip(b"\r").decode("utf-8", "replace")


def exchange(run, body, authorized=True, hang_up_after_first_word=False):
    """POST a body and read the whole answer (or, to hang up, up to its first words)."""
    response, sent = send(run, body, authorized)
    answer = Answer(response.status_code, response.headers, time.monotonic() - sent)
    try:
        with response:  # leaving it closes the connection: a hang-up, as Vapi's barge-in does
            for at, line in read_lines(response, sent):
                answer.lines.append((at, line))
                if hang_up_after_first_word and line.startswith("data:") and any(spoken(line[5:])):
                    break
    except BrokeOff as exc:
        answer.broke_off = str(exc)
    return answer


# --- reading a stream as Vapi's client does ------------------------------------------------------

def sse_events(lines):
    """The events of an SSE body, decoded as the OpenAI Node SDK's SSEDecoder does
    (openai/openai-node src/core/streaming.ts): `data:` lines joined by newlines until a blank line,
    `:` comments and other fields ignored. Returns ([(seconds, event name, data)], the lines that
    are no SSE field at all, the data of an event never ended by a blank line, which it drops)."""
    events, data, event, strays = [], [], None, []
    for at, line in lines:
        if not line:
            if data or event:
                events.append((at, event, "\n".join(data)))
            data, event = [], None
        elif not line.startswith(":"):
            field, colon, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "data":
                data.append(value)
            elif field == "event":
                event = value
            elif field not in ("id", "retry") or not colon:
                strays.append(line)
    return events, strays, "\n".join(data) if data else None


def chunks_of(answer):
    """The JSON objects of the answer's events before [DONE], each as (seconds, object)."""
    chunks = []
    for at, _, data in sse_events(answer.lines)[0]:
        if data == "[DONE]":
            break
        try:
            chunks.append((at, json.loads(data)))
        except ValueError:
            chunks.append((at, None))
    return chunks


def spoken(data):
    """What one event gives the caller: (its words, "" if none; whether it carries a tool call)."""
    try:
        chunk = json.loads(data)
    except ValueError:
        return "", False
    text, tool_call = "", False
    choices = chunk.get("choices") if isinstance(chunk, dict) else None
    for choice in choices if isinstance(choices, list) else []:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if isinstance(delta, dict):
            text += delta["content"] if isinstance(delta.get("content"), str) else ""
            tool_call = tool_call or bool(delta.get("tool_calls"))
    return text if text.strip() else "", tool_call


def answered(answer):
    """Whether Vapi gets a chat answer: 200 with chunks, or a chat.completion (stream problems are
    the stream checks' to report). Returns (yes, what it was)."""
    if answer.status != 200:
        return False, answer.error()
    if any(isinstance(chunk, dict) and isinstance(chunk.get("choices"), list)
           for _, chunk in chunks_of(answer)):
        return True, f"streamed, {answer.lines[-1][0]:.2f} s"
    body = answer.json()
    if isinstance(body, dict) and isinstance(body.get("choices"), list):
        return True, f"JSON, {answer.lines[-1][0]:.2f} s"
    return False, f"HTTP 200 without a chat answer: {answer.text()[:80]!r}"


def accumulate(chunks):
    """The rules of the OpenAI Node SDK's stream accumulator, which Vapi's client runs over every
    stream: openai/openai-node src/lib/ChatCompletionStream.ts (#accumulateChatCompletion and
    finalizeChatCompletion). Returns the problems, worded as the SDK's errors where it has one."""
    problems, ids, states = [], set(), {}
    for chunk in chunks:
        if isinstance(chunk.get("id"), str) and chunk["id"]:
            ids.add(chunk["id"])
        for choice in chunk["choices"]:
            index = choice.get("index") if isinstance(choice, dict) else None
            if not isinstance(index, int) or isinstance(index, bool) or index < 0:
                problems.append(f"invalid choice index: {index!r} (every choice needs `index`)")
                continue
            state = states.setdefault(index, {"role": None, "finish": None, "tools": set()})
            state["finish"] = choice.get("finish_reason") or state["finish"]
            delta = choice.get("delta")
            if not isinstance(delta, dict):  # the SDK skips a choice without a delta
                continue
            state["role"] = delta.get("role") or state["role"]
            calls = delta.get("tool_calls")
            if calls is not None and not isinstance(calls, list):
                problems.append(f"choices[{index}].delta.tool_calls is not a list")
                continue
            for call in calls or []:
                problems += tool_call_problems(index, call, state["tools"])
    if not chunks:
        problems.append("request ended without sending any chunks")
    elif not states:
        problems.append("no chunk carries a choice: there is no message to speak")
    for index, state in sorted(states.items()):
        if not state["finish"]:
            problems.append(f"missing finish_reason for choice {index}")
        if not state["role"]:
            problems.append(f"missing role for choice {index}")
        elif state["role"] != "assistant":
            problems.append(f"role {state['role']!r} for choice {index}, not 'assistant'")
    if len(ids) > 1:
        problems.append(f"the chunks carry {len(ids)} different ids; one answer has one id")
    elif not ids:
        problems.append("no chunk carries an `id`")
    return problems


def tool_call_problems(index, call, seen):
    """A tool call fragment's problems: the first fragment of each call carries its id, type and
    function.name, as Vapi's docs describe. The SDK threw `missing choices[0].tool_calls[0].id`
    until its mid-2026 releases, which invent an id (`call_<uuid>`) the model never issued."""
    position = call.get("index") if isinstance(call, dict) else None
    if not isinstance(position, int) or isinstance(position, bool) or position < 0:
        return [f"invalid tool call index: {position!r} (every tool call fragment needs `index`)"]
    if position in seen:
        return []
    seen.add(position)
    where = f"choices[{index}].tool_calls[{position}]"
    function = call.get("function") if isinstance(call.get("function"), dict) else {}
    return ([f"missing {where}.id on its first fragment"] * (not call.get("id"))
            + [f"missing {where}.type on its first fragment"] * (not call.get("type"))
            + [f"missing {where}.function.name on its first fragment"] * (not function.get("name")))


# --- the checks, in order -------------------------------------------------------------------------

def check_reachable(run):
    """A Vapi turn gets an HTTP answer at all (DNS, TLS, the connection, the path)."""
    run.target = target_url(run.url)
    run.first = answer = exchange(run, run.long_turn())
    note = (" (the URL already ends in /chat/completions: Vapi appends it again, as here)"
            if run.url.rstrip("/").endswith("/chat/completions") else "")
    ngrok = answer.headers.get("ngrok-error-code")
    if ngrok:
        return Result("fail", f"ngrok answered {ngrok} (HTTP {answer.status}): the tunnel is up "
                      "but cannot reach your server", "start the server on the port ngrok "
                      "forwards to (`ngrok http 8000` for PORT=8000)")
    if answer.status in (404, 405):
        return Result("fail", f"POST {run.target} got {answer.error()}{note}", "paste the base URL "
                      "(Vapi appends /chat/completions); the server must answer POST there")
    if 300 <= answer.status < 400:
        return Result("fail", f"HTTP {answer.status} redirect to "
                      f"{answer.headers.get('Location', '?')}", "paste the URL it redirects to: "
                      "a POST does not survive a redirect")
    if answer.status in (502, 503, 504) and not isinstance(answer.json(), dict):
        return Result("fail", f"{answer.error()}: a proxy's page, not your server's answer",
                      "the tunnel or proxy cannot reach your server: is it running, on the port "
                      "the tunnel forwards to?")
    return Result("pass", f"HTTP {answer.status} in {answer.headers_at:.2f} s{note}")


def check_auth(run):
    """With --api-key: the key is accepted and a turn without it gets 401. Without: warn if
    the endpoint answers anybody."""
    refused = run.first.status in (401, 403)
    if not run.key and refused:
        run.blocked = "needs --api-key"
        return Result("fail", f"the server wants a key ({run.first.error()})",
                      "run again with --api-key KEY, the API key of the custom-llm credential "
                      "you attached in Vapi (CUSTOM_LLM_API_KEY on the server)")
    if not run.key:
        return Result("warn", "answered without any key: anyone who finds the URL can use your "
                      "provider account", "set CUSTOM_LLM_API_KEY on the server and the same key "
                      "in a Vapi custom-llm credential, then pass it here with --api-key")
    if refused:
        run.blocked = "the key was refused"
        return Result("fail", f"the key was refused: {run.first.error()}",
                      "pass the key of the Vapi credential, the one CUSTOM_LLM_API_KEY holds "
                      "(several comma-separated keys: any of them)")
    without = exchange(run, run.turn("metadata-off.json"), authorized=False,
                       hang_up_after_first_word=True)
    if without.status == 401:
        return Result("pass", "the key is accepted; without it: HTTP 401")
    if without.status == 403:
        return Result("pass", "the key is accepted; without it: HTTP 403")
    return Result("fail", f"HTTP {without.status} without the key: the server does not check it",
                  "check `Authorization: Bearer <key>` against CUSTOM_LLM_API_KEY on every request")


def check_stream_content_type(run):
    """`stream: true` is answered with text/event-stream."""
    answer = run.first
    if answer.status != 200:
        hint = ("read the server's log for this turn (a 500 naming OPENAI_API_KEY, a 502 or 504 "
                "from the provider)" if answer.status >= 500 else
                "the server rejects a plain Vapi turn (tests/fixtures/metadata-off.json); if the "
                "error names the model, pass the model name you set in Vapi with --model")
        return Result("fail", f"the turn got {answer.error()}", hint)
    if answer.content_type == "text/event-stream":
        return Result("pass", "text/event-stream")
    return Result("fail", f"`stream: true` answered with {answer.content_type or 'no type'}: "
                  "Vapi asked for a stream and plays nothing", "answer `stream: true` with "
                  "`Content-Type: text/event-stream` and `data:` lines; decide from the body's "
                  "`stream`, not from the Accept header (Vapi sends application/json)")


def check_stream_framing(run):
    """Every event is `data: <JSON>` with a choices list (or an OpenAI-shaped error), and the
    stream ends with `data: [DONE]`."""
    answer = run.first
    events, strays, unended = sse_events(answer.lines)
    if run.results["stream_content_type"].status == "fail" and not events:
        return Result("skip", "no stream to read")
    unreadable, done = [], False  # events the client cannot read
    for n, (_, _, data) in enumerate(events):
        if data == "[DONE]":
            done = True
            break
        try:
            payload = json.loads(data)
        except ValueError:
            unreadable.append(f"event {n} is not JSON: {data[:60]!r}")
            continue
        if not isinstance(payload, dict) or not (isinstance(payload.get("choices"), list)
                                                 or isinstance(payload.get("error"), dict)):
            unreadable.append(f"event {n} has no `choices` list (Vapi: \"chunk.choices is not "
                              f"iterable\"): {data[:60]!r}")
    run.unreadable, problems = bool(unreadable), unreadable[:2]
    if strays:
        problems.append(f"{len(strays)} line(s) the client ignores, e.g. {strays[0][:60]!r}")
    if not done:
        problems.append("the stream ends without `data: [DONE]`" + (
            " (its last event has no blank line after it, so the client drops it)"
            if unended else ""))
    if answer.broke_off:
        problems.append(f"the stream broke off: {answer.broke_off}")
    if problems:
        return Result("fail", "; ".join(problems[:3]),
                      "one JSON object with a `choices` list on each `data:` line (json.dumps it), "
                      "a blank line after each event, `data: [DONE]` at the end, errors too")
    return Result("pass", f"{len(events) - 1} events, each `data: <JSON>` with choices, then "
                  "[DONE]")


def check_stream_accumulates(run):
    """The stream passes the rules of the OpenAI Node SDK's accumulator (Vapi's client)."""
    chunks = [chunk for _, chunk in chunks_of(run.first)]
    if run.results["stream_framing"].status == "skip" or run.unreadable:
        return Result("skip", "stream_framing found events the client cannot read")
    errors = [chunk for chunk in chunks if isinstance(chunk.get("error"), dict)]
    if errors:
        return Result("fail", f"the stream carries an error event: "
                      f"{str(errors[0]['error'].get('message'))[:160]}; the SDK raises it and "
                      "the turn fails", "see the server's log: the provider failed mid-stream")
    problems = accumulate(chunks)
    if problems:
        return Result("fail", "; ".join(problems[:3]), "role \"assistant\" in the first delta, "
                      "one id on every chunk, `index` on every choice, a finish_reason at the "
                      "end, a tool call's id, type and function.name on its first fragment")
    finish = [choice.get("finish_reason") for chunk in chunks for choice in chunk["choices"]
              if choice.get("finish_reason")]
    return Result("pass", f"{len(chunks)} chunks, one id, role assistant, finish_reason "
                  f"{finish[-1]!r}")


def output_times(run, tool_calls):
    """(seconds, words) for each event of the first turn that carries words (or a tool call)."""
    times = []
    for at, _, data in sse_events(run.first.lines)[0]:
        text, tool_call = spoken(data)
        if text or (tool_call and tool_calls):
            times.append((at, text))
    return times


def check_streams_live(run):
    """The words arrive spread over the answer's time, not released together at the end."""
    if run.results["stream_content_type"].status == "fail":
        return Result("skip", "no stream to time")
    words = output_times(run, tool_calls=False)
    count = len("".join(text for _, text in words).split())
    if count < 3:
        return Result("skip", f"the answer is too short to judge ({count} words)")
    first, last = words[0][0], words[-1][0]
    together = last - first < max(0.05, 0.1 * last)  # within 50 ms, or a tenth of the answer
    if not together:
        return Result("pass", f"{count} words in {len(words)} events over {last - first:.2f} s, "
                      f"the first after {first:.2f} s")
    if first - run.first.headers_at > max(0.25, 0.5 * first):
        return Result("fail", f"the headers came after {run.first.headers_at:.2f} s, then all "
                      f"{count} words together after {first:.2f} s: something between Vapi and "
                      "the server holds the stream back", BUFFERING_FIX)
    return Result("warn", f"the whole answer ({count} words) arrived at once after {first:.2f} s, "
                  "headers included: the server waits for the whole answer by design (as basic/ "
                  "does: the caller hears nothing until the model has finished), or a proxy or "
                  "tunnel holds it", "stream the model's words as they come (openai-sse/); if "
                  f"it does already, a proxy buffers: {BUFFERING_FIX}")


def check_first_token(run):
    """Time to the first word from here: warn above 1.5 s, fail past Vapi's 20 s."""
    if run.results["stream_content_type"].status == "fail":
        return Result("skip", "no stream to time")
    output = output_times(run, tool_calls=True)
    if not output:
        return Result("fail", "the answer carries no words and no tool call: the caller hears "
                      "nothing", "see the server's log for this turn; finish_reason 'length' with "
                      "no words: a reasoning model spent the token budget thinking (lower its "
                      "reasoning effort, or raise the assistant's Max Tokens in Vapi)")
    first = output[0][0]
    hint = ("a faster model or provider; the server near Vapi (Vapi's US region runs in AWS "
            "us-west-2; or use Vapi's EU region); fewer steps before the model")
    if first > FIRST_TOKEN_FAIL:
        return Result("fail", f"{first:.1f} s to the first word: Vapi gives up after 20 s", hint)
    if first > FIRST_TOKEN_WARN:
        return Result("warn", f"{first:.2f} s to the first word from here: dead air on the call",
                      hint)
    return Result("pass", f"{first:.2f} s to the first word from here")


def check_metadata_modes(run):
    """The bodies of metadataSendMode off, variable and destructured are all answered."""
    bodies = {"variable": run.turn("first-turn.json", mode="variable"),
              "destructured": run.turn("metadata-destructured.json", mode="destructured")}
    yes, seen = answered(run.first)
    failed = [] if yes else [f"off: {seen}"]
    for mode, body in bodies.items():
        yes, seen = answered(exchange(run, body))
        failed += [] if yes else [f"{mode}: {seen}"]
    if failed:
        return Result("fail", "; ".join(failed), "accept keys you do not know: Vapi adds call, "
                      "customer, phoneNumber and metadata (variable) or spreads the metadata's "
                      "keys at the top level (destructured); send on only OpenAI's parameters")
    return Result("pass", "off, variable and destructured answered")


def answered_check(run, body, what, hint):
    """Pass if the body is answered; the detail says how, or what came back instead."""
    yes, seen = answered(exchange(run, body))
    return Result("pass", f"{what} answered ({seen})") if yes else Result("fail", seen, hint)


def check_tool_turn(run):
    """The turn after a Vapi tool ran (assistant tool_calls + a role: tool result) is answered."""
    return answered_check(run, run.turn("after-tool-call.json"), "the turn after a tool",
                          "accept an assistant message with `content: null` and `tool_calls`, "
                          "then a `role: \"tool\"` message with `tool_call_id`")


def check_vapi_tools(run):
    """A body carrying Vapi's endCall / transferCall tools is answered."""
    return answered_check(run, run.turn("with-vapi-tools.json"), "a turn with endCall and "
                          "transferCall", "accept `tools` (Vapi's endCall and transferCall are "
                          "OpenAI function tools) and pass them to the model")


def check_model_first_message(run):
    """A conversation with only the system prompt (the assistant speaks first) is answered."""
    body = run.turn("web-call-first-turn.json")
    body["messages"] = body["messages"][:1]
    return answered_check(run, body, "a conversation without a user message",
                          "accept a conversation with only the system prompt: Vapi sends it when "
                          "the assistant speaks first with a model-generated message")


def check_non_streaming(run):
    """`stream: false` gets a chat.completion with choices[0].message."""
    answer = exchange(run, run.turn("metadata-off.json", stream=False))
    body = answer.json() if isinstance(answer.json(), dict) else {}
    choices = body.get("choices") if isinstance(body.get("choices"), list) else []
    if (answer.status == 200 and body.get("object") == "chat.completion" and choices
            and isinstance(choices[0], dict) and isinstance(choices[0].get("message"), dict)):
        return Result("pass", "a chat.completion with choices[0].message")
    seen = (answer.error() if answer.status != 200
            else f"{answer.content_type or 'no type'}: {answer.text()[:80]!r}")
    return Result("fail", seen, "answer `stream: false` with one `chat.completion` JSON object "
                  "(choices[0].message)")


def check_bad_request(run):
    """A body that is not a chat request gets a 4xx with a JSON error, never 5xx or HTML."""
    hint = ("answer a bad body with a 4xx and a JSON error ({\"error\": {\"message\": ...}}), "
            "never a crash (5xx) or an HTML page")
    seen, shapes = [], []
    for body in (b"{not json", {"not": "a chat request"}):
        answer = exchange(run, body)
        parsed = answer.json()
        if answer.status >= 500 or "json" not in answer.content_type or parsed is None:
            return Result("fail", f"{answer.error()} ({answer.content_type or 'no type'})", hint)
        if not 400 <= answer.status < 500:
            return Result("warn", f"HTTP {answer.status} for a body that is not a chat request",
                          hint)
        seen.append(str(answer.status))
        shapes.append(isinstance(parsed, dict) and isinstance(parsed.get("error"), dict))
    if not all(shapes):
        return Result("warn", f"HTTP {'/'.join(seen)} with JSON, but not OpenAI's error shape",
                      hint)
    return Result("pass", f"HTTP {'/'.join(seen)} with an OpenAI-shaped JSON error")


def check_survives_hangup(run):
    """A stream closed after its first words, then the next turn at once, is answered."""
    hung_up = exchange(run, run.long_turn(), hang_up_after_first_word=True)
    at = hung_up.lines[-1][0] if hung_up.lines else hung_up.headers_at
    yes, seen = answered(exchange(run, run.turn("metadata-off.json")))
    if yes:
        return Result("pass", f"hung up after {at:.2f} s; the next turn was answered ({seen})")
    return Result("fail", f"hung up after {at:.2f} s; the next turn got {seen}",
                  "when the caller hangs up mid-stream, stop the model and free the worker: "
                  "the next turn (a barge-in) must be answered at once")


CHECKS = [
    ("reachable", check_reachable), ("auth", check_auth),
    ("stream_content_type", check_stream_content_type), ("stream_framing", check_stream_framing),
    ("stream_accumulates", check_stream_accumulates), ("streams_live", check_streams_live),
    ("first_token", check_first_token), ("metadata_modes", check_metadata_modes),
    ("tool_turn", check_tool_turn), ("vapi_tools", check_vapi_tools),
    ("model_first_message", check_model_first_message), ("non_streaming", check_non_streaming),
    ("bad_request", check_bad_request), ("survives_hangup", check_survives_hangup),
]


def run_checks(run, report):
    """Run every check in order, calling report(name, result) after each."""
    for name, check in CHECKS:
        if run.blocked:
            result = Result("skip", f"{run.blocked} (see above)")
        else:
            try:
                result = check(run)
            except Unreachable as exc:
                result = Result("fail", str(exc), exc.hint)
            except Exception as exc:  # a bug of this script's: say so rather than blame the server
                result = Result("fail", f"vapi_check.py itself failed here ({type(exc).__name__}: "
                                f"{exc}); please report it with the server's answer")
            if name == "reachable" and result.status == "fail":
                run.blocked = "the URL is not reachable"
        run.results[name] = result
        report(name, result)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="the Custom LLM URL you paste into Vapi")
    parser.add_argument("--api-key", help="the API key of the Vapi custom-llm credential")
    parser.add_argument("--model", help="the model name set in Vapi (default: the fixtures')")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    try:
        fixtures = {name: json.loads((FIXTURES / name).read_text()) for name in FIXTURE_NAMES}
    except (OSError, ValueError) as exc:
        print(f"vapi_check.py reads Vapi's bodies from {FIXTURES}: {exc}", file=sys.stderr)
        return 2
    run = Run(args.url, "", args.api_key, args.model, fixtures)
    try:
        return check_and_print(run, args.json)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `| head`: nobody reads the rest
        sys.stdout = open(os.devnull, "w")
        return 1


def check_and_print(run, as_json):
    """Run the checks, printing a line for each (or, as_json, one object at the end); returns
    the exit code: 1 if a check failed."""
    print(f"Checking {run.url} as Vapi calls it: about {MODEL_CALLS} model calls, short answers; "
          f"the turns that carry a call have the id {run.call_id}.",
          file=sys.stderr if as_json else sys.stdout, flush=True)

    def report(name, result):
        if not as_json:
            print(f"{result.status:5} {name:20} {result.detail}", flush=True)
            if result.hint and result.status in ("warn", "fail"):
                print(f"{'':26} fix: {result.hint}", flush=True)

    run_checks(run, report)
    results = {name: run.results[name] for name, _ in CHECKS}
    if as_json:
        print(json.dumps({"url": run.url, "checks": [
            {"name": name, "status": result.status,
             "detail": result.detail + (f" (fix: {result.hint})" if result.hint
                                        and result.status in ("warn", "fail") else "")}
            for name, result in results.items()]}, indent=2))
    else:
        counts = {status: sum(r.status == status for r in results.values())
                  for status in ("pass", "warn", "fail", "skip")}
        print(", ".join(f"{count} {status}" for status, count in counts.items()))
    return 1 if any(result.status == "fail" for result in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
