"""Hybrid global/local self-attention and cross-attention.

Of `n_heads` heads, the first `n_global_heads` attend globally (causally in a decoder) and
the rest attend within a sliding window whose width is a runtime knob (`set_window`):

* causal local head, query t: keys t-w+1 .. t (w keys, itself included);
* non-causal local head, query t: keys s with |t - s| < w.

The local path costs O(T * w), forward and backward: on CPU (and any device without
FlexAttention) the blocked band of `metalearner.model.band`; on CUDA FlexAttention with a
band block mask (`metalearner.model.flex`), the window held in a 0-d tensor so that moving
it recompiles nothing. The global heads stay on SDPA's flash kernel. The kernels' names are
re-exported here.

Imports torch only; must not import ray, mlflow or anything above the model layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from metalearner.model.band import blocked_local_attention, local_block_size, round_up
from metalearner.model.flex import (
    FLEX_DEVICES,
    FlexConfig,
    LocalMaskCache,
    band_block_bounds,
    band_block_mask,
    flex_local_attention,
    local_kernel_for,
    set_flex_config,
)
from metalearner.model.rope import RotaryEmbedding

__all__ = [
    "FLEX_DEVICES",
    "CrossAttention",
    "FlexConfig",
    "HybridAttention",
    "LocalMaskCache",
    "band_block_bounds",
    "band_block_mask",
    "blocked_local_attention",
    "flex_local_attention",
    "local_kernel_for",
    "local_block_size",
    "round_up",
    "set_flex_config",
]


class HybridAttention(nn.Module):
    """Multi-head self-attention with `n_global_heads` global heads and sliding-window rest.

    Heads 0 .. n_global_heads-1 are global, the others local with width `self.window`.
    When `window >= T` every head is global and all heads run in one
    `scaled_dot_product_attention` call. Otherwise the global heads run in SDPA (flash on
    CUDA) and the local heads in FlexAttention (CUDA, `local_kernel_for`) or the blocked band.

    Args:
        d_model: model width; `d_model / n_heads` is the head size (even when `rope` is set).
        n_heads: number of heads.
        n_global_heads: how many of them attend globally, 0 .. n_heads.
        causal: causal (decoder) or bidirectional (encoder) attention.
        rope: rotary embedding applied to queries and keys, or None. Usually shared by all
            layers of a stack; it is registered as a submodule here too.
        window: initial local width, >= 1.
        dropout: dropout on the output projection (not on attention probabilities).

    Example:
        >>> rope = RotaryEmbedding(16, 256)
        >>> attn = HybridAttention(64, 4, 1, causal=True, rope=rope, window=32)
        >>> attn(torch.randn(2, 100, 64)).shape
        torch.Size([2, 100, 64])
        >>> attn.set_window(8)
    """

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_global_heads: int,
        causal: bool,
        rope: RotaryEmbedding | None,
        window: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if n_heads < 1 or d_model % n_heads:
            raise ValueError(f"n_heads: got {n_heads!r}, expected a divisor of d_model={d_model}")
        if not 0 <= n_global_heads <= n_heads:
            raise ValueError(f"n_global_heads: got {n_global_heads!r}, expected 0 .. n_heads={n_heads}")
        self.d_model = d_model
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.n_global_heads = n_global_heads
        self.causal = causal
        self.rope = rope
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)
        # FlexAttention on CUDA where the head size suits its kernels (`local_kernel_for`);
        # set False to force the blocked path everywhere.
        self.use_flex = self.head_dim >= 16 and self.head_dim & (self.head_dim - 1) == 0
        self.window = 1
        # Block masks of the band for FlexAttention; a model gives all its layers one cache
        # (`share_masks`), so a window move builds at most one mask for the whole model.
        self.masks = LocalMaskCache()
        self.set_window(window)

    def set_window(self, window: int) -> None:
        """Set the local width (an int >= 1). Nothing is rebuilt here: the next forward
        fills the mask cache's window tensor in place (and builds a block mask only when
        the window crosses a key tile)."""
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window: got {window!r}, expected an int >= 1")
        self.window = window

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, d_model) -> (B, T, d_model)."""
        b, t, _ = x.shape
        qkv = self.qkv(x).view(b, t, 3, self.n_heads, self.head_dim)
        if self.rope is not None:
            q, k, v = self.rope.split_qkv(qkv)  # (B, H, T, D) each, q and k rotated
        else:
            q, k, v = (part.transpose(1, 2) for part in qkv.unbind(2))
        y = self._attend(q, k, v)  # (B, T, H, D)
        return self.dropout(self.proj(y.reshape(b, t, self.d_model)))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(B, H, T, D) x3 -> (B, T, H, D)."""
        t = q.shape[2]
        n_global = self.n_global_heads
        if n_global == self.n_heads or self.window >= t:  # every head is global
            return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal).transpose(1, 2)
        ql, kl, vl = q[:, n_global:], k[:, n_global:], v[:, n_global:]
        if local_kernel_for(ql, self.use_flex) == "flex":  # CUDA: FlexAttention, band block mask
            local = flex_local_attention(ql, kl, vl, self.window, self.causal, self.masks)
        else:
            local = blocked_local_attention(ql, kl, vl, self.window, self.causal)
        local = local.transpose(1, 2)
        if n_global == 0:
            return local
        glob = F.scaled_dot_product_attention(
            q[:, :n_global], k[:, :n_global], v[:, :n_global], is_causal=self.causal
        ).transpose(1, 2)
        return torch.cat((glob, local), dim=2)

    # -- FlexAttention (CUDA) ------------------------------------------------------------

    def share_masks(self, masks: LocalMaskCache) -> None:
        """Use `masks` (a model's one cache) instead of this layer's own block-mask cache."""
        self.masks = masks


class CrossAttention(nn.Module):
    """Full (non-causal) attention from decoder queries to encoder memory, no rotary.

    Args:
        d_model: model width (queries and memory).
        n_heads: number of heads.
        dropout: dropout on the output projection.
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if n_heads < 1 or d_model % n_heads:
            raise ValueError(f"n_heads: got {n_heads!r}, expected a divisor of d_model={d_model}")
        self.d_model = d_model
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.kv = nn.Linear(d_model, 2 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """x: (B, T, d_model) decoder states; memory: (B, S, d_model) -> (B, T, d_model)."""
        b, t, _ = x.shape
        s = memory.shape[1]
        q = self.q(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k, v = self.kv(memory).view(b, s, 2, self.n_heads, self.head_dim).unbind(2)
        y = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2))  # (B, H, T, D)
        return self.dropout(self.proj(y.transpose(1, 2).reshape(b, t, self.d_model)))
