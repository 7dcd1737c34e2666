"""A Vapi Custom LLM server that relays the model's answer token by token as Server-Sent Events.

What it adds over `basic/`: the caller hears the first words as soon as the model writes them, and
when the caller interrupts or hangs up (Vapi closes the request), the provider's stream is closed at
once — even while the model is still thinking — so it stops generating and billing. The machinery
for that is in provider_stream.py; what every folder shares (settings, request checks, errors, the
log line) in contract.py."""

import time

import openai
from flask import Flask, Response, request

from contract import (OPENAI_API_KEY, OPENAI_BASE_URL, OPENAI_MAX_RETRIES,
                      OPENAI_TIMEOUT_SECONDS, ChatError, init_app, provider_error,
                      read_chat_request, run_with_gunicorn, sse, warm_up)
from provider_stream import CallerHungUp, ProviderStream

# gunicorn.conf.py runs this app on gevent: every call is a greenlet, and sockets cooperate.
# ProviderStream watches for silence itself (OPENAI_TIMEOUT_SECONDS); the SDK's timeout is the
# backstop.
client = openai.OpenAI(api_key=OPENAI_API_KEY or "not-set", base_url=OPENAI_BASE_URL,
                       timeout=OPENAI_TIMEOUT_SECONDS + 1, max_retries=OPENAI_MAX_RETRIES)
warm_up(client)
# X-Accel: tell nginx not to buffer
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

app = Flask(__name__)
init_app(app)


@app.post("/chat/completions")
@app.post("/v1/chat/completions")
# the model URL was pasted with /chat/completions at the end
@app.post("/chat/completions/chat/completions")
@app.post("/v1/chat/completions/chat/completions")
def chat_completions():
    """Vapi's turn: relay the provider's stream as SSE (stream: true), or its answer as JSON."""
    turn = read_chat_request()  # raises ChatError (an OpenAI-shaped 4xx) for a bad request
    if not turn.stream:
        return answer_whole(turn)

    provider = ProviderStream(client, turn.upstream, caller=request.environ.get("gunicorn.socket"))
    try:
        provider.start()  # wait for the first line: until then a failure still gets its HTTP status
    except CallerHungUp:
        return "", 499  # nobody is listening any more
    # Headers go out with the first yield, so everything that can fail with a status happened above.
    return Response(relay(provider, turn), mimetype="text/event-stream", headers=SSE_HEADERS)


def relay(provider, turn):
    """Yield each provider chunk as one `data:` event as it arrives, then `data: [DONE]`.

    After the headers, a failure becomes one error event before [DONE]. When the caller goes away,
    the server closes this generator, and leaving the `with` block stops the provider's stream."""
    with provider:
        try:
            for raw, chunk in provider:
                turn.relayed(chunk)
                # the provider's own bytes, not re-serialised
                yield b"data: " + raw.encode() + b"\n\n"
        except CallerHungUp:
            return  # nobody to send [DONE] to
        except ChatError as exc:
            yield sse(exc.body())
    yield b"data: [DONE]\n\n"


def answer_whole(turn):
    """stream: false — the provider's whole answer as one chat.completion."""
    try:
        completion = client.chat.completions.create(**turn.upstream)
    except (openai.OpenAIError, ValueError) as exc:  # ValueError: the provider sent broken JSON
        raise provider_error(exc) from exc
    turn.first_token_at, turn.chunks = time.perf_counter(), 1
    return completion.to_dict()


if __name__ == "__main__":
    run_with_gunicorn()
