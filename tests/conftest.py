"""What the tests share: the stand-in provider, the server folders running as subprocesses, and the
helpers many tests use (read SSE, POST over a raw socket, wait for a condition, run calls at once),
and a throwaway PostgreSQL cluster for openai-advanced's memory.

Every server runs exactly as a user runs it (`gunicorn app:app` in its folder, with its own
gunicorn.conf.py), pointed at the stand-in provider (`fake_llm.py`) on 127.0.0.1. Servers are
started once per configuration and reused; the stand-in is reset before every test.
`copied_folders` also runs each folder from a copy outside the repository, in its own virtualenv,
configured by its `.env` alone.
"""

import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

sys.path.insert(0, str(Path(__file__).parent))
from fake_llm import FakeLLM  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures"
FOLDERS = [name for name in ("basic", "openai-sse", "openai-advanced")
           if (ROOT / name / "app.py").exists()]
STREAMING_FOLDERS = [name for name in FOLDERS if name != "basic"]

PROVIDER_KEY = "sk-test-provider-key-0123456789"
# Every variable the servers read, so that a developer's own .env in a folder cannot change a test.
BASE_ENV = {
    "OPENAI_API_KEY": PROVIDER_KEY,
    "OPENAI_MODEL": "",
    "CUSTOM_LLM_API_KEY": "",
    "OPENAI_TIMEOUT_SECONDS": "3",
    "OPENAI_MAX_RETRIES": "0",
    "OPENAI_REASONING_EFFORT": "",
    "LOG_LEVEL": "INFO",
    "FLASK_DEBUG": "",
    "WEB_CONCURRENCY": "1",
    "MAX_CONCURRENT_CALLS": "0",  # tests of many calls at once; test_deploys.py sets its own
    "OVERLOAD_MESSAGE": "",
    "BODY_TIMEOUT_SECONDS": "5",
    # openai-advanced
    "KNOWLEDGE_DIR": "",
    "MEMORY_ENABLED": "1",
    "MEMORY_DATABASE_URL": "",
    "REWRITE_ENABLED": "",
    "REWRITE_MODEL": "",
    "AVAILABILITY_API_URL": "",
    "FLUSH_AFTER_FILLER": "",
    "BUSINESS_TIMEZONE": "America/New_York",
    "FALLBACK_BASE_URL": "",
    "FALLBACK_API_KEY": "",
    "FALLBACK_MODEL": "",
    "HEDGE_AFTER_MS": "1500",
}

# The only request parameters, and the only keys of a message, that may reach the provider.
OPENAI_PARAMS = {"model", "messages", "stream", "temperature", "top_p", "max_tokens",
                 "max_completion_tokens", "stop", "seed", "presence_penalty", "frequency_penalty",
                 "logit_bias", "tools", "tool_choice", "parallel_tool_calls", "response_format",
                 "user", "reasoning_effort"}
MESSAGE_KEYS = {"role", "content", "name", "tool_calls", "tool_call_id", "function_call"}


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load_fixture(name):
    return json.loads((FIXTURES / name).read_text())


def child_pids(pid):
    """The processes whose parent is `pid` (gunicorn's workers), from /proc: no pgrep needed."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (name)": state, ppid
        except OSError:  # the process ended while we looked
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


class Server:
    """A server process started the way a user starts it; ready once its /health answers.

    Its output (gunicorn's and the app's log lines) goes to a file that `log()` reads."""

    def __init__(self, folder, command, cwd, env, port, log_dir, stop_signal=signal.SIGQUIT):
        self.folder, self.env, self.port = folder, env, port
        self.url = f"http://127.0.0.1:{port}"
        self.stop_signal = stop_signal
        handle, path = tempfile.mkstemp(prefix=f"{folder}-{port}-", suffix=".log", dir=log_dir)
        self.log_path = Path(path)
        self.log_file = os.fdopen(handle, "w")
        self.process = subprocess.Popen(command, cwd=cwd, env=env, stdout=self.log_file,
                                        stderr=subprocess.STDOUT)
        try:
            self.wait_until_healthy(f"{folder} ({' '.join(map(str, command))} in {cwd})")
        except BaseException:
            self.stop()
            raise

    @classmethod
    def in_repo(cls, folder, env, log_dir):
        """`gunicorn app:app` in the repository's folder on a free port, `env` over os.environ."""
        port = free_port()
        full_env = {**os.environ, **env, "PORT": str(port)}
        full_env.pop("PYTHONPATH", None)
        command = [sys.executable, "-m", "gunicorn", "app:app", "--bind", f"127.0.0.1:{port}"]
        return cls(folder, command, ROOT / folder, full_env, port, log_dir)

    def wait_until_healthy(self, what, seconds=30):
        """Poll /health; RuntimeError with the server's output if it exits or does not answer."""
        deadline = time.monotonic() + seconds
        while True:
            try:
                if requests.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except requests.RequestException:  # not listening yet, or still importing
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not answer /health on port {self.port}:\n"
                                   f"{self.log()}")
            time.sleep(0.1)

    def log(self):
        """Everything the server has written so far."""
        if not self.log_file.closed:
            self.log_file.flush()
        return self.log_path.read_text()

    def log_lines(self, text):
        """The lines of the log that contain `text`."""
        return [line for line in self.log().splitlines() if text in line]

    def pids(self):
        """The gunicorn master and its workers."""
        return [self.process.pid] + child_pids(self.process.pid)

    def stop(self):
        """Quick shutdown (gunicorn's SIGQUIT: no graceful timeout to wait for), then SIGKILL."""
        if self.log_file.closed:
            return
        if self.process.poll() is None:
            workers = child_pids(self.process.pid)
            self.process.send_signal(self.stop_signal)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                for pid in workers + child_pids(self.process.pid) + [self.process.pid]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
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
    """start_server(folder, **env): a server running with that configuration, started once."""
    running = {}
    tmp_dir = tmp_path_factory.mktemp("servers")

    def start(folder, **env):
        key = (folder, tuple(sorted(env.items())))
        if key not in running:
            memory_db = tmp_dir / f"memory-{len(running)}.sqlite3"  # never the folder's own file
            config = {**BASE_ENV, "OPENAI_BASE_URL": fake.base_url,
                      "MEMORY_DB_PATH": str(memory_db), **env}
            running[key] = Server.in_repo(folder, config, tmp_dir)
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


# --- each folder copied alone, in its own virtualenv ----------------------------------------------

COPY_IGNORE = shutil.ignore_patterns(".env", ".venv", "__pycache__", "*.sqlite3*")


class CopyFailed(Exception):
    """Copying a folder, building its virtualenv or installing its requirements failed."""


@dataclass
class Copy:
    """One folder copied alone into an empty directory, with its own .venv and a .env."""

    folder: str
    path: Path          # the copied folder: the working directory of everything run in it
    port: int           # PORT in its .env
    env: dict           # what a user's shell gives it: PATH (its venv's bin first), HOME, LANG
    log_dir: Path
    build_seconds: float

    def bin(self, name):
        """A program installed in the copy's virtualenv."""
        return self.path / ".venv" / "bin" / name

    def start(self, *command, port=None, stop_signal=signal.SIGQUIT):
        """A running Server: `command` (a program of the copy's venv, and arguments) in the copy."""
        return Server(self.folder, [str(self.bin(command[0])), *command[1:]], self.path, self.env,
                      port or self.port, self.log_dir, stop_signal)


def copy_settings(fake, port):
    """What the user sets in .env after `cp .env.example .env`: the stand-in, a free port."""
    return {"OPENAI_API_KEY": PROVIDER_KEY, "OPENAI_BASE_URL": fake.base_url, "PORT": str(port),
            "WEB_CONCURRENCY": "1", "OPENAI_TIMEOUT_SECONDS": "3", "OPENAI_MAX_RETRIES": "0",
            "CUSTOM_LLM_API_KEY": "", "LOG_LEVEL": "INFO"}


def run_step(folder, command, cwd, env=None, timeout=900):
    """Run one set-up step of a copy; CopyFailed, with its output, if it fails."""
    shown = " ".join(map(str, command))
    try:
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise CopyFailed(f"{folder}: `{shown}` took over {timeout} s") from exc
    if done.returncode != 0:
        raise CopyFailed(f"{folder}: `{shown}` exited {done.returncode}:\n"
                         f"{(done.stdout + done.stderr)[-4000:]}")


def build_copy(folder, base, aside, fake):
    """Copy the folder alone into `base` (empty, outside the repository), then do what its README
    says: `python3 -m venv .venv`, `pip install -r requirements.txt`, `cp .env.example .env`, then
    edit `.env`. Its HOME and logs go `aside`. Returns a Copy; CopyFailed says which step failed."""
    started = time.monotonic()
    path = base / folder
    if path.resolve().is_relative_to(ROOT):
        raise CopyFailed(f"{path} is inside the repository")
    shutil.copytree(ROOT / folder, path, ignore=COPY_IGNORE)
    run_step(folder, [sys.executable, "-m", "venv", ".venv"], path)
    # pip runs in the user's shell (this process's environment: pip's own settings, the registry)
    pip_env = {key: value for key, value in os.environ.items()
               if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    run_step(folder, [str(path / ".venv" / "bin" / "pip"), "install", "-q",
                      "--disable-pip-version-check", "-r", "requirements.txt"], path, pip_env)
    port = free_port()
    settings = copy_settings(fake, port)
    if not (path / ".env.example").exists():
        raise CopyFailed(f"{folder}/.env.example is missing: the README's `cp` would fail")
    example = (path / ".env.example").read_text().splitlines()
    kept = [line for line in example if line.split("=", 1)[0].strip() not in settings]
    kept += [f"{key}={value}" for key, value in settings.items()]
    (path / ".env").write_text("\n".join(kept) + "\n")
    home = aside / "home"
    home.mkdir()
    env = {"PATH": f"{path / '.venv' / 'bin'}{os.pathsep}/usr/local/bin:/usr/bin:/bin",
           "HOME": str(home), "LANG": "C.UTF-8"}
    return Copy(folder, path, port, env, aside, time.monotonic() - started)


class CopiedFolders:
    """Every folder copied and set up at once (one thread each); `gunicorn(folder)` runs a copy as
    its README says, `gunicorn app:app` with no flags, started once and reused."""

    def __init__(self, fake, tmp_path_factory):
        self.executor = ThreadPoolExecutor(max_workers=len(FOLDERS) or 1)
        self.builds = {}
        for folder in FOLDERS:
            base = tmp_path_factory.mktemp(f"copy-{folder}")
            aside = tmp_path_factory.mktemp(f"copy-{folder}-home-and-logs")
            self.builds[folder] = self.executor.submit(build_copy, folder, base, aside, fake)
        self.servers = {}
        self.start_seconds = {}
        self.start_failures = {}  # a copy that did not start fails its other tests at once

    def copy(self, folder):
        """The folder's Copy, once built; the test fails (never skips) if building it failed."""
        try:
            return self.builds[folder].result()
        except CopyFailed as exc:
            failure = str(exc)
        pytest.fail(f"setting up a copy of {folder} failed: {failure}", pytrace=False)

    def gunicorn(self, folder):
        if folder in self.start_failures:
            pytest.fail(self.start_failures[folder], pytrace=False)
        if folder not in self.servers:
            copy = self.copy(folder)
            started = time.monotonic()
            try:
                self.servers[folder] = copy.start("gunicorn", "app:app")
            except RuntimeError as exc:
                self.start_failures[folder] = f"`gunicorn app:app` in the copy: {exc}"
                raise
            self.start_seconds.setdefault(folder, time.monotonic() - started)
        return self.servers[folder]

    def stop_gunicorn(self, folder):
        """Free the copy's .env port (for `python app.py`, which serves on the same one)."""
        server = self.servers.pop(folder, None)
        if server:
            server.stop()

    def close(self):
        for folder in list(self.servers):
            self.stop_gunicorn(folder)
        self.executor.shutdown(wait=True)

    def summary(self):
        parts = []
        for folder, build in self.builds.items():
            if build.done() and build.exception() is None:
                start = self.start_seconds.get(folder)
                parts.append(f"{folder} {build.result().build_seconds:.0f} s"
                             + (f" + start {start:.1f} s" if start is not None else ""))
        return ", ".join(parts)


COPIES = {}  # the session's CopiedFolders, for the terminal summary


@pytest.fixture(scope="session")
def copied_folders(fake, tmp_path_factory):
    """Each folder copied alone outside the repository, with its own virtualenv and .env."""
    copies = CopiedFolders(fake, tmp_path_factory)
    COPIES["current"] = copies
    yield copies
    copies.close()


# --- a throwaway PostgreSQL ----------------------------------------------------------------------

POSTGRES_MISSING = ("PostgreSQL server binaries (initdb, pg_ctl) are not on PATH nor under "
                    "/usr/lib/postgresql/*/bin; Debian: apt-get install postgresql")


def postgres_bin_dir():
    """Where initdb and pg_ctl are: on PATH, or Debian's /usr/lib/postgresql/<version>/bin (newest
    first); None if nowhere."""
    if shutil.which("initdb") and shutil.which("pg_ctl"):
        return Path(shutil.which("pg_ctl")).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                      key=lambda path: int(path.parent.name) if path.parent.name.isdigit() else 0)
    return next((path for path in reversed(versions)
                 if (path / "initdb").exists() and (path / "pg_ctl").exists()), None)


class PostgresCluster:
    """A PostgreSQL cluster of its own in a temporary folder: 127.0.0.1 on a free port, trust
    authentication, no fsync. As root its programs run as the `postgres` user, which PostgreSQL
    requires. `remove()` stops it and deletes the folder."""

    def __init__(self, bin_dir):
        self.bin_dir, self.port = bin_dir, free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="memory-postgres-"))
        self.data, self.log_path = self.folder / "data", self.folder / "postgres.log"
        self.user = None
        if os.geteuid() == 0:
            self.user = "postgres"
            shutil.chown(self.folder, self.user)
        try:
            self.run("initdb", "-D", self.data, "-U", "postgres", "-A", "trust", "-E", "UTF8",
                     "--locale=C", "--no-sync")
            self.start()
        except BaseException:
            self.remove()
            raise

    def run(self, program, *args):
        command = [str(self.bin_dir / program), *map(str, args)]
        if self.user:
            command = ["runuser", "-u", self.user, "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"`{' '.join(command)}` exited {done.returncode}:\n"
                               f"{done.stdout}{done.stderr}")

    def start(self):
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c fsync=off "
                   f"-c unix_socket_directories={self.folder} -c max_connections=200")
        self.run("pg_ctl", "start", "-w", "-D", self.data, "-l", self.log_path, "-o", options)

    def stop(self, mode="fast"):
        self.run("pg_ctl", "stop", "-w", "-D", self.data, "-m", mode)

    def url(self, database="postgres"):
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, name):
        """A new, empty database; returns its URL."""
        import psycopg
        with psycopg.connect(self.url(), autocommit=True) as db:
            db.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def remove(self):
        if (self.data / "postmaster.pid").exists():
            try:
                self.stop("immediate")
            except RuntimeError:
                pass
        shutil.rmtree(self.folder, ignore_errors=True)


def start_postgres():
    """A new PostgresCluster. Without PostgreSQL's binaries the test skips, saying why; in CI
    (CI=true) it fails instead, so that CI always runs these tests."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{POSTGRES_MISSING} (CI=true: .ci/run installs them)", pytrace=False)
        pytest.skip(POSTGRES_MISSING)
    return PostgresCluster(bin_dir)


@pytest.fixture(scope="session")
def postgres():
    """One PostgreSQL cluster for the session; tests create their own databases in it."""
    cluster = start_postgres()
    yield cluster
    cluster.remove()


@pytest.fixture
def memory_database(postgres):
    """An empty database of its own for one test; returns its URL."""
    return postgres.create_database(f"memory_{uuid.uuid4().hex}")


# --- talking to a server --------------------------------------------------------------------------

def read_sse(source):
    """Read a streamed answer the way a client does: keep `data:` lines, stop at [DONE], parse each.

    `source` is a streamed `requests` response, or the text of an answer already received.
    Returns (events, done): done is whether the stream ended with [DONE]."""
    if isinstance(source, str):
        lines = source.split("\n")
    else:
        lines = source.iter_lines(decode_unicode=True)
    events = []
    for line in lines:
        if not line or not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            return events, True
        events.append(json.loads(payload))
    return events, False


def open_raw_stream(server, body, content_length=None, headers=()):
    """POST a chat request over a plain socket and return the socket unread, so that the test
    decides exactly when the caller hangs up (or sends a Content-Length that is not the body's)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    length = len(data) if content_length is None else content_length
    head = ["POST /chat/completions HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/json",
            f"Content-Length: {length}", *headers]
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall("\r\n".join(head).encode() + b"\r\n\r\n" + data)
    return sock


def read_until(sock, marker, count=1):
    """Read from the socket until `marker` has been seen `count` times."""
    received = b""
    while received.count(marker) < count:
        piece = sock.recv(65536)
        if not piece:
            break
        received += piece
    return received


def hang_up(server, fake):
    """A caller who hangs up mid-answer; returns how long the provider's stream took to close."""
    fake.script({"text": " ".join(["word"] * 200), "token_delay": 0.05})
    sock = open_raw_stream(server, load_fixture("first-turn.json"))
    read_until(sock, b"data: ", 3)
    hung_up_at = time.monotonic()
    sock.close()
    assert wait_for(lambda: fake.streams and not fake.streams[-1].open, 2.0)
    assert fake.streams[-1].client_closed and not fake.streams[-1].finished
    return fake.streams[-1].closed_at - hung_up_at


def wait_for(condition, seconds=3.0):
    """Poll `condition` until it is true or `seconds` have passed; returns its last value."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.01)
    return condition()


def run_at_once(call, arguments, seconds=60):
    """Run call(argument) for every argument, each on its own thread, all at once.

    Returns the errors raised."""
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


def time_to_first_words(server, body):
    """(seconds until the first words arrived, the whole text) for one streamed call."""
    started, first, events = time.monotonic(), None, []
    with post_chat(server, body, timeout=30) as response:
        for line in response.iter_lines(decode_unicode=True):
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
                if first is None and streamed_text(events[-1:]):
                    first = time.monotonic() - started
    assert first is not None, "no words in the answer"
    return first, streamed_text(events)


def post_chat(server, body, path="/chat/completions", stream=None, **kwargs):
    """POST a chat body with requests (for the raw HTTP view: status, headers, exact events)."""
    headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(server.url + path, data=data, headers=headers,
                         stream=stream if stream is not None else True,
                         timeout=kwargs.pop("timeout", 15), **kwargs)


def phone_call(text, number=None, call_id=None):
    """openai-advanced: a Vapi first-turn body from a given number with a given utterance."""
    body = load_fixture("first-turn.json")
    body["messages"][-1]["content"] = text
    body["call"]["id"] = call_id or str(uuid.uuid4())
    number = number or "+1555" + str(uuid.uuid4().int)[:7]
    body["call"]["customer"]["number"] = body["customer"]["number"] = number
    return body


def tool_then_answer(name, arguments, answer="We have 9:30 or 2 pm open on Tuesday."):
    """Provider script: call the tool, then answer in words once its result is in the messages."""
    def respond(body):
        if body["messages"][-1]["role"] == "tool":
            return {"text": answer}
        return {"tool_calls": [{"name": name, "arguments": arguments}]}
    return respond


def system_prompt(fake_body):
    return fake_body["messages"][0]["content"]


def run_memory_command(*args, **env):
    """`python memory.py ARGS` in openai-advanced, as a user runs it, with `env` over os.environ.
    Returns (exit code, output)."""
    done = subprocess.run([sys.executable, "memory.py", *args], cwd=ROOT / "openai-advanced",
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    return done.returncode, done.stdout + done.stderr


class FakeSchedulingAPI:
    """A stand-in for the appointment API that openai-advanced's open_slots tool calls.

    GET /slots?date=... answers {"date", "open_slots"}; set `mode` to "down" (HTTP 500) or
    "slow" (sleeps)."""

    def __init__(self):
        api = self
        self.mode, self.requests = "ok", []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                api.requests.append(self.path)
                if api.mode == "slow":
                    time.sleep(5)
                if api.mode == "down":
                    status, body = 500, {"error": "boom"}
                else:
                    status = 200
                    body = {"date": self.path.split("date=")[-1], "open_slots": ["09:30", "14:00"]}
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
    """Say how many generated requests the property tests checked, and how long the copies took to
    set up (figures the README quotes)."""
    module = sys.modules.get("test_generated_input")
    if module and module.CASES["count"]:
        terminalreporter.write_line(f"generated input: {module.CASES['count']} requests checked, "
                                    "each answered validly or with an OpenAI-shaped 4xx")
    copies = COPIES.get("current")
    if copies and copies.summary():
        terminalreporter.write_line("copied folders (virtualenv + pip install, built at once; "
                                    f"then gunicorn start): {copies.summary()}")
