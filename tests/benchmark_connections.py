"""Benchmark: what a turn waits for when it finds no open connection to the provider.

    python tests/benchmark_connections.py                  # about 4 minutes
    python tests/benchmark_connections.py --before bd9630d --rtt-ms 40

The stand-in provider (tests/fake_llm.py) speaks HTTPS with a throwaway self-signed certificate
made at run time by the `openssl` command, which the servers trust through SSL_CERT_FILE. Between
a server and the stand-in runs a TCP proxy on 127.0.0.1 that holds every byte RTT/2 each way, and a
new connection's first bytes one RTT more (the TCP handshake the proxy's local accept skips), so a
new connection costs what it costs to a real provider: a TCP handshake and a TLS 1.3 handshake,
two round trips, before the request is even sent. The stand-in answers at once (no model time).
A hang-up is timed to the moment the server's FIN reaches the proxy: the wire, before the RTT/2.

For each streaming folder, in this checkout and as it was at `--before` (extracted with `git
archive` into a temporary folder), a fresh one-worker server is timed: its first turn, turns back
to back, turns after a 10 s pause, and turns 1 s after a caller hung up mid-answer (with how long
the hang-up took to reach the stand-in). Every loop is bounded by a count.
"""

import argparse
import io
import asyncio
import os
import shutil
import signal
import ssl
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

from benchmark import ROOT, TOKEN, Target, free_port, one_call, request_bytes, start_server
from fake_llm import FakeLLM

FOLDERS = ("openai-sse", "openai-advanced")


def make_certificate(folder):
    """A self-signed certificate for 127.0.0.1 and its key, made with the openssl command."""
    if not shutil.which("openssl"):
        sys.exit("this benchmark needs the `openssl` command (Debian: apt-get install openssl)")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


async def delayed_proxy(listen_port, upstream_port, one_way, hang_ups):
    """Accept on listen_port, connect each client to upstream_port, and deliver every piece of data
    `one_way` seconds after it was read, in order, in both directions; a new connection's first
    bytes 2 * one_way later still. Appends to `hang_ups` when a client closed its connection."""

    async def pump(reader, writer, from_client):
        queue = asyncio.Queue()

        async def deliver():
            while True:
                due, data = await queue.get()
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                if not data:
                    writer.close()
                    return
                writer.write(data)
                await writer.drain()

        delivery = asyncio.ensure_future(deliver())
        while True:
            try:
                data = await reader.read(65536)
            except ConnectionError:  # a reset: closed with unread data (the rest of an answer)
                data = b""
            if not data and from_client:
                hang_ups.append(time.monotonic())
            await queue.put((time.monotonic() + one_way, data))
            if not data:
                break
        try:
            await delivery
        except ConnectionError:
            pass

    async def handle(client_reader, client_writer):
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1",
                                                                             upstream_port)
        except OSError:
            client_writer.close()
            return
        await asyncio.sleep(2 * one_way)  # the SYN and SYN-ACK a real network would carry
        await asyncio.gather(pump(client_reader, upstream_writer, True),
                             pump(upstream_reader, client_writer, False), return_exceptions=True)

    return await asyncio.start_server(handle, "127.0.0.1", listen_port)


async def ttft_ms(target, tag):
    result, conn = await one_call(target, words=3, tag=tag)
    if conn:
        conn[1].close()
    return result["ttft"] * 1000 if result["ok"] else float("nan")


async def hang_up_ms(target, fake, hang_ups):
    """Hang up a few chunks into a long answer; ms until the server closed the provider's
    connection (its FIN at the proxy)."""
    fake.script({"text": " ".join(["word"] * 400), "token_delay": 0.02})
    reader, writer = await asyncio.open_connection("127.0.0.1", target.port)
    writer.write(request_bytes(target, words=3, tag="hang-up"))
    seen = b""
    while not TOKEN.search(seen):
        seen += await asyncio.wait_for(reader.read(65536), 5)
    await asyncio.sleep(0.1)
    hung_up_at = time.monotonic()
    writer.transport.abort()
    deadline = hung_up_at + 5
    while not (hang_ups and hang_ups[-1] > hung_up_at) and time.monotonic() < deadline:
        await asyncio.sleep(0.001)
    closed = [at for at in hang_ups if at > hung_up_at]
    return (closed[0] - hung_up_at) * 1000 if closed else float("inf")


async def measure_one(folder_path, name, base_url, cert, fake, hang_ups, tmp, pauses):
    port = free_port()
    process = start_server(Path(folder_path).name, port, None, tmp, cwd=folder_path,
                           base_url=base_url, SSL_CERT_FILE=str(cert), WEB_CONCURRENCY="1",
                           MEMORY_DB_PATH=str(Path(tmp) / f"memory-{port}.sqlite3"))
    target = Target(name, port, "/chat/completions", [])
    figures = {}
    try:
        await asyncio.sleep(1)  # as a first call would come a moment after the worker started
        figures["first turn of a worker"] = [await ttft_ms(target, "first")]
        figures["back to back"] = [await ttft_ms(target, f"b{i}") for i in range(5)]
        after_pause = []
        for i in range(pauses):
            await asyncio.sleep(10)
            after_pause.append(await ttft_ms(target, f"p{i}"))
        figures["after a 10 s pause"] = after_pause
        after_hang_up, closes = [], []
        for i in range(5):
            closes.append(await hang_up_ms(target, fake, hang_ups))
            await asyncio.sleep(1)
            after_hang_up.append(await ttft_ms(target, f"h{i}"))
        figures["1 s after a hang-up"] = after_hang_up
        figures["hang-up to the provider"] = closes
    finally:
        process.send_signal(signal.SIGQUIT)
        process.wait(15)
    return figures


def extract(ref, folder):
    """The repository's streaming folders as they were at `ref`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, *FOLDERS], check=True,
                             capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder


async def measure(args, tmp):
    cert, key = make_certificate(tmp)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    fake = FakeLLM(ssl_context=context).start()
    proxy_port = free_port()
    ready, hang_ups = threading.Event(), []

    async def start_proxy():
        await delayed_proxy(proxy_port, fake.port, args.rtt_ms / 2000, hang_ups)
        ready.set()

    asyncio.run_coroutine_threadsafe(start_proxy(), fake.loop)  # the stand-in's own thread
    ready.wait(5)
    base_url = f"https://127.0.0.1:{proxy_port}/v1"
    before = extract(args.before, tmp / "before")
    results = {}
    try:
        for folder in args.folders:
            for label, path in ((f"before ({args.before})", before / folder),
                                ("after", ROOT / folder)):
                print(f"{folder}, {label} ...", flush=True)
                results[(folder, label)] = await measure_one(path, folder, base_url, cert, fake,
                                                             hang_ups, tmp, args.pauses)
    finally:
        fake.stop()
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="bd9630d", help="the commit to compare with")
    parser.add_argument("--rtt-ms", type=float, default=40.0, help="the simulated round trip")
    parser.add_argument("--pauses", type=int, default=3, help="turns after a 10 s pause")
    parser.add_argument("--folders", nargs="+", default=list(FOLDERS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = asyncio.run(measure(args, Path(tmp)))
    print(f"\nConnections benchmark {time.strftime('%Y-%m-%d %H:%M')} UTC, {os.cpu_count()} cores; "
          f"the stand-in over HTTPS behind a {args.rtt_ms:.0f} ms round trip, answering at once.\n")
    print("| folder | code | TTFT (ms): first turn of a worker | back to back | after a 10 s "
          "pause | 1 s after a hang-up | hang-up to the provider (ms) |\n"
          "|---|---|---|---|---|---|---|")
    for (folder, label), figures in results.items():
        cells = [f"{statistics.median(values):.0f}" + (
            f" ({min(values):.0f}-{max(values):.0f})" if len(values) > 1 else "")
            for values in figures.values()]
        print(f"| {folder} | {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
