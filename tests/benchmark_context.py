"""How long openai-advanced's steps before the provider call take: knowledge lookup and memory read.

    python tests/benchmark_context.py

Runs the real Knowledge and Memory classes on the shipped knowledge/ folder and a temporary memory
database with some history, over a set of caller questions, and prints the median and p95 of
each step.
"""

import statistics
import sys
import tempfile
import time
from pathlib import Path

FOLDER = Path(__file__).resolve().parent.parent / "openai-advanced"
sys.path.insert(0, str(FOLDER))

from knowledge import Knowledge  # noqa: E402
from memory import Memory  # noqa: E402

QUESTIONS = [
    "What are your hours on Saturday?", "How much is a cleaning without insurance?",
    "Do you take Delta Dental?", "Where can I park?", "Is there a fee if I cancel late?",
    "Can I bring my five year old?",
    "Hi yeah I'd like to book a cleaning for next week", "Do you do whitening and how much is it?",
    "I have a really bad toothache and it's Sunday", "Which bus goes there?",
]


def percentile(values, share):
    return sorted(values)[min(len(values) - 1, int(len(values) * share))]


def main(rounds=200):
    knowledge = Knowledge(FOLDER / "knowledge")
    with tempfile.TemporaryDirectory() as tmp:
        memory = Memory(Path(tmp) / "memory.sqlite3", retention_days=30)
        callers = [f"+1555000{n:04d}" for n in range(200)]
        for i in range(2000):  # ten earlier turns for each of 200 callers
            memory.remember(f"call-{i}", callers[i % 200], QUESTIONS[i % 10],
                            "An answer of a typical length.")
        timings = {"knowledge": [], "memory": [], "both": []}
        for i in range(rounds):
            for question in QUESTIONS:
                started = time.perf_counter()
                knowledge.search(question)
                middle = time.perf_counter()
                memory.recall(callers[i % 200], "current-call", 5)
                ended = time.perf_counter()
                timings["knowledge"].append((middle - started) * 1000)
                timings["memory"].append((ended - middle) * 1000)
                timings["both"].append((ended - started) * 1000)
    print(f"{knowledge.passage_count()} passages, 2000 stored turns, "
          f"{rounds * len(QUESTIONS)} lookups")
    for step, values in timings.items():
        print(f"{step:10s} median {statistics.median(values):.3f} ms   "
              f"p95 {percentile(values, 0.95):.3f} ms")


if __name__ == "__main__":
    main()
