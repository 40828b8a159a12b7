"""The resolved configuration of one training run, its validation and `key=value` overrides.

A run config has four sections — ``task``, ``model``, ``train``, ``controller`` — written as
nested dicts (YAML, ``--set`` overrides, Ray trial configs) and flattened with dots for
MLflow params (``controller.factor``, ``model.d_model``, ...). Validation runs on strict
pydantic models (`metalearner.schema`); every error is a `ConfigError` whose message is
one line naming the field, the value and what was expected.

Sizes are bounded so that a typo cannot ask for a model or a batch that no machine holds
(`MAX_TOKENS_PER_BATCH`, `MAX_PARAMS`, the ``le=`` limits below); raise them here if you
really mean to train something that large.

A setting the run would not honour is an error, not a silent change: a model key that
the task dictates (``model.vocab_size`` of the text task, ...), ``train.seq_len`` for the
speech task, or a ``controller.min_window`` above the model's sequence length.

Must not import ray, mlflow or torch.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field

from metalearner.controllers import BOUND_PARAMS
from metalearner.knobs import Knobs
from metalearner.registry import build_controller, controller_params
from metalearner.schema import ConfigError, checker, load_dataclass, short

__all__ = ["ConfigError", "RunConfig", "TrainConfig", "load_run_config", "apply_overrides", "flatten",
           "parse_override", "set_dotted", "read_yaml"]

# ---------------------------------------------------------------- size limits

MAX_STEPS = 10_000_000
MAX_BATCH_SIZE = 4096
MAX_SEQ_LEN = 65_536
MAX_TOKENS_PER_BATCH = 2**20  # train.batch_size * train.seq_len
MAX_PARAMS = 2_000_000_000  # estimated model parameters
MAX_YAML_BYTES = 1_000_000  # a spec or config file

Pos = Annotated[int, Field(ge=1)]
Count = Annotated[int, Field(ge=0)]

# ModelConfig fields bounded beyond the model's own checks (sizes that fit in memory)
MODEL_LIMITS: dict[str, Any] = {
    "vocab_size": Field(le=2**20),
    "d_model": Field(le=8192),
    "n_layers": Field(le=128),
    "n_heads": Field(le=256),
    "n_global_heads": Field(ge=0, le=256),
    "max_seq_len": Field(le=MAX_SEQ_LEN),
    "mlp_ratio": Field(le=16),
    "n_mels": Field(le=512),
    "n_decoder_layers": Field(le=128),
    "max_source_frames": Field(le=MAX_SEQ_LEN),
    "window": Field(ge=1, le=2**20),
    "rope_base": Field(gt=1, le=1e12),
    "dropout": Field(ge=0, lt=1),
}

# ModelConfig keys each task sets from its data (train.resolve_model_config): the user
# may not set them, since the task would replace them
TASK_MODEL_KEYS: dict[str, tuple[str, ...]] = {
    "recall": ("arch", "vocab_size"),
    "text": ("arch", "vocab_size"),
    "speech": ("arch", "vocab_size", "n_mels", "max_seq_len", "max_source_frames"),
}

# tasks an HF causal LM (model.hf) can learn: tokens in, next-token logits out
HF_TASKS = ("text", "recall")

# optional dependencies: (what needs them, pip extra, import names)
EXTRAS: dict[str, tuple[str, tuple[str, ...]]] = {
    "train.engine='hf'": ("hf", ("transformers", "accelerate", "datasets")),
    "task.name='speech'": ("speech", ("datasets", "soundfile", "soxr")),
    **{f"task.format='{f}'": ("hf", ("datasets",)) for f in ("text", "jsonl", "parquet")},
}


# ---------------------------------------------------------------- sections


@dataclass
class TrainConfig:
    steps: Annotated[int, Field(ge=1, le=MAX_STEPS)] = 300
    batch_size: Annotated[int, Field(ge=1, le=MAX_BATCH_SIZE)] = 16
    seq_len: Annotated[int, Field(ge=1, le=MAX_SEQ_LEN)] = 128
    lr: Annotated[float, Field(gt=0)] = 3e-3  # no upper bound: a diverging lr is handled by train.max_nonfinite
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.1
    warmup_steps: Annotated[int, Field(ge=0, le=MAX_STEPS)] = 20
    weight_decay: Annotated[float, Field(ge=0, le=10)] = 0.1
    grad_clip: Annotated[float, Field(ge=0, le=1e6)] = 1.0
    eval_every: Annotated[int, Field(ge=1, le=MAX_STEPS)] = 50
    eval_batches: Annotated[int, Field(ge=1, le=10_000)] = 4
    seed: Annotated[int, Field(ge=0, lt=2**32)] = 0
    threads: Annotated[int, Field(ge=0, le=1024)] = 0
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    engine: Literal["torch", "hf"] = "torch"
    report_every: Annotated[int, Field(ge=1, le=MAX_STEPS)] = 25
    checkpoint_every: Annotated[int, Field(ge=0, le=MAX_STEPS)] = 0
    max_nonfinite: Annotated[int, Field(ge=1, le=MAX_STEPS)] = 10  # consecutive non-finite (skipped) steps that end the run as diverged

    def validate(self) -> None:
        tokens = self.batch_size * self.seq_len
        if tokens > MAX_TOKENS_PER_BATCH:
            raise ConfigError(f"batch_size: got {self.batch_size} with seq_len {self.seq_len} ({tokens} tokens "
                              f"per batch), expected at most {MAX_TOKENS_PER_BATCH} tokens per batch")


@dataclass
class ModelSection:
    """``model.preset`` plus any `ModelConfig` field as an override; or ``model.hf``, a
    Hugging Face causal LM (`metalearner.model.hf_config`), and then nothing else."""

    preset: str = "small"
    overrides: dict[str, Any] = field(default_factory=dict)
    hf: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        if self.hf is not None:
            return {"hf": copy.deepcopy(self.hf)}
        return {"preset": self.preset, **self.overrides}


@dataclass
class RunConfig:
    task: Any
    model: ModelSection
    train: TrainConfig
    controller: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """The nested dict form (round-trips through `RunConfig.from_dict`)."""
        train = dataclasses.asdict(self.train)
        if self.task.name == "speech":
            del train["seq_len"]  # the speech task takes it from task.max_text_len
        return {
            "task": dataclasses.asdict(self.task),
            "model": self.model.to_dict(),
            "train": train,
            "controller": dict(self.controller),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        return load_run_config(data)

    def controller_settings(self) -> dict[str, Any]:
        return {k: v for k, v in self.controller.items() if k != "name"}


# ---------------------------------------------------------------- loading


def _section(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: got {short(value)}, expected a mapping of {key} settings")
    return dict(value)


def _load_task(data: dict[str, Any]) -> Any:
    from metalearner.tasks import TASKS

    name = data.get("name", "text")
    if not isinstance(name, str) or name not in TASKS:
        raise ConfigError(f"task.name: got {short(name)}, expected one of {sorted(TASKS)}")
    return load_dataclass(TASKS[name].config_cls, data, "task.")


_MODEL_CHECKER: Any = None


def _model_checker() -> Any:
    global _MODEL_CHECKER
    if _MODEL_CHECKER is None:
        from metalearner.model import ModelConfig

        _MODEL_CHECKER = checker(ModelConfig, MODEL_LIMITS)
    return _MODEL_CHECKER


def _load_model(data: dict[str, Any], task: str, seq_len: int, vocab_size: int | None = None) -> ModelSection:
    """The model section, checked down to its size (`MAX_PARAMS`) with ``vocab_size`` token
    ids: the task's when known before it is built (a tokenizer's), else None: the model's own."""
    from metalearner.model import PRESETS
    from metalearner.schema import validate

    if "hf" in data:
        return ModelSection(hf=_load_hf(data, task, seq_len, vocab_size))
    preset = data.pop("preset", "small")
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ConfigError(f"model.preset: got {short(preset)}, expected one of {sorted(PRESETS)}")
    checked = validate(_model_checker(), data, "model.")
    overrides = {k: getattr(checked, k) for k in data}
    for key in TASK_MODEL_KEYS.get(task, ()):
        if key in overrides:
            raise ConfigError(f"model.{key}: got {short(overrides[key])}, expected it unset: the {task} task "
                              f"sets {key} from its data (the run would not use your value)")
    try:
        mc = PRESETS[preset](**overrides).validate()
    except ValueError as e:
        raise ConfigError(f"model.{e}") from None
    params = _param_estimate(mc, vocab_size)
    if params > MAX_PARAMS:
        vocab = f"{vocab_size} (task.tokenizer's)" if vocab_size is not None else f"{mc.vocab_size}"
        raise ConfigError(f"model.d_model: got {mc.d_model} with n_layers {mc.n_layers} and vocab_size "
                          f"{vocab} (about {params:.3g} parameters), expected at most {MAX_PARAMS:.3g}")
    return ModelSection(preset=preset, overrides=overrides)


@dataclass
class HFSection:
    """``model.hf``: a Hugging Face causal LM (see `metalearner.model.hf_config`)."""

    config: dict[str, Any] | None = None  # a config dict with model_type (random init), or overrides of path's
    path: str | None = None  # a local model folder (from_pretrained, local files only)
    attn_implementation: str | None = None  # "sdpa", "eager" or "metalearner_local"; None: the family's


def _load_hf(data: dict[str, Any], task: str, seq_len: int, vocab_size: int | None = None) -> dict[str, Any]:
    """Check ``model.hf`` (alone in the model section) down to the model it builds: the
    family, the folder, the config keys, both knobs' layout, the size (on the meta
    device, with ``vocab_size`` token ids when the task's are known, else the config's);
    returns the section as given, without unset keys."""
    from metalearner.model.hf_config import FAMILY_LIST, HFModelError, resolve_hf_config, section_model_type

    others = [k for k in data if k != "hf"]
    if others:
        raise ConfigError(f"model.{others[0]}: got {short(data[others[0]])} with model.hf, expected it unset (an HF "
                          "model takes its sizes from model.hf.config)")
    if task not in HF_TASKS:
        raise ConfigError(f"model.hf: got it with task.name {task!r}, expected a decoder task: one of {list(HF_TASKS)}")
    section = load_dataclass(HFSection, data["hf"], "model.hf.")
    out = {k: v for k, v in dataclasses.asdict(section).items() if v is not None}
    if section.config is not None and "vocab_size" in section.config:
        raise ConfigError(f"model.hf.config.vocab_size: got {short(section.config['vocab_size'])}, expected it unset: "
                          f"the {task} task sets vocab_size from its data (the run would not use your value)")
    try:
        section_model_type(out)
        if importlib.util.find_spec("transformers") is None:
            raise ConfigError("model.hf: got a Hugging Face model, which needs the package 'transformers' (not "
                              "installed); expected it installed: pip install 'metalearner[hf]'")
        mc = resolve_hf_config(out, vocab_size, seq_len, max_params=MAX_PARAMS)
    except HFModelError as e:
        raise ConfigError(str(e)) from None
    if mc.n_params > MAX_PARAMS:
        raise ConfigError(f"model.hf.config: got a {mc.model_type} model of {mc.n_params:.3g} parameters, expected at "
                          f"most {MAX_PARAMS:.3g} (families: {FAMILY_LIST})")
    return out


def _param_estimate(mc: Any, vocab_size: int | None = None) -> int:
    """Parameters of a model of ``mc``, roughly: blocks plus the embedding of ``vocab_size``
    token ids (None: ``mc.vocab_size``)."""
    blocks = mc.n_layers + (mc.decoder_layers if mc.arch == "encoder_decoder" else 0)
    vocab = mc.vocab_size if vocab_size is None else vocab_size
    return int(blocks * (4 + 2 * mc.mlp_ratio) * mc.d_model**2 + vocab * mc.d_model)


def _tokenizer_vocab(task: Any) -> int | None:
    """The vocabulary a configured ``task.tokenizer`` gives the model, read from its files
    without loading it; None without one (the size is then the model's own)."""
    folder = getattr(task, "tokenizer", None)
    if not folder:
        return None
    from metalearner.tasks.corpus import tokenizer_vocab_size

    return tokenizer_vocab_size(folder)


def _load_controller(data: dict[str, Any]) -> dict[str, Any]:
    name = data.get("name", "ewma")
    try:
        known = controller_params(name)  # a plugin is imported and checked here (metalearner.registry)
    except ValueError as e:
        raise ConfigError(f"controller.{e}") from None
    settings = {k: v for k, v in data.items() if k != "name"}
    for key in settings:
        if key not in known:
            raise ConfigError(f"controller.{key}: unknown parameter for controller '{name}'; "
                              f"expected one of {sorted(known)}")
    try:
        build_controller(name, init=Knobs(rope_base=10_000.0, window=1), **settings)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"controller.{e}") from None
    return {"name": name, **settings}


SECTIONS = ("task", "model", "train", "controller")


def load_run_config(data: Any) -> RunConfig:
    """Validate a nested config dict into a `RunConfig` (raises `ConfigError`)."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: got {short(data)}, expected a mapping with sections {list(SECTIONS)}")
    for key in data:
        if key not in SECTIONS:
            raise ConfigError(f"{key}: unknown section; expected one of {list(SECTIONS)}")
    sections = {key: _section(data, key) for key in SECTIONS}
    task = _load_task(sections["task"])
    train = load_dataclass(TrainConfig, sections["train"], "train.")
    if task.name == "speech" and "seq_len" in sections["train"]:
        raise ConfigError(f"train.seq_len: got {short(sections['train']['seq_len'])}, expected it unset: the speech "
                          "task takes its sequence length from task.max_text_len")
    model = _load_model(sections["model"], task.name, train.seq_len, _tokenizer_vocab(task))
    cfg = RunConfig(task=task, model=model, train=train, controller=_load_controller(sections["controller"]))
    _check_window_bounds(cfg)
    if hasattr(cfg.task, "check_files"):
        try:
            cfg.task.check_files()
        except ValueError as e:
            raise ConfigError(f"task.{e}") from None
    return cfg


def _check_window_bounds(cfg: RunConfig) -> None:
    """``controller.min_window`` must fit the model's sequence length (the train loop caps
    ``max_window`` there, as DESIGN.md says; it never lowers ``min_window``)."""
    if cfg.task.name == "speech":
        return  # the sequence lengths come from the data; train.make_controller checks
    seq = cfg.model.overrides.get("max_seq_len", cfg.train.seq_len)
    lo = cfg.controller.get("min_window", BOUND_PARAMS["min_window"].default)
    if lo > seq:
        raise ConfigError(f"controller.min_window: got {lo}, expected at most the model's sequence length "
                          f"({seq}, from {'model.max_seq_len' if 'max_seq_len' in cfg.model.overrides else 'train.seq_len'})")


def missing_extras(cfg: RunConfig) -> ConfigError | None:
    """The optional packages this run needs but cannot import, as the error to show."""
    needs = []
    if cfg.train.engine == "hf":
        needs.append("train.engine='hf'")
    if cfg.task.name == "speech":
        needs.append("task.name='speech'")
    table = dict(EXTRAS)
    if cfg.task.name == "text":
        from metalearner.tasks.corpus import resolve_format

        reading = resolve_format(cfg.task.files, cfg.task.format)  # checked when the config loaded
        if reading != "bytes":
            needs.append(f"task.format='{reading}'")
        if cfg.task.tokenizer is not None:
            needs.append(f"task.tokenizer={cfg.task.tokenizer!r}")
            table[needs[-1]] = ("hf", ("transformers",))
    return probe(needs, table)


def probe(needs: list[str], table: dict[str, tuple[str, tuple[str, ...]]] | None = None) -> ConfigError | None:
    """Check that the packages behind each of ``needs`` (keys of ``table``, default
    `EXTRAS`) import; the first missing one becomes an error naming the pip extra."""
    table = table or EXTRAS
    for what in needs:
        extra, modules = table[what]
        for mod in modules:
            if importlib.util.find_spec(mod) is None:
                field, value = what.split("=", 1)
                return ConfigError(f"{field}: got {value}, which needs the package {mod!r} (not installed); "
                                   f"expected it installed: pip install 'metalearner[{extra}]'")
    return None


def read_yaml(path: str | Path, field: str) -> Any:
    """Read a YAML file given as input ``field``; every failure is a `ConfigError`:
    missing, unreadable, too large, not UTF-8 or not YAML."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{field}: got {str(path)!r}, expected an existing YAML file")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{field}: got {str(path)!r}, expected a readable file ({e.strerror})") from None
    if len(raw) > MAX_YAML_BYTES:
        raise ConfigError(f"{field}: got {str(path)!r} of {len(raw)} bytes, expected at most {MAX_YAML_BYTES}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{field}: got {str(path)!r}, expected UTF-8 text (byte {raw[e.start]:#04x} at "
                          f"offset {e.start} is not)") from None
    return parse_yaml(text, f"{field}: {path}")


def parse_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load(text)``; any failure is a one-line `ConfigError` after ``where``."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where} is not valid YAML ({_first_line(e)})") from None
    except (ValueError, TypeError, OverflowError, RecursionError) as e:  # e.g. a date like 2024-02-30
        raise ConfigError(f"{where} holds a value YAML cannot build ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return " ".join(lines)[:200] or type(e).__name__


# ---------------------------------------------------------------- overrides and flattening


KEY_PART = re.compile(r"^([A-Za-z_][A-Za-z0-9_-]*)(?:\[(\d+)\])?$")


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.steps=100"`` -> ``("train.steps", 100)``; values parse as YAML scalars
    (a value that is not YAML stays a string)."""
    bad = ConfigError(f"--set: got {item!r}, expected key=value (e.g. train.steps=100)")
    if "=" not in item:
        raise bad
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise bad
    for part in key.split("."):
        if not KEY_PART.match(part):
            raise ConfigError(f"--set: got key {key!r}, expected dotted names like train.steps or arms[1].name")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except Exception:  # noqa: BLE001 - anything YAML cannot read is the literal string
        value = raw
    return key, value


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """Set ``data["a"]["b"] = value`` for ``key="a.b"`` (creating mappings on the way);
    ``arms[1].name`` indexes an existing list."""
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        m = KEY_PART.match(part)
        name, index = (m.group(1), m.group(2)) if m else (part, None)
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if not isinstance(node, dict):
            raise ConfigError(f"{'.'.join(parts[:i]) or key}: got {short(node)}, cannot set {key} inside it")
        if index is None:
            if last:
                node[name] = value
                return
            nxt = node.get(name)
            if nxt is None:
                nxt = node[name] = {}
            node = nxt
            continue
        seq = node.get(name)
        if not isinstance(seq, list) or not int(index) < len(seq):
            n = len(seq) if isinstance(seq, list) else 0
            raise ConfigError(f"{where}: got index {index}, expected an index below {n} (the length of {name})")
        if last:
            seq[int(index)] = value
            return
        node = seq[int(index)]


def apply_overrides(data: dict[str, Any], items: list[str]) -> dict[str, Any]:
    """A deep copy of ``data`` with each ``key=value`` of ``items`` applied."""
    out = copy.deepcopy(data)
    for item in items or []:
        key, value = parse_override(item)
        set_dotted(out, key, value)
    return out


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The dotted keys whose values differ between two nested config dicts.

    A key present in only one of them counts as differing. Used to refuse a resume whose
    config is not the one the run (or sweep) started with.

    Args:
        old: the config that was saved (e.g. in a checkpoint).
        new: the config of the current invocation.

    Returns:
        The differing keys, in the order of ``old`` (then keys only ``new`` has).
    """
    a, b = flatten(old), flatten(new)
    return [k for k in a if k not in b or a[k] != b[k]] + [k for k in b if k not in a]

