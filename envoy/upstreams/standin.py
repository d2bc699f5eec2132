"""Shared core of the stand-in upstreams behind the sample Envoy (standard library only).

The stand-ins are NOT the real training server or Talk2Me: they answer 200 with a small JSON
body on the real services' endpoints and 404 JSON otherwise, so that Envoy, sluice and the
end-to-end tests have something to route to. Every request may carry `?delay_ms=N` (at most
60000) to hold its response that long, which is how the tests fill Envoy's in-flight cap.

`GET /__stats` answers `{"requests": total, "in_flight": now, "max_in_flight": peak}`, counting
every other request (the peak is what proves Envoy's circuit breaker kept requests away).
"""

import argparse
import json
import re
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

MAX_DELAY_MS = 60_000


class Stats:
    """Request counters, shared by the handler threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0

    def enter(self):
        with self.lock:
            self.requests += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def leave(self):
        with self.lock:
            self.in_flight -= 1

    def snapshot(self):
        with self.lock:
            return {
                "requests": self.requests,
                "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
            }


def make_handler(service, routes, stats):
    """A handler class answering `routes`: a list of (compiled regex, endpoint name)."""

    class Handler(BaseHTTPRequestHandler):
        # HTTP/1.1 keep-alive, so Envoy can reuse its upstream connections.
        protocol_version = "HTTP/1.1"
        server_version = service

        def handle_any(self):
            url = urlsplit(self.path)
            body_bytes = self.read_body()
            if url.path == "/__stats":
                self.send_json(200, stats.snapshot())
                return
            stats.enter()
            try:
                delay_ms = self.delay_ms(url.query)
                if delay_ms:
                    time.sleep(delay_ms / 1000)
                endpoint = next((name for rx, name in routes if rx.fullmatch(url.path)), None)
                if endpoint is None:
                    self.send_json(404, {"error": "Not found", "service": service, "path": url.path})
                    return
                self.send_json(
                    200,
                    {
                        "service": service,
                        "endpoint": endpoint,
                        "method": self.command,
                        "path": url.path,
                        "body_bytes": body_bytes,
                        "user_agent": self.headers.get("user-agent"),
                        "x_forwarded_for": self.headers.get("x-forwarded-for"),
                    },
                )
            finally:
                stats.leave()

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = handle_any

        def read_body(self):
            """Reads and discards the request body; returns its length in bytes."""
            if "chunked" in self.headers.get("transfer-encoding", "").lower():
                total = 0
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        # Trailers, up to the empty line.
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass
                        return total
                    total += len(self.rfile.read(size))
                    self.rfile.readline()
            length = int(self.headers.get("content-length") or 0)
            remaining = length
            while remaining > 0:
                chunk = self.rfile.read(min(remaining, 65536))
                if not chunk:
                    break
                remaining -= len(chunk)
            return length - remaining

        @staticmethod
        def delay_ms(query):
            try:
                value = int(parse_qs(query).get("delay_ms", ["0"])[0])
            except ValueError:
                return 0
            return max(0, min(value, MAX_DELAY_MS))

        def send_json(self, status, obj):
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, fmt, *args):
            sys.stderr.write(f"{service}: {self.address_string()} {fmt % args}\n")

    return Handler


class Server(ThreadingHTTPServer):
    daemon_threads = True
    # The default backlog of 5 drops connections when Envoy opens dozens at once.
    request_queue_size = 256


def main(service, default_port, routes):
    """Parses --host/--port, serves `routes` until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(description=f"Stand-in for {service} (not the real service).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=default_port, help="0 picks a free port")
    args = parser.parse_args()
    compiled = [(re.compile(pattern), name) for pattern, name in routes]
    server = Server((args.host, args.port), make_handler(service, compiled, Stats()))
    host, port = server.server_address[:2]
    # Tests read this line to learn the port chosen for --port 0.
    print(f"{service} stand-in listening on http://{host}:{port}", flush=True)

    def stop(_signum, _frame):
        # shutdown() blocks until serve_forever returns, so call it off the main thread.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.serve_forever(poll_interval=0.1)
    server.server_close()
