"""How long openai-advanced's steps before the provider call take: knowledge lookup and memory read.

    python tests/benchmark_context.py

Runs the real Knowledge and memory classes on the shipped knowledge/ folder and a memory with some
history, over a set of caller questions, and prints the median and p95 of each step. The knowledge
search is also timed on documents in five languages (tests/fixtures/knowledge-languages, and the
same documents 50 times over) with questions in Japanese, Chinese, Korean, English and German.
Memory is measured in a temporary SQLite file and, when PostgreSQL's server binaries are
installed, in a throwaway PostgreSQL cluster over loopback (started as the tests start it, with the
pool warm).
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
LANGUAGES = TESTS / "fixtures" / "knowledge-languages"
QUESTIONS_IN_FIVE_LANGUAGES = [
    "診療時間は何時からですか？", "駐車場はありますか", "クレジットカードで払えますか",
    "你们的营业时间是什么时候？", "可以用微信支付吗？", "你们有儿童牙科吗？",
    "보험은 어떤 것을 받으시나요?", "주차장이 있나요?", "영어를 하는 직원이 있나요?",
    "What are your opening hours?", "Welche Versicherungen akzeptieren Sie?",
]


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


def measure_knowledge(folder, rounds, timings, name):
    """Build the index of `folder`, then time the search for every question in five languages."""
    started = time.perf_counter()
    knowledge = Knowledge(folder)
    timings[f"{name}: index built"] = [(time.perf_counter() - started) * 1000]
    timings[name] = []
    for _ in range(rounds):
        for question in QUESTIONS_IN_FIVE_LANGUAGES:
            started = time.perf_counter()
            knowledge.search(question)
            timings[name].append((time.perf_counter() - started) * 1000)
    return knowledge.passage_count()


def main(rounds=200):
    knowledge = Knowledge(FOLDER / "knowledge")
    timings = {}
    counts = {"five languages": measure_knowledge(LANGUAGES, rounds, timings, "five languages")}
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(50):
            for document in LANGUAGES.glob("*.md"):
                (Path(tmp) / f"{document.stem}-{n}.md").write_text(document.read_text())
        counts["x50"] = measure_knowledge(tmp, rounds, timings, "five languages x50")
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
    print(f"five languages: {counts['five languages']} passages, x50: {counts['x50']} passages, "
          f"{rounds * len(QUESTIONS_IN_FIVE_LANGUAGES)} lookups each")
    for step, values in timings.items():
        if len(values) == 1:
            print(f"{step:34s} {values[0]:.1f} ms")
        else:
            print(f"{step:34s} median {statistics.median(values):.3f} ms   "
                  f"p95 {percentile(values, 0.95):.3f} ms")


if __name__ == "__main__":
    main()
