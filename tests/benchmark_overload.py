"""Admission control at four times the load two cores serve well: 400 callers making calls back to
back against a folder with two workers, without a limit and with MAX_CONCURRENT_CALLS.

    python tests/benchmark_overload.py [--folder openai-sse] [--callers 400] [--limits 0,25,50]

It reuses benchmark.py's stand-in (200 ms to the first token, 25 ms between tokens) and its
load generator; every loop is bounded in count and time. Prints one line per limit."""

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import benchmark  # noqa: E402


async def overload(target, callers, seconds, warmup=2.5):
    """`callers` callers making calls back to back for `seconds`: the admitted calls' first words
    and how fast the refused ones heard 503, over the calls started after `warmup`."""
    start = time.perf_counter()
    results = []

    async def caller(i):
        conn, n = None, 0
        while time.perf_counter() < start + seconds and n < 1000:
            result, conn = await benchmark.one_call(target, 38, f"{i}x{n}", conn)
            results.append(result)
            n += 1
            if result.get("status") == 503:
                await asyncio.sleep(1)  # Retry-After: 1
        if conn:
            conn[1].close()

    await asyncio.wait_for(asyncio.gather(*(caller(i) for i in range(callers))), seconds + 60)
    measured = [r for r in results if r["started"] >= start + warmup]
    admitted = [r["ttft"] * 1000 for r in measured if r["ok"] and r["ttft"] is not None]
    refused = [(r["ended"] - r["started"]) * 1000 for r in measured if r.get("status") == 503]
    return admitted, refused, len(measured) - len(admitted) - len(refused)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", default="openai-sse")
    parser.add_argument("--callers", type=int, default=400)
    parser.add_argument("--seconds", type=float, default=9)
    parser.add_argument("--limits", default="0,25,50")
    args = parser.parse_args()
    fake_port = benchmark.free_port()
    fake = subprocess.Popen([sys.executable, str(benchmark.ROOT / "tests" / "fake_llm.py"),
                             "--port", str(fake_port), "--ttft", "0.2", "--token-delay", "0.025"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)
    try:
        for limit in args.limits.split(","):
            port = benchmark.free_port()
            with tempfile.TemporaryDirectory() as tmp:
                server = benchmark.start_server(args.folder, port, fake_port, tmp,
                                                MAX_CONCURRENT_CALLS=limit, WEB_CONCURRENCY="2")
                try:
                    target = benchmark.Target(args.folder, port, "/chat/completions", [])
                    admitted, refused, errors = asyncio.run(
                        overload(target, args.callers, args.seconds))
                finally:
                    server.terminate()
                    server.wait(70)
            pct = benchmark.pct
            print(f"{args.folder}, {args.callers} callers, MAX_CONCURRENT_CALLS={limit}: "
                  f"{len(admitted)} answered, first words p50 {pct(admitted, 0.5):.0f} / p99 "
                  f"{pct(admitted, 0.99):.0f} ms; {len(refused)} answered 503 in p50 "
                  f"{pct(refused, 0.5):.0f} / p99 {pct(refused, 0.99):.0f} ms; {errors} errors")
    finally:
        fake.terminate()


if __name__ == "__main__":
    main()
