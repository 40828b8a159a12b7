"""The ``model.hf`` section: which Hugging Face causal LM a run trains, resolved and checked
before anything starts, and built (`build_lm`) for the adapter.

    from metalearner.model.hf_config import resolve_hf_config
    mc = resolve_hf_config({"config": {"model_type": "qwen2", ...}}, vocab_size=256, seq_len=64)

The section names the model: ``config`` (a config dict with a ``model_type``: random init
under the run's seed) or ``path`` (a local folder written by ``save_pretrained``:
``from_pretrained(..., local_files_only=True)``, never a download; a ``config`` beside it
overrides keys of the saved config). The families the adapter claims are `FAMILIES`; each
has an equivalence test (tests/test_hf_model.py). Anything else is refused with an
`HFModelError` whose one line names the field: a model without RoPE or without a sliding
window (GPT-2, Llama, ...: `NO_KNOBS` says why), a folder that holds no model, a config key
the family does not know, a layout whose knobs would move nothing, a rope type whose
tables do not follow ``rope_theta``, a size above the run's cap. `metalearner.config` calls
`resolve_hf_config` when a spec is loaded, so the CLI refuses before Ray starts; the model
is then built only on the meta device (no memory, no weights read).

`metalearner.model.hf_model` puts the resolved model behind our decoder's interface and
moves its knobs. ``transformers`` is imported lazily (the ``hf`` extra). Imports torch;
must not import ray, mlflow or anything above the model layer.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Family:
    """A model type the adapter claims: where its sliding layers are, and the attention
    implementation used when ``model.hf.attn_implementation`` is unset."""

    layout: str
    attention: str = "sdpa"


# model_type -> Family; each has an equivalence test (README: "Your HF model")
FAMILIES: dict[str, Family] = {
    "qwen2": Family("layers >= max_window_layers slide (needs use_sliding_window: true)"),
    "qwen3": Family("layers >= max_window_layers slide (needs use_sliding_window: true)"),
    "mistral": Family("every layer slides"),
    "ministral": Family("sliding / full layers (layer_types)"),
    "mixtral": Family("every layer slides (mixture-of-experts MLP)"),
    "starcoder2": Family("every layer slides"),
    "gemma2": Family("alternating sliding / full layers (layer_types)", attention="eager"),
    "gemma3_text": Family("5 sliding : 1 full (layer_types); the knob moves the local RoPE base"),
    "cohere2": Family("3 sliding : 1 full (layer_types)"),
    "olmo3": Family("3 sliding : 1 full (layer_types)"),
    "exaone4": Family("3 sliding : 1 full (layer_types)"),
}
FAMILY_LIST = sorted(FAMILIES)

# Known causal LMs the knobs cannot move, with the reason named in the error.
NO_KNOBS: dict[str, str] = {
    "gpt2": "no RoPE (learned positions) and no sliding window",
    "gpt_neo": "no RoPE",
    "opt": "no RoPE and no sliding window",
    "llama": "no sliding window",
    "gemma": "no sliding window",
    "phi": "no sliding window",
    "falcon": "no sliding window",
    "bloom": "ALiBi, no RoPE",
    "mpt": "ALiBi, no RoPE",
}

# Rope types whose tables are a pure function of the config (recomputed here in place).
# "dynamic" and "longrope" recompute or cache their tables inside forward: refused.
MOVABLE_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
LOCAL_ATTENTION = "metalearner_local"  # our blocked band attention (metalearner.model.hf_local)
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", LOCAL_ATTENTION)
SLIDING = "sliding_attention"
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# config keys that are no dataclass field of every config class but that configs accept
LEGACY_KEYS = ("rope_theta", "rope_scaling", "partial_rotary_factor", "head_dim")
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


class HFModelError(ValueError):
    """A ``model.hf`` section this adapter cannot honour; the message is one line that
    starts with the field (``model.hf.config.model_type: got ...``)."""


def supported_line() -> str:
    """The supported families, as every error message names them."""
    return f"a causal LM with RoPE and a sliding window, one of {FAMILY_LIST}"


@dataclass
class HFModelConfig:
    """A resolved Hugging Face model: what `HFCausalLM` builds and the train loop reads.

    Args:
        hf: the ``model.hf`` section as given (``config`` / ``path`` / ``attn_implementation``).
        model_type: the family (a key of `FAMILIES`).
        attn_implementation: the attention transformers runs (the section's, or the family's).
        vocab_size: token ids the model embeds (the task's, or a pretrained model's own).
        max_seq_len: the run's sequence length (the train loop caps the window there).
        rope_base: initial RoPE base (the config's ``rope_theta``; knob).
        window: initial window (the config's ``sliding_window`` capped at ``max_seq_len``; knob).
        n_layers: decoder layers.
        sliding_layers: of those, the layers whose window the knob moves (the rest are global).
        n_heads: attention heads counted over all layers (``num_attention_heads * n_layers``).
        n_global_heads: of those, the heads of full-attention layers; with ``n_heads`` they
            give compare's attention compute, as ``model.n_heads`` / ``model.n_global_heads``
            of our model do per layer.
        n_params: the model's parameter count.
        arch: always "decoder" (tokens -> logits).
        hf_config: the transformers config (not logged, not compared).
    """

    hf: dict[str, Any]
    model_type: str
    attn_implementation: str
    vocab_size: int
    max_seq_len: int
    rope_base: float
    window: int
    n_layers: int
    sliding_layers: int
    n_heads: int
    n_global_heads: int
    n_params: int
    arch: str = "decoder"
    hf_config: Any = field(default=None, repr=False, compare=False)

    def params(self) -> dict[str, Any]:
        """The resolved model as nested params (``model.hf.config.*``, ``model.rope_base``, ...)."""
        return {"hf": copy.deepcopy(self.hf), "model_type": self.model_type,
                "attn_implementation": self.attn_implementation, "vocab_size": self.vocab_size,
                "max_seq_len": self.max_seq_len, "rope_base": self.rope_base, "window": self.window,
                "n_layers": self.n_layers, "sliding_layers": self.sliding_layers, "n_heads": self.n_heads,
                "n_global_heads": self.n_global_heads, "n_params": self.n_params,
                "arch": self.arch}


# ---------------------------------------------------------------- checks without transformers


def check_family(model_type: Any, where: str) -> str:
    """``model_type`` must be a key of `FAMILIES`; returns it.

    Raises:
        HFModelError: naming ``where``, the value, the reason when known, and the families.
    """
    if isinstance(model_type, str) and model_type in FAMILIES:
        return model_type
    why = NO_KNOBS.get(model_type) if isinstance(model_type, str) else None
    detail = f" ({model_type} has {why})" if why else ""
    raise HFModelError(f"{where}: got {model_type!r}{detail}, expected {supported_line()}")


def check_local_folder(path: Any) -> Path:
    """``model.hf.path`` must be a local model folder: ``config.json`` and weights.

    Raises:
        HFModelError: not a string, no folder here (a hub id is not downloaded), or a
            folder without a model.
    """
    expected = ("expected a local model folder (config.json and weights, as save_pretrained writes; "
                "nothing is downloaded)")
    if not isinstance(path, str) or not path:
        raise HFModelError(f"model.hf.path: got {path!r}, {expected}")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise HFModelError(f"model.hf.path: got {path!r}, which is no folder here; {expected}")
    if not (folder / "config.json").is_file():
        raise HFModelError(f"model.hf.path: got {path!r}, a folder without config.json; {expected}")
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise HFModelError(f"model.hf.path: got {path!r}, a folder without weights ({' or '.join(WEIGHT_FILES)}); "
                           f"{expected}")
    return folder


def section_model_type(section: dict[str, Any]) -> str:
    """The family a ``model.hf`` section names, checked without importing transformers:
    ``config.model_type``, or the ``model_type`` in ``path``'s config.json (a ``config``
    beside a ``path`` holds overrides and names no model_type).

    Raises:
        HFModelError: neither config nor path, an unsupported family, a bad folder.
    """
    cfg, path = section.get("config"), section.get("path")
    if path is None:
        if cfg is None:
            raise HFModelError("model.hf: got neither config nor path, expected one of them (config: a mapping with "
                               "model_type, for a random init; path: a local model folder)")
        if "model_type" not in cfg:
            raise HFModelError(f"model.hf.config.model_type: missing, expected {supported_line()}")
        return check_family(cfg["model_type"], "model.hf.config.model_type")
    folder = check_local_folder(path)
    if cfg is not None and "model_type" in cfg:
        raise HFModelError(f"model.hf.config.model_type: got {cfg['model_type']!r} with model.hf.path, expected it "
                           "unset (the folder's config.json names the family; config holds overrides)")
    try:
        saved = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise HFModelError(f"model.hf.path: got {path!r}, whose config.json is not readable JSON ({e}); expected a "
                           "local model folder") from None
    model_type = saved.get("model_type") if isinstance(saved, dict) else None
    return check_family(model_type, f"model.hf.path: {path} holds model_type")


def attention_of(section: dict[str, Any], model_type: str) -> str:
    """The attention implementation a section asks for (default: the family's).

    Raises:
        HFModelError: an unknown name, or ``metalearner_local`` where it is not installed.
    """
    name = section.get("attn_implementation") or FAMILIES[model_type].attention
    if name not in ATTN_IMPLEMENTATIONS:
        raise HFModelError(f"model.hf.attn_implementation: got {name!r}, expected one of {list(ATTN_IMPLEMENTATIONS)}")
    if name == LOCAL_ATTENTION and importlib.util.find_spec("metalearner.model.hf_local") is None:
        raise HFModelError(f"model.hf.attn_implementation: got {name!r}, which needs metalearner.model.hf_local (not "
                           "in this install); expected 'sdpa' or 'eager'")
    return name


# ---------------------------------------------------------------- transformers configs


def load_hf_config(section: dict[str, Any], vocab_size: int | None = None) -> Any:
    """The transformers config of a ``model.hf`` section.

    Args:
        section: the ``model.hf`` section.
        vocab_size: for a random init, the task's vocabulary (None: the config's own);
            token ids (bos/eos/pad) outside it are dropped.

    Raises:
        HFModelError: anything `section_model_type` refuses, an unknown config key, a
            value the config class rejects, or a layout whose knobs cannot move
            (`check_knob_layout`).
    """
    from transformers import AutoConfig

    model_type = section_model_type(section)
    overrides = dict(section.get("config") or {})
    overrides.pop("model_type", None)
    known = set(getattr(AutoConfig.for_model(model_type), "__dataclass_fields__", {})) | set(LEGACY_KEYS)
    for key in overrides:
        if key not in known:
            raise HFModelError(f"model.hf.config.{key}: unknown key for model_type {model_type!r}; expected one of "
                               f"{sorted(known)}")
    pretrained = section.get("path") is not None
    if vocab_size is not None and not pretrained:
        overrides["vocab_size"] = vocab_size
    try:
        if pretrained:
            config = AutoConfig.from_pretrained(str(Path(section["path"]).expanduser()), local_files_only=True,
                                                **overrides)
        else:
            config = AutoConfig.for_model(model_type, **overrides)
    except Exception as e:  # noqa: BLE001 - any failure of the config class on user input (its strict
        # validation raises huggingface_hub's own errors, which are no ValueError)
        raise HFModelError(f"model.hf.config: got {short_dict(overrides)}, which {model_type} rejects "
                           f"({first_line(e)})") from None
    if not pretrained:
        for key in TOKEN_ID_KEYS:  # ids of the default vocabulary mean nothing in the task's
            value = getattr(config, key, None)
            if isinstance(value, int) and not 0 <= value < config.vocab_size:
                setattr(config, key, None)
    check_knob_layout(config)
    return config


def short_dict(d: dict[str, Any], limit: int = 80) -> str:
    text = repr(d)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def first_line(e: BaseException) -> str:
    """The text of ``e`` on one line, at most 300 characters."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return " ".join(lines)[:300] or type(e).__name__


def sliding_layer_count(config: Any) -> int:
    """How many layers of ``config`` have a sliding window (0: the window knob moves nothing)."""
    if getattr(config, "sliding_window", None) is None:
        return 0
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return sum(t == SLIDING for t in layer_types)
    return int(config.num_hidden_layers)


def knob_rope_parameters(config: Any) -> dict[str, Any]:
    """The ``rope_parameters`` entry the base knob moves: the flat dict, or the
    ``sliding_attention`` entry of one nested by layer type (Gemma 3)."""
    params = getattr(config, "rope_parameters", None) or {}
    if isinstance(params.get(SLIDING), dict):
        return params[SLIDING]
    return params


def check_knob_layout(config: Any) -> None:
    """Both knobs must have something to move in ``config``.

    Raises:
        HFModelError: no sliding layer, a window below 1, no usable ``rope_theta``, a rope
            type the knob cannot move, or an odd rotary dimension.
    """
    mt = config.model_type
    if sliding_layer_count(config) == 0:
        hint = ("use_sliding_window: true and max_window_layers < num_hidden_layers" if mt in ("qwen2", "qwen3")
                else "sliding_window set")
        raise HFModelError(f"model.hf.config: got a {mt} config without sliding-window layers, expected {hint} "
                           "(the window knob would move nothing)")
    window = config.sliding_window
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise HFModelError(f"model.hf.config.sliding_window: got {window!r}, expected an int >= 1")
    rope = knob_rope_parameters(config)
    rope_type = rope.get("rope_type", "default")
    if rope_type not in MOVABLE_ROPE_TYPES:
        raise HFModelError(f"model.hf.config.rope_parameters.rope_type: got {rope_type!r}, expected one of "
                           f"{list(MOVABLE_ROPE_TYPES)} (the base knob recomputes the rotary tables from rope_theta "
                           "between steps; this type does not take the base, or recomputes its tables in forward)")
    theta = rope.get("rope_theta")
    if isinstance(theta, bool) or not isinstance(theta, int | float) or not math.isfinite(theta) or theta <= 1:
        raise HFModelError(f"model.hf.config.rope_theta: got {theta!r}, expected a finite float > 1")
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if not getattr(config, "head_dim", None) and config.hidden_size % config.num_attention_heads:
        raise HFModelError(f"model.hf.config.num_attention_heads: got {config.num_attention_heads}, expected a "
                           f"divisor of hidden_size {config.hidden_size} (or head_dim set)")
    if int(head_dim * rope.get("partial_rotary_factor", 1.0)) % 2:
        raise HFModelError(f"model.hf.config.head_dim: got {head_dim}, expected an even rotary dimension")


COUNT_FIELDS = ("num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "num_local_experts",
                "num_experts_per_tok")
MAX_COUNT = 65_536  # far beyond any model this runs, far below what makes a meta build hang


def rough_params(config: Any) -> float:
    """Parameters of a model of ``config``, roughly (attention, MLP, embeddings; experts
    counted), from its sizes alone: a guard before anything is built."""
    h = float(config.hidden_size)
    inner = max(h, float(config.num_attention_heads) * float(getattr(config, "head_dim", None) or 0))
    ffn = float(getattr(config, "intermediate_size", None) or 4 * h)
    experts = float(getattr(config, "num_local_experts", None) or 1)
    return float(config.num_hidden_layers) * (4 * h * inner + 3 * h * ffn * experts) + float(config.vocab_size) * h


def resolve_hf_config(section: dict[str, Any], vocab_size: int | None, seq_len: int,
                      max_params: float | None = None) -> HFModelConfig:
    """The `HFModelConfig` of a ``model.hf`` section for a run.

    Args:
        section: the ``model.hf`` section (``config`` / ``path`` / ``attn_implementation``).
        vocab_size: the task's token ids: a random init gets exactly this vocabulary, a
            pretrained model must embed at least as many; None (validation before the
            task is built): the config's own.
        seq_len: the run's sequence length (the window is capped there).
        max_params: refuse a config whose rough size (`rough_params`) is above it,
            before the model is built on the meta device.

    Raises:
        HFModelError: the section, or its pairing with the task, is not usable; the model
            cannot be built (checked on the meta device: no memory, no weights read).
    """
    model_type = section_model_type(section)
    attention = attention_of(section, model_type)
    pretrained = section.get("path") is not None
    config = load_hf_config(section, vocab_size)
    if pretrained and vocab_size is not None and config.vocab_size < vocab_size:
        raise HFModelError(f"model.hf.path: got a model with vocab_size {config.vocab_size}, expected at least the "
                           f"task's {vocab_size} token ids")
    for name in COUNT_FIELDS:  # counts the size estimate does not see (heads, kv heads) hang the build
        value = getattr(config, name, None)
        if value is not None and not (isinstance(value, int) and 1 <= value <= MAX_COUNT):
            raise HFModelError(f"model.hf.config.{name}: got {value!r}, expected an int in 1 .. {MAX_COUNT}")
    try:
        size = rough_params(config)
    except (TypeError, ValueError) as e:
        raise HFModelError(f"model.hf.config: got sizes {model_type} cannot use ({first_line(e)})") from None
    if max_params is not None and not size <= max_params:
        raise HFModelError(f"model.hf.config: got a {model_type} model of about {size:.3g} parameters, expected at "
                           f"most {max_params:.3g}")
    try:
        with torch.device("meta"):
            lm = build_lm(config, "eager", None)
    except Exception as e:  # noqa: BLE001 - any failure of transformers' model code on this config
        raise HFModelError(f"model.hf.config: the {model_type} model cannot be built from it ({first_line(e)})") from None
    heads = int(config.num_attention_heads)
    return HFModelConfig(
        hf=copy.deepcopy(section), model_type=model_type, attn_implementation=attention,
        vocab_size=int(config.vocab_size), max_seq_len=seq_len,
        rope_base=float(knob_rope_parameters(config)["rope_theta"]),
        window=min(int(config.sliding_window), seq_len), n_layers=int(config.num_hidden_layers),
        sliding_layers=sliding_layer_count(config), n_heads=heads * int(config.num_hidden_layers),
        n_global_heads=heads * (int(config.num_hidden_layers) - sliding_layer_count(config)),
        n_params=sum(p.numel() for p in lm.parameters()), hf_config=config)


def register_attention(name: str) -> str:
    """Make attention implementation ``name`` known to transformers; returns the name to
    pass on. ``metalearner_local`` is registered by `metalearner.model.hf_local`."""
    if name == LOCAL_ATTENTION:
        return importlib.import_module("metalearner.model.hf_local").register_local_attention()
    return name


def build_lm(config: Any, attn_implementation: str, path: str | None) -> nn.Module:
    """The transformers causal LM in fp32: a random init from ``config`` under the
    current torch seed, or ``path``'s weights (local files only)."""
    from transformers import AutoModelForCausalLM

    attn = register_attention(attn_implementation)
    if path is None:
        return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(str(Path(path).expanduser()), config=config, local_files_only=True,
                                                attn_implementation=attn, dtype=torch.float32)
