"""Everything the command line is given, checked once before anything starts.

One function per command turns the parsed flags into a validated input (`train_inputs`
-> `RunConfig`, `sweep_inputs` -> `ExperimentSpec`, ...) or raises `ConfigError`, whose
message is the one line the CLI prints before it exits 2. Nothing here starts Ray or
MLflow or writes a file; paths that a run will write are only probed for writability.

Order of precedence in ``metalearner train``: the ``--config`` file, then
``--controller-spec`` (the controller section), then the flags ``--steps`` and
``--engine``, then ``--set`` (an intended override: the last one wins). ``--task`` and
``--controller`` name the section they select: if ``--config`` names another task or
controller, that is an error, since its settings would not apply.

Must not import ray or mlflow; imports torch only to read a checkpoint.
"""

from __future__ import annotations

import argparse
import os
import re
import tempfile
from pathlib import Path
from typing import Any, NoReturn

from metalearner.config import (
    MAX_STEPS,
    ConfigError,
    RunConfig,
    apply_overrides,
    load_run_config,
    missing_extras,
    read_yaml,
)
from metalearner.runtime_env import flag_runtime_env
from metalearner.schema import check_name, short

URI_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
MAX_CPUS = 4096
MAX_UTTERANCES = 1_000_000


class OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose errors are a `ConfigError` (one line, field first)
    instead of a usage block; the CLI prints it and exits 2."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(_argparse_line(message))


def _argparse_line(message: str) -> str:
    m = re.match(r"argument ([^:]+): invalid (\w+) value: (.*)$", message)
    if m:
        flag, kind, value = m.groups()
        return f"{flag.split('/')[-1]}: got {value}, expected {'an' if kind == 'int' else 'a'} {kind}"
    m = re.match(r"argument ([^:]+): invalid choice: (\S+) \(choose from (.*)\)$", message)
    if m:
        flag, value, choices = m.groups()
        return f"{flag.split('/')[-1]}: got {value}, expected one of {choices}"
    m = re.match(r"the following arguments are required: (.*)$", message)
    if m:
        return f"{m.group(1)}: missing, expected a value"
    m = re.match(r"unrecognized arguments: (.*)$", message)
    if m:
        return f"{m.group(1).split()[0]}: unknown argument; expected one of those in --help"
    return message


# ---------------------------------------------------------------- paths


def writable_path(value: str, field: str, folder: bool, shown: str | None = None) -> Path:
    """``value`` is a path the run will write (a file, or a folder when ``folder``):
    it must be of that kind if it exists, and its nearest existing parent a folder where
    this process can create a folder (probed: a temporary folder made and removed, since
    permission bits do not tell root, ``/proc`` or a read-only mount). ``shown``: the value
    as the user gave it (a URI)."""
    p = Path(value).expanduser()
    given = shown or value
    if p.exists():
        if folder and not p.is_dir():
            raise ConfigError(f"{field}: got {given!r}, expected a folder (it is a file)")
        if not folder and p.is_dir():
            raise ConfigError(f"{field}: got {given!r}, expected a file path (it is a folder)")
        if not os.access(p if folder else p.parent, os.W_OK) or _cannot_create_in(p if folder else p.parent):
            raise ConfigError(f"{field}: got {given!r}, expected a place this user may write")
        return p
    parent = p.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{field}: got {given!r}, expected a place this user may write ({parent} is not a folder)")
    why = _cannot_create_in(parent)
    if why or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{field}: got {given!r}, expected a place this user may write ({parent} is not a "
                          f"writable folder{f': {why}' if why else ''})")
    return p


def _cannot_create_in(folder: Path) -> str | None:
    """Why a folder cannot be created in ``folder`` (the OS's reason), or None if it can:
    a temporary one is made and removed again."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".metalearner-probe-", dir=folder))
    except OSError as e:
        return e.strerror or type(e).__name__
    return None


def storage_location(value: str | None, field: str) -> None:
    """``--storage``: a URI (``s3://``, ``gs://``: left to Ray) or a writable local folder."""
    if value is None:
        writable_path("ray_results", f"{field} (default ./ray_results)", folder=True)
        return
    m = URI_SCHEME.match(value)
    if m and m.group(1) != "file":
        return
    writable_path(value[len("file://"):] if m else value, field, folder=True, shown=value)


def tracking_location(uri: str | None, field: str = "--tracking-uri") -> None:
    """A local MLflow store (``sqlite:///PATH``, ``file://PATH`` or a plain path) must
    be writable; server URIs (``http://``, ...) are left to MLflow."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if not path or path == ":memory:":
            return
        writable_path(path, field, folder=False, shown=uri)
        return
    m = URI_SCHEME.match(uri)
    if m and m.group(1) != "file":
        return
    writable_path(uri[len("file://"):] if m else uri, field, folder=True, shown=uri)


# ---------------------------------------------------------------- train


def _flag_section(loaded: dict[str, Any], section: str, flag: str, value: str | None) -> None:
    """Put ``--task``/``--controller`` into ``loaded[section]["name"]``; another name
    there is a conflict (that section's settings would not apply)."""
    if section not in loaded:
        loaded[section] = {"name": value} if value is not None else {}
        return
    current = loaded[section]
    if not isinstance(current, dict):
        raise ConfigError(f"{section}: got {short(current)}, expected a mapping of {section} settings")
    if value is not None:
        named = current.get("name")
        if named is not None and named != value:
            raise ConfigError(f"{flag}: got {value!r}, but the config names {section}.name {named!r}; expected "
                              f"one of them (the {named!r} settings would not apply to {value!r})")
        current["name"] = value


def train_config_dict(args: argparse.Namespace) -> dict[str, Any]:
    """The nested run config of ``metalearner train``, before validation (see the
    module docstring for the order of precedence)."""
    loaded: dict[str, Any] = {}
    if args.config:
        data = read_yaml(args.config, "--config")
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"--config: got {short(data)}, expected a mapping of sections (task, model, train, "
                              "controller)")
        loaded = dict(data)
    if getattr(args, "controller_spec", None):
        spec = read_yaml(args.controller_spec, "--controller-spec")
        if isinstance(spec, dict) and set(spec) == {"controller"}:
            spec = spec["controller"]
        if not isinstance(spec, dict):
            raise ConfigError(f"--controller-spec: got {short(spec)}, expected a mapping with 'name' and settings")
        if loaded.get("controller"):
            raise ConfigError("--controller-spec: got a spec, but --config has a controller section too; expected "
                              "one of them")
        if args.controller is not None and spec.get("name") not in (None, args.controller):
            raise ConfigError(f"--controller: got {args.controller!r}, but --controller-spec names "
                              f"{spec.get('name')!r}; expected one of them")
        loaded["controller"] = dict(spec)
    _flag_section(loaded, "task", "--task", args.task)
    _flag_section(loaded, "controller", "--controller", args.controller)
    if args.steps is not None:
        loaded.setdefault("train", {})
        if isinstance(loaded["train"], dict):
            loaded["train"]["steps"] = args.steps
    if getattr(args, "engine", None):
        loaded.setdefault("train", {})
        if isinstance(loaded["train"], dict):
            loaded["train"]["engine"] = args.engine
    return apply_overrides(loaded, args.set)


def train_inputs(args: argparse.Namespace) -> RunConfig:
    """Check every input of ``metalearner train``; returns the validated run config."""
    if args.steps is not None and not 1 <= args.steps <= MAX_STEPS:
        raise ConfigError(f"--steps: got {args.steps}, expected an int in 1..{MAX_STEPS}")
    if args.resume and not args.checkpoint_dir:
        raise ConfigError("--resume: got no --checkpoint-dir, expected --checkpoint-dir DIR holding an earlier "
                          "run's checkpoint")
    cfg = load_run_config(train_config_dict(args))
    err = missing_extras(cfg)
    if err is not None:
        raise err
    task_data(cfg)
    check_name(args.experiment, "--experiment")
    if args.run_name is not None:
        check_name(args.run_name, "--run-name")
    if args.no_mlflow and not args.trace_csv:
        raise ConfigError("--no-mlflow: got no --trace-csv, expected one: the trace would go nowhere")
    if not args.no_mlflow:
        tracking_location(args.tracking_uri)
    if args.trace_csv:
        writable_path(args.trace_csv, "--trace-csv", folder=False)
    if args.checkpoint_dir:
        writable_path(args.checkpoint_dir, "--checkpoint-dir", folder=True)
    if args.resume and cfg.train.engine == "torch":
        check_checkpoint(Path(args.checkpoint_dir), cfg)
    return cfg


def check_checkpoint(directory: Path, cfg: RunConfig) -> dict[str, Any]:
    """The checkpoint in ``directory`` must be readable as plain data (`train.read_checkpoint`,
    ``weights_only``), belong to a run of this config (`train.check_same_config`: only
    ``train.steps`` may differ) and stop before ``train.steps``. Returns the loaded state."""
    from metalearner.train import CHECKPOINT_FILE, CheckpointError, check_same_config, read_checkpoint

    path = directory / CHECKPOINT_FILE
    if not path.is_file():
        raise ConfigError(f"--checkpoint-dir: got {str(directory)!r}, expected a folder with {CHECKPOINT_FILE}")
    try:
        state = read_checkpoint(path)
    except CheckpointError as e:
        raise ConfigError(f"--checkpoint-dir: {e}") from None
    check_same_config(state["config"], cfg.to_dict(), str(path))
    if not isinstance(state["step"], int) or state["step"] < 0:
        raise ConfigError(f"--checkpoint-dir: got {str(path)!r} with step {short(state['step'])}, expected an int >= 0")
    if state["step"] >= cfg.train.steps:
        raise ConfigError(f"train.steps: got {cfg.train.steps}, expected more than the checkpoint's step "
                          f"{state['step']} (nothing would be left to train)")
    return state


def task_data(cfg: RunConfig) -> None:
    """What a config load checks only cheaply, checked in full once per command: the text
    task's tokenizer folder must load (`metalearner.tasks.corpus.load_tokenizer`). The
    corpus's records are checked where they are read, when the task is built."""
    if cfg.task.name == "text" and cfg.task.tokenizer is not None:
        from metalearner.tasks.corpus import load_tokenizer

        try:
            load_tokenizer(cfg.task.tokenizer)
        except ValueError as e:
            raise ConfigError(f"task.{e}") from None


# ---------------------------------------------------------------- sweep, compare, data


def local_cpus() -> int:
    """The CPUs a local Ray will find here: this process's CPU affinity, capped by a cgroup
    v2 quota (``cpu.max``), rounded up (a lower bound for the cpus_per_trial check)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return n


def sweep_inputs(args: argparse.Namespace) -> Any:
    """Check every input of ``metalearner sweep``; returns the validated `ExperimentSpec`
    (with ``--resume``: the spec the sweep started with, which a given one must equal)."""
    from metalearner.experiment import check_extras, load_experiment

    if args.num_cpus is not None and not 1 <= args.num_cpus <= MAX_CPUS:
        raise ConfigError(f"--num-cpus: got {args.num_cpus}, expected an int in 1..{MAX_CPUS}")
    code = flag_runtime_env(getattr(args, "py_modules", None), getattr(args, "working_dir", None))
    if args.resume is not None:
        spec = resume_spec(args, code)
    elif args.experiment is None:
        raise ConfigError("experiment: missing, expected a spec file such as experiments/quickstart.yaml "
                          "(or --resume EXPERIMENT_DIR)")
    else:
        spec = load_experiment(args.experiment, overrides=args.set, smoke=args.smoke_test, runtime_env=code,
                               arms=getattr(args, "arm", None))
    check_extras(spec)
    task_data(load_run_config(spec.run_config(spec.arms[0], spec.seeds[0])))
    if args.address is None:
        cpus = args.num_cpus or local_cpus()
        need = spec.resources.cpus_per_trial
        if need > cpus:
            raise ConfigError(f"resources.cpus_per_trial: got {need:g}, expected at most the {cpus} CPUs of the "
                              "local Ray (--num-cpus); no trial could start")
    tracking_uri = args.tracking_uri
    if args.resume is None:
        storage_location(args.storage, "--storage")
    else:
        from metalearner.sweep_state import SweepState

        tracking_uri = tracking_uri or SweepState.load(args.resume).tracking_uri
    tracking_location(tracking_uri)
    if args.out:
        writable_path(args.out, "--out", folder=True)
    if getattr(args, "metrics_db", None):
        metrics_db_location(args.metrics_db, tracking_uri)
    return spec


def metrics_db_location(uri: str, tracking_uri: str | None) -> None:
    """``--metrics-db``: the PostgreSQL backend of a tracking server, reachable, with the
    MLflow schema the bulk path was tested against (checked now, through the tracking
    layer: a wrong database exits 2 before Ray)."""
    from metalearner.tracking.access import TrackingAccessError, check_metrics_db

    tracking = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if not tracking.startswith(("http://", "https://")):
        raise ConfigError(f"--metrics-db: got it with the tracking store {tracking!r}, expected a tracking server "
                          "(--tracking-uri http://HOST:PORT) whose backend store it is")
    try:
        check_metrics_db(uri)
    except TrackingAccessError as e:
        raise ConfigError(str(e)) from None


def resume_spec(args: argparse.Namespace, code: dict[str, Any] | None = None) -> Any:
    """``sweep --resume DIR``: the spec saved in DIR (its ``runtime_env`` included). A spec
    file, ``--set``, ``--smoke-test``, ``--arm``, ``--py-modules`` or ``--working-dir`` given too must
    yield that same spec: a resume never changes what the sweep runs (the first differing
    field is named). ``code``: the runtime_env of those flags (`flag_runtime_env`)."""
    from metalearner.experiment import load_experiment
    from metalearner.sweep_state import SPEC_FILE, SweepState
    from trainables.storage import same_storage

    folder = Path(args.resume)
    try:
        SweepState.load(folder)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    storage = SweepState.load(folder).storage
    if args.storage is not None and not same_storage(args.storage, storage):
        raise ConfigError(f"--storage: got {args.storage!r} with --resume, expected {storage!r} or none (a resumed "
                          "sweep keeps the storage it started with)")
    started = SweepState.load(folder).tracking_uri
    if args.tracking_uri is not None and not same_store(args.tracking_uri, started):
        raise ConfigError(f"--tracking-uri: got {args.tracking_uri!r} with --resume, expected {started!r} or none "
                          "(a resumed sweep delivers to the tracking store it started with)")
    saved_file = folder / SPEC_FILE
    saved = load_experiment(saved_file)
    given = load_experiment(args.experiment or saved_file, overrides=args.set, smoke=args.smoke_test,
                            runtime_env=code, arms=getattr(args, "arm", None))
    for key, old, new in spec_diff(saved.raw, given.raw):
        raise ConfigError(f"{key}: got {short(new)}, expected {short(old)} as in the sweep being resumed "
                          f"({saved_file}); a resume runs the spec it started with")
    return saved


def same_store(a: str, b: str) -> bool:
    """Whether tracking URIs ``a`` and ``b`` name the same store (a SQLite file by its
    resolved path, anything else by its text, trailing slashes aside)."""
    prefix = "sqlite:///"
    if a.startswith(prefix) and b.startswith(prefix):
        return Path(a[len(prefix):]).resolve() == Path(b[len(prefix):]).resolve()
    return a.rstrip("/") == b.rstrip("/")


_MISSING = "<missing>"


def spec_diff(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) of every difference between two specs, in
    order; list items are named ``key[i]``."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in [*old, *(k for k in new if k not in old)]:
            key = f"{prefix}.{k}" if prefix else str(k)
            out += spec_diff(old.get(k, _MISSING), new.get(k, _MISSING), key)
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [d for i, (a, b) in enumerate(zip(old, new)) for d in spec_diff(a, b, f"{prefix}[{i}]")]
    return [] if old == new else [(prefix, old, new)]


def compare_inputs(args: argparse.Namespace) -> None:
    """Check the inputs of ``metalearner compare``."""
    check_name(args.sweep, "NAME-or-run-id")
    if args.arm is not None:
        check_name(args.arm, "--arm")
        if not args.export_best:
            raise ConfigError(f"--arm: got {args.arm!r} without --export-best, expected both (--arm picks the arm "
                              "whose best trial is exported)")
    tracking_location(args.tracking_uri)
    writable_path(args.out, "--out", folder=True)
    if args.export_best:
        writable_path(args.export_best, "--export-best", folder=False)


def data_inputs(args: argparse.Namespace) -> None:
    """Check the inputs of ``metalearner data speech-digits``."""
    if not 1 <= args.n <= MAX_UTTERANCES:
        raise ConfigError(f"--n: got {args.n}, expected an int in 1..{MAX_UTTERANCES}")
    if not 0 <= args.seed < 2**32:
        raise ConfigError(f"--seed: got {args.seed}, expected an int in 0..{2**32 - 1}")
    writable_path(args.out, "--out", folder=True)
