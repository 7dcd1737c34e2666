"""A Vapi Custom LLM server, the simplest version: ask the model, wait for the whole answer, send it
back.

Vapi always asks for a stream (`stream: true`), so the finished answer goes back as Server-Sent
Events; the caller hears nothing until the model has written its last word. `openai-sse/` relays it
word by word. What every folder shares (settings, request checks, errors, the log line) is in
contract.py."""

import time

import openai
from flask import Flask, Response

from contract import (OPENAI_API_KEY, OPENAI_BASE_URL, OPENAI_MAX_RETRIES,
                      OPENAI_TIMEOUT_SECONDS, ProviderFailed, init_app, provider_error,
                      read_chat_request, run_with_gunicorn, sse, warm_up)

client = openai.OpenAI(api_key=OPENAI_API_KEY or "not-set", base_url=OPENAI_BASE_URL,
                       timeout=OPENAI_TIMEOUT_SECONDS, max_retries=OPENAI_MAX_RETRIES)
warm_up(client)

app = Flask(__name__)
init_app(app)


@app.post("/chat/completions")
@app.post("/v1/chat/completions")
# the model URL was pasted with /chat/completions at the end
@app.post("/chat/completions/chat/completions")
@app.post("/v1/chat/completions/chat/completions")
def chat_completions():
    """Vapi's turn: ask the provider for the whole answer, then send it as SSE (stream: true) or
    JSON."""
    turn = read_chat_request()  # raises ChatError (an OpenAI-shaped 4xx) for a bad request
    try:
        completion = client.chat.completions.create(**turn.upstream)
    except (openai.OpenAIError, ValueError) as exc:  # ValueError: the provider sent broken JSON
        raise provider_error(exc) from exc
    if not completion.choices:
        raise ProviderFailed(502, "The model provider sent no choices.", "provider_error")
    turn.first_token_at = time.perf_counter()
    if not turn.stream:
        turn.chunks = 1
        return completion.to_dict()
    events = list(completion_as_sse(completion))
    turn.chunks = len(events) - 1
    return Response(events, mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})


def completion_as_sse(completion):
    """The finished answer as the stream Vapi expects: role, content or tool calls, finish_reason,
    [DONE]."""
    choice = completion.choices[0]
    head = {"id": completion.id, "object": "chat.completion.chunk", "created": completion.created,
            "model": completion.model}

    def chunk(delta, finish_reason=None):
        return sse({**head, "choices": [{"index": 0, "delta": delta,
                                         "finish_reason": finish_reason}]})

    yield chunk({"role": "assistant", "content": ""})
    if choice.message.content:
        yield chunk({"content": choice.message.content})
    if choice.message.tool_calls:
        yield chunk({"tool_calls": [
            {"index": i, "id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments}}
            for i, call in enumerate(choice.message.tool_calls)]})
    yield chunk({}, choice.finish_reason or "stop")
    yield b"data: [DONE]\n\n"


if __name__ == "__main__":
    run_with_gunicorn()
