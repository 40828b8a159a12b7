"""Can the driver's MLflow writer keep up with a cluster? (load test of the write path)

Starts a local ``mlflow server`` over PostgreSQL (`scripts/tracking_server.py`: not
timed), then feeds one `MlflowWriter` (journal in a temp folder, as a sweep's driver
does) from many concurrent simulated trials: each producer thread is one trial, makes its
child run with a run key (``create_run(..., parent=PARENT, key="trial-N")``) and reports
chunks of ``--chunk`` steps x the trace keys (``log_metrics`` per step, then ``flush``:
one journal append + fsync per chunk), exactly as the sweep's Tune callback does per
result. Producers report flat out (no training between chunks): the writer sees the
heaviest load it can get.

Printed, per writer variant (``--variants``, side by side, the order rotating each round:
``1`` = one request at a time, the delivery of the writer before issue 9 less its search
request per new run; ``8`` = 8 parallel requests, the default for a tracking server;
``8+db`` = the same with ``--metrics-db``, the trace points written straight into the
server's PostgreSQL):

* delivered points/s end to end: from the first point journaled to ``close()`` returning
  with every point stored on the server and its watermark saved; and while points flow:
  from the first point stored to the last (the runs' creation and termination, one
  request each to the server, left out);
* the trial count, points, and the undelivered backlog's peak (points journaled but not
  yet stored) and the peak of the writer's in-memory queue;
* the producers' time on tracking per chunk (median, max): the journal append + fsync
  only. They never wait on delivery: the run's producing time is printed next to its
  delivery time.

Every run ends with an audit through the REST client: every trial's ``loss`` at steps
1..N, once each.

    python benchmarks/bench_tracking_load.py            # 32 trials x 200 steps, ~5 min on a busy box
    python benchmarks/bench_tracking_load.py --trials 32 --steps 2000 --variants 8+db,8   # the goal's run
    python benchmarks/bench_tracking_load.py --quick    # 8 trials x 100 steps: machinery only
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # "View run ..." per terminated run

import mlflow  # noqa: E402
import tracking_server  # noqa: E402  (scripts/tracking_server.py)

from metalearner.trace import TRACE_KEYS  # noqa: E402
from metalearner.tracking import MlflowWriter  # noqa: E402

GOAL = 20_000  # points/s to a local server (issue 9)


@dataclass
class Load:
    """One load run's figures."""

    variant: str
    trials: int
    points: int
    produce_s: float = 0.0  # first point journaled -> last producer done
    total_s: float = 0.0  # first point journaled -> close() returned
    chunk_ms: list[float] = field(default_factory=list)  # producer time per chunk
    first_s: float = 0.0  # first point journaled -> first point stored (runs created on the server first)
    last_s: float = 0.0  # first point journaled -> every point stored (before the runs' terminations)
    backlog_peak: int = 0  # points journaled, not yet stored
    queue_peak: int = 0  # the writer's in-memory queue (points)

    @property
    def rate(self) -> float:
        return self.points / self.total_s

    @property
    def points_rate(self) -> float:
        """points/s while points flow: from the first point stored to the last (the runs'
        creation before and their termination after, one request each, left out)."""
        return self.points / max(self.last_s - self.first_s, 1e-9)


def run_load(uri: str, folder: Path, connections: int, trials: int, steps: int, chunk: int, tag: str,
             metrics_db: str | None = None) -> Load:
    """``trials`` producer threads into one writer; returns the figures (audited)."""
    writer = MlflowWriter(uri, journal_dir=folder / f"journal-{tag}", connections=connections, metrics_db=metrics_db)
    parent = writer.create_run(f"load-{tag}", "parent", {"metalearner.kind": "sweep"})
    writer.flush()
    keys = list(TRACE_KEYS)
    load = Load(tag.split("-r")[0], trials, trials * steps * len(keys))
    go = threading.Barrier(trials + 1)
    times: list[list[float]] = [[] for _ in range(trials)]

    def trial(i: int) -> None:
        go.wait()
        key = writer.create_run(f"load-{tag}", f"trial-{i}", {"metalearner.kind": "trial"}, parent=parent,
                                key=f"trial-{i}")
        for start in range(1, steps + 1, chunk):
            t0 = time.perf_counter()
            for s in range(start, min(start + chunk, steps + 1)):
                writer.log_metrics(key, {k: 1.0 / (s + i) for k in keys}, s)
            writer.flush(key)
            times[i].append((time.perf_counter() - t0) * 1e3)
        writer.terminate(key)

    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            stored = writer.points_written
            if stored and not load.first_s:
                load.first_s = time.perf_counter() - t0
            if stored >= load.points and not load.last_s:
                load.last_s = time.perf_counter() - t0
            journaled = sum(len(t) for t in times) * chunk * len(keys)
            load.backlog_peak = max(load.backlog_peak, journaled - stored)
            load.queue_peak = max(load.queue_peak, writer.delivery.in_memory)
            time.sleep(0.02)

    threads = [threading.Thread(target=trial, args=(i,)) for i in range(trials)]
    for t in threads:
        t.start()
    watcher = threading.Thread(target=watch, daemon=True)
    go.wait()
    t0 = time.perf_counter()
    watcher.start()
    for t in threads:
        t.join()
    load.produce_s = time.perf_counter() - t0
    writer.terminate(parent)
    left = writer.close()
    load.total_s = time.perf_counter() - t0
    done.set()
    watcher.join()
    load.first_s = load.first_s or load.total_s
    load.last_s = load.last_s or load.total_s
    assert left.complete, f"undelivered after close: {left}"
    assert writer.points_written == load.points, (writer.points_written, load.points)
    load.chunk_ms = [x for t in times for x in t]
    audit(uri, f"load-{tag}", trials, steps)
    return load


def store_ceiling(pg_port: int, folder: Path, trials: int, steps: int) -> float:
    """points/s of MLflow's own SQLAlchemy store on the same PostgreSQL, called in this
    process on one thread with full 1000-point batches per run: what one server worker
    can do per core at best (no HTTP, no JSON, no journal)."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore(f"postgresql+psycopg2://{tracking_server.PG_USER}@127.0.0.1:{pg_port}/mlflow",
                            str(folder / "ceiling-artifacts"))
    exp = store.create_experiment(f"ceiling-{time.time_ns()}")
    keys = list(TRACE_KEYS)
    Metric = mlflow.entities.Metric
    ids = [store.create_run(exp, "bench", 0, [], f"t{i}").info.run_id for i in range(trials)]
    per_batch = 1000 // len(keys)
    t0 = time.perf_counter()
    for start in range(1, steps + 1, per_batch):
        for i, rid in enumerate(ids):
            store.log_batch(rid, [Metric(k, 1.0 / (s + i), 0, s) for s in range(start, min(start + per_batch, steps + 1))
                                  for k in keys], [], [])
    return trials * steps * len(keys) / (time.perf_counter() - t0)


def audit(uri: str, experiment: str, trials: int, steps: int) -> None:
    """Every trial run holds ``loss`` at steps 1..N exactly once (REST client)."""
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], "tags.`metalearner.kind` = 'trial'", max_results=1000)
    assert len(runs) == trials, (len(runs), trials)
    for r in runs:
        got = sorted(m.step for m in client.get_metric_history(r.info.run_id, "loss"))
        assert got == list(range(1, steps + 1)), (r.info.run_name, len(got))
        assert r.info.status == "FINISHED", r.info.status


def label(variant: str) -> str:
    n, _, db = variant.partition("+")
    return f"connections={n}" + (" + metrics-db" if db else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=32, help="concurrent producer threads, one child run each")
    ap.add_argument("--steps", type=int, default=200, help="steps per trial")
    ap.add_argument("--chunk", type=int, default=50, help="steps per report (one flush)")
    ap.add_argument("--variants", default="1,8,8+db",
                    help="writer variants to compare (comma list): N = N connections to the server, N+db = N "
                         "connections with the trace points written straight into the server's PostgreSQL "
                         "(--metrics-db)")
    ap.add_argument("--repeats", type=int, default=1, help="rounds; the order of the variants rotates")
    ap.add_argument("--server-workers", type=int, default=2, help="mlflow server --workers")
    ap.add_argument("--quick", action="store_true", help="8 trials x 100 steps, one round: machinery only")
    a = ap.parse_args()
    if a.quick:
        a.trials, a.steps, a.repeats = 8, 100, 1
    variants = a.variants.split(",")
    with tempfile.TemporaryDirectory(prefix="bench-load-") as d:
        folder = Path(d)
        folder.chmod(0o755)  # as root, PostgreSQL runs as the postgres user: it must reach its folder
        port, pg_port = tracking_server.free_port(), tracking_server.free_port()
        t0 = time.perf_counter()
        pg = tracking_server.start_postgres(folder / "server", pg_port)
        try:
            server = tracking_server.start_mlflow(folder / "server", port, pg_port, workers=a.server_workers,
                                                  timeout=600)  # each worker imports mlflow: slow on a busy box
            try:
                uri = f"http://127.0.0.1:{port}"
                mlflow.MlflowClient(uri).search_experiments()  # the schema is made on first use
                print(f"mlflow server on PostgreSQL, {a.server_workers} workers, up in "
                      f"{time.perf_counter() - t0:.1f} s (not timed); load "
                      f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
                results: dict[str, list[Load]] = {c: [] for c in variants}
                pg_uri = f"postgresql://{tracking_server.PG_USER}@127.0.0.1:{pg_port}/mlflow"
                ceiling: list[float] = []
                for r in range(a.repeats):
                    ceiling.append(store_ceiling(pg_port, folder, a.trials, a.steps))
                    print(f"  round {r} store ceiling (in-process SQLAlchemy store, 1 thread): "
                          f"{ceiling[-1]:8.0f} points/s", flush=True)
                    order = variants[r % len(variants):] + variants[: r % len(variants)]
                    for c in order:
                        res = run_load(uri, folder, int(c.split("+")[0]), a.trials, a.steps, a.chunk,
                                       f"c{c.replace('+', '')}-r{r}", pg_uri if c.endswith("+db") else None)
                        results[c].append(res)
                        print(f"  round {r} {label(c)}: {res.rate:8.0f} points/s end to end, "
                              f"{res.points_rate:8.0f} while points flow ({res.points} points in "
                              f"{res.total_s:.2f} s: first stored at {res.first_s:.2f} s, last at {res.last_s:.2f} s; "
                              f"producers done at {res.produce_s:.2f} s)", flush=True)
            finally:
                tracking_server.stop(server)
        finally:
            tracking_server.stop(pg)
    print(f"\n{a.trials} trials x {a.steps} steps x {len(TRACE_KEYS)} keys, chunks of {a.chunk} steps "
          f"(median of {a.repeats}):")
    print(f"  store ceiling: {statistics.median(ceiling):8.0f} points/s on one core (MLflow's SQLAlchemy store "
          "called in-process: the server's own cost per point, no HTTP)")
    best = flowing = 0.0
    for c, runs in results.items():
        rate = statistics.median(r.rate for r in runs)
        flow = statistics.median(r.points_rate for r in runs)
        best, flowing = max(best, rate), max(flowing, flow)
        chunk_ms = [x for r in runs for x in r.chunk_ms]
        print(f"  {label(c)}: {rate:8.0f} points/s delivered end to end, {flow:8.0f} while points flow; backlog "
              f"peak {max(r.backlog_peak for r in runs)} points, writer queue peak {max(r.queue_peak for r in runs)}; "
              f"producer per chunk median {statistics.median(chunk_ms):.2f} ms, max {max(chunk_ms):.1f} ms "
              f"(journal append + fsync; never waits on the server)")
    if len(results) > 1:
        base = statistics.median(r.rate for r in results[variants[0]])
        for c in variants[1:]:
            print(f"  ratio {label(c)} / {label(variants[0])}: "
                  f"{statistics.median(r.rate for r in results[c]) / base:.2f} end to end")
    print(f"RESULT tracking_load: points_per_s={best:.0f} end to end, {flowing:.0f} while points flow; "
          f"goal>={GOAL} ({'met' if best >= GOAL else 'met while points flow' if flowing >= GOAL else 'NOT met'})")


if __name__ == "__main__":
    main()
