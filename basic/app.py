"""The simplest Vapi Custom LLM server: ask the model, wait for the whole answer, then send it.

Vapi asks for a stream (`stream: true`), so the finished answer goes back as Server-Sent Events: the
caller hears nothing until the model's last word (`openai-sse/` relays it word by word). Shared
settings, request checks, errors and the log line are in contract.py.
"""

import openai
from flask import Flask, Response

from contract import (OPENAI_API_KEY, OPENAI_BASE_URL, OPENAI_MAX_RETRIES,
                      OPENAI_TIMEOUT_SECONDS, complete, init_app, read_chat_request,
                      run_with_gunicorn, sse, warm_up)

# "not-set": the server starts without a key and answers chat requests with an error naming it.
client = openai.OpenAI(api_key=OPENAI_API_KEY or "not-set", base_url=OPENAI_BASE_URL,
                       timeout=OPENAI_TIMEOUT_SECONDS, max_retries=OPENAI_MAX_RETRIES)
warm_up(client)

app = Flask(__name__)
init_app(app)


@app.post("/chat/completions")
@app.post("/v1/chat/completions")
@app.post("/chat/completions/chat/completions")  # a model URL pasted with /chat/completions
@app.post("/v1/chat/completions/chat/completions")
def chat_completions():
    """Vapi's turn: ask the provider for the whole answer, then send it as SSE or JSON."""
    turn = read_chat_request()  # raises ChatError (an OpenAI-shaped 4xx) for a bad request
    completion = complete(client, turn.upstream)  # client.chat.completions.create(...), checked
    turn.completed(completion)  # for the log line: when, and whether it had words
    if not turn.stream:
        return completion.to_dict()
    events = list(completion_as_sse(completion))
    turn.chunks = len(events) - 1
    return Response(events, mimetype="text/event-stream", headers={"Cache-Control": "no-cache"})


def completion_as_sse(completion):
    """The finished answer as the stream Vapi expects: role, words or tool calls, finish, [DONE]."""
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
