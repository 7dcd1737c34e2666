"""What openai-advanced adds: prompt shaping, knowledge, memory across calls, the rewrite, and
server-side tools."""

import json
import sqlite3
import time
import uuid

import pytest

from conftest import (FOLDERS, load_fixture, open_raw_stream, phone_call, post_chat, read_sse,
                      run_at_once, run_memory_command, streamed_text, system_prompt,
                      tool_then_answer, wait_for)

pytestmark = pytest.mark.skipif("openai-advanced" not in FOLDERS, reason="no folder yet")
REWRITE_MARKER = "You clean up phone-call transcripts"


@pytest.fixture
def advanced(start_server, scheduling_api):
    return start_server("openai-advanced", AVAILABILITY_API_URL=scheduling_api.url)


def memory_rows(server, **where):
    with sqlite3.connect(server.env["MEMORY_DB_PATH"]) as db:
        clause = " AND ".join(f"{key} = ?" for key in where) or "1"
        return db.execute("SELECT call_id, caller, user_text, assistant_text FROM turns "
                          f"WHERE {clause}",
                          tuple(where.values())).fetchall()


def main_requests(fake):
    """The provider requests for answers (not the rewrite calls)."""
    return [b for b in fake.chat_bodies() if REWRITE_MARKER not in json.dumps(b["messages"][0])]


# --- prompt and knowledge -------------------------------------------------------------------------

def test_knowledge_passage_and_the_users_own_prompt_reach_the_model(advanced, fake):
    events, done = read_sse(post_chat(advanced, phone_call("What are your hours on Saturday?")))
    assert done
    prompt = system_prompt(fake.chat_bodies()[0])
    assert prompt.startswith("You are Riley, the friendly phone receptionist for Acme Dental."), \
        "the assistant's own system prompt comes first, unchanged"
    assert "Saturday from 9:00 am to 1:00 pm" in prompt
    assert "America/New_York" in prompt
    assert "The caller's phone number is +1555" in prompt


@pytest.mark.parametrize("question, expected", [
    ("How much is a cleaning without insurance?", "$145"),
    ("Do you take Delta Dental?", "Delta Dental PPO"),
    ("Where can I park?", "garage under the building"),
    ("Is there a fee if I cancel late?", "$50 fee"),
])
def test_the_right_passage_for_each_question(advanced, fake, question, expected):
    read_sse(post_chat(advanced, phone_call(question)))
    assert expected in system_prompt(fake.chat_bodies()[0])


def test_web_call_without_system_prompt_or_number_still_gets_context(advanced, fake):
    body = load_fixture("web-call-first-turn.json")
    body["messages"] = body["messages"][1:]  # no system message at all
    events, done = read_sse(post_chat(advanced, body))
    assert done
    messages = fake.chat_bodies()[0]["messages"]
    assert messages[0]["role"] == "system" and "at the clinic" in messages[0]["content"]
    assert "phone number" not in messages[0]["content"]
    assert messages[1:] == body["messages"]


# --- memory ---------------------------------------------------------------------------------------

def test_a_second_call_from_the_same_number_sees_the_first(advanced, fake):
    number = "+15550001111"
    read_sse(post_chat(advanced, phone_call("Do you whiten teeth?", number)))
    assert wait_for(lambda: memory_rows(advanced, caller=number))
    read_sse(post_chat(advanced, phone_call("Hi, I called before.", number)))
    read_sse(post_chat(advanced, phone_call("Hi, first time calling.", "+15550002222")))
    second, other = system_prompt(fake.chat_bodies()[1]), system_prompt(fake.chat_bodies()[2])
    assert "Earlier calls from this number" in second
    assert 'caller said "Do you whiten teeth?"' in second
    assert 'you answered "You said: Do you whiten teeth?"' in second
    assert "Earlier calls" not in other and "whiten teeth" not in other


def test_the_current_call_is_not_an_earlier_call(advanced, fake):
    body = phone_call("Do you see children?")
    read_sse(post_chat(advanced, body))
    assert wait_for(lambda: memory_rows(advanced, call_id=body["call"]["id"]))
    read_sse(post_chat(advanced, body))
    assert "Earlier calls" not in system_prompt(fake.chat_bodies()[1])


def test_memory_stores_the_turn_once_with_the_original_words(advanced):
    body = phone_call("Can I bring my son?")
    read_sse(post_chat(advanced, body))
    assert wait_for(lambda: memory_rows(advanced, call_id=body["call"]["id"]))
    assert memory_rows(advanced, call_id=body["call"]["id"]) == [
        (body["call"]["id"], body["customer"]["number"], "Can I bring my son?",
         "You said: Can I bring my son?")]


def test_tool_result_turns_and_web_calls_are_not_stored(advanced):
    body = load_fixture("after-tool-call.json")
    body["call"]["id"] = call_id = str(uuid.uuid4())
    read_sse(post_chat(advanced, body))
    web = load_fixture("web-call-first-turn.json")
    web["call"]["id"] = web_id = str(uuid.uuid4())
    read_sse(post_chat(advanced, web))
    time.sleep(0.2)
    assert memory_rows(advanced, call_id=call_id) == []
    assert memory_rows(advanced, call_id=web_id) == []


def test_an_interrupted_turn_is_not_stored(advanced, fake):
    fake.script({"text": " ".join(["word"] * 100), "token_delay": 0.05})
    body = phone_call("Tell me everything.")
    sock = open_raw_stream(advanced, body)
    sock.recv(4096)
    sock.close()
    assert wait_for(lambda: fake.streams and not fake.streams[0].open)
    time.sleep(0.2)
    assert memory_rows(advanced, call_id=body["call"]["id"]) == []


def test_memory_off_stores_nothing(start_server, fake, tmp_path):
    database = tmp_path / "off.sqlite3"
    server = start_server("openai-advanced", MEMORY_ENABLED="0", MEMORY_DB_PATH=str(database))
    number = "+15550003333"
    for text in ("First call.", "Second call."):
        read_sse(post_chat(server, phone_call(text, number)))
    assert not database.exists()
    assert "Earlier calls" not in system_prompt(fake.chat_bodies()[1])


def test_retention_removes_old_turns(advanced, fake):
    number = "+15550004444"
    with sqlite3.connect(advanced.env["MEMORY_DB_PATH"]) as db:
        db.execute("INSERT INTO turns (call_id, caller, user_text, assistant_text, created_at) "
                   "VALUES ('old-call', ?, 'Ancient question', 'Ancient answer', ?)",
                   (number, time.time() - 40 * 86400))
    read_sse(post_chat(advanced, phone_call("Hello again.", number)))
    assert "Ancient question" not in system_prompt(fake.chat_bodies()[0]), \
        "older than MEMORY_RETENTION_DAYS"
    assert wait_for(lambda: memory_rows(advanced, caller=number, user_text="Hello again."))
    assert memory_rows(advanced, call_id="old-call") == [], "deleted on the next write"


def test_forget_deletes_everything_about_one_number(advanced, fake):
    number, other = "+15550005555", "+15550006666"
    for text, caller in (("First call.", number), ("Second call.", number), ("Mine.", other)):
        read_sse(post_chat(advanced, phone_call(text, caller)))
    assert wait_for(lambda: len(memory_rows(advanced, caller=number)) == 2)
    assert wait_for(lambda: memory_rows(advanced, caller=other))
    status, output = run_memory_command("forget", number, MEMORY_DATABASE_URL="",
                                        MEMORY_DB_PATH=advanced.env["MEMORY_DB_PATH"])
    assert (status, output) == (0, f"Deleted 2 turns stored for {number}.\n")
    assert memory_rows(advanced, caller=number) == []
    assert len(memory_rows(advanced, caller=other)) == 1, "other numbers are kept"
    read_sse(post_chat(advanced, phone_call("Hello?", number)))
    assert "Earlier calls" not in system_prompt(fake.chat_bodies()[-1])


def test_the_memory_command_says_how_to_use_it():
    status, output = run_memory_command("forget")
    assert status == 2 and output.startswith("usage: python memory.py forget")


# --- rewrite --------------------------------------------------------------------------------------

def rewrite_responder(plan):
    return lambda body: plan if REWRITE_MARKER in json.dumps(body["messages"][0]) else None


def test_rewrite_on_the_model_sees_the_rewritten_words(start_server, fake):
    server = start_server("openai-advanced", REWRITE_ENABLED="1")
    fake.responder = rewrite_responder({"text": "What are your opening hours on Saturday?"})
    body = phone_call("uh what r ur hours sat")
    events, done = read_sse(post_chat(server, body))
    assert done
    [rewrite_request] = [b for b in fake.chat_bodies() if b not in main_requests(fake)]
    assert "uh what r ur hours sat" in rewrite_request["messages"][1]["content"]
    [answer_request] = main_requests(fake)
    assert answer_request["messages"][-1]["content"] == "What are your opening hours on Saturday?"
    assert "Saturday from 9:00 am" in system_prompt(answer_request), \
        "knowledge uses the rewritten question"
    assert wait_for(lambda: body["call"]["id"] in server.log())
    assert "rewrite_ms=" in server.log()


@pytest.mark.parametrize("plan", [{"ttft": 5}, {"status": 500}, {"hang": True}],
                         ids=["slow", "error", "hang"])
def test_rewrite_that_fails_keeps_the_original_within_the_budget(start_server, fake, plan):
    server = start_server("openai-advanced", REWRITE_ENABLED="1", REWRITE_BUDGET_MS="500")
    fake.responder = rewrite_responder(plan)
    started = time.monotonic()
    response = post_chat(server, phone_call("uh what r ur hours sat"))
    events, done = read_sse(response)
    assert done and streamed_text(events) == "You said: uh what r ur hours sat"
    assert time.monotonic() - started < 0.5 + 1.0
    assert main_requests(fake)[0]["messages"][-1]["content"] == "uh what r ur hours sat"


def test_rewrite_never_touches_a_tool_turn(start_server, fake):
    server = start_server("openai-advanced", REWRITE_ENABLED="1")
    fake.responder = rewrite_responder({"text": "SHOULD NOT APPEAR"})
    body = load_fixture("after-tool-call.json")
    read_sse(post_chat(server, body))
    assert len(fake.chat_bodies()) == 1, "no rewrite call when the turn ends with a tool result"
    assert fake.chat_bodies()[0]["messages"][-1] == body["messages"][-1]


# --- server-side tools ----------------------------------------------------------------------------

def test_server_tool_round_trip(advanced, fake, scheduling_api):
    fake.responder = tool_then_answer("open_slots", '{"date": "2026-01-06"}')
    response = post_chat(advanced, phone_call("Anything open next Tuesday?"))
    raw = response.content.decode()
    events, done = read_sse(raw)
    assert done and raw.rstrip().endswith("data: [DONE]")
    assert streamed_text(events) == \
        "One moment while I check that. We have 9:30 or 2 pm open on Tuesday.", \
        "the filler and the next round are two sentences, as a voice reads them"
    assert len({event["id"] for event in events}) == 1, "one completion, however many rounds"
    assert [e for e in events if "role" in e["choices"][0]["delta"]] == events[:1], "one role chunk"
    assert not any("tool_calls" in e["choices"][0]["delta"] for e in events), \
        "server tools are not Vapi's"
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert scheduling_api.requests == ["/slots?date=2026-01-06"]

    first, second = fake.chat_bodies()
    assert "open_slots" in [t["function"]["name"] for t in first["tools"]]
    assistant, tool = second["messages"][-2:]
    assert assistant["role"] == "assistant" and assistant["tool_calls"][0]["function"] == {
        "name": "open_slots", "arguments": '{"date": "2026-01-06"}'}
    assert tool == {"role": "tool", "tool_call_id": assistant["tool_calls"][0]["id"],
                    "content": json.dumps({"date": "2026-01-06", "open_slots": ["09:30", "14:00"]})}


def test_local_tool_round_trip(advanced, fake):
    fake.responder = tool_then_answer("local_time", "{}", "It is just after nine.")
    events, done = read_sse(post_chat(advanced, phone_call("Are you open right now?")))
    assert done and streamed_text(events).endswith("It is just after nine.")
    result = json.loads(fake.chat_bodies()[1]["messages"][-1]["content"])
    assert result["timezone"] == "America/New_York" and result["now"]


@pytest.mark.parametrize("mode", ["down", "slow", "unreachable"])
def test_scheduling_api_failure_becomes_a_result_the_model_can_talk_about(start_server, fake,
                                                                            scheduling_api,
                                                                            mode):
    url = scheduling_api.url if mode != "unreachable" else "http://127.0.0.1:9"
    server = start_server("openai-advanced", AVAILABILITY_API_URL=url,
                          AVAILABILITY_TIMEOUT_SECONDS="1")
    scheduling_api.mode = mode
    fake.responder = tool_then_answer("open_slots", '{"date": "2026-01-06"}',
                                      "Sorry, I can't see the calendar right now.")
    events, done = read_sse(post_chat(server, phone_call("Anything open Tuesday?")))
    assert done and streamed_text(events).endswith("Sorry, I can't see the calendar right now.")
    assert "error" in json.loads(fake.chat_bodies()[1]["messages"][-1]["content"])


def test_vapi_tools_pass_through_untouched(advanced, fake):
    fake.script({"tokens": ["Connecting you now."],
                 "tool_calls": [{"name": "transferCall",
                                 "arguments": '{"destination":"+15555550188"}'}]})
    events, done = read_sse(post_chat(advanced, load_fixture("with-vapi-tools.json")))
    assert done and len(fake.chat_bodies()) == 1
    calls = [c for e in events for c in e["choices"][0]["delta"].get("tool_calls", [])]
    assert calls[0]["function"] == {"name": "transferCall", "arguments": ""}
    assert calls[0]["index"] == 0
    assert "".join(c["function"].get("arguments", "") for c in calls) == \
        '{"destination":"+15555550188"}'
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_when_one_answer_calls_both_kinds_vapi_tools_win(advanced, fake):
    fake.script({"tool_calls": [{"name": "local_time", "arguments": "{}"},
                                {"name": "endCall", "arguments": "{}"}]})
    events, done = read_sse(post_chat(advanced, load_fixture("with-vapi-tools.json")))
    assert done and len(fake.chat_bodies()) == 1, "the server-side call is dropped, not run"
    calls = [c for e in events for c in e["choices"][0]["delta"].get("tool_calls", [])]
    assert {c["function"].get("name") for c in calls} - {None} == {"endCall"}
    assert {c["index"] for c in calls} == {0}, "renumbered from 1 to 0"
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert "One moment" not in streamed_text(events), "no filler for a check that never happens"


def test_no_filler_before_a_transfer_that_follows_a_server_side_call(advanced, fake):
    fake.script({"tokens": ["Sure."], "tool_calls": [
        {"name": "local_time", "arguments": '{"reason": "' + "x" * 200 + '"}'},
        {"name": "transferCall", "arguments": '{"destination":"+15555550188"}'}]})
    events, done = read_sse(post_chat(advanced, load_fixture("with-vapi-tools.json")))
    assert done and streamed_text(events) == "Sure."
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_words_before_a_tool_call_and_after_it_are_separate_sentences(advanced, fake):
    def respond(body):
        if body["messages"][-1]["role"] == "tool":
            return {"tokens": ["It", " is", " nine."]}
        return {"tokens": ["Let", " me", " look."],
                "tool_calls": [{"name": "local_time", "arguments": "{}"}]}

    fake.responder = respond
    events, done = read_sse(post_chat(advanced, phone_call("What time is it?")))
    assert done and streamed_text(events) == \
        "Let me look. One moment while I check that. It is nine."
    assert len({event["id"] for event in events}) == 1


def test_round_limit(start_server, fake):
    server = start_server("openai-advanced", MAX_TOOL_ROUNDS="2")

    def always_the_tool(body):
        offered = [t["function"]["name"] for t in body.get("tools", [])]
        if "local_time" in offered:
            return {"tool_calls": [{"name": "local_time", "arguments": "{}"}]}
        return {"text": "Let me have someone call you back."}

    fake.responder = always_the_tool
    events, done = read_sse(post_chat(server, phone_call("What time is it there?")))
    assert done and streamed_text(events).endswith("Let me have someone call you back.")
    assert len(fake.chat_bodies()) == 3, \
        "two tool rounds, then one answer without server-side tools"
    assert streamed_text(events).count("One moment while I check that.") == 1


def test_flush_after_filler(start_server, fake):
    server = start_server("openai-advanced", FLUSH_AFTER_FILLER="1")
    fake.responder = tool_then_answer("local_time", "{}", "Nine.")
    events, _ = read_sse(post_chat(server, phone_call("What time is it?")))
    assert streamed_text(events) == "One moment while I check that. <flush /> Nine."


def test_a_round_that_only_calls_a_tool_sends_nothing_before_the_filler(advanced, fake):
    fake.responder = tool_then_answer("local_time", "{}", "Nine.")
    fake.token_delay = 0.05
    response = post_chat(advanced, phone_call("What time is it?"))
    events, done = read_sse(response)
    assert done
    texts = [e["choices"][0]["delta"].get("content") for e in events]
    assert texts[:2] == ["", "One moment while I check that."], texts
    assert not any("tool_calls" in e["choices"][0]["delta"] for e in events)


def test_a_finish_reason_riding_on_the_last_tool_fragment_is_held_back(advanced, fake):
    def respond(body):
        if body["messages"][-1]["role"] == "tool":
            return {"text": "Nine."}
        return {"tool_calls": [{"name": "local_time", "arguments": "{}"}],
                "finish_in_last_delta": True}

    fake.responder = respond
    events, done = read_sse(post_chat(advanced, phone_call("What time is it?")))
    assert done and streamed_text(events) == "One moment while I check that. Nine."
    finishes = [e["choices"][0]["finish_reason"] for e in events
                if e["choices"][0]["finish_reason"]]
    assert finishes == ["stop"], "no tool_calls finish before the second round"


def test_stream_false_with_both_kinds_of_tool_sends_vapis_alone(advanced, fake):
    fake.script({"tool_calls": [{"name": "local_time", "arguments": "{}"},
                                {"name": "endCall", "arguments": "{}"}]})
    body = {**load_fixture("with-vapi-tools.json"), "stream": False}
    response = post_chat(advanced, body)
    choice = response.json()["choices"][0]
    assert [call["function"]["name"] for call in choice["message"]["tool_calls"]] == ["endCall"]
    assert choice["finish_reason"] == "tool_calls" and len(fake.chat_bodies()) == 1


def test_stream_false_runs_the_same_tool_rounds(advanced, fake):
    fake.responder = tool_then_answer("local_time", "{}", "It is nine.")
    body = {**phone_call("What time is it?"), "stream": False}
    response = post_chat(advanced, body)
    assert response.json()["choices"][0]["message"]["content"] == "It is nine."
    assert fake.chat_bodies()[1]["messages"][-1]["role"] == "tool"


# --- latency accounting and load ------------------------------------------------------------------

def test_log_line_times_each_step(advanced):
    body = phone_call("Hours on Friday?")
    read_sse(post_chat(advanced, body))
    assert wait_for(lambda: body["call"]["id"] in advanced.log())
    [line] = [line for line in advanced.log().splitlines() if body["call"]["id"] in line]
    assert "knowledge_ms=" in line
    assert "memory_ms=" in line and "rounds=0" in line and "Friday" not in line


def test_concurrent_calls_under_two_workers_store_every_turn_once(start_server, fake, tmp_path):
    server = start_server("openai-advanced", WEB_CONCURRENCY="2",
                          MEMORY_DB_PATH=str(tmp_path / "load.sqlite3"))
    fake.token_delay = 0.005
    numbers = [f"+1555000{n:04d}" for n in range(8)]
    bodies = [phone_call(f"Question {i} from caller {i % 8}", numbers[i % 8]) for i in range(48)]

    def call(body):
        events, done = read_sse(post_chat(server, body, timeout=30))
        assert done and streamed_text(events) == "You said: " + body["messages"][-1]["content"]

    errors = run_at_once(call, bodies)
    assert errors == []
    assert wait_for(lambda: len(memory_rows(server)) == 48, 5)
    rows = memory_rows(server)
    assert sorted(row[0] for row in rows) == sorted(body["call"]["id"] for body in bodies), \
        "each turn once"
    assert "locked" not in server.log() and "Traceback" not in server.log()


# --- what is remembered ---------------------------------------------------------------------------

def test_a_transfer_is_remembered_as_what_happened(advanced, fake):
    body = phone_call("Put me through to billing.")
    body["tools"] = load_fixture("with-vapi-tools.json")["tools"]
    fake.script({"tokens": ["Connecting", " you", " now."],
                 "tool_calls": [{"name": "transferCall",
                                 "arguments": '{"destination":"+15555550188"}'}]})
    read_sse(post_chat(advanced, body))
    assert wait_for(lambda: memory_rows(advanced, call_id=body["call"]["id"]), 3)
    [row] = memory_rows(advanced, call_id=body["call"]["id"])
    assert row[3] == "Connecting you now. [called transferCall]"


def test_a_silent_hang_up_tool_is_remembered_and_an_empty_answer_is_not(advanced, fake):
    end_call = phone_call("Bye.")
    end_call["tools"] = load_fixture("with-vapi-tools.json")["tools"]
    fake.script({"tool_calls": [{"name": "endCall", "arguments": "{}"}]})
    read_sse(post_chat(advanced, end_call))
    empty = phone_call("Hello?")
    fake.script({"tokens": []})
    events, done = read_sse(post_chat(advanced, empty))
    assert done and streamed_text(events) == ""
    assert wait_for(lambda: memory_rows(advanced, call_id=end_call["call"]["id"]), 3)
    assert memory_rows(advanced, call_id=end_call["call"]["id"])[0][3] == "[called endCall]"
    time.sleep(0.3)
    assert memory_rows(advanced, call_id=empty["call"]["id"]) == [], "never an empty answer"
    read_sse(post_chat(advanced, phone_call("Me again.", empty["customer"]["number"])))
    assert "Earlier calls" not in system_prompt(fake.chat_bodies()[-1])


# --- caller fields of any shape -------------------------------------------------------------------

@pytest.mark.parametrize("call, customer", [
    ({"id": "\ud800", "customer": {"number": "+15550001234"}}, None),
    ({"id": "ok-1", "customer": {"number": "\ud83d"}}, {"number": "+1555\udfff"}),
    ({"id": 5, "customer": ["+15550001234"]}, {"number": {"e164": "+1"}}),
    ("a string", 7),
    ({"id": "x" * 10000, "customer": {"number": "+1" * 5000}}, {"number": "\n\t"}),
    ({"customer": {"number": None}}, {"number": True}),
    ({"id": "ok-2", "customer": {"number": "+1 555\u0000 0001"}}, {}),
], ids=["surrogate-call-id", "surrogate-numbers", "wrong-types", "not-objects", "huge-and-blank",
        "null-and-bool", "nul-character"])
def test_caller_fields_of_any_shape_leave_the_call_working(advanced, fake, call, customer):
    body = phone_call("Do you take walk-ins?")
    body["call"], body["customer"] = call, customer
    log_before = len(advanced.log())
    for _ in range(2):  # the second time, memory has (or has not) got the first
        response = post_chat(advanced, body)
        events, done = read_sse(response)
        assert response.status_code == 200 and done
        assert streamed_text(events) == "You said: Do you take walk-ins?"
    time.sleep(0.2)
    assert "Traceback" not in advanced.log()[log_before:]


# --- knowledge in any script ----------------------------------------------------------------------

@pytest.fixture
def multilingual(start_server, tmp_path):
    (tmp_path / "staff.md").write_text(
        "# Staff\n\n## Dr. Müller\n\nDr. Anna Müller sees children on Tuesdays.\n\n"
        "## Desserts\n\nThe waiting room serves crème brûlée on Fridays.\n\n"
        "## Парковка\n\nБесплатная парковка во дворе, въезд с улицы Ленина.\n\n"
        "## Ωράριο\n\nΤο ιατρείο είναι ανοιχτό Δευτέρα με Παρασκευή.\n", encoding="utf-8")
    return start_server("openai-advanced", KNOWLEDGE_DIR=str(tmp_path))


@pytest.mark.parametrize("question, expected", [
    ("Is Dr. Müller in this week?", "sees children on Tuesdays"),
    ("Is doctor Muller in?", "sees children on Tuesdays"),
    ("Do you still serve cre\u0300me brule\u0301e?", "crème brûlée"),  # accents as separate marks
    ("Где у вас парковка?", "въезд с улицы Ленина"),
    ("Ποιο είναι το ωράριο;", "Δευτέρα με Παρασκευή"),
])
def test_knowledge_matches_words_in_any_script(multilingual, fake, question, expected):
    read_sse(post_chat(multilingual, phone_call(question)))
    assert expected in system_prompt(fake.chat_bodies()[0])


def test_knowledge_in_another_script_does_not_match_everything(multilingual, fake):
    read_sse(post_chat(multilingual, phone_call("Сколько стоит чистка зубов?")))
    assert "information for this question" not in system_prompt(fake.chat_bodies()[0])
    assert "въезд" not in system_prompt(fake.chat_bodies()[0])


# --- wording and settings -------------------------------------------------------------------------

def test_every_section_the_model_reads_comes_from_prompt_md(advanced, fake):
    from conftest import ROOT
    prompt_md = (ROOT / "openai-advanced" / "prompt.md").read_text()
    code = "".join(path.read_text() for path in (ROOT / "openai-advanced").glob("*.py"))
    number = "+15550009999"
    read_sse(post_chat(advanced, phone_call("Do you whiten teeth?", number)))
    assert wait_for(lambda: memory_rows(advanced, caller=number), 3)
    read_sse(post_chat(advanced, phone_call("How much is a cleaning?", number)))
    context = system_prompt(fake.chat_bodies()[-1]).split("\n\n", 1)[1]
    for phrase in ("The caller's phone number is", "Earlier calls from this number",
                   "information for this question", "You clean up phone-call transcripts"):
        assert phrase in prompt_md and phrase not in code, phrase
    for phrase in ("The caller's phone number is", "Earlier calls from this number",
                   "information for this question"):
        assert phrase in context, phrase


def test_the_time_zone_works_without_system_zone_data(start_server, fake, tmp_path):
    server = start_server("openai-advanced", BUSINESS_TIMEZONE="Europe/Paris",
                          PYTHONTZPATH=str(tmp_path))  # no zone files there: tzdata must answer
    read_sse(post_chat(server, phone_call("What time is it?")))
    assert "(Europe/Paris)" in system_prompt(fake.chat_bodies()[0])
