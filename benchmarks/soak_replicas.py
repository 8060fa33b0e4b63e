"""Soak of two replicas on PostgreSQL: what a plant does over months, compressed into an hour, from one command.

Two real ``anomaly serve`` replicas share one PostgreSQL records database, one ``--data-dir`` (the picture volume)
and one ``--model-dir`` holding two small ``efficientnet_lite0`` models (fitted here on shared bottle training
photos, or synthetic parts where the shared data is absent), as docs/service.md describes for several replicas.
PostgreSQL is a throw-away cluster started here as tests/conftest.py starts the tests' one (as an unprivileged user
when run as root). For ``--minutes`` the driver:

* scores about ``--rate`` parts a second in all, alternating between the replicas, every photo distinct (a counter
  stamped into one corner), a few as a batch of three, some with a heatmap, now and then a truncated upload (400);
* polls as the page does (the newest inspection and its pictures every 2 s; the models, versions, drift, review
  queue, history and stats every 30 s; the page itself every 2 minutes) and scrapes ``/metrics`` every 15 s;
* reviews a part every 20 s (its true verdict; a fifth undone);
* updates the first model over HTTP every ``--update-every`` seconds, on alternating replicas, with one good photo,
  and after every third update rolls it back (``replaces`` the version it saw) on the other replica; after each it
  waits until both replicas serve the version on disk and says how long that took;
* every ``--backup-every`` seconds runs ``anomaly models backup`` and ``pg_dump --format=custom`` and checks that
  each loads: ``anomaly info --verify`` of every model in the copy, ``pg_restore`` into a new database whose
  inspections are counted;
* stops one replica with SIGTERM and starts it again, twice (its parts go to the other meanwhile, as a load
  balancer would send them), and restarts PostgreSQL once (scoring goes on; the records wait and come back);
* samples every 30 s each replica's RSS, open fds, threads and the PostgreSQL connections it holds, the database's
  size and its sessions (``pg_stat_activity``), the files under the model directory and the data directory, and
  the replicas' logs.

At the end it waits for the record buffers to empty and checks that every inspection id a replica answered is a
row in the database. Printed: the sampled table, every unexpected status, the settle time of each update and
rollback, the backups' checks and the records' count. ``--json`` writes all of it.

    python benchmarks/soak_replicas.py                                   # 60 minutes, about 2 parts a second
    python benchmarks/soak_replicas.py --minutes 6 --update-every 60 --backup-every 120 --json soak.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import training_photos  # noqa: E402  (the load test's: the same photos, the same header)
from rolling_restart import free_port  # noqa: E402  (the drill's: a port in the scratch servers' range)

SHARED = REPO.parent / "shared" / "data" / "mvtec_ad" / "bottle"  # --category: another place
PG_USER = "anomaly-pg"  # PostgreSQL refuses to run as root: the cluster runs as this user, as the tests' does
MODEL, SECOND = "bottle", "bottle_small"


def proc_counts(pid: int) -> dict[str, Any]:
    """RSS (MiB), open fds, threads, and the inodes of its sockets, from /proc."""
    out: dict[str, Any] = {"rss_mb": float("nan"), "fds": 0, "threads": 0, "sockets": set()}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                out["rss_mb"] = int(line.split()[1]) / 1024
            elif line.startswith("Threads:"):
                out["threads"] = int(line.split()[1])
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            out["fds"] += 1
            with_target = os.readlink(fd) if fd.is_symlink() else ""
            if with_target.startswith("socket:["):
                out["sockets"].add(with_target[8:-1])
    except OSError:
        pass
    return out


def connections_to(sockets: set[str], port: int) -> int:
    """How many of these socket inodes are TCP connections to ``port`` on loopback (PostgreSQL's)."""
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[9] in sockets and int(f[2].rsplit(":", 1)[1], 16) == port and f[3] == "01":
                n += 1
    return n


def tree_files(root: Path) -> tuple[int, float]:
    """Files under ``root`` and their size in MiB."""
    n, size = 0, 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            try:
                size += os.lstat(os.path.join(dirpath, name)).st_size
                n += 1
            except OSError:
                pass
    return n, size / 2**20


class Postgres:
    """A throw-away cluster on a free loopback port, as tests/conftest.py's ``postgres_server``."""

    def __init__(self, root: Path):
        found = shutil.which("pg_ctl")
        versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
        if not found and not versions:
            raise SystemExit("PostgreSQL is not installed: apt-get install postgresql")
        # /usr/local/bin/pg_ctl may be a link into the version's bin, where pg_dump and pg_restore are
        self.bindir = Path(found).resolve().parent if found else versions[-1].parent
        self.root, self.data, self.port = root, root / "data", free_port()
        self.run_as: dict[str, str] = {}
        root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            import pwd

            try:
                pwd.getpwnam(PG_USER)
            except KeyError:
                subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER],
                               capture_output=True)
            shutil.chown(root, PG_USER, PG_USER)
            self.run_as = {"user": PG_USER, "group": PG_USER}
        subprocess.run([str(self.bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E",
                        "UTF8", "--locale=C", "--no-sync"], check=True, capture_output=True, **self.run_as)
        self.start()

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=100"
        return subprocess.run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-o", options, "-l",
                               str(self.root / "log"), "-w", "-t", "60", *args], capture_output=True, text=True,
                              **self.run_as)

    def start(self) -> None:
        done = self.ctl("start")
        if done.returncode != 0:
            raise SystemExit(f"PostgreSQL did not start: {done.stderr}")

    def url(self, db: str, driver: bool = True) -> str:
        return f"postgresql{'+psycopg' if driver else ''}://postgres@127.0.0.1:{self.port}/{db}"

    def query(self, sql: str, db: str = "postgres", params: tuple = ()) -> list[tuple]:
        import psycopg

        with psycopg.connect(self.url(db, False), autocommit=True, connect_timeout=5) as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def tool(self, name: str, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(self.bindir / name), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                               *args], capture_output=True, text=True)

    def stop(self) -> None:
        self.ctl("-m", "fast", "stop")


def fit_models(model_dir: Path, train_limit: int, category: Path) -> str:
    """Two small efficientnet_lite0 models: ``bottle`` on ``train_limit`` photos, ``bottle_small`` on half as many
    at a smaller working size."""
    sys.path.insert(0, str(REPO))
    from anomaly_service import AnomalyModel

    train, source = training_photos(category, train_limit)
    print(f"fitting two efficientnet_lite0 models on {source} ...", file=sys.stderr, flush=True)
    AnomalyModel(backbone="efficientnet_lite0", progress=False).fit(train).save(model_dir / MODEL)
    AnomalyModel(backbone="efficientnet_lite0", image_size=160, progress=False).fit(train[::2]).save(
        model_dir / SECOND)
    return source


def test_photos(category: Path) -> list[tuple[np.ndarray, str]]:
    """(pixels, true verdict) of the category's test photos, as a line sees them: four good parts in five."""
    if (category / "test").is_dir():
        good, defect = [], []
        for p in sorted((category / "test").rglob("*.png")):
            pixels = np.asarray(Image.open(p).convert("RGB"))
            (good if p.parent.name == "good" else defect).append((pixels, "good" if p.parent.name == "good"
                                                                   else "defect"))
    else:
        sys.path.insert(0, str(REPO / "tests"))
        from conftest import add_defect, textured_part

        rng = np.random.default_rng(1)
        good = [(textured_part(rng, 256, 256), "good") for _ in range(12)]
        defect = [(add_defect(textured_part(rng, 256, 256), 100, 100, 20)[0], "defect") for _ in range(6)]
    out = []
    for i in range(100):
        out.append(defect[i // 5 % len(defect)] if i % 5 == 4 else good[i % len(good)])
    return out


def stamped(pixels: np.ndarray, n: int, fmt: str = "PNG") -> bytes:
    """The photo with ``n`` written into its top-left corner as pixel values: every part distinct."""
    img = pixels.copy()
    img[0, :8] = np.frombuffer(n.to_bytes(8, "big"), np.uint8)[:, None]
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, fmt, **({"compress_level": 1} if fmt == "PNG" else {"quality": 92}))
    return buf.getvalue()


class Replica:
    def __init__(self, name: str, model_dir: Path, data_dir: Path, db_url: str, log: Path, flags: list[str]):
        self.name, self.model_dir, self.data_dir, self.db_url, self.log = name, model_dir, data_dir, db_url, log
        self.flags, self.port = flags, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.up = threading.Event()
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self) -> None:
        env = {**os.environ, "ANOMALY_DATABASE_URL": self.db_url}
        env.pop("ANOMALY_API_KEY", None)
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "anomaly_service.cli", "serve", "--model-dir",
                                          str(self.model_dir), "--data-dir", str(self.data_dir), "--port",
                                          str(self.port), *self.flags], env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited during start-up; see {self.log}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    self.starts += 1
                    self.up.set()
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit(f"{self.name} did not become ready")

    def stop(self) -> float:
        """SIGTERM, as a service manager stops it; the seconds it took to exit."""
        self.up.clear()
        time.sleep(1.0)  # the balancer takes it out first: parts in flight end, new ones go to the other
        assert self.proc is not None
        t0 = time.time()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return time.time() - t0


class Soak:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.root = args.workdir or Path(tempfile.mkdtemp(prefix="anomaly-soak2-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.model_dir, self.data_dir = self.root / "models", self.root / "data"
        self.model_dir.mkdir(exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.statuses: Counter = Counter()  # (route kind, status) -> count
        self.unexpected: list[dict[str, Any]] = []
        self.answered_ids: set[str] = set()
        self.truth: dict[str, str] = {}
        self.null_ids = 0
        self.parts = 0
        self.reviews = self.undone = 0
        self.events: list[dict[str, Any]] = []
        self.samples: list[dict[str, Any]] = []
        self.changes: list[dict[str, Any]] = []
        self.backups: list[dict[str, Any]] = []
        self.served_versions: Counter = Counter()
        self.pg_outage = False  # records routes answer 503 records_unavailable while PostgreSQL is down: expected
        self.expected_version: tuple[str, float] | None = None  # settled (version, since): every answer after it
        self.stale: list[dict[str, Any]] = []
        self.t0 = time.time()

    # -- bookkeeping ------------------------------------------------------------------------------------------------
    def minute(self) -> float:
        return (time.time() - self.t0) / 60

    def note(self, kind: str, **what: Any) -> None:
        with self.lock:
            self.events.append({"minute": round(self.minute(), 2), "event": kind, **what})
        print(f"[{self.minute():5.1f} min] {kind} {what}", file=sys.stderr, flush=True)

    def count(self, kind: str, replica: Replica, r: httpx.Response | None, exc: Exception | None = None,
              expected: tuple[int, ...] = (200,)) -> None:
        status = r.status_code if r is not None else type(exc).__name__
        with self.lock:
            self.statuses[(kind, status)] += 1
            outage = self.pg_outage and status == 503 and r is not None and "records_unavailable" in r.text
            if status not in expected and replica.up.is_set() and not outage:
                body = r.text[:300] if r is not None else str(exc)[:300]
                self.unexpected.append({"minute": round(self.minute(), 2), "replica": replica.name, "kind": kind,
                                        "status": status, "body": body})
                print(f"[{self.minute():5.1f} min] UNEXPECTED {kind} on {replica.name}: {status} {body[:160]}",
                      file=sys.stderr, flush=True)

    def get(self, c: httpx.Client, replica: Replica, kind: str, path: str, expected: tuple[int, ...] = (200,),
            **kw: Any) -> httpx.Response | None:
        try:
            r = c.get(f"{replica.url}{path}", **kw)
        except httpx.HTTPError as exc:
            self.count(kind, replica, None, exc, expected)
            return None
        self.count(kind, replica, r, None, expected)
        return r

    def live(self) -> list[Replica]:
        return [r for r in self.replicas if r.up.is_set()]

    # -- the line ---------------------------------------------------------------------------------------------------
    def scorer(self) -> None:
        n = 0
        with httpx.Client(timeout=120) as c:
            while not self.stop_event.is_set():
                t_next = time.time() + 1.0 / self.args.rate
                live = self.live()
                if not live:
                    time.sleep(0.2)
                    continue
                replica = live[n % len(live)]
                n += 1
                pixels, _ = self.photos[n % len(self.photos)]
                model = SECOND if n % 5 == 0 else MODEL
                sent = time.time()
                try:
                    if n % 97 == 0:  # a truncated upload: 400
                        data = stamped(pixels, n)
                        r = c.post(f"{replica.url}/score", params={"model": model},
                                   files={"file": ("cut.png", data[: len(data) // 2], "image/png")})
                        self.count("score-truncated", replica, r, None, (400,))
                    elif n % 10 == 0:  # a batch of three
                        files = [("files", (f"b{n}-{i}.png", stamped(self.photos[(n + i) % len(self.photos)][0],
                                                                    n * 10 + i), "image/png")) for i in range(3)]
                        r = c.post(f"{replica.url}/score/batch", params={"model": model}, files=files)
                        self.count("score-batch", replica, r)
                        if r.status_code == 200:
                            self.take_ids(replica, [item.get("result") or {} for item in r.json()["results"]],
                                          [self.photos[(n + i) % len(self.photos)][1] for i in range(3)], sent)
                    else:
                        fmt = "JPEG" if n % 4 == 0 else "PNG"
                        params = {"model": model, **({"heatmap": "png"} if n % 5 == 1 else {})}
                        r = c.post(f"{replica.url}/score", params=params,
                                   files={"file": (f"p{n}.{fmt.lower()}", stamped(pixels, n, fmt),
                                                   f"image/{fmt.lower()}")})
                        self.count("score", replica, r)
                        if r.status_code == 200:
                            self.take_ids(replica, [r.json()], [self.photos[n % len(self.photos)][1]], sent)
                except httpx.HTTPError as exc:
                    self.count("score", replica, None, exc)
                time.sleep(max(0.0, t_next - time.time()))

    def take_ids(self, replica: Replica, answers: list[dict[str, Any]], truths: list[str], sent: float) -> None:
        expected = self.expected_version
        with self.lock:
            for a, truth in zip(answers, truths):
                self.parts += 1
                if a.get("inspection_id"):
                    self.answered_ids.add(a["inspection_id"])
                    self.truth[a["inspection_id"]] = truth
                else:
                    self.null_ids += 1
                if a.get("model") == MODEL:
                    self.served_versions[(replica.name, a.get("model_version"))] += 1
                    if expected and sent > expected[1] and a.get("model_version") != expected[0]:
                        self.stale.append({"minute": round(self.minute(), 2), "replica": replica.name,
                                           "served": a.get("model_version"), "settled": expected[0]})

    def page(self, replica: Replica) -> None:
        """One open page on this replica: its polls."""
        k = 0
        with httpx.Client(timeout=60) as c:
            while not self.stop_event.wait(2.0):
                if not replica.up.is_set():
                    continue
                k += 1
                r = self.get(c, replica, "page-newest", "/inspections", params={"limit": 1})
                if r is not None and r.status_code == 200 and r.json()["items"]:
                    iid = r.json()["items"][0]["id"]
                    self.get(c, replica, "page-picture", f"/inspections/{iid}/display", (200, 404, 410))
                    self.get(c, replica, "page-picture", f"/inspections/{iid}/overlay.png", (200, 404, 410))
                if k % 15 == 0:
                    self.get(c, replica, "page-models", "/models")
                    for m in (MODEL, SECOND):
                        self.get(c, replica, "page-versions", f"/models/{m}/versions")
                        self.get(c, replica, "page-drift", f"/models/{m}/drift")
                    q = self.get(c, replica, "page-queue", f"/models/{MODEL}/false-alarms", params={"limit": 6})
                    if q is not None and q.status_code == 200:
                        for item in q.json().get("to_learn", [])[:6]:
                            iid = item["id"] if isinstance(item, dict) else item
                            self.get(c, replica, "page-picture", f"/inspections/{iid}/thumbnail", (200, 404, 410))
                    h = self.get(c, replica, "page-history", "/inspections", params={"limit": 20})
                    if h is not None and h.status_code == 200 and h.json()["items"]:
                        iid = h.json()["items"][-1]["id"]
                        self.get(c, replica, "page-one", f"/inspections/{iid}")
                    self.get(c, replica, "page-stats", "/inspections/stats")
                    self.get(c, replica, "page-map", f"/models/{MODEL}/embedding")
                    self.get(c, replica, "page-picture", f"/models/{MODEL}/training-images/0/thumbnail")
                if k % 60 == 0:
                    self.get(c, replica, "page", "/")

    def scraper(self) -> None:
        with httpx.Client(timeout=30) as c:
            while not self.stop_event.wait(15.0):
                for replica in self.live():
                    r = self.get(c, replica, "metrics", "/metrics")
                    if r is not None and r.status_code == 200:
                        series = [ln for ln in r.text.splitlines() if ln and not ln.startswith("#")]
                        replica.series = len(series)  # type: ignore[attr-defined]
                        replica.metrics = {ln.split()[0]: float(ln.split()[1]) for ln in series  # type: ignore
                                           if ln.startswith(("anomaly_records_dropped_total",
                                                             "anomaly_record_buffer_depth",
                                                             "anomaly_records_written_total"))}

    def reviewer(self) -> None:
        rng = random.Random(1)
        with httpx.Client(timeout=60) as c:
            while not self.stop_event.wait(20.0):
                live = self.live()
                if not live:
                    continue
                replica = rng.choice(live)
                r = self.get(c, replica, "review-list", "/inspections", params={"limit": 20, "verdict": "unreviewed"})
                if r is None or r.status_code != 200 or not r.json()["items"]:
                    continue
                item = r.json()["items"][0]
                with self.lock:
                    verdict = self.truth.get(item["id"], "good")
                try:
                    rv = c.post(f"{replica.url}/inspections/{item['id']}/review", headers={"X-Reviewer": "soak"},
                                json={"verdict": verdict, "replaces": "unreviewed"})
                except httpx.HTTPError as exc:
                    self.count("review", replica, None, exc, (200, 409))
                    continue
                self.count("review", replica, rv, None, (200, 409))
                if rv.status_code == 200:
                    self.reviews += 1
                    if rng.random() < 0.2:
                        reviews = rv.json().get("reviews") or []
                        if reviews:
                            rid = reviews[-1]["id"]
                            try:
                                u = c.post(f"{replica.url}/inspections/{item['id']}/reviews/{rid}/undo",
                                           headers={"X-Reviewer": "soak"})
                                self.count("review-undo", replica, u, None, (200, 409))
                                self.undone += u.status_code == 200
                            except httpx.HTTPError as exc:
                                self.count("review-undo", replica, None, exc)

    def sampler(self) -> None:
        while True:
            row: dict[str, Any] = {"minute": round(self.minute(), 2)}
            for replica in self.replicas:
                pc = proc_counts(replica.proc.pid) if replica.proc and replica.proc.poll() is None else None
                row[replica.name] = {
                    "rss_mb": pc["rss_mb"] if pc else None, "fds": pc["fds"] if pc else None,
                    "threads": pc["threads"] if pc else None,
                    "pg_conns": connections_to(pc["sockets"], self.pg.port) if pc else None,
                    "series": getattr(replica, "series", None), "metrics": dict(getattr(replica, "metrics", {})),
                    "log_mb": replica.log.stat().st_size / 2**20 if replica.log.exists() else 0,
                    "log_lines": sum(1 for _ in open(replica.log, "rb")) if replica.log.exists() else 0}
            try:
                row["db_mb"] = self.pg.query("SELECT pg_database_size('soak')")[0][0] / 2**20
                row["pg_sessions"] = dict(self.pg.query("SELECT coalesce(state, '?'), count(*) FROM pg_stat_activity "
                                                        "WHERE datname = 'soak' GROUP BY 1"))
                row["records"] = self.pg.query("SELECT count(*) FROM inspections", "soak")[0][0]
            except Exception as exc:  # PostgreSQL restarting: the sample says so
                row["db_error"] = type(exc).__name__
            row["model_files"], row["model_mb"] = tree_files(self.model_dir)
            row["data_files"], row["data_mb"] = tree_files(self.data_dir)
            with self.lock:
                row.update(parts=self.parts, unexpected=len(self.unexpected), reviews=self.reviews)
                self.samples.append(row)
            brief = ", ".join(f"{r.name} RSS {row[r.name]['rss_mb'] or 0:.0f} fds {row[r.name]['fds']} thr "
                              f"{row[r.name]['threads']} pg {row[r.name]['pg_conns']}" for r in self.replicas)
            print(f"[{self.minute():5.1f} min] sample: {brief}; db {row.get('db_mb', 0):.1f} MiB, records "
                  f"{row.get('records')}, sessions {row.get('pg_sessions')}, model files {row['model_files']}",
                  file=sys.stderr, flush=True)
            if self.stop_event.wait(30.0):
                return

    # -- operations -------------------------------------------------------------------------------------------------
    def current_on_disk(self, c: httpx.Client, replica: Replica) -> str | None:
        r = self.get(c, replica, "versions", f"/models/{MODEL}/versions")
        return r.json()["current"] if r is not None and r.status_code == 200 else None

    def settle(self, c: httpx.Client, change: dict[str, Any]) -> None:
        """Wait until every live replica serves the version on disk; how long that took."""
        t0, target, seen = time.time(), change.get("version"), {}
        while time.time() - t0 < 120:
            seen = {}
            for replica in self.live():
                r = self.get(c, replica, "models", "/models")
                if r is not None and r.status_code == 200:
                    seen[replica.name] = {m["name"]: m["version"] for m in r.json()["models"]}.get(MODEL)
            if seen and all(v == target for v in seen.values()):
                change["settled_s"] = round(time.time() - t0, 1)
                self.expected_version = (target, time.time())
                return
            time.sleep(1.0)
        change["settled_s"] = None
        change["not_settled"] = seen
        self.note("NOT SETTLED", target=target, seen=seen)

    def change(self, c: httpx.Client, k: int, rng: random.Random) -> None:
        self.expected_version = None
        replica = self.live()[k % len(self.live())]
        pixels = next(p for p, v in self.photos[k * 7 % len(self.photos):] + self.photos if v == "good")
        t0 = time.time()
        try:
            r = c.post(f"{replica.url}/models/{MODEL}/update", headers={"X-Reviewer": "soak"},
                       files=[("files", (f"update-{k}.png", stamped(pixels, 10**9 + k), "image/png"))],
                       data={"note": f"soak update {k}"}, timeout=600)
        except httpx.HTTPError as exc:
            self.count("update", replica, None, exc)
            return
        self.count("update", replica, r, None, (200, 409))
        change = {"minute": round(self.minute(), 2), "action": "update", "replica": replica.name,
                  "status": r.status_code, "seconds": round(time.time() - t0, 1)}
        if r.status_code == 200:
            change.update(version=r.json()["version"], previous=r.json()["previous"])
        else:
            change["body"] = r.text[:300]
            change["version"] = self.current_on_disk(c, replica)
        self.settle(c, change)
        self.changes.append(change)
        self.note("update", **{k2: v for k2, v in change.items() if k2 != "minute"})

    def rollback(self, c: httpx.Client, k: int) -> None:
        self.expected_version = None
        replica = self.live()[(k + 1) % len(self.live())]
        r = self.get(c, replica, "versions", f"/models/{MODEL}/versions")
        if r is None or r.status_code != 200:
            return
        body = r.json()
        older = [v["id"] for v in body["versions"] if not v["current"] and not v.get("error")]
        if not older:
            return
        t0 = time.time()
        try:
            rb = c.post(f"{replica.url}/models/{MODEL}/rollback", headers={"X-Reviewer": "soak"},
                        json={"version": older[0], "replaces": body["current"], "note": "soak rollback"},
                        timeout=600)
        except httpx.HTTPError as exc:
            self.count("rollback", replica, None, exc)
            return
        self.count("rollback", replica, rb, None, (200, 409))
        change = {"minute": round(self.minute(), 2), "action": "rollback", "replica": replica.name,
                  "status": rb.status_code, "seconds": round(time.time() - t0, 1), "version": older[0],
                  "previous": body["current"]}
        if rb.status_code != 200:
            change["body"] = rb.text[:300]
            change["version"] = self.current_on_disk(c, replica)
        self.settle(c, change)
        self.changes.append(change)
        self.note("rollback", **{k2: v for k2, v in change.items() if k2 != "minute"})

    def backup(self, k: int) -> None:
        out: dict[str, Any] = {"minute": round(self.minute(), 2)}
        target = self.root / "backup-models"
        t0 = time.time()
        b = subprocess.run([sys.executable, "-m", "anomaly_service.cli", "models", "backup", "--model-dir",
                            str(self.model_dir), "--out", str(target)], capture_output=True, text=True)
        out.update(models_rc=b.returncode, models_s=round(time.time() - t0, 1))
        if b.returncode != 0:
            out["models_err"] = (b.stderr or b.stdout)[-500:]
        verified = {}
        for m in (MODEL, SECOND):
            v = subprocess.run([sys.executable, "-m", "anomaly_service.cli", "info", "--verify", str(target / m)],
                               capture_output=True, text=True)
            verified[m] = v.returncode == 0 or (v.stderr or v.stdout)[-300:]
        out["models_verify"] = verified
        out["backup_versions"] = len(list((target / ".versions" / MODEL).glob("*"))) if (
            target / ".versions" / MODEL).is_dir() else 0
        dump = self.root / "records.dump"
        t0 = time.time()
        d = self.pg.tool("pg_dump", "--format=custom", "-f", str(dump), "soak")
        out.update(dump_rc=d.returncode, dump_s=round(time.time() - t0, 1), dump_mb=round(
            dump.stat().st_size / 2**20, 2) if dump.exists() else None)
        if d.returncode != 0:
            out["dump_err"] = d.stderr[-500:]
        else:
            name = f"restored_{k}"
            self.pg.query(f'CREATE DATABASE "{name}"')
            rr = self.pg.tool("pg_restore", "--no-owner", "-d", name, str(dump))
            out["restore_rc"] = rr.returncode
            if rr.returncode != 0:
                out["restore_err"] = rr.stderr[-500:]
            out["restored_records"] = self.pg.query("SELECT count(*) FROM inspections", name)[0][0]
            out["restored_revision"] = self.pg.query("SELECT version_num FROM alembic_version", name)[0][0]
            self.pg.query(f'DROP DATABASE "{name}"')
        self.backups.append(out)
        self.note("backup", **{k2: v for k2, v in out.items() if k2 != "minute"})

    def restart_replica(self, replica: Replica) -> None:
        took = replica.stop()
        rc = replica.proc.returncode if replica.proc else None
        t0 = time.time()
        replica.start()
        self.note("replica restarted", replica=replica.name, exit_code=rc, stop_s=round(took, 1),
                  start_s=round(time.time() - t0, 1))

    def restart_postgres(self) -> None:
        t0 = time.time()
        self.pg_outage = True
        self.pg.ctl("-m", "fast", "stop")
        down = time.time()
        time.sleep(self.args.pg_down)
        self.pg.start()
        self.note("postgres restarted", stop_s=round(down - t0, 1), down_s=round(time.time() - down, 1))
        with httpx.Client(timeout=10) as c:  # the records come back: each replica's recording is on again
            t1 = time.time()
            while time.time() - t1 < 180:
                states = {}
                for replica in self.live():
                    r = self.get(c, replica, "readyz", "/readyz", (200, 503))
                    states[replica.name] = r.json().get("recording") if r is not None else None
                if all(s == "on" for s in states.values()):
                    self.pg_outage = False
                    self.note("recording back", after_s=round(time.time() - t1, 1), states=states)
                    return
                time.sleep(1.0)
            self.note("RECORDING NOT BACK", states=states)

    def controller(self) -> None:
        a = self.args
        rng = random.Random(2)
        end = self.t0 + a.minutes * 60
        plan: list[tuple[float, str, int]] = []
        for k, t in enumerate(np.arange(a.update_every, a.minutes * 60 - 30, a.update_every)):
            plan.append((t, "update", k))
            if k % 3 == 2:
                plan.append((t + a.update_every / 2, "rollback", k))
        for k, t in enumerate(np.arange(a.backup_every, a.minutes * 60 - 30, a.backup_every)):
            plan.append((t + 30, "backup", k))
        plan += [(a.minutes * 60 * 0.3, "restart", 1), (a.minutes * 60 * 0.5, "postgres", 0),
                 (a.minutes * 60 * 0.75, "restart", 0)]
        plan.sort()
        with httpx.Client(timeout=60) as c:
            for t, what, k in plan:
                while time.time() < self.t0 + t:
                    if self.stop_event.wait(min(1.0, self.t0 + t - time.time() + 0.01)):
                        return
                if time.time() > end:
                    break
                try:
                    if what == "update":
                        self.change(c, k, rng)
                    elif what == "rollback":
                        self.rollback(c, k)
                    elif what == "backup":
                        self.backup(k)
                    elif what == "restart":
                        self.restart_replica(self.replicas[k])
                    elif what == "postgres":
                        self.restart_postgres()
                except Exception as exc:  # the soak goes on; the event says what failed
                    self.note(f"{what} FAILED", error=repr(exc)[:300])
        while time.time() < end and not self.stop_event.wait(1.0):
            pass

    # -- the run ----------------------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        a = self.args
        self.pg = Postgres(self.root / "pg")
        self.pg.query("CREATE DATABASE soak")
        try:
            source = fit_models(self.model_dir, a.train_limit, a.category) if not a.model_dir else ""
            if a.model_dir:
                shutil.copytree(a.model_dir, self.model_dir, dirs_exist_ok=True)
            self.photos = test_photos(a.category)
            flags = ["--keep-images", "all", "--retention-max-bytes", str(a.retention_max_bytes),
                     "--retention-interval", str(a.retention_interval), *a.server_args.split()]
            self.replicas = [Replica(f"replica{i}", self.model_dir, self.data_dir, self.pg.url("soak"),
                                     self.root / f"replica{i}.log", flags) for i in range(2)]
            for r in self.replicas:
                r.start()
            self.t0 = time.time()
            self.note("start", root=str(self.root), source=source, flags=flags)
            threads = [threading.Thread(target=self.sampler, daemon=True),
                       threading.Thread(target=self.scorer, daemon=True),
                       threading.Thread(target=self.scraper, daemon=True),
                       threading.Thread(target=self.reviewer, daemon=True),
                       *(threading.Thread(target=self.page, args=(r,), daemon=True) for r in self.replicas)]
            for t in threads:
                t.start()
            self.controller()
            self.stop_event.set()
            for t in threads:
                t.join(timeout=180)
            result = self.finish()
        finally:
            for r in self.replicas if hasattr(self, "replicas") else []:
                if r.proc and r.proc.poll() is None:
                    r.stop()
            self.pg.stop()
        return result

    def finish(self) -> dict[str, Any]:
        """Wait for the buffers to empty; check every answered id is a row."""
        deadline = time.time() + 120
        with httpx.Client(timeout=30) as c:
            while time.time() < deadline:
                depth = 0.0
                for replica in self.live():
                    r = self.get(c, replica, "metrics", "/metrics")
                    if r is not None:
                        depth += sum(float(ln.split()[1]) for ln in r.text.splitlines()
                                     if ln.startswith("anomaly_record_buffer_depth"))
                if depth == 0:
                    break
                time.sleep(1.0)
            time.sleep(2.0)
        rows = {r[0] for r in self.pg.query("SELECT id FROM inspections", "soak")}
        lost = sorted(self.answered_ids - rows)
        final = {r.name: self.get(httpx.Client(timeout=10), r, "models", "/models").json() for r in self.live()}
        return {"samples": self.samples, "events": self.events, "changes": self.changes, "backups": self.backups,
                "statuses": {f"{k} {s}": n for (k, s), n in sorted(self.statuses.items(), key=str)},
                "unexpected": self.unexpected, "stale": self.stale, "parts": self.parts,
                "answered_ids": len(self.answered_ids),
                "null_ids": self.null_ids, "rows": len(rows), "lost": lost[:50], "lost_count": len(lost),
                "reviews": self.reviews, "undone": self.undone,
                "served_versions": {f"{r} {v}": n for (r, v), n in sorted(self.served_versions.items(), key=str)},
                "final_models": {n: {m["name"]: m["version"] for m in b["models"]} for n, b in final.items()}}


def print_report(res: dict[str, Any], args: argparse.Namespace) -> None:
    samples = res["samples"]
    names = [k for k in samples[0] if k.startswith("replica")] if samples else []
    print(f"\n{args.minutes:g} min, about {args.rate:g} parts/s in all, two replicas on one PostgreSQL database; "
          f"{os.cpu_count()} CPUs\n")
    head = "| minute | parts | " + " | ".join(f"{n} RSS MiB / fds / threads / PG conns" for n in names) + \
           " | PG sessions | database MiB | records | model dir files | data dir MiB | logs MiB |"
    print(head)
    print("| " + " | ".join("---:" for _ in range(head.count("|") - 1)) + " |")
    step = max(1, len(samples) // 14)
    for s in samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else []):
        cells = []
        for n in names:
            v = s[n]
            cells.append("down" if v["rss_mb"] is None else
                         f"{v['rss_mb']:.0f} / {v['fds']} / {v['threads']} / {v['pg_conns']}")
        sessions = sum(s.get("pg_sessions", {}).values()) if "pg_sessions" in s else s.get("db_error", "-")
        print(f"| {s['minute']:.1f} | {s['parts']} | {' | '.join(cells)} | {sessions} | "
              f"{s.get('db_mb', float('nan')):.1f} | {s.get('records', '-')} | {s['model_files']} | "
              f"{s['data_mb']:.1f} | {sum(s[n]['log_mb'] for n in names):.2f} |")
    print("\nchanges:")
    for ch in res["changes"]:
        print(f"  {ch}")
    print("backups:")
    for b in res["backups"]:
        print(f"  {b}")
    print(f"\nparts answered {res['parts']}, ids {res['answered_ids']} (none: {res['null_ids']}), rows "
          f"{res['rows']}, answered ids not in the database: {res['lost_count']}; reviews {res['reviews']} "
          f"({res['undone']} undone)")
    print(f"statuses: {res['statuses']}")
    print(f"answers from a version older than the settled one: {len(res['stale'])} {res['stale'][:5]}")
    print(f"unexpected answers: {len(res['unexpected'])}")
    for u in res["unexpected"][:30]:
        print(f"  {u}")
    print(f"final versions: {res['final_models']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--rate", type=float, default=1.7,
                    help="Scoring requests a second, in all (a tenth are batches of three)")
    ap.add_argument("--update-every", type=float, default=240.0, help="Seconds between updates")
    ap.add_argument("--backup-every", type=float, default=600.0, help="Seconds between backups")
    ap.add_argument("--pg-down", type=float, default=10.0, help="Seconds PostgreSQL stays stopped in its restart")
    ap.add_argument("--retention-max-bytes", type=int, default=8_000_000)
    ap.add_argument("--retention-interval", type=float, default=120.0)
    ap.add_argument("--train-limit", type=int, default=40)
    ap.add_argument("--category", type=Path, default=SHARED, help="An MVTec AD category folder (train/good, test)")
    ap.add_argument("--model-dir", type=Path, default=None, help="Copy these models instead of fitting two")
    ap.add_argument("--server-args", default="", help="Extra 'anomaly serve' flags for both replicas")
    ap.add_argument("--workdir", type=Path, default=None, help="Where the models, data, logs and cluster go")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    # a SIGTERM (``timeout``, ``kill``) or SIGHUP (the terminal closed) would end the script without its ``finally``,
    # leaving the replicas and the cluster running with no parent: stopped as for Ctrl-C instead
    def stopped(signum: int, frame: Any) -> None:
        signal.signal(signum, signal.SIG_IGN)
        raise SystemExit(f"stopped by {signal.Signals(signum).name}: the replicas and PostgreSQL are stopped")

    handlers = {s: signal.signal(s, stopped) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        res = Soak(args).run()
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    print_report(res, args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
