"""The body of scripts/soak (run it through that wrapper, which builds the binaries and
prepares the tools and the venv): a bounded soak of one real sluice server on loopback.

For --duration seconds (default 600), against one `sluice serve` (release build) whose admin
listener speaks mTLS with a certificate made here with openssl:

  load      sluice-load in chunks of --chunk seconds, shapes hot, clients, unique in turn,
            --connections x --concurrency calls in flight; every reply is checked by
            sluice-load itself (its `failures`).
  probes    every --probe-every seconds, through grpcurl: a client never seen before on
            /soak/probe (3/hour) gets OK with 2, 1, 0 remaining, then OVER_LIMIT; Allow makes it
            OK, Disallow OVER_LIMIT again; an address blocked with BlockIp gets OVER_LIMIT and is
            in ListBlocks, and after UnblockIp gets OK and is not; GetStats answers, its totals
            never go down, its tracked keys stay within store.max_keys (rounded up to a multiple of
            the store's 256 shards) and its tracked clients within stats.max_clients.
  reloads   every --reload-every seconds the config file is replaced (rename) with the load's
            limit and /soak/reload's limit changed; sluice_config_reloads_total{result="ok"}
            must go up by one, {result="failed"} never, and /soak/reload must then report the
            new limit.
  rotations every --rotate-every seconds the admin listener's certificate and key are replaced,
            alternately by renaming new files over them and by a Kubernetes-style `..data`
            symlink swap; the listener must then serve the new certificate (openssl s_client,
            SHA-256 of the certificate) and sluice_tls_reloads_total{listener="admin"} go up.
  samples   every --sample-every seconds: VmRSS and open descriptors of the server (/proc),
            decisions/s (sluice_requests_total), and the error counters on /metrics.

It fails, exit status 1 with the reasons, on any of:
  - a wrong answer from a probe or a config/certificate check, a failed admin call;
  - a sluice-load chunk with a failure (a gRPC error or an inconsistent reply);
  - sluice_store_errors_total, sluice_config_reloads_total{result="failed"},
    sluice_connections_refused_total above 0; an interval without a single decision;
  - sluice_tls_reload_failures_total beyond the half-rotation transients accepted: at most one
    per rotation, counted during that rotation (the server reads the certificate and the key
    one after the other, so a poll can fall between the two renames of a rename rotation, or
    between the two reads across a symlink swap; that set is refused, the old certificate
    stays, and the next poll takes the new pair). None outside a rotation.
  - growth after warm-up: the median of the last quarter of the samples against the median of
    the second quarter (the first quarter is warm-up: the store fills to store.max_keys and the
    statistics to stats.max_clients there), beyond --rss-tolerance-mib or
    --rss-tolerance-pct of the second quarter's RSS, whichever is larger, or beyond
    --fd-tolerance descriptors;
  - the server dying, not stopping cleanly on SIGTERM, or logging a panic or an ERROR line
    (but for its "TLS reload refused" lines, as many as the transients accepted above).

It writes into --out (default target/soak/): report.md, soak.png (RSS, decisions/s and open
descriptors over time), samples.csv, load.jsonl (sluice-load's JSON line per chunk),
events.jsonl (reloads, rotations, failures) and server.log. Never reads stdin; every process it
starts is ended on exit, including on SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

# The soak's own rules. The load domain is benches/load.yaml's, with a limit the hot client
# exceeds and the others do not, so the load sees both answers; max_keys and max_clients are
# small enough that the first unique chunk fills them during warm-up, so that the bounds, not
# the run's length, decide the memory held.
MAX_KEYS = 100_000
# The memory store splits max_keys over its 256 shards, each holding max_keys/256 rounded up
# (src/store/memory.rs), so the counters tracked reach this bound, not max_keys itself.
KEYS_BOUND = -(-MAX_KEYS // 256) * 256
MAX_CLIENTS = 20_000
PROBE_LIMIT = 3
CONFIG = """\
# Written by scripts/soak (generation {gen}); replaced every --reload-every seconds.
enabled: true
store:
  max_keys: {max_keys}
  sweep_interval_seconds: 10
stats:
  max_clients: {max_clients}
domains:
  - name: load
    client: [remote_address]
    endpoint_entry: path
    algorithm: sliding_window
    endpoints:
      - path: /bench
        limits: ["{load_limit}/minute"]
  - name: soak
    client: [remote_address]
    endpoint_entry: path
    endpoints:
      # A new client per probe: {probe} OK, then OVER_LIMIT. An hour's window keeps these
      # counters the last a full store would evict (it evicts the soonest to expire).
      - path: /soak/probe
        limits: ["{probe}/hour"]
      - path: /soak/block
        limits: ["1000000/minute"]
      # Changed by every reload; the reload check reads it back from a decision.
      - path: /soak/reload
        limits: ["{reload_limit}/minute"]
"""


def load_limit(gen: int) -> int:
    return 1000 + gen % 2


def reload_limit(gen: int) -> int:
    return 5000 + gen


class Stopped(Exception):
    """The soak is stopping: no new child process is started."""


class Children:
    """Every process the soak starts, so that all of them are ended on the way out."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.procs: set[subprocess.Popen] = set()
        self.closing = False

    def popen(self, args: list[str], **kw) -> subprocess.Popen:
        with self.lock:
            if self.closing:
                raise Stopped()
            # A session of its own: a terminal's ^C reaches the soak, which ends the children
            # itself, in order.
            p = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True, **kw)
            self.procs.add(p)
            return p

    def forget(self, p: subprocess.Popen) -> None:
        with self.lock:
            self.procs.discard(p)

    def run(self, args: list[str], timeout: float) -> subprocess.CompletedProcess:
        p = self.popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            raise RuntimeError(f"{Path(args[0]).name} timed out after {timeout:.0f} s") from None
        finally:
            self.forget(p)
        return subprocess.CompletedProcess(args, p.returncode, out, err)

    def end_all(self) -> None:
        with self.lock:
            self.closing = True
            procs = list(self.procs)
        for p in procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + 10
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# --- /metrics -------------------------------------------------------------------------------

SAMPLE_RE = re.compile(r"^([A-Za-z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)")
LABEL_RE = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class Metrics:
    """One scrape of /metrics: samples by name, each with its labels."""

    def __init__(self, text: str) -> None:
        self.samples: dict[str, list[tuple[dict[str, str], float]]] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            m = SAMPLE_RE.match(line)
            if not m:
                continue
            labels = dict(LABEL_RE.findall(m.group(2) or ""))
            try:
                value = float(m.group(3))
            except ValueError:
                continue
            self.samples.setdefault(m.group(1), []).append((labels, value))

    def sum(self, name: str, **labels: str) -> float:
        """The sum of `name` over the samples whose labels include `labels` (0 if none)."""
        return sum(
            v for ls, v in self.samples.get(name, []) if all(ls.get(k) == want for k, want in labels.items())
        )


# --- the soak -------------------------------------------------------------------------------


@dataclass
class Sample:
    t: float
    rss_kib: int
    fds: int
    threads: int
    requests: float
    decisions_per_s: float | None
    cpu_s: float
    loadavg: float
    store_errors: float
    reloads_ok: float
    reloads_failed: float
    tls_reloads: float
    tls_failures: float
    handshake_failures: float
    refused: float
    tracked_keys: float
    tracked_clients: float
    evictions: float


@dataclass
class Counts:
    probes: int = 0
    probe_decisions: int = 0
    admin_calls: dict[str, int] = field(default_factory=dict)
    reloads: int = 0
    rotations: dict[str, int] = field(default_factory=lambda: {"rename": 0, "symlink": 0})
    rotation_failures_accepted: int = 0
    load_chunks: int = 0


def parse_duration(text: str) -> float:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|m|h)?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r}: a duration such as 600, 90s, 10m or 1h")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.children = Children()
        # stop: no new step starts (the time is up, or a failure); failed: steps in progress
        # give up too. A step still running at the end finishes, so its counts stay exact.
        self.stop = threading.Event()
        self.failed = threading.Event()
        self.lock = threading.Lock()
        self.failures: list[str] = []
        self.counts = Counts()
        self.samples: list[Sample] = []
        self.chunks: list[dict] = []
        self.probe_seconds: list[float] = []
        self.t0 = time.monotonic()
        self.started_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix="sluice-soak-"))
        self.events = open(self.out / "events.jsonl", "w")
        self.server: subprocess.Popen | None = None
        self.server_exit: int | None = None
        self.grpcurl = str(Path(args.tools) / "grpcurl")
        self.openssl = str(Path(args.tools) / "openssl")
        self.gen = 0
        self.cert_gen = 0
        self.last_totals: dict[str, int] | None = None

    # -- bookkeeping

    def now(self) -> float:
        return time.monotonic() - self.t0

    def event(self, kind: str, **fields) -> None:
        with self.lock:
            self.events.write(json.dumps({"t": round(self.now(), 2), "event": kind, **fields}) + "\n")
            self.events.flush()

    def log(self, msg: str) -> None:
        print(f"soak [{self.now():6.0f}s] {msg}", file=sys.stderr, flush=True)

    def fail(self, why: str) -> None:
        with self.lock:
            self.failures.append(f"t={self.now():.0f}s: {why}")
        self.event("failure", why=why)
        self.log(f"FAILURE: {why}")
        self.failed.set()
        self.stop.set()

    def admin_count(self, method: str) -> None:
        with self.lock:
            self.counts.admin_calls[method] = self.counts.admin_calls.get(method, 0) + 1

    # -- files

    def openssl_run(self, *argv: str) -> None:
        r = self.children.run([self.openssl, *argv], timeout=60)
        if r.returncode != 0:
            raise RuntimeError(f"openssl {' '.join(argv[:2])}: {r.stderr.strip()[-400:]}")

    def make_pki(self) -> None:
        """A CA, an operator's client certificate, and the admin secret directory laid out as
        Kubernetes mounts a secret: tls.crt -> ..data/tls.crt, ..data -> ..v0."""
        d = self.tmp / "pki"
        d.mkdir()
        self.ca = d / "ca.crt"
        self.openssl_run(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(d / "ca.key"), "-out", str(self.ca), "-days", "2",
            "-subj", "/CN=sluice soak CA",
        )  # fmt: skip
        self.client_crt, self.client_key = self.leaf("operator", "DNS:operator", "clientAuth")
        self.secret = self.tmp / "admin-tls"
        self.secret.mkdir()
        crt, key = self.leaf("server-0", "IP:127.0.0.1,DNS:localhost", "serverAuth")
        (self.secret / "..v0").mkdir()
        shutil.copy(crt, self.secret / "..v0" / "tls.crt")
        shutil.copy(key, self.secret / "..v0" / "tls.key")
        os.symlink("..v0", self.secret / "..data")
        for f in ("tls.crt", "tls.key"):
            os.symlink(f"..data/{f}", self.secret / f)
        self.served_fingerprint = fingerprint_file(crt)

    def leaf(self, name: str, san: str, usage: str) -> tuple[Path, Path]:
        d = self.tmp / "pki"
        crt, key, csr, ext = (d / f"{name}.{x}" for x in ("crt", "key", "csr", "ext"))
        ext.write_text(f"subjectAltName={san}\nextendedKeyUsage={usage}\n")
        self.openssl_run(
            "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(key), "-out", str(csr), "-subj", f"/CN=sluice soak {name}",
        )  # fmt: skip
        self.openssl_run(
            "x509", "-req", "-in", str(csr), "-CA", str(self.ca), "-CAkey", str(d / "ca.key"),
            "-CAcreateserial", "-out", str(crt), "-days", "2", "-extfile", str(ext),
        )  # fmt: skip
        return crt, key

    def write_config(self) -> None:
        """Replaces the config file by rename, so the server never reads half of it."""
        text = CONFIG.format(
            gen=self.gen,
            max_keys=MAX_KEYS,
            max_clients=MAX_CLIENTS,
            load_limit=load_limit(self.gen),
            probe=PROBE_LIMIT,
            reload_limit=reload_limit(self.gen),
        )
        tmp = self.config.with_name(".soak.yaml.tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config)

    # -- the server

    def start_server(self) -> None:
        self.config = self.tmp / "soak.yaml"
        self.write_config()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
        env.setdefault("RUST_LOG", "info")
        self.server_log = open(self.out / "server.log", "w")
        argv = [
            self.args.sluice, "serve", "--config", str(self.config),
            "--grpc-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0",
            "--http-addr", "127.0.0.1:0", "--state-file", str(self.tmp / "sluice-state.json"),
            "--log-format", "json", "--reload-interval", "1s",
            "--admin-tls-cert", str(self.secret / "tls.crt"),
            "--admin-tls-key", str(self.secret / "tls.key"),
            "--admin-tls-client-ca", str(self.ca),
        ]  # fmt: skip
        self.server = self.children.popen(argv, stdout=self.server_log, stderr=subprocess.STDOUT, env=env)
        self.pid = self.server.pid
        want = {
            "serving RateLimitService": "grpc",
            "serving Admin": "admin",
            "serving /metrics": "http",
        }
        found: dict[str, str] = {}
        deadline = time.monotonic() + 30
        while len(found) < len(want):
            if self.server.poll() is not None:
                raise RuntimeError(
                    f"sluice exited at start ({self.server.returncode}): see {self.out}/server.log"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"sluice did not log its addresses within 30 s: see {self.out}/server.log")
            for line in (self.out / "server.log").read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                fields = rec.get("fields", {})
                for prefix, name in want.items():
                    if str(fields.get("message", "")).startswith(prefix) and "addr" in fields:
                        found[name] = fields["addr"]
            time.sleep(0.1)
        self.grpc_addr, self.admin_addr, self.http_addr = found["grpc"], found["admin"], found["http"]
        for addr in (self.grpc_addr, self.admin_addr, self.http_addr):
            if not addr.startswith("127."):
                raise RuntimeError(f"sluice listens on {addr}, not on loopback")
        while True:
            try:
                with urllib.request.urlopen(f"http://{self.http_addr}/readyz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("sluice /readyz did not answer 200 within 30 s")
            time.sleep(0.1)
        self.log(
            f"sluice pid {self.pid}: decisions {self.grpc_addr}, admin (mTLS) {self.admin_addr}, "
            f"http {self.http_addr}"
        )

    def metrics(self) -> Metrics:
        with urllib.request.urlopen(f"http://{self.http_addr}/metrics", timeout=10) as r:
            return Metrics(r.read().decode())

    def stop_server(self) -> None:
        """SIGTERM, as an orchestrator stops it: it must exit 0 within its 10 s drain."""
        if self.server is None or self.server.poll() is not None:
            return
        self.server.send_signal(signal.SIGTERM)
        try:
            self.server_exit = self.server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.server.kill()
            self.server.wait()
            self.fail("sluice did not stop within 20 s of SIGTERM")
            return
        self.children.forget(self.server)
        if self.server_exit != 0:
            self.fail(f"sluice exited with status {self.server_exit} on SIGTERM")

    # -- grpcurl

    def grpc(self, method: str, body: dict, admin: bool) -> dict:
        """One call through grpcurl; the reply as JSON, or an exception saying what failed."""
        if admin:
            conn = [
                "-cacert",
                str(self.ca),
                "-cert",
                str(self.client_crt),
                "-key",
                str(self.client_key),
                self.admin_addr,
            ]
            full = f"sluice.admin.v1.Admin/{method}"
        else:
            conn = ["-plaintext", self.grpc_addr]
            full = f"envoy.service.ratelimit.v3.RateLimitService/{method}"
        argv = [self.grpcurl, "-max-time", "20", "-d", json.dumps(body), *conn, full]
        r = self.children.run(argv, timeout=30)
        if admin:
            self.admin_count(method)
        if r.returncode != 0:
            raise RuntimeError(
                f"grpcurl {method} {json.dumps(body)}: exit {r.returncode}: {r.stderr.strip()[-400:]}"
            )
        try:
            return json.loads(r.stdout or "{}")
        except ValueError:
            raise RuntimeError(f"grpcurl {method}: not JSON: {r.stdout[:200]!r}") from None

    def decide(self, path: str, client: str) -> dict:
        reply = self.grpc(
            "ShouldRateLimit",
            {
                "domain": "soak",
                "descriptors": [
                    {"entries": [{"key": "path", "value": path}, {"key": "remote_address", "value": client}]}
                ],
            },
            admin=False,
        )
        with self.lock:
            self.counts.probe_decisions += 1
        return reply

    def expect(
        self, what: str, reply: dict, code: str, remaining: int | None = None, limit: int | None = None
    ) -> None:
        got = reply.get("overallCode", "UNKNOWN")
        if got != code:
            raise WrongAnswer(f"{what}: overallCode {got}, expected {code}: {json.dumps(reply)[:300]}")
        if remaining is None and limit is None:
            return
        statuses = reply.get("statuses") or [{}]
        status = statuses[0]
        if remaining is not None and int(status.get("limitRemaining", 0)) != remaining:
            raise WrongAnswer(
                f"{what}: limitRemaining {status.get('limitRemaining', 0)}, expected {remaining}"
            )
        if limit is not None:
            rpu = int((status.get("currentLimit") or {}).get("requestsPerUnit", 0))
            if rpu != limit:
                raise WrongAnswer(f"{what}: currentLimit.requestsPerUnit {rpu}, expected {limit}")

    # -- the workers

    def worker(self, name: str, body) -> threading.Thread:
        def run() -> None:
            try:
                body()
            except Stopped:
                pass
            except WrongAnswer as e:
                self.fail(f"wrong answer: {e}")
            except Exception as e:  # noqa: BLE001 - every other error fails the soak, named
                if not self.failed.is_set():
                    self.check_alive()
                    self.fail(f"{name}: {type(e).__name__}: {e}")

        t = threading.Thread(target=run, name=name, daemon=True)
        t.start()
        return t

    def every(self, period: float, first: float, step) -> None:
        """Calls step() at first, first + period, ... until the soak's end."""
        n = 0
        while True:
            at = first + n * period
            if at >= self.args.duration:
                return
            if self.stop.wait(max(0.0, at - self.now())):
                return
            step()
            n += 1

    def load_loop(self) -> None:
        shapes = ["hot", "clients", "unique"]
        k = 0
        while not self.stop.is_set():
            left = self.args.duration - self.now()
            if left < 1:
                return
            d = min(self.args.chunk, left)
            shape = shapes[k % len(shapes)]
            argv = [
                self.args.load, "--addr", self.grpc_addr, "--shape", shape,
                "--connections", str(self.args.connections), "--concurrency", str(self.args.concurrency),
                "--threads", "1", "--warmup", "0", "--duration", f"{d:.1f}", "--json",
                "--label", f"soak-{k}",
            ]  # fmt: skip
            t_start = self.now()
            r = self.children.run(argv, timeout=d + 60)
            line = (r.stdout.strip().splitlines() or [""])[-1]
            try:
                result = json.loads(line)
            except ValueError:
                raise RuntimeError(
                    f"sluice-load {shape} exit {r.returncode}: {(r.stderr or r.stdout).strip()[-400:]}"
                ) from None
            result["t_start"], result["t_end"] = round(t_start, 2), round(self.now(), 2)
            with self.lock:
                self.chunks.append(result)
                self.counts.load_chunks += 1
            if result.get("failures", 0) or r.returncode != 0:
                self.fail(
                    f"sluice-load {shape} chunk {k}: exit {r.returncode}, {result.get('failures')} failures, "
                    f"first: {result.get('first_failure')}"
                )
                return
            k += 1

    def probe(self) -> None:
        """One probe cycle: limits, the allowlist, blocks and statistics, each checked."""
        n = self.counts.probes
        t = self.now()
        client = f"2001:db8:1::{n + 1:x}"
        for i in range(PROBE_LIMIT):
            self.expect(f"probe {client} call {i + 1}", self.decide("/soak/probe", client), "OK",
                        remaining=PROBE_LIMIT - i - 1, limit=PROBE_LIMIT)  # fmt: skip
        self.expect(
            f"probe {client} call {PROBE_LIMIT + 1}", self.decide("/soak/probe", client), "OVER_LIMIT"
        )
        self.grpc("Allow", {"ip": client, "reason": "soak"}, admin=True)
        self.expect(f"probe {client} allowlisted", self.decide("/soak/probe", client), "OK")
        self.grpc("Disallow", {"ip": client}, admin=True)
        self.expect(f"probe {client} after Disallow", self.decide("/soak/probe", client), "OVER_LIMIT")

        blocked = f"192.0.2.{n % 254 + 1}" if n % 2 == 0 else f"2001:db8:2::{n + 1:x}"
        self.expect(f"block probe {blocked} before BlockIp", self.decide("/soak/block", blocked), "OK")
        self.grpc("BlockIp", {"ip": blocked, "duration_seconds": 600, "reason": "soak"}, admin=True)
        self.expect(f"block probe {blocked} blocked", self.decide("/soak/block", blocked), "OVER_LIMIT")
        listed = [b.get("ip", "") for b in self.grpc("ListBlocks", {}, admin=True).get("blocks", [])]
        if not any(ip.split("/")[0] == blocked for ip in listed):
            raise WrongAnswer(f"ListBlocks after BlockIp {blocked}: {listed}")
        self.grpc("UnblockIp", {"ip": blocked}, admin=True)
        self.expect(f"block probe {blocked} after UnblockIp", self.decide("/soak/block", blocked), "OK")
        listed = [b.get("ip", "") for b in self.grpc("ListBlocks", {}, admin=True).get("blocks", [])]
        if any(ip.split("/")[0] == blocked for ip in listed):
            raise WrongAnswer(f"ListBlocks after UnblockIp {blocked} still lists it: {listed}")

        stats = self.grpc("GetStats", {"top": 3}, admin=True)
        total = {k: int(v) for k, v in (stats.get("total") or {}).items()}
        if self.last_totals is not None:
            for k, before in self.last_totals.items():
                if total.get(k, 0) < before:
                    raise WrongAnswer(f"GetStats total.{k} went down: {before} -> {total.get(k, 0)}")
        self.last_totals = total
        keys, clients = int(stats.get("trackedKeys", 0)), int(stats.get("trackedClients", 0))
        if keys > KEYS_BOUND or clients > MAX_CLIENTS:
            raise WrongAnswer(
                f"GetStats: trackedKeys {keys} (bound {KEYS_BOUND}), "
                f"trackedClients {clients} (bound {MAX_CLIENTS})"
            )
        with self.lock:
            self.counts.probes += 1
            self.probe_seconds.append(self.now() - t)

    def wait_metric(self, what: str, cond, timeout: float = 15) -> Metrics:
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if cond(m):
                return m
            if time.monotonic() > deadline:
                raise WrongAnswer(f"{what} within {timeout:.0f} s")
            if self.failed.wait(0.2):
                raise Stopped()

    def reload(self) -> None:
        before = self.metrics()
        ok0 = before.sum("sluice_config_reloads_total", result="ok")
        failed0 = before.sum("sluice_config_reloads_total", result="failed")
        self.gen += 1
        t = self.now()
        self.write_config()
        m = self.wait_metric(
            f'sluice_config_reloads_total{{result="ok"}} did not rise above {ok0:.0f} '
            f"after generation {self.gen}",
            lambda m: (
                m.sum("sluice_config_reloads_total", result="ok") >= ok0 + 1
                or m.sum("sluice_config_reloads_total", result="failed") > failed0
            ),
        )
        if m.sum("sluice_config_reloads_total", result="failed") > failed0:
            raise WrongAnswer(f"config generation {self.gen} refused: see server.log")
        took = self.now() - t
        self.expect(f"config generation {self.gen}", self.decide("/soak/reload", "203.0.113.1"), "OK",
                    limit=reload_limit(self.gen))  # fmt: skip
        with self.lock:
            self.counts.reloads += 1
        self.event("config_reload", generation=self.gen, seconds=round(took, 2))

    def served_cert(self) -> str:
        r = self.children.run(
            [self.openssl, "s_client", "-connect", self.admin_addr, "-CAfile", str(self.ca),
             "-cert", str(self.client_crt), "-key", str(self.client_key), "-alpn", "h2",
             "-verify_return_error"],
            timeout=30,
        )  # fmt: skip
        m = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", r.stdout, re.S)
        if r.returncode != 0 or not m:
            raise RuntimeError(
                f"openssl s_client {self.admin_addr}: exit {r.returncode}: {r.stderr.strip()[-300:]}"
            )
        return fingerprint_pem(m.group(0))

    def rotate(self) -> None:
        self.cert_gen += 1
        mode = "rename" if self.cert_gen % 2 == 1 else "symlink"
        crt, key = self.leaf(f"server-{self.cert_gen}", "IP:127.0.0.1,DNS:localhost", "serverAuth")
        want = fingerprint_file(crt)
        m0 = self.metrics()
        r0 = m0.sum("sluice_tls_reloads_total", listener="admin")
        f0 = m0.sum("sluice_tls_reload_failures_total", listener="admin")
        t = self.now()
        if mode == "rename":
            # New files beside the old ones, then renamed over them: cert, then key.
            data = (self.secret / "..data").resolve()
            for src, name in ((crt, "tls.crt"), (key, "tls.key")):
                shutil.copy(src, data / f".{name}.new")
            for name in ("tls.crt", "tls.key"):
                os.replace(data / f".{name}.new", data / name)
        else:
            # As the kubelet updates a secret: a new directory, ..data swapped to it by one
            # rename, the old directory removed.
            old = (self.secret / "..data").resolve()
            new = self.secret / f"..v{self.cert_gen}"
            new.mkdir()
            shutil.copy(crt, new / "tls.crt")
            shutil.copy(key, new / "tls.key")
            os.symlink(new.name, self.secret / "..data_tmp")
            os.replace(self.secret / "..data_tmp", self.secret / "..data")
            shutil.rmtree(old)
        deadline = time.monotonic() + 15
        while (got := self.served_cert()) != want:
            if got != self.served_fingerprint:
                raise WrongAnswer(
                    f"rotation {self.cert_gen} ({mode}): the admin listener serves {got[:16]}, "
                    "neither the old nor the new certificate"
                )
            if time.monotonic() > deadline:
                raise WrongAnswer(
                    f"rotation {self.cert_gen} ({mode}): the new certificate was not served within 15 s"
                )
            if self.failed.wait(0.2):
                raise Stopped()
        took = self.now() - t
        self.served_fingerprint = want
        # A poll interval more, so that a refused half-rotation of this rotation is counted
        # within its window.
        if self.failed.wait(1.5):
            raise Stopped()
        m1 = self.metrics()
        r1 = m1.sum("sluice_tls_reloads_total", listener="admin")
        f1 = m1.sum("sluice_tls_reload_failures_total", listener="admin")
        if r1 < r0 + 1:
            raise WrongAnswer(
                f"rotation {self.cert_gen} ({mode}): sluice_tls_reloads_total stayed at {r1:.0f}"
            )
        if f1 - f0 > 1:
            raise WrongAnswer(
                f"rotation {self.cert_gen} ({mode}): {f1 - f0:.0f} reload failures (at most 1 accepted)"
            )
        with self.lock:
            self.counts.rotations[mode] += 1
            self.counts.rotation_failures_accepted += int(f1 - f0)
        self.event("cert_rotation", generation=self.cert_gen, mode=mode, seconds=round(took, 2),
                   reloads=r1 - r0, failures=f1 - f0, sha256=want[:16])  # fmt: skip

    def check_alive(self) -> None:
        """Fails the soak, first, if the server is gone: that is the cause of what follows."""
        if self.server is not None and self.server_exit is None and (code := self.server.poll()) is not None:
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"
            self.fail(f"sluice (pid {self.pid}) died: {how}")

    def sample(self) -> None:
        t = self.now()
        try:
            status = Path(f"/proc/{self.pid}/status").read_text()
            fds = len(os.listdir(f"/proc/{self.pid}/fd"))
        except OSError:
            self.check_alive()
            self.fail(f"sluice (pid {self.pid}) is gone")
            return
        rss = int(re.search(r"^VmRSS:\s+(\d+)", status, re.M).group(1))
        cpu_s = cpu_seconds(self.pid)
        threads = int(re.search(r"^Threads:\s+(\d+)", status, re.M).group(1))
        m = self.metrics()
        requests = m.sum("sluice_requests_total")
        rate = None
        if self.samples:
            prev = self.samples[-1]
            rate = (requests - prev.requests) / max(1e-6, t - prev.t)
        s = Sample(
            t=t,
            rss_kib=rss,
            fds=fds,
            threads=threads,
            requests=requests,
            decisions_per_s=rate,
            cpu_s=cpu_s,
            loadavg=float(Path("/proc/loadavg").read_text().split()[0]),
            store_errors=m.sum("sluice_store_errors_total"),
            reloads_ok=m.sum("sluice_config_reloads_total", result="ok"),
            reloads_failed=m.sum("sluice_config_reloads_total", result="failed"),
            tls_reloads=m.sum("sluice_tls_reloads_total"),
            tls_failures=m.sum("sluice_tls_reload_failures_total"),
            handshake_failures=m.sum("sluice_tls_handshake_failures_total"),
            refused=m.sum("sluice_connections_refused_total"),
            tracked_keys=m.sum("sluice_tracked_keys"),
            tracked_clients=m.sum("sluice_tracked_clients"),
            evictions=m.sum("sluice_store_evictions_total"),
        )
        with self.lock:
            self.samples.append(s)
        if s.store_errors:
            self.fail(f"sluice_store_errors_total is {s.store_errors:.0f}")
        if s.reloads_failed:
            self.fail(f'sluice_config_reloads_total{{result="failed"}} is {s.reloads_failed:.0f}')
        if s.refused:
            self.fail(f"sluice_connections_refused_total is {s.refused:.0f}")
        if rate is not None and rate <= 0 and t < self.args.duration - 1:
            self.fail(f"no decision at all in the {t - self.samples[-2].t:.1f} s before t={t:.0f}s")
        if len(self.samples) % max(1, round(30 / self.args.sample_every)) == 1:
            with self.lock:
                c = self.counts
                rot = sum(c.rotations.values())
            self.log(
                f"rss {rss / 1024:.1f} MiB, fds {fds}, "
                f"{(rate or 0):,.0f} decisions/s, probes {c.probes}, reloads {c.reloads}, rotations {rot}"
            )

    # -- the run

    def run(self) -> int:
        a = self.args
        self.make_pki()
        self.start_server()
        self.t0 = time.monotonic()
        self.log(
            f"soak for {a.duration:.0f} s: load chunks of {a.chunk:.0f} s "
            f"({a.connections}x{a.concurrency} in flight), "
            f"probes every {a.probe_every:.0f} s, reloads every {a.reload_every:.0f} s, "
            f"rotations every {a.rotate_every:.0f} s, samples every {a.sample_every:.0f} s"
        )
        self.sample()
        threads = [
            self.worker("load", self.load_loop),
            self.worker("sampler", lambda: self.every(a.sample_every, a.sample_every, self.sample)),
            self.worker("probe", lambda: self.every(a.probe_every, 1, self.probe)),
            self.worker("reload", lambda: self.every(a.reload_every, a.reload_every, self.reload)),
            self.worker("rotate", lambda: self.every(a.rotate_every, a.rotate_every, self.rotate)),
        ]
        self.stop.wait(a.duration)
        ended_early = self.stop.is_set()
        self.stop.set()
        for t in threads:
            t.join(timeout=90)
            if t.is_alive():
                self.fail(f"the {t.name} worker did not finish within 90 s of the end")
        if not ended_early:
            self.sample()
        self.final_checks()
        self.stop_server()
        self.check_log()
        self.report()
        return 1 if self.failures else 0

    def final_checks(self) -> None:
        if not self.samples:
            return
        last = self.samples[-1]
        c = self.counts
        accepted = c.rotation_failures_accepted
        if last.tls_failures > accepted:
            self.fail(
                f"sluice_tls_reload_failures_total is {last.tls_failures:.0f}, "
                f"beyond the {accepted} half-rotation transient(s) seen during rotations"
            )
        if last.handshake_failures:
            self.fail(f"sluice_tls_handshake_failures_total is {last.handshake_failures:.0f}")
        rotations = sum(c.rotations.values())
        if last.tls_reloads != rotations:
            self.fail(f"sluice_tls_reloads_total is {last.tls_reloads:.0f} after {rotations} rotation(s)")
        if last.reloads_ok != c.reloads:
            self.fail(
                f'sluice_config_reloads_total{{result="ok"}} is {last.reloads_ok:.0f} '
                f"after {c.reloads} reload(s)"
            )
        a = self.args
        q2, q4 = quarter(self.samples, 1, a.duration), quarter(self.samples, 3, a.duration)
        self.growth: dict[str, tuple[float, float, float]] = {}
        if len(q2) < 2 or len(q4) < 2:
            return
        rss2 = statistics.median(x.rss_kib / 1024 for x in q2)
        rss4 = statistics.median(x.rss_kib / 1024 for x in q4)
        fds2 = statistics.median(x.fds for x in q2)
        fds4 = statistics.median(x.fds for x in q4)
        self.growth["rss"] = (rss2, rss4, max(a.rss_tolerance_mib, rss2 * a.rss_tolerance_pct / 100))
        self.growth["fds"] = (fds2, fds4, a.fd_tolerance)
        for name, unit in (("rss", " MiB"), ("fds", "")):
            base, end, allowed = self.growth[name]
            if end - base > allowed:
                self.fail(
                    f"{name} grew after warm-up: median of the last quarter {end:.1f}{unit} against "
                    f"{base:.1f}{unit} in the second quarter (+{end - base:.1f}, tolerance {allowed:.1f})"
                )

    def check_log(self) -> None:
        self.log_levels: dict[str, int] = {}
        self.log_errors: list[str] = []
        self.log_warnings: dict[str, int] = {}
        refused = 0
        self.server_log.flush()
        for line in (self.out / "server.log").read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                if "panicked" in line:
                    self.fail(f"sluice panicked: {line[:300]}")
                continue
            level = rec.get("level", "?")
            self.log_levels[level] = self.log_levels.get(level, 0) + 1
            msg = str(rec.get("fields", {}).get("message", ""))
            if level == "ERROR" and msg.startswith("TLS reload refused"):
                # A half-rotation's refusal: as many as final_checks accepted, no more.
                refused += 1
                self.log_warnings[msg] = self.log_warnings.get(msg, 0) + 1
            elif level == "ERROR":
                self.log_errors.append(line[:300])
            elif level == "WARN":
                self.log_warnings[msg] = self.log_warnings.get(msg, 0) + 1
        if self.log_errors:
            self.fail(f"sluice logged {len(self.log_errors)} ERROR line(s), first: {self.log_errors[0]}")
        if refused > self.counts.rotation_failures_accepted:
            self.fail(
                f"sluice logged {refused} refused TLS reload(s), beyond the "
                f"{self.counts.rotation_failures_accepted} half-rotation transient(s) accepted"
            )

    # -- output

    def report(self) -> None:
        write_csv(self.out / "samples.csv", self.samples)
        with open(self.out / "load.jsonl", "w") as f:
            for c in self.chunks:
                f.write(json.dumps(c) + "\n")
        plot_ok = self.plot()
        a, c, s = self.args, self.counts, self.samples
        verdict = "PASS" if not self.failures else "FAIL"
        meminfo = Path("/proc/meminfo").read_text()
        mem_gib = int(re.search(r"^MemTotal:\s+(\d+)", meminfo, re.M).group(1)) / 1048576
        cpu = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu_name = cpu.group(1).strip() if cpu else platform.processor()
        lines = [
            f"# sluice soak: {verdict}",
            "",
            f"- Started {self.started_at}, {a.duration:.0f} s; sluice {git_describe()}.",
            f"- Machine: `nproc` {nproc()}, {mem_gib:.1f} GiB memory, {cpu_name}, "
            f"Linux {platform.release()}.",
            f"- Command: `{' '.join(['scripts/soak', *user_argv()])}`.",
            f"- Load: sluice-load, shapes hot, clients, unique in turn, chunks of {a.chunk:.0f} s, "
            f"{a.connections} connections x {a.concurrency} calls in flight, 1 thread. Config: "
            f"load limit 1000/minute per client (the hot client is over it, the others are not), "
            f"store.max_keys {MAX_KEYS:,}, stats.max_clients {MAX_CLIENTS:,}.",
            f"- Every {a.probe_every:.0f} s a probe, every {a.reload_every:.0f} s a config reload, "
            f"every {a.rotate_every:.0f} s an admin certificate rotation, every "
            f"{a.sample_every:.0f} s a sample.",
            "",
        ]
        if self.failures:
            lines += ["## Failures", ""] + [f"- {f}" for f in self.failures] + [""]
        rows: list[tuple[str, str]] = []
        if s:
            first, last = s[0], s[-1]
            span = max(1.0, last.t - first.t)
            rows += [
                ("RSS start / end / max", f"{first.rss_kib / 1024:.1f} / {last.rss_kib / 1024:.1f} / "
                 f"{max(x.rss_kib for x in s) / 1024:.1f} MiB"),
                ("open fds start / end / max", f"{first.fds} / {last.fds} / {max(x.fds for x in s)}"),
                ("threads start / end", f"{first.threads} / {last.threads}"),
                ("server CPU", f"{(last.cpu_s - first.cpu_s) / span:.2f} cores on average"),
                ("machine load average (1 min)", f"median {statistics.median(x.loadavg for x in s):.1f}, "
                 f"max {max(x.loadavg for x in s):.1f}"),
            ]  # fmt: skip
            if not getattr(self, "growth", {}):
                rows.append(("growth after warm-up", "not judged: fewer than 2 samples in a quarter"))
            for name, label, unit in (("rss", "RSS", " MiB"), ("fds", "open fds", "")):
                if name in getattr(self, "growth", {}):
                    base, end, allowed = self.growth[name]
                    rows.append((
                        f"{label}, median of 2nd quarter -> of last quarter",
                        f"{base:.1f} -> {end:.1f}{unit} ({end - base:+.1f}; tolerance +{allowed:.1f})",
                    ))  # fmt: skip
            rates = [x.decisions_per_s for x in s if x.decisions_per_s is not None]
            if rates:
                rows.append((
                    "decisions (all, from /metrics)",
                    f"{last.requests:,.0f}: {last.requests / span:,.0f}/s on average, "
                    f"{min(rates):,.0f} to {max(rates):,.0f}/s per {a.sample_every:.0f} s",
                ))  # fmt: skip
            rows += [
                ("counters tracked, max", f"{max(x.tracked_keys for x in s):,.0f} (bound {KEYS_BOUND:,}: "
                 f"max_keys over 256 shards); evictions {last.evictions:,.0f}"),
                ("clients with statistics, max", f"{max(x.tracked_clients for x in s):,.0f} distinct "
                 f"(entries bounded by {MAX_CLIENTS:,}; a client decided on both threads takes two)"),
            ]  # fmt: skip
        for shape in ("hot", "clients", "unique"):
            ch = [x for x in self.chunks if x.get("shape") == shape]
            if ch:
                rate = statistics.median(x["decisions_per_s"] for x in ch)
                ok, over = sum(x["ok"] for x in ch), sum(x["over_limit"] for x in ch)
                p99, worst = statistics.median(x["p99_ms"] for x in ch), max(x["p99_ms"] for x in ch)
                rows.append((
                    f"sluice-load {shape} ({len(ch)} chunks)",
                    f"median {rate:,.0f} decisions/s; ok {ok:,}, over_limit {over:,}, failures "
                    f"{sum(x['failures'] for x in ch)}; p99 median {p99:.2f} ms, worst {worst:.2f} ms",
                ))  # fmt: skip
        took = self.probe_seconds or [0.0]
        admin = ", ".join(f"{k} {v}" for k, v in sorted(c.admin_calls.items())) or "none"
        rows += [
            ("probe cycles (limit, allowlist, block, stats)", f"{c.probes}, {statistics.median(took):.2f} s "
             f"each (median; worst {max(took):.2f} s); {c.probe_decisions} decisions checked"),
            ("admin calls (grpcurl, mTLS)", f"{sum(c.admin_calls.values())}: {admin}"),
            ("config reloads", f"{c.reloads}, each checked"),
            ("certificate rotations", f"{sum(c.rotations.values())} (rename {c.rotations['rename']}, "
             f"symlink {c.rotations['symlink']}), each checked"),
        ]  # fmt: skip
        if s:
            rows += [
                ("/metrics at the end", f"config reloads ok {last.reloads_ok:.0f}, failed "
                 f"{last.reloads_failed:.0f}; TLS reloads {last.tls_reloads:.0f}, reload failures "
                 f"{last.tls_failures:.0f} (half-rotation transients accepted: "
                 f"{c.rotation_failures_accepted}); TLS handshake failures "
                 f"{last.handshake_failures:.0f}; store errors {last.store_errors:.0f}; connections "
                 f"refused {last.refused:.0f}"),
            ]  # fmt: skip
        levels = ", ".join(f"{k} {v}" for k, v in sorted(getattr(self, "log_levels", {}).items()))
        rows += [
            ("sluice-load failures", f"{sum(x.get('failures', 0) for x in self.chunks)}"),
            ("server log", f"{levels or 'none'}; exit status on SIGTERM {self.server_exit}"),
        ]
        lines += ["## Figures", "", "| | |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in rows] + [""]
        warns = getattr(self, "log_warnings", {})
        if warns:
            lines += ["Warnings logged (and accepted refusals):", ""]
            lines += [f"- {n} x {m}" for m, n in sorted(warns.items())] + [""]
        lines += [
            f"Plot: `{self.out / 'soak.png'}`" if plot_ok else "Plot: not drawn (matplotlib missing)",
            "",
            f"Verdict: **{verdict}**",
            "",
        ]
        (self.out / "report.md").write_text("\n".join(lines))

    def plot(self) -> bool:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return False
        s = self.samples
        if not s:
            return False
        t = [x.t / 60 for x in s]
        fig, (ax1, ax2, ax3) = plt.subplots(
            3, 1, figsize=(9, 6.2), sharex=True, gridspec_kw={"height_ratios": [3, 3, 1.6]}
        )
        ax1.plot(t, [x.rss_kib / 1024 for x in s], color="tab:blue", lw=1.3)
        ax1.set_ylabel("RSS (MiB)")
        ax1.set_ylim(bottom=0)
        rated = [(x.t / 60, x.decisions_per_s / 1000) for x in s if x.decisions_per_s is not None]
        ax2.plot([r[0] for r in rated], [r[1] for r in rated], color="tab:green", lw=1.1, label="/metrics")
        ax2.set_ylabel("decisions/s (k)")
        ax2.set_ylim(bottom=0)
        ax3.plot(t, [x.fds for x in s], color="tab:purple", lw=1.1, drawstyle="steps-post")
        ax3.set_ylabel("open fds")
        ax3.set_ylim(bottom=0, top=max(x.fds for x in s) * 1.3 + 1)
        ax3.set_xlabel("minutes")
        d = self.args.duration / 60
        g = getattr(self, "growth", {}).get("rss")
        for ax in (ax1, ax2, ax3):
            ax.axvspan(0, d / 4, color="0.92", lw=0)
            ax.grid(alpha=0.3)
        if g:
            base, end, _ = g
            ax1.hlines(
                base, d / 4, d / 2, colors="tab:orange", lw=2, label=f"median, 2nd quarter {base:.1f} MiB"
            )
            ax1.hlines(end, 3 * d / 4, d, colors="tab:red", lw=2, label=f"median, last quarter {end:.1f} MiB")
        with open(self.out / "events.jsonl") as f:
            events = [json.loads(line) for line in f]
        for e in events:
            if e["event"] == "cert_rotation":
                ax1.axvline(e["t"] / 60, color="tab:orange", lw=0.9, alpha=0.8, ls=":")
            elif e["event"] == "config_reload":
                ax2.axvline(e["t"] / 60, color="0.35", lw=0.9, alpha=0.8, ls=":")
        ax1.plot([], [], color="tab:orange", lw=0.9, ls=":", label="certificate rotation")
        ax2.plot([], [], color="0.35", lw=0.9, ls=":", label="config reload")
        for shape, color in (("hot", "tab:red"), ("clients", "tab:blue"), ("unique", "tab:olive")):
            ch = [c for c in self.chunks if c.get("shape") == shape]
            ax2.scatter(
                [(c["t_start"] + c["t_end"]) / 120 for c in ch],
                [c["decisions_per_s"] / 1000 for c in ch],
                s=9, color=color, label=f"sluice-load {shape}", zorder=3,
            )  # fmt: skip
        ax1.legend(loc="lower right", fontsize=8)
        ax2.legend(loc="lower right", fontsize=7, ncol=4)
        verdict = "PASS" if not self.failures else "FAIL"
        fig.suptitle(
            f"sluice soak, {self.args.duration / 60:.0f} min on {nproc()} cores: {verdict} "
            f"(grey: warm-up quarter)",
            fontsize=11,
        )
        fig.tight_layout()
        fig.savefig(self.out / "soak.png", dpi=80)
        plt.close(fig)
        return True

    def close(self) -> None:
        self.failed.set()
        self.stop.set()
        self.children.end_all()
        self.events.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


class WrongAnswer(Exception):
    """A reply, counter or certificate that is not what it must be."""


def quarter(samples: list[Sample], q: int, duration: float) -> list[Sample]:
    lo, hi = duration * q / 4, duration * (q + 1) / 4
    return [s for s in samples if lo <= s.t < hi or (q == 3 and s.t >= hi)]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc/PID/stat (ticks of 1/100 s)."""
    rest = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def fingerprint_pem(pem: str) -> str:
    body = "".join(line for line in pem.splitlines() if line and not line.startswith("-----"))
    return hashlib.sha256(base64.b64decode(body)).hexdigest()


def fingerprint_file(path: Path) -> str:
    m = re.search(r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", path.read_text(), re.S)
    if not m:
        raise RuntimeError(f"{path}: no certificate")
    return fingerprint_pem(m.group(0))


def write_csv(path: Path, samples: list[Sample]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        names = list(Sample.__dataclass_fields__)
        w.writerow(names)
        for s in samples:
            w.writerow(
                [
                    round(v, 2) if isinstance(v, float) else ("" if v is None else v)
                    for v in (getattr(s, n) for n in names)
                ]
            )


def user_argv() -> list[str]:
    """The command line as the user gave it to scripts/soak, without what the wrapper adds."""
    argv, out, skip = sys.argv[1:], [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--sluice", "--load", "--tools"):
            skip = True
        elif not a.startswith(("--sluice=", "--load=", "--tools=")):
            out.append(a)
    return out


def nproc() -> str:
    try:
        return subprocess.run(
            ["nproc"], capture_output=True, text=True, stdin=subprocess.DEVNULL
        ).stdout.strip()
    except OSError:
        return str(os.cpu_count())


def git_describe() -> str:
    try:
        r = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            cwd=Path(__file__).resolve().parent,
        )
        return r.stdout.strip() or "?"
    except OSError:
        return "?"


def main() -> int:
    p = argparse.ArgumentParser(
        prog="scripts/soak",
        description="Soak one real sluice server on loopback: load, probes, admin calls, config and "
        "certificate reloads; fails on growth, errors or a wrong answer. See the top of scripts/soak.py.",
    )
    p.add_argument(
        "--duration", type=parse_duration, default=600.0, help="how long (600, 90s, 10m, 1h; default 10m)"
    )
    p.add_argument("--out", default="target/soak", help="output directory (default target/soak)")
    p.add_argument(
        "--chunk",
        type=parse_duration,
        default=None,
        help="seconds per sluice-load run (default duration/40, 5-15 s)",
    )
    p.add_argument("--connections", type=int, default=2, help="sluice-load connections (default 2)")
    p.add_argument(
        "--concurrency", type=int, default=8, help="sluice-load calls in flight per connection (default 8)"
    )
    p.add_argument("--probe-every", type=parse_duration, default=5.0)
    p.add_argument("--reload-every", type=parse_duration, default=20.0)
    p.add_argument("--rotate-every", type=parse_duration, default=30.0)
    p.add_argument("--sample-every", type=parse_duration, default=5.0)
    p.add_argument(
        "--rss-tolerance-mib", type=float, default=8.0, help="RSS growth accepted, MiB (default 8)"
    )
    p.add_argument(
        "--rss-tolerance-pct",
        type=float,
        default=10.0,
        help="... or percent of the 2nd quarter's, if larger (default 10)",
    )
    p.add_argument("--fd-tolerance", type=int, default=4, help="open descriptors growth accepted (default 4)")
    p.add_argument("--sluice", required=True, help=argparse.SUPPRESS)
    p.add_argument("--load", required=True, help=argparse.SUPPRESS)
    p.add_argument("--tools", required=True, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.duration < 10:
        p.error("--duration must be at least 10 s")
    if args.chunk is None:
        args.chunk = min(15.0, max(5.0, args.duration / 40))

    soak = Soak(args)

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        code = soak.run()
    except KeyboardInterrupt as e:
        print(f"soak: interrupted ({e}); ending every process it started", file=sys.stderr)
        soak.close()
        return 130
    except Exception as e:  # noqa: BLE001 - set-up errors end the soak with their message
        soak.fail(f"{type(e).__name__}: {e}")
        soak.close()
        try:
            soak.report()
        except Exception:  # noqa: BLE001
            pass
        print(f"soak: FAIL: {e}", file=sys.stderr)
        return 1
    soak.close()
    out = Path(args.out)
    if code:
        print("soak: FAIL:\n  " + "\n  ".join(soak.failures), file=sys.stderr)
    else:
        print("soak: PASS", file=sys.stderr)
    print(f"soak: report {out / 'report.md'}, plot {out / 'soak.png'}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
