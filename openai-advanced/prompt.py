"""Prompt shaping: the text of a turn, the caller's number, the optional rewrite, and prompt.md
filled in."""

import datetime
import logging

import gevent
import openai

log = logging.getLogger("openai-advanced")

REWRITE_INSTRUCTIONS = (
    "You clean up phone-call transcripts. Rewrite the caller's last utterance as one clear, self-contained "
    "sentence in the caller's own voice: fix speech-to-text errors and spell out what 'it' or 'that' refers to. "
    "Reply with the rewritten sentence only.")


def text_of(content):
    """The text of a message's content: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def caller_number(body):
    """The caller's phone number from `call.customer.number` or `customer.number`; None for web
    calls."""
    call = body.get("call") if isinstance(body.get("call"), dict) else {}
    for customer in (call.get("customer"), body.get("customer")):
        if isinstance(customer, dict) and isinstance(customer.get("number"), str) and customer["number"]:
            return customer["number"][:32]
    return None


def rewrite_utterance(client, model, messages, budget_seconds):
    """Ask a model to rewrite the caller's last utterance within the budget; None on timeout or
    error."""
    transcript = "\n".join(f"{m['role']}: {text_of(m.get('content'))}" for m in messages[-6:]
                           if m["role"] in ("user", "assistant") and text_of(m.get("content")))
    try:
        # a hard limit on the whole call, connection and retries included
        with gevent.Timeout(budget_seconds):
            completion = client.with_options(timeout=budget_seconds, max_retries=0).chat.completions.create(
                model=model, max_tokens=120, temperature=0,
                messages=[{"role": "system", "content": REWRITE_INSTRUCTIONS},
                          {"role": "user", "content": transcript}])
        return (completion.choices[0].message.content or "").strip() or None
    except (gevent.Timeout, openai.OpenAIError, ValueError, IndexError) as exc:
        log.info("rewrite skipped: %s", type(exc).__name__)
        return None


def render_context(template, timezone, caller, earlier, passages):
    """The template (prompt.md) filled in for this turn; a section with nothing to say is left
    empty."""
    return template.safe_substitute(
        now=datetime.datetime.now(timezone).strftime("%A %B %d %Y, %I:%M %p"), timezone=timezone.key,
        caller=f"The caller's phone number is {caller}." if caller else "",
        earlier_calls="Earlier calls from this number (most recent first):\n" + "".join(
            f"- {datetime.datetime.fromtimestamp(at, timezone):%b %d}: caller said \"{said[:200]}\"; "
            f"you answered \"{answered[:200]}\"\n" for at, said, answered in earlier) if earlier else "",
        knowledge="Clinic information for this question:\n" + "".join(f"- {p}\n" for p in passages)
        if passages else "")
