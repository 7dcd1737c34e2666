"""Prompt shaping: prompt.md filled in for a turn, the caller's number, a message's text, and the
optional rewrite of the caller's last words. Every word the model reads from here is in prompt.md.
"""

import datetime
import re
import string

import gevent

from contract import ProviderFailed, complete

SECTION = re.compile(r"^<!-- \$(\w+).*?-->\n", re.MULTILINE | re.DOTALL)


class Prompt:
    """prompt.md: the template appended to the system prompt (its text up to the first `<!--`), and
    the sections that fill its placeholders (each after a `<!-- $name -->` line)."""

    def __init__(self, path):
        text = path.read_text(encoding="utf-8")
        parts = SECTION.split(text[text.index("<!-- $"):])
        self.template = string.Template(text[:text.index("<!--")].rstrip() + "\n")
        self.sections = {name: string.Template(body.strip())
                         for name, body in zip(parts[1::2], parts[2::2], strict=True)}

    def section(self, name, **values):
        """One section of prompt.md with its placeholders filled in."""
        return self.sections[name].safe_substitute(values)

    def render(self, timezone, caller, earlier, passages):
        """The template filled in for this turn; a section with nothing to say is left empty."""
        turns = "\n".join(
            self.section("earlier_call", said=said[:200], answered=answered[:200],
                         date=f"{datetime.datetime.fromtimestamp(at, timezone):%b %d}")
            for at, said, answered in earlier)
        return self.template.safe_substitute(
            now=datetime.datetime.now(timezone).strftime("%A %B %d %Y, %I:%M %p"),
            timezone=timezone.key,
            caller=self.section("caller", number=caller) if caller else "",
            earlier_calls=self.section("earlier_calls", turns=turns) if earlier else "",
            knowledge=self.section("knowledge", passages="\n".join(
                self.section("passage", passage=p) for p in passages)) if passages else "")


def text_of(content):
    """The text of a message's content: a string, or the text parts of a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p["text"] for p in content
                        if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def caller_number(body):
    """The caller's phone number from `call.customer.number` or `customer.number`: None for web
    calls, and for anything that is not a short line of printable text (memory keys on it)."""
    call = body.get("call") if isinstance(body.get("call"), dict) else {}
    for customer in (call.get("customer"), body.get("customer")):
        number = customer.get("number") if isinstance(customer, dict) else None
        if isinstance(number, str) and 0 < len(number) <= 64 and number.isprintable():
            return number  # isprintable(): no newline, and no lone surrogate such as '\ud800'
    return None


class RewriteSkipped(Exception):
    """The rewrite gave nothing to use; `reason`, for the log line: timeout, empty, or the error."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


def rewrite_utterance(client, prompt, model, messages, budget_seconds):
    """Ask a model to rewrite the caller's last words within the budget; raises RewriteSkipped."""
    transcript = "\n".join(f"{m['role']}: {text_of(m.get('content'))}" for m in messages[-6:]
                           if m["role"] in ("user", "assistant") and text_of(m.get("content")))
    try:
        with gevent.Timeout(budget_seconds):  # a hard limit on the whole call, retries included
            completion = complete(client.with_options(timeout=budget_seconds, max_retries=0), {
                "model": model, "max_tokens": 120, "temperature": 0, "messages": [
                    {"role": "system", "content": prompt.section("rewrite")},
                    {"role": "user", "content": transcript}]})
        rewritten = (completion.choices[0].message.content or "").strip()
    except gevent.Timeout:
        raise RewriteSkipped("timeout") from None
    except ProviderFailed as failure:  # the SDK's own timeout too: provider_timeout
        raise RewriteSkipped("timeout" if failure.error["code"] == "provider_timeout"
                             else failure.logged()) from None
    if not rewritten:
        raise RewriteSkipped("empty")
    return rewritten
