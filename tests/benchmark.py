"""Benchmark: what each server adds to a call's time to first token, how many calls it holds, its
CPU per relayed chunk, how fast a hang-up reaches the provider, and its memory.

    python tests/benchmark.py                 # all three folders, about 5 minutes
    python tests/benchmark.py --quick         # a smoke run: two load levels, short windows

It starts the stand-in provider (tests/fake_llm.py in its own process: 200 ms to the first token, 25
ms between tokens, 40 tokens per answer) and each server folder under its own gunicorn.conf.py, all
on 127.0.0.1, and drives them with an asyncio load generator in this process. Every loop is bounded
by a count and a deadline. Each load level is run against the stand-in directly too: "added" figures
are the server's minus the direct ones. The table is printed and written to benchmark-results.md.
"""

import argparse
import asyncio
import json
import os
import platform
import re
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TTFT, TOKEN_DELAY = 0.2, 0.025
# The stand-in answers "You said: <the words>": 40 tokens, 42 chunks with the role and finish ones.
WORDS = 38
CHUNKS_PER_CALL = WORDS + 4
TOKEN = re.compile(rb'"content": ?"[^"]')
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pids):
    """User + system CPU of these processes so far."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / CLK_TCK
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def rss_mib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def pct(values, share):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * share))] if values else float("nan")


class Target:
    """Where calls go: the stand-in directly, or a server."""

    def __init__(self, name, port, path, pids):
        self.name, self.port, self.path, self.pids = name, port, path, pids


def request_bytes(target, words=WORDS, tag="0"):
    """A Vapi-like request; the stand-in called directly gets only OpenAI's fields (it rejects
    any other, as OpenAI does)."""
    text = " ".join([f"t{tag}"] + [f"w{i}" for i in range(words - 1)])
    body = {"model": "gpt-4o-mini", "stream": True, "temperature": 0.5, "max_tokens": 250,
            "messages": [{"role": "system", "content": "You are a receptionist."},
                         {"role": "user", "content": text}]}
    if target.name != "stand-in":
        body["call"] = {"id": f"bench-{tag}",
                        "customer": {"number": f"+1555{abs(hash(tag)) % 10**7:07d}"}}
    body = json.dumps(body).encode()
    path = target.path
    return (b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % (path.encode(), len(body)) + body)


async def one_call(target, words=WORDS, tag="0", conn=None, on_chunks=None):
    """One streaming call over a (reused) connection. Returns (result dict, connection or None)."""
    started = time.perf_counter()
    if conn is None:
        conn = await asyncio.open_connection("127.0.0.1", target.port)
    reader, writer = conn
    result = {"started": started, "ttft": None, "chunks": 0, "ok": False}
    try:
        writer.write(request_bytes(target, words, tag))
        status = await reader.readline()
        headers = {}
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b""):
                break
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        result["status"] = int(status.split()[1])
        data = b""
        if headers.get("transfer-encoding") == "chunked":
            while True:
                size = int((await reader.readline()).strip().split(b";")[0], 16)
                piece = await reader.readexactly(size + 2)
                if size == 0:
                    break
                data += piece
                events = piece.count(b"data: ")
                if result["ttft"] is None and TOKEN.search(piece):
                    result["ttft"] = time.perf_counter() - started
                result["chunks"] += events
                if on_chunks:
                    on_chunks(events)
        else:
            data = await reader.readexactly(int(headers.get("content-length", 0)))
            result["ttft"] = time.perf_counter() - started if TOKEN.search(data) else None
            result["chunks"] = data.count(b"data: ")
            if on_chunks:
                on_chunks(result["chunks"])
        result["ok"] = (result["status"] == 200 and b"data: [DONE]" in data
                        and b'"error"' not in data)
        result["chunks"] -= 1  # [DONE] is not a chunk
        if on_chunks:
            on_chunks(-1)
        if headers.get("connection", "").lower() == "close":
            writer.close()
            conn = None
    except (OSError, ValueError, asyncio.IncompleteReadError) as exc:
        result["error"] = type(exc).__name__
        writer.close()
        conn = None
    result["ended"] = time.perf_counter()
    return result, conn


async def closed_loop(target, clients, seconds, warmup, words=WORDS):
    """`clients` callers, each making calls back to back for `seconds`; the statistics cover the
    calls started after `warmup`."""
    start = time.perf_counter()
    deadline = start + seconds
    window = {"chunks": 0, "calls": 0}
    results = []

    def count(n):
        if time.perf_counter() >= start + warmup:
            window["chunks"] += n
            window["calls"] += n < 0  # -1 marks the end of a call

    async def caller(i):
        await asyncio.sleep(i * min(1.0, warmup / 2) / clients)  # stagger the starts
        conn, n = None, 0
        while time.perf_counter() < deadline and n < 1000:
            result, conn = await one_call(target, words, f"{i}x{n}", conn, count)
            results.append(result)
            n += 1
        if conn:
            conn[1].close()

    tasks = [asyncio.ensure_future(caller(i)) for i in range(clients)]
    await asyncio.sleep(warmup)
    cpu0, self0 = cpu_seconds(target.pids), resource.getrusage(resource.RUSAGE_SELF)
    wall0 = time.perf_counter()
    fake0 = cpu_seconds([FAKE_PID])
    await asyncio.sleep(max(0.0, deadline - time.perf_counter()))
    cpu1, self1 = cpu_seconds(target.pids), resource.getrusage(resource.RUSAGE_SELF)
    wall1 = time.perf_counter()
    fake1 = cpu_seconds([FAKE_PID])
    rss = [rss_mib(pid) for pid in target.pids[1:]] if target.name != "stand-in" else []
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
    measured = [r for r in results if r["started"] >= start + warmup]
    ok = [r for r in measured if r["ok"] and r["ttft"] is not None]
    wall = wall1 - wall0
    return {
        "clients": clients, "calls": len(measured), "errors": len(measured) - len(ok),
        "ttfts": [r["ttft"] * 1000 for r in ok],
        # CPU is counted per answer of CHUNKS_PER_CALL provider chunks (basic sends them as one)
        "chunks": window["calls"] * CHUNKS_PER_CALL,
        "server_cpu": cpu1 - cpu0, "fake_cpu_share": (fake1 - fake0) / wall,
        "loadgen_cpu_share": (self1.ru_utime + self1.ru_stime
                              - self0.ru_utime - self0.ru_stime) / wall,
        "rss": rss, "wall": wall,
    }


def fake_control(path, plan=None):
    data = json.dumps(plan).encode() if plan is not None else None
    request = urllib.request.Request(f"http://127.0.0.1:{FAKE_PORT}/_fake/{path}", data=data,
                                     method="POST" if data else "GET")
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.loads(response.read())


async def hang_up_propagation(target, before_first_token, trials):
    """Milliseconds from the caller hanging up to the stand-in seeing its stream closed."""
    delays = []
    for _ in range(trials):
        fake_control("reset")
        if before_first_token:
            fake_control("script", {"ttft": 5})
        reader, writer = await asyncio.open_connection("127.0.0.1", target.port)
        writer.write(request_bytes(target))
        deadline = time.monotonic() + 3
        if before_first_token:
            while not fake_control("streams") and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)
        else:  # a few chunks in (basic sends it all at once, when the provider has finished)
            seen = b""
            while not TOKEN.search(seen) and time.monotonic() < deadline:
                seen += await asyncio.wait_for(reader.read(65536), 3)
            await asyncio.sleep(0.1)
        hung_up_at = time.monotonic()
        writer.transport.abort()
        stream = None
        while time.monotonic() < hung_up_at + 6:
            streams = fake_control("streams")
            if streams and streams[-1]["closed_at"]:
                stream = streams[-1]
                break
            await asyncio.sleep(0.005)
        if stream is None:
            delays.append(float("inf"))
        elif before_first_token or not stream["finished"]:  # basic: complete before its 1st byte
            delays.append((stream["closed_at"] - hung_up_at) * 1000)
    fake_control("reset")
    return delays


def start_server(folder, port, fake_port, tmp, cwd=None, base_url=None, **settings):
    """The folder under gunicorn (the repository's, or the copy in `cwd`), on the stand-in at
    `fake_port` (or `base_url`); no MAX_CONCURRENT_CALLS unless `settings` set one: the benchmark
    measures what the server holds."""
    base_url = base_url or f"http://127.0.0.1:{fake_port}/v1"
    env = {**os.environ, "PORT": str(port), "OPENAI_BASE_URL": base_url,
           "OPENAI_API_KEY": "sk-benchmark", "CUSTOM_LLM_API_KEY": "", "OPENAI_MODEL": "",
           "LOG_LEVEL": "WARNING", "MAX_CONCURRENT_CALLS": "0",
           "OPENAI_MAX_RETRIES": "0", "MEMORY_DB_PATH": str(Path(tmp) / f"{folder}-memory.sqlite3"),
           **settings}
    process = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "app:app", "--bind", f"127.0.0.1:{port}"],
        cwd=cwd or ROOT / folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).read()
            return process
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"{folder} did not start")


async def sequential_ttfts(target, calls):
    results = []
    for i in range(calls):
        result, conn = await one_call(target, words=3, tag=f"s{i}")
        if conn:
            conn[1].close()
        if result["ok"]:
            results.append(result["ttft"] * 1000)
    return results


async def measure(args, folders):
    direct = Target("stand-in", FAKE_PORT, "/v1/chat/completions", [])
    levels = args.levels
    report = {"direct": {}, "servers": {}}
    print(f"stand-in: sequential calls, then {levels} concurrent callers for "
          f"{args.seconds:.0f} s each", flush=True)
    report["direct"]["one"] = await sequential_ttfts(direct, args.sequential)
    for clients in levels:
        report["direct"][clients] = await closed_loop(direct, clients, args.seconds, args.warmup)
        print(f"  {clients:4d} callers: "
              f"p50 {statistics.median(report['direct'][clients]['ttfts']):.1f} ms, "
              f"stand-in CPU {report['direct'][clients]['fake_cpu_share'] * 100:.0f}%", flush=True)
    for folder in folders:
        port = free_port()
        process = start_server(folder, port, FAKE_PORT, args.tmp)
        try:
            target = Target(folder, port, "/chat/completions",
                            [process.pid] + children(process.pid))
            for _ in range(2):  # warm every worker up
                await asyncio.gather(*(one_call(target, words=3, tag=f"w{i}") for i in range(20)))
            entry = {"idle_rss": [rss_mib(pid) for pid in target.pids[1:]]}
            print(f"{folder}: sequential calls, {levels} concurrent callers, hang-ups", flush=True)
            entry["one"] = await sequential_ttfts(target, args.sequential)
            for clients in levels:
                entry[clients] = await closed_loop(target, clients, args.seconds, args.warmup)
                stats = entry[clients]
                print(f"  {clients:4d} callers: {stats['calls']} calls, {stats['errors']} errors, "
                      f"p99 {pct(stats['ttfts'], 0.99):.1f} ms, CPU/1000 chunks "
                      f"{stats['server_cpu'] / max(1, stats['chunks']) * 1000:.3f} s", flush=True)
            entry["hangup_mid"] = await hang_up_propagation(target, False, args.trials)
            entry["hangup_before"] = await hang_up_propagation(target, True, args.trials)
            report["servers"][folder] = entry
        finally:
            process.send_signal(signal.SIGQUIT)
            process.wait(15)
    return report


def render(report, args):
    direct = report["direct"]
    base_one = statistics.median(direct["one"])
    lines = [
        f"Benchmark run {time.strftime('%Y-%m-%d %H:%M')} UTC on {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, "
        + ", ".join(f"{p} {metadata.version(p)}" for p in ("flask", "gunicorn", "gevent", "openai"))
        + ".",
        f"Stand-in: {TTFT * 1000:.0f} ms to first token, {TOKEN_DELAY * 1000:.0f} ms between "
        f"tokens, 40 tokens ({CHUNKS_PER_CALL} chunks) per answer; load levels run "
        f"{args.seconds:.0f} s each, measured after {args.warmup:.1f} s. Added = server minus "
        "stand-in called directly at the same level.",
        "",
        "| server | added TTFT, 1 call p50 / p95 / p99 (ms) | "
        "added TTFT, 100 calls p50 / p95 / p99 (ms) | "
        "streams held (0 errors, p99 TTFT < own p50 + 50 ms) | "
        "CPU s per 1000 chunks at 100 / 300 calls | "
        "hang-up mid-stream → provider closed, median / max (ms) | "
        "hang-up before 1st token → closed, median / max (ms) | "
        "RSS per worker idle / at 300 (MiB) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ladders = []
    for folder, entry in report["servers"].items():
        one = entry["one"]
        one_txt = " / ".join(f"{pct(one, q) - base_one:.1f}" for q in (0.5, 0.95, 0.99))
        hundred = entry.get(100)
        if hundred:
            base = statistics.median(direct[100]["ttfts"])
            hundred_txt = " / ".join(f"{pct(hundred['ttfts'], q) - base:.1f}"
                                     for q in (0.5, 0.95, 0.99))
        else:
            hundred_txt = "-"
        # Held: no errors, and p99 TTFT within 50 ms of the server's own p50 at the lightest level
        # (for the streaming servers that is the stand-in's TTFT plus ~2 ms; basic waits for whole
        # answers by design).
        held, baseline = 0, pct(entry[args.levels[0]]["ttfts"], 0.5)
        for clients in args.levels:
            stats = entry[clients]
            p99 = pct(stats["ttfts"], 0.99)
            if stats["errors"] == 0 and stats["calls"] and p99 - baseline < 50:
                held = clients
        cpu = " / ".join(f"{entry[c]['server_cpu'] / max(1, entry[c]['chunks']) * 1000:.3f}"
                         if c in entry else "-" for c in (100, 300))
        mid, before = entry["hangup_mid"], entry["hangup_before"]
        mid_txt = (f"{statistics.median(mid):.0f} / {max(mid):.0f}" if mid
                   else "n/a: answer complete before 1st byte")
        rss300 = entry[300]["rss"] if 300 in entry else []
        lines.append(
            f"| {folder} | {one_txt} | {hundred_txt} | {held} of {max(args.levels)} tried | "
            f"{cpu} | "
            f"{mid_txt} | {statistics.median(before):.0f} / {max(before):.0f} | "
            f"{' + '.join(f'{r:.0f}' for r in entry['idle_rss'])} / "
            f"{' + '.join(f'{r:.0f}' for r in rss300) or '-'} |")
        ladders.append(f"\n{folder}: callers | calls | errors | TTFT p50 / p99 (ms) | "
                       f"added p99 (ms) | server CPU per 1000 chunks (s) | stand-in CPU | "
                       f"load generator CPU")
        for clients in args.levels:
            stats, base = entry[clients], statistics.median(direct[clients]["ttfts"])
            ladders.append(
                f"  {clients:4d} | {stats['calls']:5d} | {stats['errors']:3d} | "
                f"{pct(stats['ttfts'], 0.5):.1f} / "
                f"{pct(stats['ttfts'], 0.99):.1f} | {pct(stats['ttfts'], 0.99) - base:.1f} | "
                f"{stats['server_cpu'] / max(1, stats['chunks']) * 1000:.3f} | "
                f"{stats['fake_cpu_share'] * 100:.0f}% | {stats['loadgen_cpu_share'] * 100:.0f}%")
    ladders.append("\nstand-in called directly: callers | calls | errors | TTFT p50 / p99 (ms) | "
                   "its CPU per 1000 chunks (s) | its CPU | load generator CPU")
    for clients in args.levels:
        stats = direct[clients]
        fake_cpu = stats['fake_cpu_share'] * stats['wall'] / max(1, stats['chunks']) * 1000
        ladders.append(f"  {clients:4d} | {stats['calls']:5d} | {stats['errors']:3d} | "
                       f"{pct(stats['ttfts'], 0.5):.1f} / {pct(stats['ttfts'], 0.99):.1f} | "
                       f"{fake_cpu:.3f}"
                       f" | {stats['fake_cpu_share'] * 100:.0f}% | "
                       f"{stats['loadgen_cpu_share'] * 100:.0f}%")
    return "\n".join(lines) + "\n" + "\n".join(ladders) + "\n"


def main():
    global FAKE_PORT, FAKE_PID
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folders", nargs="+", default=["basic", "openai-sse", "openai-advanced"])
    parser.add_argument("--quick", action="store_true", help="two load levels, short windows")
    parser.add_argument("--output", default="benchmark-results.md")
    args = parser.parse_args()
    args.levels = [50, 100] if args.quick else [50, 100, 200, 300, 400, 600]
    args.seconds, args.warmup = (4.0, 1.5) if args.quick else (9.0, 2.5)
    args.sequential, args.trials = (10, 3) if args.quick else (30, 10)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(65536, hard), hard))  # hundreds of sockets
    import tempfile
    with tempfile.TemporaryDirectory() as args.tmp:
        FAKE_PORT = free_port()
        fake = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_llm.py"),
                                 "--port", str(FAKE_PORT), "--ttft", str(TTFT),
                                 "--token-delay", str(TOKEN_DELAY), "--keep", "200"],
                                stdout=subprocess.DEVNULL)
        FAKE_PID = fake.pid
        time.sleep(1)
        try:
            report = asyncio.run(measure(args, args.folders))
        finally:
            fake.terminate()
    text = render(report, args)
    print("\n" + text)
    Path(args.output).write_text(text)
    Path(args.output).with_suffix(".json").write_text(json.dumps(report, default=str))
    print(f"written to {args.output}")


if __name__ == "__main__":
    main()
