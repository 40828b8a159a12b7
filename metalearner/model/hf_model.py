"""Hugging Face causal LMs as the model: the knobs of a transformers model, moved in place.

    from metalearner.model.hf_model import HFCausalLM, resolve_hf_config
    mc = resolve_hf_config({"config": {"model_type": "qwen2", ...}}, vocab_size=256, seq_len=64)
    model = HFCausalLM(mc)            # tokens (B, T) -> logits (B, T, V), like DecoderLM
    model.apply_knobs(Knobs(rope_base=20_000.0, window=32))

Which model a ``model.hf`` section names, and what is refused, is resolved in
`metalearner.model.hf_config` (`resolve_hf_config`, `HFModelConfig`, `FAMILIES`); this
module is the adapter that moves the knobs of the model it builds.

How the knobs map onto an HF model (`HFCausalLM.apply_knobs`, the one place they move):

- ``rope_base`` is the model's ``rope_theta``: the config's ``rope_parameters`` entry is
  set and the rotary module's ``inv_freq`` / ``original_inv_freq`` buffers are recomputed
  with the model's own init function for its ``rope_type`` and copied in place. Rope types
  whose tables do not follow ``rope_theta``, or that recompute them inside ``forward``
  (``dynamic``, ``longrope``), are refused. A model with one rotary table per layer type
  (Gemma 3: a local and a global base) moves the table of its sliding layers only; its
  full-attention layers keep their base, as they keep their (unbounded) window.
- ``window`` is the model's ``sliding_window``: the config's value (which transformers
  reads when it builds the sliding mask, every forward) and the ``sliding_window``
  attribute of every sliding-attention layer. Full-attention layers of a hybrid layout
  (``config.layer_types``) stay global. Our own model mixes global and local heads inside
  each layer (``n_global_heads``); an HF hybrid mixes them by layer: a ``full_attention``
  layer is all global heads, a ``sliding_attention`` layer all local ones, so its
  counterpart of ``n_global_heads / n_heads`` is ``1 - sliding_layers / n_layers``.

No parameter or buffer is replaced (optimizers keep working); the window is capped at the
sequence length by the train loop, as for our model. ``transformers`` is imported lazily
(the ``hf`` extra). Imports torch and `metalearner.knobs`; must not import ray, mlflow or
anything above the model layer.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from metalearner.knobs import Knobs
from metalearner.model.hf_config import (
    FAMILIES,
    SLIDING,
    HFModelConfig,
    HFModelError,
    build_lm,
    knob_rope_parameters,
    load_hf_config,
    resolve_hf_config,
    supported_line,
)

# the names callers have imported from here since before the split (the section's names live in hf_config)
__all__ = ["FAMILIES", "SLIDING", "HFCausalLM", "HFModelConfig", "HFModelError", "RotaryTable", "resolve_hf_config",
           "rotary_tables", "sliding_modules"]


@dataclass
class RotaryTable:
    """One rotary table the base knob rewrites: ``module``'s ``{prefix}inv_freq`` buffer."""

    module: nn.Module
    layer_type: str | None  # None: the module's one table; else the key of a per-layer-type table

    def rewrite(self) -> None:
        """Recompute the table from the module's config with the model's own init function
        for its rope type, and copy it into ``inv_freq`` and ``original_inv_freq`` in place."""
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        prefix = "" if self.layer_type is None else f"{self.layer_type}_"
        kind = self.module.rope_type if self.layer_type is None else self.module.rope_type[self.layer_type]
        init = self.module.compute_default_rope_parameters if kind == "default" else ROPE_INIT_FUNCTIONS[kind]
        kwargs = {} if self.layer_type is None else {"layer_type": self.layer_type}
        inv_freq, scaling = init(self.module.config, device=getattr(self.module, f"{prefix}inv_freq").device, **kwargs)
        for name in ("inv_freq", "original_inv_freq"):
            buf = getattr(self.module, f"{prefix}{name}", None)
            if buf is not None:
                buf.copy_(inv_freq.to(device=buf.device, dtype=buf.dtype))
        setattr(self.module, f"{prefix}attention_scaling", scaling)


def rotary_tables(lm: nn.Module) -> list[RotaryTable]:
    """Every rotary table of ``lm`` that the base knob moves: each rotary module's one
    table, or its ``sliding_attention`` table when it holds one per layer type."""
    found = []
    for module in lm.modules():
        kind = getattr(module, "rope_type", None)
        if isinstance(kind, dict) and SLIDING in kind and hasattr(module, f"{SLIDING}_inv_freq"):
            found.append(RotaryTable(module, SLIDING))
        elif isinstance(kind, str) and hasattr(module, "inv_freq"):
            found.append(RotaryTable(module, None))
    return found


def sliding_modules(lm: nn.Module, config: Any) -> list[nn.Module]:
    """The attention modules of ``lm``'s sliding layers that keep a ``sliding_window`` of
    their own (Mistral's keep none: they read the config)."""
    layer_types = getattr(config, "layer_types", None)
    found = []
    for module in lm.modules():
        idx = getattr(module, "layer_idx", None)
        if not isinstance(idx, int) or not hasattr(module, "sliding_window"):
            continue
        if (layer_types[idx] == SLIDING) if layer_types else module.sliding_window is not None:
            found.append(module)
    return found


class HFCausalLM(nn.Module):
    """A transformers causal LM behind our decoder's interface: tokens (B, T) -> logits
    (B, T, V), `apply_knobs`, `knobs` (see the module docstring for what they move).

    Args:
        mc: the resolved `HFModelConfig` (`resolve_hf_config`); the weights are a random
            init under the current torch seed, or the folder's.

    Example:
        >>> mc = resolve_hf_config({"config": {"model_type": "mistral", "hidden_size": 32,
        ...     "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        ...     "num_key_value_heads": 2, "sliding_window": 8}}, vocab_size=256, seq_len=32)
        >>> HFCausalLM(mc)(torch.randint(0, 256, (2, 32))).shape
        torch.Size([2, 32, 256])
    """

    def __init__(self, mc: HFModelConfig) -> None:
        super().__init__()
        self.cfg = mc
        config = mc.hf_config if mc.hf_config is not None else load_hf_config(mc.hf, mc.vocab_size)
        self.lm = build_lm(copy.deepcopy(config), mc.attn_implementation, mc.hf.get("path"))
        self._config = self.lm.config  # the one config object every layer and mask builder reads
        self._rotary = rotary_tables(self.lm)
        self._windows = sliding_modules(self.lm, self._config)
        if not self._rotary:
            raise HFModelError(f"model.hf: got a {mc.model_type} model without a rotary table the base knob can "
                               f"move, expected {supported_line()}")
        self._knobs = Knobs(rope_base=float(knob_rope_parameters(self._config)["rope_theta"]),
                            window=int(self._config.sliding_window))
        self.apply_knobs(Knobs(rope_base=mc.rope_base, window=mc.window))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: LongTensor (B, T) -> logits (B, T, vocab_size)."""
        return self.lm(input_ids=tokens, use_cache=False).logits

    @property
    def knobs(self) -> Knobs:
        """The knobs the model uses now."""
        return self._knobs

    @torch.no_grad()
    def apply_knobs(self, knobs: Knobs) -> None:
        """Set the RoPE base and the sliding window; a no-op for unchanged knobs.

        Call between optimizer steps. Rotary buffers are rewritten in place; no parameter
        or buffer is replaced, so optimizer state and references stay valid.
        """
        if knobs == self._knobs:
            return
        if knobs.rope_base != self._knobs.rope_base:
            configs = {id(c): c for c in [self._config, *(t.module.config for t in self._rotary)]}
            for config in configs.values():  # one object in every family so far
                knob_rope_parameters(config)["rope_theta"] = float(knobs.rope_base)
            for table in self._rotary:
                table.rewrite()
        if knobs.window != self._knobs.window:
            self._config.sliding_window = int(knobs.window)
            for module in self._windows:
                module.sliding_window = int(knobs.window)
        self._knobs = knobs
