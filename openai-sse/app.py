"""A Vapi Custom LLM server that relays the model's answer token by token as Server-Sent Events.

What it adds over `basic/`: the caller hears the first words as soon as the model writes them,
and a caller who hangs up stops the model at once (provider_stream.py). Shared settings, checks,
errors and the log line are in contract.py.
"""

import openai
from flask import Flask, Response, request

from contract import (OPENAI_API_KEY, OPENAI_BASE_URL, OPENAI_MAX_RETRIES,
                      OPENAI_TIMEOUT_SECONDS, complete, error_event, init_app, read_chat_request,
                      run_with_gunicorn, warm_up)
from provider_stream import (CallerHungUp, ProviderStream, keep_warm, keepalive_http_client,
                             start_relay)

# "not-set": the server starts without a key and answers chat requests with an error naming it.
# ProviderStream watches for silence itself (OPENAI_TIMEOUT_SECONDS); the SDK's timeout: a backstop.
# Idle connections to the provider stay open between turns, and one is open before the first.
client = openai.OpenAI(api_key=OPENAI_API_KEY or "not-set", base_url=OPENAI_BASE_URL,
                       timeout=OPENAI_TIMEOUT_SECONDS + 1, max_retries=OPENAI_MAX_RETRIES,
                       http_client=keepalive_http_client())
warm_up(client)
keep_warm(client)
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # nginx: do not buffer

app = Flask(__name__)
init_app(app)


@app.post("/chat/completions")
@app.post("/v1/chat/completions")
@app.post("/chat/completions/chat/completions")  # a model URL pasted with /chat/completions
@app.post("/v1/chat/completions/chat/completions")
def chat_completions():
    """Vapi's turn: relay the provider's stream as SSE (stream: true), or its answer as JSON."""
    turn = read_chat_request()  # raises ChatError (an OpenAI-shaped 4xx) for a bad request
    if not turn.stream:
        completion = complete(client, turn.upstream)  # the whole answer, as basic/ does
        turn.completed(completion)
        return completion.to_dict()

    provider = ProviderStream(client, turn.upstream, caller=request.environ.get("gunicorn.socket"))
    try:
        events = start_relay(relay(turn, provider))  # to the first event: errors keep a status
    except CallerHungUp:
        return "", 499  # nobody is listening any more
    return Response(events, mimetype="text/event-stream", headers=SSE_HEADERS)


def relay(turn, provider):
    """Yield each provider chunk as one `data:` event as it arrives, then `data: [DONE]`.

    Before the first event a failure is raised (the view answers with its status); after it, it
    becomes one error event before [DONE]. Leaving the `with` block stops the provider's stream."""
    with provider:
        try:
            for raw, chunk in provider:
                turn.relayed(chunk)
                yield b"data: " + raw.encode() + b"\n\n"  # the provider's own bytes, not re-encoded
            turn.ended()  # an answer without words is named in the log line
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


if __name__ == "__main__":
    run_with_gunicorn()
