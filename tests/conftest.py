"""Shared test fixtures: the stand-in provider, and each server folder running under gunicorn as a subprocess.

Every server runs exactly as a user runs it (`gunicorn app:app` in its folder, with its own gunicorn.conf.py),
pointed at the stand-in provider (`fake_llm.py`) on 127.0.0.1. Servers are started once per configuration and
reused; the stand-in is reset before every test.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

sys.path.insert(0, str(Path(__file__).parent))
from fake_llm import FakeLLM  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures"
FOLDERS = [name for name in ("basic", "openai-sse", "openai-advanced") if (ROOT / name / "app.py").exists()]
STREAMING_FOLDERS = [name for name in FOLDERS if name != "basic"]

PROVIDER_KEY = "sk-test-provider-key-0123456789"
# Every variable the servers read, so that a developer's own .env in a folder cannot change a test.
BASE_ENV = {
    "OPENAI_API_KEY": PROVIDER_KEY,
    "OPENAI_MODEL": "",
    "CUSTOM_LLM_API_KEY": "",
    "OPENAI_TIMEOUT_SECONDS": "3",
    "OPENAI_MAX_RETRIES": "0",
    "LOG_LEVEL": "INFO",
    "FLASK_DEBUG": "",
    "WEB_CONCURRENCY": "1",
    # openai-advanced
    "KNOWLEDGE_DIR": "",
    "MEMORY_ENABLED": "1",
    "REWRITE_ENABLED": "",
    "REWRITE_MODEL": "",
    "AVAILABILITY_API_URL": "",
    "FLUSH_AFTER_FILLER": "",
}


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load_fixture(name):
    return json.loads((FIXTURES / name).read_text())


class Server:
    """One server folder running under gunicorn with its gunicorn.conf.py, on a free port of 127.0.0.1."""

    def __init__(self, folder, env, tmp_dir):
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tmp_dir) / f"{folder}-{self.port}.log"
        full_env = {**os.environ, **env, "PORT": str(self.port)}
        full_env.pop("PYTHONPATH", None)
        self.log_file = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gunicorn", "app:app", "--bind", f"127.0.0.1:{self.port}"],
            cwd=ROOT / folder, env=full_env, stdout=self.log_file, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or still importing
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{folder} did not start:\n{self.log()}")
            time.sleep(0.1)

    def log(self):
        self.log_file.flush()
        return self.log_path.read_text()

    def pids(self):
        """The gunicorn master and its workers."""
        out = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True).stdout
        return [self.process.pid] + [int(pid) for pid in out.split()]

    def stop(self):
        """Quick shutdown (SIGQUIT): tests do not wait for gunicorn's graceful timeout."""
        self.process.send_signal(signal.SIGQUIT)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            for pid in self.pids():
                os.kill(pid, signal.SIGKILL)
            self.process.wait()
        self.log_file.close()


@pytest.fixture(scope="session")
def fake():
    server = FakeLLM().start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def fresh_fake(fake):
    fake.reset()
    yield


@pytest.fixture(scope="session")
def start_server(fake, tmp_path_factory):
    """start_server(folder, **env): a running server with that configuration, started once per session."""
    running = {}
    tmp_dir = tmp_path_factory.mktemp("servers")

    def start(folder, **env):
        key = (folder, tuple(sorted(env.items())))
        if key not in running:
            memory_db = tmp_dir / f"memory-{len(running)}.sqlite3"  # never the folder's own memory file
            config = {**BASE_ENV, "OPENAI_BASE_URL": fake.base_url, "MEMORY_DB_PATH": str(memory_db), **env}
            running[key] = Server(folder, config, tmp_dir)
            running[key].env = config
        return running[key]

    yield start
    for server in running.values():
        server.stop()


@pytest.fixture(params=FOLDERS)
def folder(request):
    return request.param


@pytest.fixture
def server(folder, start_server):
    """The folder's server in its default test configuration."""
    return start_server(folder)


def read_sse(response):
    """Read a streamed answer the way a client does: keep `data:` lines, stop at [DONE], json.loads each.

    Returns (events, done): done is whether the stream ended with [DONE]."""
    events = []
    for line in response.iter_lines(decode_unicode=True):
        if not line or not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return events, True
        events.append(json.loads(payload))
    return events, False


def run_at_once(call, arguments, seconds=60):
    """Run call(argument) for every argument, each on its own thread, all at once; returns the errors raised."""
    import threading

    errors = []

    def guarded(argument):
        try:
            call(argument)
        except Exception as exc:  # collected for the test to assert on
            errors.append(repr(exc))

    threads = [threading.Thread(target=guarded, args=(argument,)) for argument in arguments]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds)
    return errors


def streamed_text(events):
    return "".join(choice["delta"].get("content") or ""
                   for event in events for choice in event.get("choices", []))


def post_chat(server, body, path="/chat/completions", stream=None, **kwargs):
    """POST a chat body with requests (for the raw HTTP view: status, headers, exact events)."""
    headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(server.url + path, data=data, headers=headers, stream=stream if stream is not None
                         else True, timeout=kwargs.pop("timeout", 15), **kwargs)


class FakeSchedulingAPI:
    """A stand-in for the external appointment API that openai-advanced's clinic_open_slots tool calls.

    GET /slots?date=... answers {"date", "open_slots"}; set `mode` to "down" (HTTP 500) or "slow" (sleeps)."""

    def __init__(self):
        import http.server
        import threading

        api = self
        self.mode, self.requests = "ok", []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                api.requests.append(self.path)
                if api.mode == "slow":
                    time.sleep(5)
                status, body = (500, {"error": "boom"}) if api.mode == "down" else \
                    (200, {"date": self.path.split("date=")[-1], "open_slots": ["09:30", "14:00"]})
                data = json.dumps(body).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="session")
def scheduling_api():
    api = FakeSchedulingAPI()
    yield api
    api.server.shutdown()


@pytest.fixture(autouse=True)
def fresh_scheduling_api(request):
    if "scheduling_api" in request.fixturenames:
        api = request.getfixturevalue("scheduling_api")
        api.mode = "ok"
        api.requests.clear()
    yield


def pytest_terminal_summary(terminalreporter):
    """Say how many generated requests the property tests checked (the figure the README quotes)."""
    module = sys.modules.get("test_generated_input")
    if module and module.CASES["count"]:
        terminalreporter.write_line(f"generated input: {module.CASES['count']} requests checked, "
                                    "each answered validly or with an OpenAI-shaped 4xx")
