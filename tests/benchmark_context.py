"""How long openai-advanced's steps before the provider call take: knowledge lookup and memory read.

    python tests/benchmark_context.py

Runs the real Knowledge and memory classes on the shipped knowledge/ folder and a memory with some
history, over a set of caller questions, and prints the median and p95 of each step. Memory is
measured in a temporary SQLite file and, when PostgreSQL's server binaries are installed, in a
throwaway PostgreSQL cluster over loopback (started as the tests start it, with the pool warm).
Under gevent's monkey-patching, as in the server's workers.
"""

from gevent import monkey

monkey.patch_all()

import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

TESTS = Path(__file__).resolve().parent
FOLDER = TESTS.parent / "openai-advanced"
sys.path[:0] = [str(FOLDER), str(TESTS)]

from conftest import PostgresCluster, postgres_bin_dir  # noqa: E402
from knowledge import Knowledge  # noqa: E402
from memory import Memory, PostgresMemory  # noqa: E402

QUESTIONS = [
    "What are your hours on Saturday?", "How much is a cleaning without insurance?",
    "Do you take Delta Dental?", "Where can I park?", "Is there a fee if I cancel late?",
    "Can I bring my five year old?",
    "Hi yeah I'd like to book a cleaning for next week", "Do you do whitening and how much is it?",
    "I have a really bad toothache and it's Sunday", "Which bus goes there?",
]
CALLERS = [f"+1555000{n:04d}" for n in range(200)]


def percentile(values, share):
    return sorted(values)[min(len(values) - 1, int(len(values) * share))]


def fill(memory):
    """Ten earlier turns for each of 200 callers."""
    for i in range(2000):
        memory.remember(f"call-{i}", CALLERS[i % 200], QUESTIONS[i % 10],
                        "An answer of a typical length.")


def measure(knowledge, memory, rounds, timings, name):
    """Time the knowledge search and `memory`'s read, one after the other, for every question."""
    for step in ("knowledge", name, f"both ({name})"):
        timings.setdefault(step, [])
    for i in range(rounds):
        for question in QUESTIONS:
            started = time.perf_counter()
            knowledge.search(question)
            middle = time.perf_counter()
            memory.recall(CALLERS[i % 200], "current-call", 5)
            ended = time.perf_counter()
            timings["knowledge"].append((middle - started) * 1000)
            timings[name].append((ended - middle) * 1000)
            timings[f"both ({name})"].append((ended - started) * 1000)


def main(rounds=200):
    knowledge = Knowledge(FOLDER / "knowledge")
    timings = {}
    with tempfile.TemporaryDirectory() as tmp:
        memory = Memory(Path(tmp) / "memory.sqlite3", retention_days=30)
        fill(memory)
        measure(knowledge, memory, rounds, timings, "memory, SQLite")
    bin_dir = postgres_bin_dir()
    if bin_dir:
        cluster = PostgresCluster(bin_dir)
        try:
            memory = PostgresMemory(cluster.create_database("benchmark"), retention_days=30)
            fill(memory)
            memory.recall(CALLERS[0])  # the pool is warm
            measure(knowledge, memory, rounds, timings, "memory, PostgreSQL")
            memory.close()
        finally:
            cluster.remove()
    print(f"{knowledge.passage_count()} passages, 2000 stored turns, "
          f"{rounds * len(QUESTIONS)} lookups per memory"
          + ("" if bin_dir else "; PostgreSQL not measured: no server binaries found"))
    for step, values in timings.items():
        print(f"{step:26s} median {statistics.median(values):.3f} ms   "
              f"p95 {percentile(values, 0.95):.3f} ms")


if __name__ == "__main__":
    main()
