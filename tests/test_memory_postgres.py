"""openai-advanced's memory in PostgreSQL (MEMORY_DATABASE_URL): two instances share one memory, a
slow database does not stall a worker's other calls, the database can go away and come back, and
turns are forgotten by age or by number. Every test runs on a throwaway cluster (conftest.py)."""

import importlib
import sys
import threading
import time
import uuid

import psycopg
import pytest

from conftest import (FOLDERS, ROOT, load_fixture, phone_call, post_chat, read_sse, run_at_once,
                      run_memory_command, start_postgres, streamed_text, system_prompt,
                      time_to_first_words, wait_for)

pytestmark = pytest.mark.skipif("openai-advanced" not in FOLDERS, reason="no folder yet")

QUERY_WAIT_SECONDS = 1.0  # memory.py: the longest a query may wait
MEMORY_WAIT_SECONDS = 1.5  # memory.py: the longest a call waits for PostgreSQL
RETRY_SECONDS = 5  # memory.py: how long memory is skipped after a failure


def rows(url, **where):
    """(call_id, caller, user_text, assistant_text) of the stored turns that match `where`."""
    clause = " AND ".join(f"{key} = %s" for key in where) or "true"
    with psycopg.connect(url) as db:
        return db.execute("SELECT call_id, caller, user_text, assistant_text FROM turns "
                          f"WHERE {clause} ORDER BY id", tuple(where.values())).fetchall()


def instance(start_server, url, name, **env):
    """openai-advanced with its memory in PostgreSQL; `name` (a variable the server does not read)
    makes it a separate server from any other with the same settings."""
    return start_server("openai-advanced", MEMORY_DATABASE_URL=url, INSTANCE=name, **env)


def new_number():
    return "+1555" + str(uuid.uuid4().int)[:7]


@pytest.fixture(scope="module")
def shared_database(postgres):
    """One database for the two-instance tests of this module."""
    return postgres.create_database(f"memory_{uuid.uuid4().hex}")


@pytest.fixture
def two_instances(start_server, shared_database):
    """Two servers (two gunicorn processes, two workers each) on different ports, one memory."""
    return (instance(start_server, shared_database, "first", WEB_CONCURRENCY="2"),
            instance(start_server, shared_database, "second", WEB_CONCURRENCY="2"))


@pytest.fixture
def own_postgres():
    """A cluster of this test's own, which it may stop and start."""
    cluster = start_postgres()
    yield cluster
    cluster.remove()


# --- several instances, one memory ----------------------------------------------------------------

def test_the_next_call_through_the_other_instance_remembers_the_first(two_instances, fake,
                                                                      shared_database):
    first, second = two_instances
    number = new_number()
    read_sse(post_chat(first, phone_call("Do you whiten teeth?", number)))
    assert wait_for(lambda: rows(shared_database, caller=number))
    events, done = read_sse(post_chat(second, phone_call("Hi, I called before.", number)))
    assert done
    prompt = system_prompt(fake.chat_bodies()[-1])
    assert 'caller said "Do you whiten teeth?"' in prompt
    assert 'you answered "You said: Do you whiten teeth?"' in prompt


def test_48_calls_over_both_instances_store_each_finished_turn_once(two_instances, fake,
                                                                    shared_database):
    fake.token_delay = 0.005
    numbers = [new_number() for _ in range(8)]
    bodies = [phone_call(f"Question {i} from caller {i % 8}", numbers[i % 8]) for i in range(48)]

    def call(index):
        body = bodies[index]
        events, done = read_sse(post_chat(two_instances[index % 2], body, timeout=30))
        assert done and streamed_text(events) == "You said: " + body["messages"][-1]["content"]

    assert run_at_once(call, range(48)) == []

    def stored():
        return [row for number in numbers for row in rows(shared_database, caller=number)]

    assert wait_for(lambda: len(stored()) >= 48, 10)
    time.sleep(0.3)  # a doubled write would land by now
    assert sorted(row[0] for row in stored()) == sorted(body["call"]["id"] for body in bodies), \
        "each turn once: none lost, none doubled"
    for server in two_instances:
        assert "Traceback" not in server.log() and "memory:" not in server.log()


def test_the_turn_is_stored_with_the_original_words_and_no_nul(two_instances, shared_database):
    body = phone_call("Can I bring\u0000 my son?")
    read_sse(post_chat(two_instances[0], body))
    assert wait_for(lambda: rows(shared_database, call_id=body["call"]["id"]))
    assert rows(shared_database, call_id=body["call"]["id"]) == [
        (body["call"]["id"], body["customer"]["number"], "Can I bring my son?",
         "You said: Can I bring\u0000 my son?".replace("\u0000", ""))]


def test_instances_starting_at_once_on_an_empty_database_create_one_table(memory_database):
    sys.path.insert(0, str(ROOT / "openai-advanced"))
    try:
        memory = importlib.import_module("memory")
    finally:
        sys.path.pop(0)
    starting = threading.Barrier(8)
    errors, memories = [], []

    def start():
        starting.wait()
        try:
            memories.append(memory.PostgresMemory(memory_database, 30))
        except Exception as exc:  # collected for the assertion
            errors.append(repr(exc))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    try:
        assert errors == [] and all(m.schema_ready for m in memories), "every instance started"
        with psycopg.connect(memory_database) as db:
            assert db.execute("SELECT count(*) FROM pg_tables WHERE tablename = 'turns'"
                              ).fetchone() == (1,)
            indexes = {name for (name,) in db.execute(
                "SELECT indexname FROM pg_indexes WHERE tablename = 'turns'")}
        assert {"turns_by_caller", "turns_by_age"} <= indexes
    finally:
        for started in memories:
            started.close()


# --- a slow database ------------------------------------------------------------------------------

def test_a_slow_memory_read_does_not_stall_the_workers_other_calls(start_server, fake,
                                                                   memory_database):
    server = instance(start_server, memory_database, "slow-read", WEB_CONCURRENCY="1")
    read_sse(post_chat(server, phone_call("Warm up.")))  # the table exists, the pool is warm
    web_call = load_fixture("web-call-first-turn.json")  # no number: no memory to read
    phone = {}

    def slow_phone_call():
        started = time.monotonic()
        events, phone["done"] = read_sse(post_chat(server, phone_call("Are you open today?")))
        phone["seconds"], phone["text"] = time.monotonic() - started, streamed_text(events)

    with psycopg.connect(memory_database) as locker:
        locker.execute("LOCK TABLE turns IN ACCESS EXCLUSIVE MODE")  # held until the rollback
        waiting = threading.Thread(target=slow_phone_call)
        waiting.start()
        assert wait_for(lambda: locker.execute(
            "SELECT count(*) FROM pg_locks WHERE NOT granted").fetchone()[0] == 1), \
            "the phone call's memory read waits for the lock"
        first_words = [time_to_first_words(server, web_call)[0] for _ in range(5)]
        assert waiting.is_alive(), "the phone call was still waiting for its memory read"
        waiting.join(10)
        locker.rollback()
    assert max(first_words) < 0.3, f"the other calls waited: {first_words}"
    assert phone["done"] and phone["text"] == "You said: Are you open today?"
    assert QUERY_WAIT_SECONDS - 0.2 < phone["seconds"] < MEMORY_WAIT_SECONDS + 0.5, \
        "the read gave up in time and the call was answered without memory"


# --- the database goes away -----------------------------------------------------------------------

def test_the_server_starts_and_answers_while_postgres_is_down(start_server, own_postgres, fake):
    url = own_postgres.create_database("memory")
    own_postgres.stop()
    server = instance(start_server, url, "down-at-start", WEB_CONCURRENCY="1")
    number = new_number()
    try:
        for text in ("First call.", "Second call."):
            response = post_chat(server, phone_call(text, number))
            events, done = read_sse(response)
            assert response.status_code == 200 and done
        assert len(server.log_lines("PostgreSQL is unavailable")) == 1
        own_postgres.start()
        time.sleep(RETRY_SECONDS)

        def remembered():
            read_sse(post_chat(server, phone_call("Now?", number)))
            return wait_for(lambda: rows(url, caller=number), 1)

        assert wait_for(remembered, 10), "the table is created once PostgreSQL is reachable"
        assert len(server.log_lines("PostgreSQL is back")) == 1
    finally:
        server.stop()


def test_postgres_going_away_under_traffic_and_coming_back(start_server, own_postgres, fake):
    url = own_postgres.create_database("memory")
    server = instance(start_server, url, "outage", WEB_CONCURRENCY="1")
    workers = server.pids()
    number = new_number()
    read_sse(post_chat(server, phone_call("Before.", number)))
    assert wait_for(lambda: rows(url, caller=number))
    results, stop = [], threading.Event()

    def traffic():
        while not stop.is_set():
            started = time.monotonic()
            body = phone_call("Still there?", number)
            response = post_chat(server, body)
            events, done = read_sse(response)
            results.append((time.monotonic() - started, response.status_code, done,
                            streamed_text(events) == "You said: Still there?"))
            time.sleep(0.1)

    callers = [threading.Thread(target=traffic) for _ in range(4)]
    try:
        for caller in callers:
            caller.start()
        time.sleep(1)
        own_postgres.stop()
        down_at = len(results)
        time.sleep(2 * RETRY_SECONDS + 1)  # two retries while it is down
        during = results[down_at:]
        own_postgres.start()
        assert wait_for(lambda: server.log_lines("PostgreSQL is back"), 3 * RETRY_SECONDS)
    finally:
        stop.set()
        for caller in callers:
            caller.join(10)
    try:
        assert len(during) > 20 and all(status == 200 and done and right
                                        for _, status, done, right in results), \
            "every call is answered, without memory while PostgreSQL is down"
        assert max(seconds for seconds, *_ in during) < MEMORY_WAIT_SECONDS + 0.5
        assert len(server.log_lines("PostgreSQL is unavailable")) == 1, "one line, not one a call"
        assert len(server.log_lines("PostgreSQL is back")) == 1
        assert "Traceback" not in server.log()
        assert server.pids() == workers, "no worker was stuck and restarted"
        later = phone_call("After.", number)
        read_sse(post_chat(server, later))
        assert wait_for(lambda: rows(url, call_id=later["call"]["id"])), "memory works again"
    finally:
        server.stop()


# --- retention and forgetting ---------------------------------------------------------------------

def test_retention_and_forget_on_postgres(two_instances, fake, shared_database):
    first, second = two_instances
    number, other = new_number(), new_number()
    with psycopg.connect(shared_database) as db:
        db.execute("INSERT INTO turns (call_id, caller, user_text, assistant_text, created_at) "
                   "VALUES ('old-call', %s, 'Ancient question', 'Ancient answer', "
                   "now() - interval '40 days')", (number,))
    read_sse(post_chat(first, phone_call("Hello again.", number)))
    assert "Ancient question" not in system_prompt(fake.chat_bodies()[-1]), \
        "older than MEMORY_RETENTION_DAYS"
    assert wait_for(lambda: rows(shared_database, caller=number, user_text="Hello again."))
    assert rows(shared_database, call_id="old-call") == [], "deleted on the next write"

    read_sse(post_chat(second, phone_call("Another question.", number)))
    read_sse(post_chat(second, phone_call("Mine.", other)))
    assert wait_for(lambda: len(rows(shared_database, caller=number)) == 2)
    assert wait_for(lambda: rows(shared_database, caller=other))
    status, output = run_memory_command("forget", number, MEMORY_DATABASE_URL=shared_database)
    assert (status, output) == (0, f"Deleted 2 turns stored for {number}.\n")
    assert rows(shared_database, caller=number) == []
    assert len(rows(shared_database, caller=other)) == 1, "other numbers are kept"
    read_sse(post_chat(first, phone_call("Hello?", number)))
    assert "Earlier calls" not in system_prompt(fake.chat_bodies()[-1])


def test_forget_says_so_when_postgres_is_down(own_postgres):
    url = own_postgres.create_database("memory")
    own_postgres.stop()
    status, output = run_memory_command("forget", "+15555550123", MEMORY_DATABASE_URL=url)
    assert status == 1 and "Nothing deleted" in output and "Traceback" not in output
