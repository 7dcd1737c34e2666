"""gunicorn settings, picked up by `gunicorn app:app` run in this folder.

Each call holds one thread while it waits for the model (seconds). The default `sync` worker holds
one call per process and kills any request that outlasts `timeout`, so it would put callers in a
queue of dead air: use threads instead."""

import os
from pathlib import Path

from dotenv import load_dotenv

# gunicorn reads this file before it imports app.py: load .env here too, so that PORT and
# WEB_CONCURRENCY set there count.
load_dotenv(Path(__file__).with_name(".env"))

bind = f"0.0.0.0:{os.getenv('PORT', '8000')}"
worker_class = "gthread"
# One process per core; each holds `threads` simultaneous calls (a waiting thread costs little).
workers = int(os.getenv("WEB_CONCURRENCY", "2"))
threads = int(os.getenv("GUNICORN_THREADS", "256"))
# Vapi and ngrok reuse connections between turns; keep idle ones open (in a poller, not a thread).
keepalive = 30
# For gthread this is the worker heartbeat, not a limit on how long a stream may run.
timeout = 30
# app.py logs one line per request with the call id and timings: no access log to repeat it.
accesslog = None
