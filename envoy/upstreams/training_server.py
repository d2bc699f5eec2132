#!/usr/bin/env python3
"""STAND-IN for the training server (FastAPI, lib/training/training_server.py), for the sample
Envoy stack and sluice's end-to-end tests. Standard library only; not the real service.

Answers 200 with a small JSON body on the endpoints the training server rate limited with slowapi
(any method), 404 JSON otherwise:

    POST /api/training/execute            POST /api/training/validate
    POST /api/training/cancel/{job_id}    POST /api/training/pause/{job_id}
    POST /api/training/resume/{job_id}    POST /api/training/{job_id}/force-start
    POST /api/filesystem/list             POST /api/filesystem/read
    POST /api/filesystem/info

`?delay_ms=N` holds a response N ms; `GET /__stats` reports request counts (see standin.py).

    python3 envoy/upstreams/training_server.py [--host 127.0.0.1] [--port 8000]
"""

import sys

sys.dont_write_bytecode = True  # no __pycache__ beside the scripts

from standin import main  # noqa: E402

SEGMENT = r"[^/]+"

ROUTES = [
    (r"/api/training/execute", "execute"),
    (r"/api/training/validate", "validate"),
    (rf"/api/training/cancel/{SEGMENT}", "cancel"),
    (rf"/api/training/pause/{SEGMENT}", "pause"),
    (rf"/api/training/resume/{SEGMENT}", "resume"),
    (rf"/api/training/{SEGMENT}/force-start", "force-start"),
    (r"/api/filesystem/list", "filesystem-list"),
    (r"/api/filesystem/read", "filesystem-read"),
    (r"/api/filesystem/info", "filesystem-info"),
]

if __name__ == "__main__":
    main("training", 8000, ROUTES)
