"""Soak: many concurrent calls for minutes, a share of the callers hanging up at random moments.

    python tests/soak.py                          # each folder: 120 callers for 120 s, 30% hang up
    python tests/soak.py --seconds 30 --folders openai-sse

Checks, per server: zero errors for the calls that stay, every finished call got exactly its own
words, zero provider streams left open at the end, RSS at the start and the end, and for
openai-advanced that every finished turn is stored in memory exactly once (and no interrupted one
more than once). Traffic goes to 127.0.0.1 only; every caller stops at the deadline. Exits non-zero
if a check fails.
"""

import argparse
import asyncio
import json
import random
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import benchmark as bench

EVENT = re.compile(rb"data: (\{.*?\})\n\n")


async def soak_call(target, tag, hang_up_after):
    """One call; hangs up after `hang_up_after` seconds if given. Returns (outcome, detail)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", target.port)
    request = bench.request_bytes(target, bench.WORDS, tag)
    writer.write(request.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1))
    data = b""

    async def read_to_done():
        nonlocal data
        while b"data: [DONE]" not in data:
            piece = await reader.read(65536)
            if not piece:
                break
            data += piece

    try:
        if hang_up_after is not None:
            try:
                await asyncio.wait_for(read_to_done(), hang_up_after)
            except asyncio.TimeoutError:
                writer.transport.abort()
                return "hung_up", None
        else:
            await asyncio.wait_for(read_to_done(), 30)
    except (OSError, asyncio.TimeoutError) as exc:
        writer.transport.abort()
        return "error", type(exc).__name__
    writer.close()
    if b" 200 " not in data.split(b"\r\n", 1)[0] or b"data: [DONE]" not in data:
        return "error", data[:200]
    events = [json.loads(match) for match in EVENT.findall(data)]
    if any("error" in event for event in events):
        return "error", "error event"
    text = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
    expected = "You said: " + " ".join([f"t{tag}"] + [f"w{i}" for i in range(bench.WORDS - 1)])
    return ("finished", None) if text == expected else ("error", f"wrong content: {text[:80]!r}")


async def soak(target, callers, seconds, hang_up_share, seed):
    rng = random.Random(seed)
    deadline = time.perf_counter() + seconds
    outcomes = {"finished": [], "hung_up": [], "error": []}

    async def caller(i):
        await asyncio.sleep(i / callers)  # ramp up over a second
        n = 0
        while time.perf_counter() < deadline and n < 10_000:
            tag = f"{i}x{n}"
            # before the first token (0-0.2 s) or while the answer streams (0.2-1.2 s)
            hang_up_after = rng.uniform(0.0, 1.2) if rng.random() < hang_up_share else None
            outcome, detail = await soak_call(target, tag, hang_up_after)
            outcomes[outcome].append((tag, detail))
            n += 1

    await asyncio.gather(*(caller(i) for i in range(callers)))
    return outcomes


async def run_folder(folder, args, tmp):
    port = bench.free_port()
    process = bench.start_server(folder, port, bench.FAKE_PORT, tmp)
    try:
        target = bench.Target(folder, port, "/chat/completions",
                              [process.pid] + bench.children(process.pid))
        for _ in range(2):
            await asyncio.gather(*(bench.one_call(target, words=3, tag=f"warm{i}")
                                   for i in range(20)))
        rss_start = [bench.rss_mib(pid) for pid in target.pids[1:]]
        rss_samples = []

        # total RSS of the workers every tenth of the run: flat, or still growing?
        async def sample_rss():
            for _ in range(10):
                await asyncio.sleep(args.seconds / 10)
                rss_samples.append(round(sum(bench.rss_mib(pid) for pid in target.pids[1:]), 1))

        sampler = asyncio.ensure_future(sample_rss())
        outcomes = await soak(target, args.callers, args.seconds, args.hang_up_share, args.seed)
        await sampler
        await asyncio.sleep(3)  # let hung-up streams and memory writes settle
        rss_end = [bench.rss_mib(pid) for pid in target.pids[1:]]
        open_streams = bench.fake_control("stats")["open"]
        result = {"folder": folder, "finished": len(outcomes["finished"]),
                  "hung_up": len(outcomes["hung_up"]), "errors": outcomes["error"][:5],
                  "error_count": len(outcomes["error"]),
                  "open_provider_streams": open_streams, "rss_start": rss_start, "rss_end": rss_end,
                  "rss_total_during_run": rss_samples}
        if folder == "openai-advanced":
            database = Path(tmp) / f"{folder}-memory.sqlite3"
            with sqlite3.connect(database) as db:
                rows = dict(db.execute("SELECT call_id, count(*) FROM turns GROUP BY call_id")
                            .fetchall())
            finished = [f"bench-{tag}" for tag, _ in outcomes["finished"]]
            result["turns_stored_once"] = sum(rows.get(call_id) == 1 for call_id in finished)
            result["turns_missing_or_duplicated"] = len(finished) - result["turns_stored_once"]
            result["interrupted_stored_twice"] = sum(rows.get(f"bench-{tag}", 0) > 1
                                                     for tag, _ in outcomes["hung_up"])
        return result
    finally:
        process.terminate()
        process.wait(15)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folders", nargs="+", default=["basic", "openai-sse", "openai-advanced"])
    parser.add_argument("--callers", type=int, default=120)
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--hang-up-share", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    bench.FAKE_PORT = bench.free_port()
    fake = subprocess.Popen([sys.executable, str(bench.ROOT / "tests" / "fake_llm.py"), "--port",
                             str(bench.FAKE_PORT), "--ttft", str(bench.TTFT),
                             "--token-delay", str(bench.TOKEN_DELAY), "--keep", "200"],
                            stdout=subprocess.DEVNULL)
    bench.FAKE_PID = fake.pid
    time.sleep(1)
    failed = False
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for folder in args.folders:
                bench.fake_control("reset")
                result = asyncio.run(run_folder(folder, args, tmp))
                print(json.dumps(result), flush=True)
                failed |= bool(result["error_count"] or result["open_provider_streams"]
                               or result.get("turns_missing_or_duplicated")
                               or result.get("interrupted_stored_twice"))
    finally:
        fake.terminate()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
