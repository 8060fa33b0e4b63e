"""Rolling restart drill: two real ``anomaly serve`` replicas behind HAProxy, restarted one at a time under load.

A plant runs several replicas behind a load balancer and upgrades them one at a time. The question is whether a
client ever sees a failed part while that happens. For each setting (the replicas' ``--stop-delay`` and HAProxy's
retry policy) the drill starts two replicas, each with its own SQLite records, and HAProxy in front of them with
HTTP health checks on ``/readyz`` and keep-alive connections to the replicas (``option http-keep-alive``,
``http-reuse``). A few client threads, each on one keep-alive connection to HAProxy, post real photos to
``POST /score`` back to back while the drill sends one replica SIGTERM, waits for it to exit, starts it again,
waits until HAProxy sees it up, and does the same to the other; ``--restarts`` rounds of that. Printed: per
setting, the answers by status and the client-side errors, and each failed request's line from HAProxy's log
(its termination state says which side closed: ``SC`` the replica refused the connection, ``SH`` it closed before
answering, ``CD`` the client left).

``--idle`` runs no restart: it asks whether an idle keep-alive connection that a replica closes (after
``--timeout-keep-alive``) can take a part HAProxy sends on it at that moment. Each client pauses after every answer
for a time drawn from ``--pause`` (around the keep-alive timeout), ``--requests`` parts a setting, one setting per
``--keep-alives`` value and retry policy. On loopback a replica's close reaches HAProxy at once, which then drops
the connection from its pool; ``--latency MS`` puts a relay before each replica that delays every chunk and close
by that much each way, as a network hop between the balancer and the replicas does.

HAProxy must be installed (Debian: ``apt-get install haproxy``); without it the script says so and exits 0.

    python benchmarks/rolling_restart.py                                    # delay 0 and 3 s, HAProxy's retries
    python benchmarks/rolling_restart.py --delays 0 3 --retries default redispatch --restarts 5
    python benchmarks/rolling_restart.py --images DIR --model-dir DIR --model NAME --clients 3 --json out.json
    python benchmarks/rolling_restart.py --delays 3 --check tcp --http-reuse always --restarts 3
    python benchmarks/rolling_restart.py --delays 3 --server-options 'on-marked-down shutdown-sessions'
    python benchmarks/rolling_restart.py --idle --latency 25 --keep-alives 5 30 --retries default retry-on --clients 20

``--retries``: ``none`` (``retries 0``), ``default`` (HAProxy's defaults: 3 retries of a failed connection, to the
same replica), ``redispatch`` (``option redispatch`` and ``retries 3``: the last retry goes to another replica),
``retry-on`` (redispatch and ``retry-on conn-failure empty-response response-timeout``: a request sent on a
connection closed unanswered is sent again, if it fits in HAProxy's buffer, ``tune.bufsize``).
The HAProxy settings asked of a plant: docs/service.md "Behind a load balancer".
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED_TEST = REPO.parent / "shared" / "data" / "mvtec_ad" / "bottle" / "test"
RETRIES = ("none", "default", "redispatch", "retry-on")
# an ``option httplog`` line: ... status bytes cookie cookie termination-state ... "METHOD URI HTTP/1.1"
LOG_LINE = re.compile(r'\s(\d{3}|-1) \+?\d+ \S+ \S+ (\S{4}) .*"(\S+) (\S+)')


def free_port() -> int:
    """A port in the range the project's scratch servers use, free when asked (bound again by its user)."""
    for _ in range(100):
        port = random.randint(20000, 29999)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise SystemExit("no free port in 20000-29999")


def fit_model(root: Path) -> tuple[Path, str]:
    """A small efficientnet_lite0 model on synthetic good parts, as the tests fit theirs."""
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "tests"))
    from anomaly_service import AnomalyModel
    from conftest import textured_part

    rng = np.random.default_rng(0)
    images = [textured_part(rng, 128, 128) for _ in range(12)]
    print("fitting a small efficientnet_lite0 model on synthetic parts ...", file=sys.stderr)
    AnomalyModel(backbone="efficientnet_lite0", image_size=128, coreset_ratio=0.25, progress=False,
                 calibration_fraction=0.25).fit(images).save(root / "drill")
    return root, "drill"


def load_images(folder: Path | None, limit: int = 16) -> tuple[list[bytes], str]:
    """Photo bytes to post: ``folder``'s PNGs (bottle's test photos by default), else synthetic PNGs."""
    folder = folder or (SHARED_TEST if SHARED_TEST.is_dir() else None)
    if folder is not None:
        files = sorted(folder.rglob("*.png"))
        if not files:
            raise SystemExit(f"{folder}: no PNG photos")
        picked = files[:: max(1, len(files) // limit)][:limit]
        return [p.read_bytes() for p in picked], f"{len(picked)} photos from {folder}"
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import png_bytes, textured_part

    rng = np.random.default_rng(1)
    return [png_bytes(textured_part(rng, 128, 128)) for _ in range(limit)], f"{limit} synthetic photos"


class Replica:
    """One ``anomaly serve`` process on a fixed port, with its own records directory, started again on demand."""

    def __init__(self, name: str, model_dir: Path, work: Path, delay: float, extra: list[str]):
        self.name, self.model_dir, self.delay, self.extra = name, model_dir, delay, extra
        self.port = free_port()
        self.data_dir = work / f"data-{name}"
        self.log = work / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        cmd = [sys.executable, "-m", "anomaly_service.cli", "serve", "--model-dir", str(self.model_dir),
               "--port", str(self.port), "--data-dir", str(self.data_dir), "--reload-interval", "0",
               "--stop-delay", str(self.delay), "--log-level", "warning", *self.extra]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

    def stop(self, timeout: float = 120) -> tuple[float, int]:
        """SIGTERM, and wait for the exit: (seconds it took, exit status)."""
        assert self.proc is not None
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        status = self.proc.wait(timeout=timeout)
        return time.monotonic() - t0, status

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class Relay:
    """A TCP relay in front of one replica that delays every chunk and every close by ``delay`` seconds each way, as
    a network hop between the balancer and the replica does (on loopback a replica's close reaches HAProxy at once,
    so a request can only cross it in a window of microseconds)."""

    def __init__(self, target_port: int, delay: float):
        import asyncio

        self.target_port, self.delay = target_port, delay
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        import asyncio

        asyncio.set_event_loop(self.loop)

        async def pump(reader, writer, other) -> None:
            # chunks in order, each ``delay`` after it was read; the end of the stream too, then both sides close
            queue: asyncio.Queue = asyncio.Queue()

            async def deliver() -> None:
                while True:
                    due, data = await queue.get()
                    await asyncio.sleep(max(0.0, due - self.loop.time()))
                    if data is None or writer.is_closing():
                        break
                    writer.write(data)
                writer.close()
                other.close()

            task = asyncio.ensure_future(deliver())
            try:
                while data := await reader.read(65536):
                    queue.put_nowait((self.loop.time() + self.delay, data))
            except OSError:
                pass
            queue.put_nowait((self.loop.time() + self.delay, None))
            await task

        async def handle(client_reader, client_writer) -> None:
            try:
                server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            except OSError:
                client_writer.close()
                return
            await asyncio.gather(pump(client_reader, server_writer, client_writer),
                                 pump(server_reader, client_writer, server_writer), return_exceptions=True)

        async def main() -> None:
            server = await asyncio.start_server(handle, "127.0.0.1", self.port)
            self._ready.set()
            async with server:
                await server.serve_forever()

        try:
            self.loop.run_until_complete(main())
        except RuntimeError:  # stopped by stop(): end the connections' tasks quietly
            tasks = asyncio.all_tasks(self.loop)
            for task in tasks:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        self.loop.close()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)


class HAProxy:
    """HAProxy in the foreground (``-db``), its log on stderr in a file, its state through a stats socket."""

    def __init__(self, work: Path, replicas: list[Replica], retries: str, inter: float, fall: int, rise: int,
                 reuse: str, check: str = "http", server_options: str = "", extra: list[str] | None = None):
        self.port = free_port()
        # a Unix socket's path has a short limit (HAProxy's: 97 bytes), which a deep --work or pytest's tmp_path passes
        self._socket_dir = None if len(str(work / "haproxy.sock")) < 90 else Path(tempfile.mkdtemp(prefix="rr-"))
        self.socket = (self._socket_dir or work) / "haproxy.sock"
        self.config = work / "haproxy.cfg"
        self.log = work / "haproxy.log"
        retry_lines = {"none": ["retries 0"], "default": [],
                       "redispatch": ["option redispatch", "retries 3"],
                       "retry-on": ["option redispatch", "retries 3",
                                    "retry-on conn-failure empty-response response-timeout"]}[retries]
        servers = [f"    server {r.name} 127.0.0.1:{r.port} check" for r in replicas]
        self.config.write_text("\n".join([
            "global",
            "    log stderr format raw local0 info",
            f"    stats socket {self.socket} level admin",
            "    maxconn 256",
            "defaults",
            "    mode http",
            "    log global",
            "    option httplog",
            "    option http-keep-alive",
            f"    http-reuse {reuse}",
            "    timeout connect 2s",
            "    timeout client 60s",
            "    timeout server 60s",
            "    timeout check 2s",
            *[f"    {line}" for line in retry_lines],
            *[f"    {line}" for line in extra or []],
            "frontend line",
            f"    bind 127.0.0.1:{self.port}",
            "    default_backend replicas",
            "backend replicas",
            "    balance roundrobin",
            *(["    option httpchk GET /readyz", "    http-check expect status 200"] if check == "http" else []),
            f"    default-server inter {int(inter * 1000)}ms fall {fall} rise {rise} {server_options}".rstrip(),
            *servers,
            "",
        ]))
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        check = subprocess.run(["haproxy", "-c", "-f", str(self.config)], capture_output=True, text=True)
        if check.returncode != 0:
            raise SystemExit(f"haproxy refused its configuration:\n{check.stdout}{check.stderr}")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(["haproxy", "-db", "-f", str(self.config)], stdout=log, stderr=log)

    def status(self) -> dict[str, str]:
        """Each server's state as HAProxy sees it (UP, DOWN, UP 1/2 ...)."""
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(2)
                s.connect(str(self.socket))
                s.sendall(b"show stat\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
        except OSError:
            return {}
        lines = data.decode().splitlines()
        if not lines or not lines[0].startswith("# "):
            return {}
        header = lines[0][2:].split(",")
        out = {}
        for line in lines[1:]:
            row = dict(zip(header, line.split(",")))
            if row.get("pxname") == "replicas" and row.get("svname") not in ("BACKEND", None):
                out[row["svname"]] = row.get("status", "")
        return out

    def wait_up(self, names: list[str], timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.status()
            if all(state.get(n) == "UP" for n in names):
                return
            time.sleep(0.2)
        raise SystemExit(f"HAProxy did not see {names} up within {timeout:g} s: {self.status()}")

    def wait_down(self, name: str, timeout: float) -> bool:
        """Wait until HAProxy has taken ``name`` out (a replica restarted within its checks never is)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.status().get(name, "").startswith(("DOWN", "MAINT")):
                return True
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGUSR1)  # a soft stop: the log is written out
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)


class Clients:
    """``n`` threads, each with one keep-alive connection to HAProxy, posting photos back to back until stopped."""

    def __init__(self, url: str, images: list[bytes], n: int, model: str,
                 pause: tuple[float, float] | None = None, total: int | None = None):
        self.url, self.images, self.n, self.model = url, images, n, model
        self.pause, self.total = pause, total  # idle mode: a pause drawn from ``pause`` after each answer
        self.counts: Counter[str] = Counter()
        self.failures: list[tuple[float, str]] = []  # (seconds since the start, what the client saw)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(n)]
        self.t0 = time.monotonic()

    def _loop(self, i: int) -> None:
        import httpx

        k = i
        rng = random.Random(i)
        slept = 0.0
        with httpx.Client(timeout=60, limits=httpx.Limits(max_connections=1, max_keepalive_connections=1)) as c:
            while not self._stop.is_set():
                data = self.images[k % len(self.images)]
                k += self.n
                try:
                    r = c.post(f"{self.url}/score", params={"model": self.model},
                               files={"file": ("part.png", data, "image/png")})
                    key = str(r.status_code)
                except httpx.HTTPError as exc:
                    key = f"{type(exc).__name__}: {exc}"[:120]
                with self._lock:
                    self.counts[key] += 1
                    if key != "200":
                        after = f" (after {slept:.3f} s idle)" if self.pause is not None else ""
                        self.failures.append((time.monotonic() - self.t0, key + after))
                    if self.total is not None and sum(self.counts.values()) >= self.total:
                        self._stop.set()
                if self.pause is not None:
                    slept = rng.uniform(*self.pause)
                    self._stop.wait(slept)

    def start(self) -> None:
        self.t0 = time.monotonic()
        for t in self._threads:
            t.start()

    def wait(self) -> None:
        """Until ``total`` answers were counted (idle mode)."""
        while not self._stop.wait(1):
            pass

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)


def failed_log_lines(log: Path) -> list[str]:
    """HAProxy's request lines that were not a 200 answered in full (their termination state is not ``----``)."""
    out = []
    for line in log.read_text(errors="replace").splitlines():
        m = LOG_LINE.search(line)
        if m and m.group(3) == "POST" and (m.group(1) != "200" or m.group(2) != "----"):
            out.append(line.strip())
    return out


def log_states(lines: list[str]) -> dict[str, int]:
    """The failed lines counted by status and termination state (``503 SC--``)."""
    counts: Counter[str] = Counter()
    for line in lines:
        m = LOG_LINE.search(line)
        if m:
            counts[f"{m.group(1)} {m.group(2)}"] += 1
    return dict(sorted(counts.items()))


def stop_all(clients: Clients | None, replicas: list[Replica], proxy: HAProxy) -> None:
    """The clients, then both replicas (SIGTERM, a minute to exit), then HAProxy; whatever stops this midway (a
    second Ctrl-C while a replica takes its time) kills what is left, never leaves it running."""
    try:
        if clients is not None:
            clients.stop()
        running = [r for r in replicas if r.proc is not None and r.proc.poll() is None]
        for r in running:
            r.proc.send_signal(signal.SIGTERM)
        for r in running:
            try:
                r.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass  # killed below
    finally:
        try:
            for r in replicas:
                r.kill()
        finally:
            proxy.stop()


def run_setting(model_dir: Path, model: str, images: list[bytes], delay: float, retries: str, args: argparse.Namespace,
                work: Path) -> dict[str, Any]:
    work.mkdir(parents=True)
    replicas = [Replica(name, model_dir, work, delay, args.server_args.split()) for name in ("a", "b")]
    proxy = HAProxy(work, replicas, retries, args.inter, args.fall, args.rise, args.http_reuse, args.check,
                    args.server_options)
    clients = None
    stops: list[float] = []
    statuses: list[int] = []
    try:
        for r in replicas:
            r.start()
        proxy.start()
        proxy.wait_up(["a", "b"])
        clients = Clients(f"http://127.0.0.1:{proxy.port}", images, args.clients, model)
        clients.start()
        time.sleep(args.settle)
        for round_ in range(args.restarts):
            for r in replicas:
                seconds, status = r.stop()
                stops.append(seconds)
                statuses.append(status)
                r.start()
                # until HAProxy has seen the stop, it still says UP: waiting for UP alone took the other replica
                # down while this one was still out
                proxy.wait_down(r.name, timeout=(args.fall + 1) * args.inter + 5)
                proxy.wait_up(["a", "b"])
                time.sleep(args.settle)
            print(f"  delay {delay:g} s, retries {retries}: round {round_ + 1}/{args.restarts} done, "
                  f"{dict(clients.counts)}", file=sys.stderr)
        clients.stop()
    finally:
        stop_all(clients, replicas, proxy)
    assert clients is not None
    return {"stop_delay": delay, "retries": retries, "check": args.check, "http_reuse": args.http_reuse,
            "server_options": args.server_options, "restarts": len(stops),
            "answers": dict(sorted(clients.counts.items())),
            "failed": sum(n for k, n in clients.counts.items() if k != "200"),
            "stop_seconds_median": float(np.median(stops)) if stops else None,
            "exit_statuses": sorted(set(statuses)),
            "client_failures": [f"{t:.1f} s {what}" for t, what in clients.failures],
            "haproxy_failed_lines": failed_log_lines(proxy.log),
            "haproxy_failed": log_states(failed_log_lines(proxy.log))}


def run_idle(model_dir: Path, model: str, images: list[bytes], keep_alive: float, retries: str,
             args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """No restart: the clients pause around the replicas' keep-alive timeout between parts, so HAProxy sends some
    parts on a connection to a replica just as the replica closes it for being idle."""
    work.mkdir(parents=True)
    extra = ["--timeout-keep-alive", f"{keep_alive:g}", *args.server_args.split()]
    replicas = [Replica(name, model_dir, work, 0.0, extra) for name in ("a", "b")]
    relays = [Relay(r.port, args.latency / 1000) for r in replicas] if args.latency > 0 else []
    targets = [SimpleNamespace(name=r.name, port=relay.port) for r, relay in zip(replicas, relays)] or replicas
    proxy = HAProxy(work, targets, retries, args.inter, args.fall, args.rise, args.http_reuse, args.check,
                    args.server_options, args.haproxy_lines)
    clients = None
    t0 = time.monotonic()
    try:
        for r in replicas:
            r.start()
        for relay in relays:
            relay.start()
        proxy.start()
        proxy.wait_up(["a", "b"])
        clients = Clients(f"http://127.0.0.1:{proxy.port}", images, args.clients, model,
                          pause=tuple(args.pause), total=args.requests)
        clients.start()
        clients.wait()
        clients.stop()
    finally:
        if clients is not None:
            clients.stop()
        for r in replicas:
            if r.proc is not None and r.proc.poll() is None:
                try:
                    r.stop(timeout=60)
                except subprocess.TimeoutExpired:
                    r.kill()
        proxy.stop()
        for relay in relays:
            relay.stop()
    assert clients is not None
    print(f"  keep-alive {keep_alive:g} s, retries {retries}: {dict(clients.counts)} in "
          f"{time.monotonic() - t0:.0f} s", file=sys.stderr)
    return {"keep_alive": keep_alive, "retries": retries, "http_reuse": args.http_reuse, "latency_ms": args.latency,
            "haproxy_lines": args.haproxy_lines, "server_options": args.server_options,
            "pause": list(args.pause), "answers": dict(sorted(clients.counts.items())),
            "posted": sum(clients.counts.values()),
            "failed": sum(n for k, n in clients.counts.items() if k != "200"),
            "client_failures": [f"{t:.1f} s {what}" for t, what in clients.failures],
            "haproxy_failed_lines": failed_log_lines(proxy.log),
            "haproxy_failed": log_states(failed_log_lines(proxy.log))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delays", type=float, nargs="+", default=[0.0, 3.0],
                        help="--stop-delay values of the replicas, one setting each (default: 0 and 3 s, a little "
                             "over inter x fall)")
    parser.add_argument("--retries", nargs="+", choices=RETRIES, default=["default", "redispatch"],
                        help="HAProxy retry policies, one setting each (default: HAProxy's defaults, redispatch)")
    parser.add_argument("--restarts", type=int, default=5, help="restarts of each replica per setting (default 5)")
    parser.add_argument("--clients", type=int, default=3, help="client threads, each on one keep-alive connection")
    parser.add_argument("--inter", type=float, default=1.0, help="HAProxy's health check interval, seconds (1)")
    parser.add_argument("--fall", type=int, default=2, help="failed checks before HAProxy takes a replica out (2)")
    parser.add_argument("--rise", type=int, default=2, help="passed checks before HAProxy sends it work again (2)")
    parser.add_argument("--http-reuse", choices=["never", "safe", "aggressive", "always"], default="safe",
                        help="HAProxy's reuse of idle connections to the replicas (default: its own, safe)")
    parser.add_argument("--check", choices=["http", "tcp"], default="http",
                        help="HAProxy's health check: http (GET /readyz, 200 expected) or tcp (the port open)")
    parser.add_argument("--server-options", default="",
                        help="more HAProxy server options for both replicas, e.g. 'on-marked-down shutdown-sessions'")
    parser.add_argument("--idle", action="store_true",
                        help="no restarts: each client pauses between parts for a time drawn from --pause, around "
                             "the replicas' keep-alive timeout, so HAProxy reuses connections the replicas close")
    parser.add_argument("--keep-alives", type=float, nargs="+", default=[5.0, 30.0],
                        help="--idle: the replicas' --timeout-keep-alive values, one setting each (default 5 and 30)")
    parser.add_argument("--pause", type=float, nargs=2, default=[4.5, 5.5], metavar=("MIN", "MAX"),
                        help="--idle: seconds a client waits after each answer, drawn uniformly (default 4.5 5.5)")
    parser.add_argument("--latency", type=float, default=0.0,
                        help="--idle: milliseconds a relay adds each way between HAProxy and each replica, as a "
                             "network hop does (default 0: HAProxy talks to the replicas directly)")
    parser.add_argument("--requests", type=int, default=300, help="--idle: parts posted per setting (default 300)")
    parser.add_argument("--haproxy-lines", nargs="*", default=[],
                        help="more lines for HAProxy's defaults section, e.g. 'timeout http-keep-alive 2s'")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds of load before each restart (2)")
    parser.add_argument("--images", type=Path, help="folder of PNG photos to post (default: bottle's test photos "
                        "beside the repository, else synthetic ones)")
    parser.add_argument("--model-dir", type=Path, help="models to serve (default: a small model fitted here)")
    parser.add_argument("--model", default="drill", help="the model under --model-dir to score with")
    parser.add_argument("--server-args", default="", help="more `anomaly serve` flags for both replicas")
    parser.add_argument("--work", type=Path, help="keep the logs, configs and records here (default: a temporary "
                        "directory, removed)")
    parser.add_argument("--json", type=Path, help="write every setting's counts and failed lines here")
    args = parser.parse_args()
    if args.restarts < 1 or args.clients < 1 or args.fall < 1 or args.rise < 1 or args.inter <= 0:
        parser.error("--restarts, --clients, --fall and --rise take 1 or more, --inter more than 0")
    if shutil.which("haproxy") is None:
        print("haproxy is not installed (Debian: apt-get install haproxy): nothing measured", file=sys.stderr)
        return

    # a SIGTERM (``timeout``, a CI job cancelled, ``kill``) or SIGHUP (the terminal closed) ended the script at once,
    # and the replicas and HAProxy ran on with no parent: stopped as for Ctrl-C; a second one is not let cut that short
    def stopped(signum: int, frame: Any) -> None:
        signal.signal(signum, signal.SIG_IGN)
        raise SystemExit(f"stopped by {signal.Signals(signum).name}: the replicas and HAProxy are stopped")

    handlers = {s: signal.signal(s, stopped) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        drill(args)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)


def drill(args: argparse.Namespace) -> None:
    work = args.work or Path(tempfile.mkdtemp(prefix="rolling-restart-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("ANOMALY_LOG_LEVEL", "warning")
    try:
        model_dir, model = (args.model_dir, args.model) if args.model_dir else fit_model(work / "models")
        images, source = load_images(args.images)
        version = subprocess.run(["haproxy", "-v"], capture_output=True, text=True).stdout.splitlines()[0]
        print(f"{version}; {source}; {args.clients} clients; inter {args.inter:g} s, fall {args.fall}, "
              f"rise {args.rise}; {args.check} check; http-reuse {args.http_reuse}; "
              f"{args.restarts} restarts of each replica{'; ' + args.server_options if args.server_options else ''}",
              file=sys.stderr)
        rows = []
        if args.idle:
            print(f"idle: pauses of {args.pause[0]:g}-{args.pause[1]:g} s, {args.requests} parts a setting, "
                  f"{args.latency:g} ms each way to the replicas; "
                  f"HAProxy defaults + {args.haproxy_lines}", file=sys.stderr)
            for keep_alive in args.keep_alives:
                for retries in args.retries:
                    rows.append(run_idle(model_dir, model, images, keep_alive, retries, args,
                                         work / f"keepalive{keep_alive:g}-{retries}"))
        for delay in ([] if args.idle else args.delays):
            for retries in args.retries:
                rows.append(run_setting(model_dir, model, images, delay, retries, args,
                                        work / f"delay{delay:g}-{retries}"))
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    if args.idle:
        print_idle(rows, args)
        return
    print("| --stop-delay | HAProxy retries | restarts | answers the clients saw | failed | HAProxy's log of them | "
          "median stop s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        answers = ", ".join(f"{k} x{n}" for k, n in row["answers"].items())
        logged = ", ".join(f"{k} x{n}" for k, n in row["haproxy_failed"].items()) or "-"
        print(f"| {row['stop_delay']:g} | {row['retries']} | {row['restarts']} | {answers} | {row['failed']} | "
              f"{logged} | {row['stop_seconds_median']:.1f} |")
    print_failures(rows, args, lambda row: f"delay {row['stop_delay']:g}, retries {row['retries']}")


def print_failures(rows: list[dict[str, Any]], args: argparse.Namespace, label: Any) -> None:
    """What the clients and HAProxy said of each failed part, under each row's ``label(row)``; the rows to --json."""
    for row in rows:
        if row["haproxy_failed_lines"] or row["client_failures"]:
            print(f"\n{label(row)}:")
            for line in row["client_failures"][:20]:
                print(f"  client: {line}")
            for line in row["haproxy_failed_lines"][:20]:
                print(f"  haproxy: {line}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


def print_idle(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print("| --timeout-keep-alive | HAProxy retries | parts posted | answers the clients saw | failed | "
          "HAProxy's log of them |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        answers = ", ".join(f"{k} x{n}" for k, n in row["answers"].items())
        logged = ", ".join(f"{k} x{n}" for k, n in row["haproxy_failed"].items()) or "-"
        print(f"| {row['keep_alive']:g} | {row['retries']} | {row['posted']} | {answers} | {row['failed']} | "
              f"{logged} |")
    print_failures(rows, args, lambda row: f"keep-alive {row['keep_alive']:g}, retries {row['retries']}")


if __name__ == "__main__":
    main()
