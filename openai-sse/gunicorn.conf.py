"""gunicorn settings, picked up by `gunicorn app:app` run in this folder.

Every streaming call stays open for as long as the model talks (seconds) and relays a few dozen
small chunks a second. The default `sync` worker holds one call per process and kills any request
that outlasts `timeout`. Threads (`gthread`) work, but hundreds of them fighting over Python's GIL
cost 1.5-2.5x the CPU per relayed chunk. gevent runs each call as a greenlet: thousands fit in one
process, and switching between them is cheap. The gevent worker also monkey-patches the standard
library before it imports app.py; streaming depends on that (provider_stream.py), which is why
`flask run` refuses streams and `python app.py` runs gunicorn.
"""

import os
import sys
from pathlib import Path

from dotenv import load_dotenv

# gunicorn reads this file before it imports app.py: load .env here too, so that PORT and
# WEB_CONCURRENCY set there count.
load_dotenv(Path(__file__).with_name(".env"))


def whole_number(name, default, minimum, maximum=None):
    """A number setting, by contract.py's rule (which this file does not import: it loads the
    SDK, too much for gunicorn's master process): empty means the default, and a value that cannot
    be used stops gunicorn with one line (SystemExit: no traceback)."""
    text = os.getenv(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum or (maximum is not None and value > maximum):
        expected = f"a whole number from {minimum}" + (f" to {maximum}" if maximum else "")
        sys.exit(f"Cannot start: {name}={text!r} in .env or the environment: expected {expected} "
                 f"(empty means the default, {default})")
    return value


bind = f"0.0.0.0:{whole_number('PORT', 8000, 1, 65535)}"
worker_class = "gevent"
# One process per core; each serves up to `worker_connections` simultaneous calls.
workers = whole_number("WEB_CONCURRENCY", 2, 1)
worker_connections = whole_number("WORKER_CONNECTIONS", 1000, 1)
# Vapi and ngrok reuse connections between turns: keep idle ones open for a while.
keepalive = 30
# The worker heartbeat, not a limit on how long a stream may run.
timeout = 30
# app.py logs one line per request with the call id and timings: no access log to repeat it.
accesslog = None


def post_fork(server, worker):
    """Tell the app which worker this is (1: the first started), so that only the first one logs
    the start-up summary and stops gunicorn on a wrong setting (contract.py FIRST_WORKER): simpler
    than logging from this master process, which never imports the app."""
    os.environ["GUNICORN_WORKER_AGE"] = str(worker.age)
