"""Benchmark of openai-advanced's second provider: what a hedge saves, what an idle one costs.

    python tests/benchmark_fallback.py          # about 1 minute

1. Time to first token when the primary takes 5 s to its first token, without a fallback and with a
   hedge after 1 s to a fallback that takes 200 ms (sequential calls).
2. CPU per 1000 relayed chunks at 100 callers with a fast primary (200 ms), with no fallback and
   with a fallback configured but never used.
Stand-ins and servers run on 127.0.0.1 (tests/fake_llm.py, gunicorn with the folder's own config);
every loop is bounded by a count and a deadline.
"""

import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import benchmark
from benchmark import (ROOT, Target, children, closed_loop, free_port, one_call, pct,
                       sequential_ttfts)


def start_stand_in(ttft):
    port = free_port()
    process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_llm.py"), "--port",
                                str(port), "--ttft", str(ttft), "--token-delay", "0.025",
                                "--keep", "200"], stdout=subprocess.DEVNULL)
    return port, process


def start_advanced(tmp, primary_port, **env):
    port = free_port()
    full_env = {**os.environ, "PORT": str(port), "OPENAI_API_KEY": "sk-benchmark",
                "OPENAI_BASE_URL": f"http://127.0.0.1:{primary_port}/v1", "LOG_LEVEL": "WARNING",
                "OPENAI_MAX_RETRIES": "0", "CUSTOM_LLM_API_KEY": "", "OPENAI_MODEL": "",
                "MAX_CONCURRENT_CALLS": "0", "OPENAI_TIMEOUT_SECONDS": "15",
                "FALLBACK_BASE_URL": "", "HEDGE_AFTER_MS": "1500",
                "MEMORY_DB_PATH": str(Path(tmp) / f"memory-{port}.sqlite3"), **env}
    process = subprocess.Popen([sys.executable, "-m", "gunicorn", "app:app", "--bind",
                                f"127.0.0.1:{port}"], cwd=ROOT / "openai-advanced", env=full_env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
            return Target("openai-advanced", port, "/chat/completions",
                          [process.pid] + children(process.pid)), process
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("openai-advanced did not start")


def stop(process):
    process.send_signal(signal.SIGQUIT)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()


async def measure(tmp):
    slow_port, slow = start_stand_in(5.0)
    fast_port, fast = start_stand_in(0.2)
    fallback_port, fallback = start_stand_in(0.2)
    benchmark.FAKE_PID = fast.pid
    lines, cpu_lines = [], []
    try:
        time.sleep(1)
        fallback_url = f"http://127.0.0.1:{fallback_port}/v1"
        for label, env in [("no fallback", {}),
                           ("hedge after 1 s", {"FALLBACK_BASE_URL": fallback_url,
                                                "HEDGE_AFTER_MS": "1000"})]:
            target, process = start_advanced(tmp, slow_port, **env)
            try:
                values = await sequential_ttfts(target, 6)
            finally:
                stop(process)
            lines.append(f"| primary 5 s to its first token, {label} | "
                         f"{statistics.median(values):.0f} | {max(values):.0f} | {len(values)} |")
        for label, env in [("no fallback", {}),
                           ("fallback configured, unused", {"FALLBACK_BASE_URL": fallback_url})]:
            target, process = start_advanced(tmp, fast_port, **env)
            try:
                for _ in range(2):  # warm every worker up
                    await asyncio.gather(*(one_call(target, words=3, tag=f"w{i}")
                                           for i in range(20)))
                stats = await closed_loop(target, 100, 9.0, 2.5)
            finally:
                stop(process)
            cpu = stats["server_cpu"] / max(1, stats["chunks"]) * 1000
            cpu_lines.append(f"| {label} | {cpu:.3f} | {pct(stats['ttfts'], 0.99):.0f} | "
                             f"{stats['calls']} / {stats['errors']} |")
    finally:
        for process in (slow, fast, fallback):
            process.terminate()
    return lines, cpu_lines


def main():
    with tempfile.TemporaryDirectory() as tmp:
        lines, cpu_lines = asyncio.run(measure(tmp))
    print(f"Fallback benchmark {time.strftime('%Y-%m-%d %H:%M')} UTC, {os.cpu_count()} cores; "
          "stand-ins: 25 ms between tokens; fallback 200 ms to its first token.\n")
    print("| time to first token | median (ms) | max (ms) | calls |\n|---|---|---|---|")
    print("\n".join(lines))
    print("\n| 100 callers, primary 200 ms to first token | server CPU s per 1000 chunks | "
          "TTFT p99 (ms) | calls / errors |\n|---|---|---|---|")
    print("\n".join(cpu_lines))


if __name__ == "__main__":
    main()
