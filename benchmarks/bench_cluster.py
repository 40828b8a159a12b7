"""The 2-node sweep's figures, and the sizes behind the cluster guide (issue 9).

Runs the same small sweep twice through the real command line (``metalearner sweep
--address``), interleaved when ``--repeats`` > 1: on a 2-node local Ray cluster
(``ray start --head`` + a second ``ray start --address`` with its own temp dir, one CPU
each) and on a 1-node cluster (``ray start --head --num-cpus=2``: the same total CPUs).
Both clusters are started here before the sweep (not timed), in their own process groups,
and ended by them. On this 2-core machine both run two trials
at a time on the same cores, so the ratio measures what a second node *costs* (two
raylets, trials placed across nodes, task data and results crossing node object stores
over TCP), not what it gains.

Printed per run: sweep wall time, the trials' own training seconds (``train_seconds``
from their last Tune result), efficiency = wall / (sum of train seconds / 2 slots),
trials per node (the ``metalearner.node_id`` tags in MLflow), the audit (every child run
holds every trace key at steps 1..N exactly once), and the driver's peak RSS (psutil,
sampled every 0.2 s). Then the sizes: a Tune result as the trials send it (JSON bytes
per ``result.json`` line) and the same result with scalars only (dicts and lists
dropped: what is left after the payload change of issue 9), the experiment folders'
bytes, and the bytes of one checkpoint of the ``tiny`` and ``small`` presets
(`TrainingRun.save`: model, optimizer, controller, RNG).

    python benchmarks/bench_cluster.py            # 8 trials x 300 steps, ~5 min
    python benchmarks/bench_cluster.py --quick    # 4 trials x 20 steps: machinery only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")

from tracking_server import free_port, stop  # noqa: E402  (scripts/tracking_server.py)

SPEC = """\
name: {name}
task: {{name: recall, n_pairs: 4, distance: 16}}
model: {{preset: tiny, window: 8}}
train: {{steps: {steps}, batch_size: 8, seq_len: 32, report_every: {every}, checkpoint_every: {every},
        eval_every: {every}, eval_batches: 1}}
seeds: {seeds}
arms:
  - {{name: static, controller: {{name: static}}}}
  - {{name: ewma, controller: {{name: ewma, factor: 1.2, beta: 0.5, threshold: 0.0}}}}
resources: {{cpus_per_trial: 1}}
"""
RAY_ENV = {"RAY_AUTH_MODE": "disabled"}


class Cluster:
    """A Ray cluster on 127.0.0.1 (a context manager): one node per entry of ``cpus``,
    with that many CPUs; the first is the head."""

    def __init__(self, folder: Path, cpus: list[int]) -> None:
        self.folder, self.cpus = folder, cpus
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[tuple[subprocess.Popen, Path]] = []

    def _node(self, name: str, cpus: int, *args: str) -> None:
        temp = Path("/tmp") / f"mlb-{os.getpid()}-{name}"  # Ray's socket paths must stay short
        shutil.rmtree(temp, ignore_errors=True)
        ports = [a for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                                "--metrics-export-port", "--runtime-env-agent-port", "--node-manager-port",
                                "--object-manager-port") for a in (flag, str(free_port()))]
        log = open(self.folder / f"ray-{name}.log", "w")
        proc = subprocess.Popen(["ray", "start", "--block", f"--num-cpus={cpus}", "--num-gpus=0", "--temp-dir", str(temp),
                                 "--disable-usage-stats", *args, *ports], stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **RAY_ENV, "PYTHONPATH": str(ROOT)}, start_new_session=True)
        self.nodes.append((proc, temp))

    def _wait(self, n: int, timeout: float = 600) -> None:
        code = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
                "print(sum(1 for x in ray.nodes() if x['Alive']))")
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(p.poll() is not None for p, _ in self.nodes):
                tails = [f.read_text()[-1500:] for f in sorted(self.folder.glob("ray-*.log"))]
                raise RuntimeError("a ray node exited:\n" + "\n".join(tails))
            try:
                out = subprocess.run([sys.executable, "-c", code, self.address], capture_output=True, text=True,
                                     env={**os.environ, **RAY_ENV}, timeout=120)
            except subprocess.TimeoutExpired:  # a busy machine: ask again
                continue
            if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(n)]:
                return
            time.sleep(2)
        raise TimeoutError(f"{n} Ray nodes not up at {self.address} after {timeout:.0f} s")

    def __enter__(self) -> Cluster:
        try:
            self._node("head", self.cpus[0], "--head", "--node-ip-address=127.0.0.1", f"--port={self.port}",
                       "--include-dashboard=false")
            self._wait(1)  # the head first: a worker joins a running GCS
            for i, cpus in enumerate(self.cpus[1:], start=2):
                self._node(f"worker{i}", cpus, f"--address={self.address}", "--node-ip-address=127.0.0.1")
                self._wait(i)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for proc, temp in reversed(self.nodes):
            stop(proc, timeout=20)
            shutil.rmtree(temp, ignore_errors=True)


def run_sweep(spec: Path, folder: Path, where: list[str]) -> dict:
    """``metalearner sweep`` in a subprocess (its RSS sampled); returns its figures."""
    uri = f"sqlite:///{folder}/mlflow.db"
    storage = folder / "ray"
    env = {**os.environ, **RAY_ENV, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "metalearner.cli", "sweep", str(spec), *where, "--tracking-uri",
                             uri, "--storage", str(storage)], cwd=folder, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    peak = [0]

    def sample() -> None:
        ps = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak[0] = max(peak[0], ps.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    try:
        out, _ = proc.communicate(timeout=1800)
    finally:
        stop(proc)
    wall = time.perf_counter() - t0
    watcher.join()
    if proc.returncode != 0:
        raise RuntimeError(f"sweep {' '.join(where)}: exit code {proc.returncode}, expected 0:\n{out[-3000:]}")
    return {"wall": wall, "rss": peak[0], "uri": uri, "storage": storage, **sizes(storage)}


def sizes(storage: Path) -> dict:
    """Tune result bytes (as sent, and scalars only), train seconds, folder and checkpoint bytes."""
    lines, scalars, train = [], [], []
    for f in storage.rglob("result.json"):
        last = None
        for line in f.read_text().splitlines():
            if not line.strip():
                continue
            res = json.loads(line)
            lines.append(len(line.encode()))
            scalars.append(len(json.dumps({k: v for k, v in res.items()
                                           if not isinstance(v, (dict, list))}).encode()))
            last = res
        if last is not None:
            train.append(float(last["train_seconds"]))
    ckpts = [d for d in storage.rglob("checkpoint_*") if d.is_dir()]
    return {"result_bytes": statistics.mean(lines), "scalar_bytes": statistics.mean(scalars),
            "results": len(lines), "train": sum(train), "trials": len(train),
            "folder_bytes": folder_bytes(storage),
            "ckpt_bytes": statistics.mean(folder_bytes(d) for d in ckpts) if ckpts else 0.0,
            "ckpts_kept": len(ckpts)}


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def audit(uri: str) -> dict[str, int]:
    """Every child run: FINISHED, every trace key at steps 1..N once. Returns trials per node."""
    import mlflow

    from metalearner.trace import STEP_KEYS

    client = mlflow.MlflowClient(tracking_uri=uri)
    parent = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                "tags.`metalearner.kind` = 'sweep'")[0]
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                              max_results=1000)
    per_node: dict[str, int] = {}
    for r in runs:
        assert r.info.status == "FINISHED", (r.info.run_name, r.info.status)
        n = int(r.data.params["train.steps"])
        for key in STEP_KEYS:
            if key == "loss_ewma" and r.data.params["controller.name"] == "static":
                continue
            got = sorted(m.step for m in client.get_metric_history(r.info.run_id, key))
            assert got == list(range(1, n + 1)), (r.info.run_name, key, len(got))
        node = r.data.tags["metalearner.node_id"][:8]
        per_node[node] = per_node.get(node, 0) + 1
    return per_node


def checkpoint_bytes(preset: str) -> int:
    """Bytes of one `TrainingRun.save` of a ``preset`` model on the text task."""
    from metalearner.config import load_run_config
    from metalearner.train import TrainingRun

    cfg = load_run_config({"task": {"name": "recall", "n_pairs": 4, "distance": 16}, "model": {"preset": preset},
                           "train": {"steps": 2, "batch_size": 2, "seq_len": 32, "report_every": 1, "seed": 0},
                           "controller": {"name": "ewma", "factor": 1.2}})
    run = TrainingRun(cfg)
    run.advance(1)
    with tempfile.TemporaryDirectory() as d:
        run.save(d)
        return folder_bytes(Path(d))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=4, help="seeds per arm (2 arms: trials = 2 x seeds)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=25, help="report (and checkpoint) every N steps")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="4 trials x 20 steps: machinery only")
    a = ap.parse_args()
    if a.quick:
        a.seeds, a.steps, a.every, a.repeats = 2, 20, 5, 1
    print(f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    runs: dict[str, list[dict]] = {"2 nodes": [], "1 node": []}
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as d:
        top = Path(d)
        for r in range(a.repeats):
            order = ["2 nodes", "1 node"] if r % 2 == 0 else ["1 node", "2 nodes"]
            for mode in order:
                folder = top / f"{mode.replace(' ', '')}-{r}"
                folder.mkdir()
                spec = folder / "spec.yaml"
                spec.write_text(SPEC.format(name=f"bench_{mode.replace(' ', '')}", steps=a.steps, every=a.every,
                                            seeds=list(range(a.seeds))))
                with Cluster(folder, [1, 1] if mode == "2 nodes" else [2]) as cluster:
                    res = run_sweep(spec, folder, ["--address", cluster.address])
                res["per_node"] = audit(res["uri"])
                res["eff"] = res["wall"] / (res["train"] / 2)
                runs[mode].append(res)
                print(f"  round {r} {mode}: wall {res['wall']:.1f} s, trials' train {res['train']:.1f} s, "
                      f"wall/(train/2) {res['eff']:.2f}, trials per node {sorted(res['per_node'].values())}, "
                      f"audit complete ({res['trials']} trials x {a.steps} steps), driver peak RSS "
                      f"{res['rss'] / 2**20:.0f} MiB", flush=True)
        tiny, small = checkpoint_bytes("tiny"), checkpoint_bytes("small")
    two, one = runs["2 nodes"], runs["1 node"]
    med = statistics.median
    print(f"\n{2 * a.seeds} trials (2 arms x {a.seeds} seeds, tiny, {a.steps} steps, report + checkpoint every "
          f"{a.every}), median of {a.repeats}:")
    for mode, rs in runs.items():
        print(f"  {mode:8s} wall {med(r['wall'] for r in rs):6.1f} s   wall/(train/2) {med(r['eff'] for r in rs):.2f}"
              f"   trials per node {[sorted(r['per_node'].values()) for r in rs]}   driver peak RSS "
              f"{med(r['rss'] for r in rs) / 2**20:.0f} MiB ({med(r['rss'] for r in rs) / 2**20 / (2 * a.seeds):.0f}"
              " MiB per trial, upper bound)")
    print(f"  2 nodes / 1 node wall: {med(r['wall'] for r in two) / med(r['wall'] for r in one):.2f}")
    r0 = one[0]
    print(f"  Tune result: {r0['result_bytes']:.0f} bytes as sent (trace chunk of {a.every} steps + params in the "
          f"first), {r0['scalar_bytes']:.0f} bytes scalars only; {r0['results']} results")
    print(f"  experiment folders (Tune + journal + checkpoints kept): {r0['folder_bytes'] / 2**20:.1f} MiB; "
          f"{r0['ckpts_kept']} checkpoints kept, {r0['ckpt_bytes'] / 1024:.0f} KiB each")
    print(f"  checkpoint bytes (TrainingRun.save): tiny {tiny / 1024:.0f} KiB, small {small / 2**20:.2f} MiB")
    print(f"RESULT cluster_vs_single: ratio={med(r['wall'] for r in two) / med(r['wall'] for r in one):.2f} "
          "(info: same 2 cores)")


if __name__ == "__main__":
    main()
