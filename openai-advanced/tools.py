"""Server-side tools: functions the model may call that this server runs itself, between two rounds.

Each tool is an OpenAI function definition plus a Python function that takes the parsed arguments
and returns a JSON-serialisable result. A failure is returned as {"error": "..."} so that the model
can tell the caller about it; a tool never raises into the stream. Add a tool: write the function,
add it to `build_tools`.
"""

import datetime
import json
import zoneinfo

import requests

from contract import ProviderFailed, log


def local_time(timezone):
    """The date and time where the business is (no network)."""
    now = datetime.datetime.now(zoneinfo.ZoneInfo(timezone))
    return {"now": now.strftime("%A %B %d %Y, %I:%M %p"), "timezone": timezone}


def open_slots(api_url, timeout_seconds, date):
    """Ask the scheduling API which appointment slots are free on a date."""
    url = f"{api_url.rstrip('/')}/slots"
    try:
        response = requests.get(url, params={"date": date}, timeout=timeout_seconds)
        response.raise_for_status()
        return {"date": date, "open_slots": response.json().get("open_slots", [])}
    except requests.Timeout:
        log.warning("server-side tool open_slots failed: %s did not answer in %g s "
                    "(AVAILABILITY_TIMEOUT_SECONDS)", url, timeout_seconds)
        return {"error": "The scheduling system did not answer in time. "
                         "Offer to have the front desk call back."}
    except (requests.RequestException, ValueError, AttributeError) as exc:
        log.warning("server-side tool open_slots failed: %s", failure(url, exc))
        return {"error": "The scheduling system is not available right now. "
                         "Offer to have the front desk call back."}


def failure(url, exc):
    """Why a call to an API failed, in a few words for the log (no response body: it may hold
    personal data)."""
    if isinstance(exc, requests.HTTPError):
        return f"{url} answered HTTP {exc.response.status_code}"
    if isinstance(exc, requests.ConnectionError):
        while (exc.__cause__ or exc.__context__) is not None:  # down to the socket's own error
            exc = exc.__cause__ or exc.__context__
        return f"{url} could not be reached: {exc}"
    return f"{url} sent an answer that is not the expected JSON ({type(exc).__name__})"


def function_tool(name, description, properties=None):
    """An OpenAI function tool definition whose arguments are all required strings."""
    properties = properties or {}
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": properties, "required": list(properties)}}}


def build_tools(timezone, availability_api_url, availability_timeout_seconds):
    """The server-side tools for this configuration: {name: (definition, function(arguments))}."""
    tools = {"local_time": (
        function_tool("local_time", "Get the current date and time at the business."),
        lambda arguments: local_time(timezone))}
    if availability_api_url:  # offered only when there is an API to ask
        tools["open_slots"] = (
            function_tool("open_slots", "Look up free appointment slots on a given date.",
                          {"date": {"type": "string", "description": "ISO date, e.g. 2026-01-06"}}),
            lambda arguments: open_slots(availability_api_url, availability_timeout_seconds,
                                         str(arguments.get("date", ""))))
    return tools


def run_tool(tools, name, arguments_json):
    """Run one server-side tool call; returns the JSON string for the `role: "tool"` message."""
    try:
        arguments = json.loads(arguments_json or "{}")
        if not isinstance(arguments, dict):
            raise ValueError("arguments must be a JSON object")
    except ValueError:
        log.warning("server-side tool %s not run: its arguments are not a JSON object", name)
        return json.dumps({"error": f"The arguments for {name} were not a valid JSON object."})
    try:
        return json.dumps(tools[name][1](arguments))
    except Exception as exc:  # a bug in a tool must not break the caller's stream: it is logged
        log.error("server-side tool %s failed", name, exc_info=exc)
        return json.dumps({"error": f"{name} failed: {type(exc).__name__}"})


def server_tools_for(upstream, server_tools):
    """The server-side tools a request may use: ours, minus any name the request's own tools use."""
    request_tools = upstream.get("tools") if isinstance(upstream.get("tools"), list) else []
    taken = {t["function"].get("name") for t in request_tools
             if isinstance(t, dict) and isinstance(t.get("function"), dict)}
    return {name: tool for name, tool in server_tools.items() if name not in taken}


def with_tools(upstream, server_tools):
    """The provider request for one round: the request's own tools plus the server-side ones."""
    if not server_tools:
        return upstream
    request_tools = upstream.get("tools") if isinstance(upstream.get("tools"), list) else []
    return {**upstream,
            "tools": request_tools + [definition for definition, _ in server_tools.values()]}


def tool_round_messages(server_calls, server_tools):
    """Run the calls: the assistant's `tool_calls` message, then one `role: "tool"` message each."""
    return [{"role": "assistant", "content": None, "tool_calls": [
        {"id": call["id"], "type": "function",
         "function": {"name": call["name"], "arguments": call["arguments"]}}
        for call in server_calls]}] + [
        {"role": "tool", "tool_call_id": call["id"],
         "content": run_tool(server_tools, call["name"], call["arguments"])}
        for call in server_calls]


class RoundCalls:
    """One round's tool calls as their fragments stream in: Vapi's pass through, renumbered from 0
    (a server-side call may have taken index 0); calls to server-side tools are held back."""

    def __init__(self, server_tools, round_number):
        self.server_tools, self.round_number = server_tools, round_number
        self.calls = {}  # the provider's index: {"id", "name", "arguments"}
        self.vapi_index = {}  # the provider's index: the index Vapi sees

    def add(self, fragments):
        """Add one chunk's fragments; returns those for Vapi. Raises ProviderFailed for fragments
        not in OpenAI's shape."""
        if not isinstance(fragments, list) or not all(
                isinstance(f, dict) and isinstance(f.get("index", 0), int)
                and isinstance(f.get("function") or {}, dict) for f in fragments):
            raise ProviderFailed(502, "The model provider sent a malformed tool call.",
                                 "provider_error", code="bad_chunk")
        to_vapi = []
        for fragment in fragments:
            function, index = fragment.get("function") or {}, fragment.get("index", 0)
            call = self.calls.setdefault(index, {
                "id": fragment.get("id") or f"call_{self.round_number}_{index}",
                "name": str(function.get("name") or ""), "arguments": ""})
            call["arguments"] += str(function.get("arguments") or "")
            if call["name"] not in self.server_tools:
                index_for_vapi = self.vapi_index.setdefault(index, len(self.vapi_index))
                to_vapi.append({**fragment, "index": index_for_vapi})
        return to_vapi

    def held(self):
        """The calls to server-side tools."""
        return [call for call in self.calls.values() if call["name"] in self.server_tools]

    def for_vapi(self):
        """The names of Vapi's tools called."""
        return [call["name"] for call in self.calls.values()
                if call["name"] not in self.server_tools]
