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
from pathlib import Path

from dotenv import load_dotenv

# gunicorn reads this file before it imports app.py: load .env here too, so that PORT and
# WEB_CONCURRENCY set there count.
load_dotenv(Path(__file__).with_name(".env"))

bind = f"0.0.0.0:{os.getenv('PORT', '8000')}"
worker_class = "gevent"
# One process per core; each serves up to `worker_connections` simultaneous calls.
workers = int(os.getenv("WEB_CONCURRENCY", "2"))
worker_connections = int(os.getenv("WORKER_CONNECTIONS", "1000"))
# Vapi and ngrok reuse connections between turns: keep idle ones open for a while.
keepalive = 30
# The worker heartbeat, not a limit on how long a stream may run.
timeout = 30
# app.py logs one line per request with the call id and timings: no access log to repeat it.
accesslog = None
