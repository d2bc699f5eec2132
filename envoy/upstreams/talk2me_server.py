#!/usr/bin/env python3
"""STAND-IN for Talk2Me (Flask), for the sample Envoy stack and sluice's end-to-end tests.
Standard library only; not the real service.

Answers 200 with a small JSON body on the endpoints Talk2Me rate limited (any method), 404 JSON
otherwise:

    POST /transcribe    POST /translate    POST /translate/stream    POST /speak
    /api/...            (push notifications, error logging, ...)

`?delay_ms=N` holds a response N ms; `GET /__stats` reports request counts and the peak number
in flight, which the tests use to check Envoy's cap of 50 concurrent requests (see standin.py).

    python3 envoy/upstreams/talk2me_server.py [--host 127.0.0.1] [--port 5005]
"""

import sys

sys.dont_write_bytecode = True  # no __pycache__ beside the scripts

from standin import main  # noqa: E402

ROUTES = [
    (r"/transcribe", "transcribe"),
    (r"/translate", "translate"),
    (r"/translate/stream", "translate-stream"),
    (r"/speak", "speak"),
    (r"/api/.+", "api"),
]

if __name__ == "__main__":
    main("talk2me", 5005, ROUTES)
