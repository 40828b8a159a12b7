"""`attn_implementation="metalearner_local"`: HF models whose sliding-window layers cost
what the band costs.

transformers' `sdpa` and `eager` paths apply a sliding window as a dense (B, 1, T, T) mask,
so a smaller window saves nothing. `register_local_attention()` registers, under
`ATTN_NAME`, an attention function (through `AttentionInterface`) and a mask function
(through `AttentionMaskInterface`) that together run every sliding-window layer through the
blocked band (`metalearner.model.band.blocked_local_attention`, or FlexAttention on CUDA when
`local_kernel_for` says "flex") and every full-attention layer through causal SDPA, without
building a T x T mask::

    from metalearner.model.hf_local import register_local_attention
    name = register_local_attention()  # "metalearner_local"
    model = AutoModelForCausalLM.from_config(config, attn_implementation=name)

Numerically it is the `sdpa` path with the dense sliding-window mask (tests/test_hf_local.py
checks outputs and gradients on Qwen2, Mistral and Gemma 3). Inputs the band cannot take go
to HF's own `sdpa` function, with the dense mask, and cost what `sdpa` costs: real padding
or packed sequences in the batch, a key length that differs from the query length (decoding
with a cache), bidirectional attention, attention dropout > 0, and anything that asks for
attention weights or a position bias (`softcap` raises there, as it does with `sdpa`).

Both registrations are needed: transformers gives an attention name without a mask function
no mask at all, so padding would be silently ignored. They are per process: call
`register_local_attention()` before building the model in every process that builds one (a
Ray worker too; the HF model adapter does it when a spec asks for this implementation).

Imports torch and the model layer; transformers is imported when `register_local_attention`
runs (it needs the 'hf' extra). Must not import ray, mlflow or anything above the model layer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from metalearner.model.band import blocked_local_attention
from metalearner.model.flex import flex_local_attention, local_kernel_for

__all__ = [
    "ATTN_NAME",
    "HF_MISSING",
    "local_attention_forward",
    "local_mask",
    "register_local_attention",
    "window_mask",
]

ATTN_NAME = "metalearner_local"
HF_MISSING = "attn_implementation 'metalearner_local' needs the 'hf' extra: pip install 'metalearner[hf]'"

# keyword arguments the band does not implement: a call carrying one goes to HF's sdpa
_SDPA_ONLY = ("position_bias", "softcap", "s_aux", "output_attentions")


def register_local_attention() -> str:
    """Register `ATTN_NAME` with transformers (attention and mask functions); idempotent.

    Returns:
        The name to pass as `attn_implementation` ("metalearner_local").

    Raises:
        RuntimeError: transformers is not installed (names the extra to install).
    """
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:
        raise RuntimeError(HF_MISSING) from e
    AttentionInterface.register(ATTN_NAME, local_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, local_mask)
    return ATTN_NAME


def local_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: Any = 0,
    kv_offset: int = 0,
    mask_function: Any = None,
    attention_mask: torch.Tensor | None = None,
    allow_is_causal_skip: bool = True,
    **kwargs: Any,
) -> torch.Tensor | None:
    """The mask function of `ATTN_NAME` (same signature as transformers' `sdpa_mask`).

    Returns None when the mask is only the causal or causal sliding-window pattern (no
    padding, no packed sequences, no cache offset, query length = key length): the
    attention function then applies the pattern itself from `is_causal` and the layer's
    `sliding_window`, and no T x T mask is built. Otherwise the dense boolean mask
    `sdpa_mask` builds, which sends the layer to HF's sdpa.

    Args:
        batch_size, q_length, kv_length, q_offset, kv_offset: sizes, as transformers passes them.
        mask_function: the pattern (causal, sliding window, overlays).
        attention_mask: the 2D padding mask (B, kv), True = attend, or None.
        allow_is_causal_skip: False when the caller needs the mask built (bidirectional,
            packed sequences, custom overlays).
        **kwargs: passed on to `sdpa_mask` (local_size, use_vmap, device, ...).

    Returns:
        None, or a (B, 1, q_length, kv_length) boolean mask.
    """
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    pattern_only = (
        allow_is_causal_skip
        and isinstance(q_offset, int)
        and q_offset == 0
        and kv_offset == 0
        and q_length == kv_length
        and (attention_mask is None or bool(attention_mask[:, :kv_length].all()))
    )
    if pattern_only:
        return None
    kwargs.pop("allow_is_bidirectional_skip", None)
    return sdpa_mask(
        batch_size,
        q_length,
        kv_length,
        q_offset,
        kv_offset,
        mask_function if mask_function is not None else causal_mask_function,
        attention_mask,
        allow_is_causal_skip=False,
        allow_is_bidirectional_skip=False,
        **kwargs,
    )


def local_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention function of `ATTN_NAME` (same contract as transformers' sdpa function).

    A causal layer with `sliding_window` smaller than the sequence, no mask (see
    `local_mask`) and no dropout runs the band: FlexAttention on CUDA where
    `local_kernel_for` picks it, else `blocked_local_attention`. A causal layer without a
    window (or with one >= T) runs causal SDPA. Everything else goes to HF's
    `sdpa_attention_forward` with the mask it was given (dense, so no saving).

    Args:
        module: the attention layer (`num_key_value_groups` and `is_causal` are read).
        query: (B, H, T, D).
        key, value: (B, H_kv, S, D); H a multiple of H_kv (grouped-query attention).
        attention_mask: None (the pattern only) or a mask for sdpa.
        dropout: attention dropout probability (the band needs 0).
        scaling: softmax scale; default 1/sqrt(D).
        is_causal: overrides `module.is_causal` when given.
        sliding_window: the layer's window, None for a full-attention layer.
        **kwargs: the rest of what the model passes (handed to sdpa on a fallback).

    Returns:
        (attn_output (B, T, H, D) contiguous, None), as transformers' sdpa function.
    """
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    t = query.shape[2]
    band_ok = (
        attention_mask is None
        and causal
        and dropout == 0.0
        and key.shape[2] == t
        and t > 1
        and key.shape[-1] == value.shape[-1] == query.shape[-1]
        and not any(kwargs.get(name) for name in _SDPA_ONLY)
    )
    if not band_ok:
        if attention_mask is None and causal and sliding_window is not None and sliding_window < key.shape[2]:
            attention_mask = window_mask(t, key.shape[2], int(sliding_window), query.device)  # `local_mask` left it out
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal,
            **kwargs,
        )
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)  # (B, H, T, D)
    if sliding_window is None or sliding_window >= t:  # full causal attention
        out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling)
        return out.transpose(1, 2).contiguous(), None
    d = query.shape[-1]
    if scaling is not None and scaling != d**-0.5:  # both kernels scale by 1/sqrt(D)
        query = query * (scaling * d**0.5)
    if local_kernel_for(query) == "flex":
        out = flex_local_attention(query, key, value, int(sliding_window), causal=True)
    else:
        out = blocked_local_attention(query, key, value, int(sliding_window), causal=True)
    return out.transpose(1, 2).contiguous(), None


def window_mask(q_length: int, kv_length: int, window: int, device: torch.device) -> torch.Tensor:
    """The dense causal sliding-window mask, for a layer that falls back to sdpa when
    `local_mask` returned None: the queries are the last `q_length` of `kv_length` positions.

    Returns:
        (1, 1, q_length, kv_length) boolean, True = attend (key s of query t: t - window < s <= t).
    """
    t = torch.arange(kv_length - q_length, kv_length, device=device).view(-1, 1)
    s = torch.arange(kv_length, device=device).view(1, -1)
    return ((s <= t) & (s > t - window)).view(1, 1, q_length, kv_length)
