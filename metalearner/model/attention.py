"""Hybrid global/local self-attention and cross-attention.

Of `n_heads` heads, the first `n_global_heads` attend globally (causally in a decoder) and
the rest attend within a sliding window whose width is a runtime knob (`set_window`):

* causal local head, query t: keys t-w+1 .. t (w keys, itself included);
* non-causal local head, query t: keys s with |t - s| < w.

The local path costs O(T * w), forward and backward: `blocked_local_attention` splits the
queries into blocks of `c` positions and attends each block to its own band of keys only.
On CUDA, when FlexAttention is available, one `flex_attention` call with a block mask covers
global and local heads together; the window lives in a 0-d tensor so that changing it does
not recompile the kernel.

Imports torch only; must not import ray, mlflow or anything above the model layer.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from metalearner.model.rope import RotaryEmbedding

try:  # FlexAttention is optional: used only on CUDA.
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # pragma: no cover - depends on the torch build
    create_block_mask = None
    flex_attention = None

__all__ = [
    "CrossAttention",
    "HybridAttention",
    "blocked_local_attention",
    "local_block_size",
]


# ----------------------------------------------------------------------------------------
# Blocked sliding-window attention (CPU and any device without FlexAttention)
# ----------------------------------------------------------------------------------------


def local_block_size(window: int, seq_len: int) -> int:
    """Query block size `c` for `blocked_local_attention` (tuned on a 2-core CPU).

    Each block of `c` queries attends to `(m + 1) * c` keys (causal) or `(2m + 1) * c`
    (non-causal), `m = ceil((window - 1) / c)`: small blocks waste less of the band, large
    ones run bigger matrix products. Rule: the power of two >= (window - 1) / 3, clamped to
    16 .. 64 and to the sequence length rounded up to a multiple of 8.
    """
    window = max(1, min(window, seq_len))
    c = 16
    while c < 64 and 3 * c < window - 1:
        c *= 2
    return min(c, _round_up(seq_len, 8))


def blocked_local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    causal: bool,
    block_size: int | None = None,
) -> torch.Tensor:
    """Sliding-window attention whose cost follows the window, not the sequence.

    Queries are split into blocks of `c` positions (the sequence is zero-padded to a multiple
    of `c`); block n attends to key blocks n-m .. n (causal) or n-m .. n+m (non-causal),
    `m = ceil((window - 1) / c)`, with an additive band mask. A query always sees its own
    position, so no row of the softmax is fully masked (not even padding rows), and gradients
    stay finite. Forward and backward are explicit batched matrix products over
    (B * H * n_blocks, c, (m+1) * c) tiles; see `_BlockedLocalAttention`.

    Args:
        q, k, v: (B, H, T, D), any strides.
        window: local width w >= 1 (windows >= T behave like global attention).
        causal: causal band t-w < s <= t if True, else |t - s| < w.
        block_size: query block size; default `local_block_size(window, T)`.

    Returns:
        (B, H, T, D), a view of a freshly computed tensor.
    """
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v: got shapes {q.shape}, {k.shape}, {v.shape}, expected equal (B, H, T, D)")
    if window < 1:
        raise ValueError(f"window: got {window!r}, expected an int >= 1")
    seq_len = q.shape[2]
    window = min(int(window), seq_len)
    c = block_size or local_block_size(window, seq_len)
    out = _BlockedLocalAttention.apply(q, k, v, window, bool(causal), c)
    assert isinstance(out, torch.Tensor)
    return out


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


_BIAS_CACHE: OrderedDict[tuple[Any, ...], torch.Tensor] = OrderedDict()
_BIAS_CACHE_SIZE = 16


def _band_bias(
    seq_len: int,
    window: int,
    causal: bool,
    c: int,
    m: int,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """Additive mask (n_blocks, c, R * c): 0 where query block n may see the key, else -inf.

    Row i of block n is query t = n*c + i; column j is key s = n*c + j - m*c.
    """
    key = (seq_len, window, causal, c, m, dtype, device)
    bias = _BIAS_CACHE.get(key)
    if bias is not None:
        _BIAS_CACHE.move_to_end(key)
        return bias
    n_blocks = -(-seq_len // c)
    n_keys = (m + 1 if causal else 2 * m + 1) * c
    n = torch.arange(n_blocks, device=device).view(-1, 1, 1)
    i = torch.arange(c, device=device).view(1, -1, 1)
    j = torch.arange(n_keys, device=device).view(1, 1, -1)
    t = n * c + i
    s = n * c + j - m * c
    rel = t - s
    allowed = (rel >= 0) & (rel < window) if causal else rel.abs() < window
    allowed &= (s >= 0) & (s < seq_len)
    allowed |= j == i + m * c  # own position: keeps padded query rows non-empty
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
    bias.masked_fill_(~allowed, float("-inf"))
    _BIAS_CACHE[key] = bias
    if len(_BIAS_CACHE) > _BIAS_CACHE_SIZE:
        _BIAS_CACHE.popitem(last=False)
    return bias


def _pack(x: torch.Tensor, c: int, lead: int, tail: int, scale: float | None = None) -> torch.Tensor:
    """(B, H, T, D) -> flat ((lead + B*H*n_blocks + tail) * c, D), zeros in all padding.

    Each (batch, head) sequence is padded to n_blocks * c rows; `lead`/`tail` extra blocks
    of zeros before/after the whole buffer let every key band be a plain strided view.
    """
    b, h, t, d = x.shape
    t_pad = _round_up(t, c)
    rows = b * h * t_pad
    buf = x.new_empty(((lead + tail) * c + rows, d))
    if lead:
        buf[: lead * c].zero_()
    if tail:
        buf[lead * c + rows :].zero_()
    body = buf[lead * c : lead * c + rows].view(b, h, t_pad, d)
    if t_pad > t:
        body[:, :, t:].zero_()
    if scale is None:
        body[:, :, :t].copy_(x)
    else:
        torch.mul(x, scale, out=body[:, :, :t])
    return buf


class _BlockedLocalAttention(torch.autograd.Function):
    """Banded attention with a hand-written backward (same math as autograd would do, minus
    the copies autograd makes for overlapping views).

    Layout: G = B*H*n_blocks query tiles (G, c, D); keys and values are one flat zero-padded
    buffer, and tile g's key band is the strided (overlapping) view rows g*c .. g*c + R*c.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        window: int,
        causal: bool,
        c: int,
    ) -> torch.Tensor:
        b, h, t, d = q.shape
        m = -(-(window - 1) // c)
        n_bands = m + 1 if causal else 2 * m + 1
        t_pad = _round_up(t, c)
        g = b * h * (t_pad // c)
        scale = d**-0.5
        qb = _pack(q, c, 0, 0, scale).view(g, c, d)  # scaled queries (G, c, D)
        kf = _pack(k, c, m, n_bands - 1 - m)  # flat keys
        vf = _pack(v, c, m, n_bands - 1 - m)  # flat values
        kw = kf.as_strided((g, n_bands * c, d), (c * d, d, 1))  # (G, R*c, D) key bands
        vw = vf.as_strided((g, n_bands * c, d), (c * d, d, 1))
        bias = _band_bias(t, window, causal, c, m, qb.dtype, qb.device)  # (nb, c, R*c)
        scores = torch.bmm(qb, kw.transpose(1, 2))  # (G, c, R*c)
        scores.view(b * h, -1, c, n_bands * c).add_(bias)
        probs = torch.softmax(scores, dim=-1)
        del scores
        out = torch.bmm(probs, vw)  # (G, c, D)
        ctx.save_for_backward(qb, kf, vf, probs)
        ctx.geometry = (b, h, t, d, c, m, n_bands, g, scale)
        return out.view(b, h, t_pad, d)[:, :, :t]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        qb, kf, vf, probs = ctx.saved_tensors
        b, h, t, d, c, m, n_bands, g, scale = ctx.geometry
        kw = kf.as_strided((g, n_bands * c, d), (c * d, d, 1))
        vw = vf.as_strided((g, n_bands * c, d), (c * d, d, 1))
        do = _pack(grad_out, c, 0, 0).view(g, c, d)  # zeros on padded query rows
        dp = torch.bmm(do, vw.transpose(1, 2))  # (G, c, R*c)
        # softmax backward, fused: probs * (dp - sum(dp * probs)); 0 where masked
        ds = torch.ops.aten._softmax_backward_data(dp, probs, -1, probs.dtype)
        del dp
        dq = torch.baddbmm(qb, ds, kw, beta=0.0, alpha=scale)  # (G, c, D); qb only gives the shape
        dk = torch.zeros_like(kf)
        dv = torch.zeros_like(vf)
        for r in range(n_bands):  # band r of tile g is block g + r of the flat buffers
            rows = slice(r * c, (r + g) * c)
            dk[rows].view(g, c, d).baddbmm_(ds[:, :, r * c : (r + 1) * c].transpose(1, 2), qb)
            dv[rows].view(g, c, d).baddbmm_(probs[:, :, r * c : (r + 1) * c].transpose(1, 2), do)
        t_pad = _round_up(t, c)

        def unpack(flat: torch.Tensor) -> torch.Tensor:  # drop the lead/tail/pad rows
            return flat[m * c : (m + g) * c].view(b, h, t_pad, d)[:, :, :t]

        return dq.view(b, h, t_pad, d)[:, :, :t], unpack(dk), unpack(dv), None, None, None


# ----------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------


class HybridAttention(nn.Module):
    """Multi-head self-attention with `n_global_heads` global heads and sliding-window rest.

    Heads 0 .. n_global_heads-1 are global, the others local with width `self.window`.
    When `window >= T` every head is global and all heads run in one
    `scaled_dot_product_attention` call.

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

    window_tensor: torch.Tensor

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
        # FlexAttention on CUDA when importable and the head size suits its kernels
        # (a power of two >= 16); set False to force the blocked path everywhere.
        self.use_flex = self.head_dim >= 16 and self.head_dim & (self.head_dim - 1) == 0
        self.window = 1
        # The window as a 0-d tensor for FlexAttention's mask (read, not baked into the kernel).
        self.register_buffer("window_tensor", torch.tensor(1, dtype=torch.int32), persistent=False)
        self._flex_state: dict[str, Any] = {}
        self.set_window(window)

    def set_window(self, window: int) -> None:
        """Set the local width (an int >= 1); the window tensor is updated in place."""
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window: got {window!r}, expected an int >= 1")
        self.window = window
        self.window_tensor.fill_(window)

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
        if q.is_cuda and self.use_flex and flex_attention is not None:
            return self._flex(q, k, v).transpose(1, 2)
        local = blocked_local_attention(
            q[:, n_global:], k[:, n_global:], v[:, n_global:], self.window, self.causal
        ).transpose(1, 2)
        if n_global == 0:
            return local
        glob = F.scaled_dot_product_attention(
            q[:, :n_global], k[:, :n_global], v[:, :n_global], is_causal=self.causal
        ).transpose(1, 2)
        return torch.cat((glob, local), dim=2)

    # -- CUDA: FlexAttention ----------------------------------------------------------------

    def _flex(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """All heads in one FlexAttention call; block mask rebuilt only when T/window change."""
        assert create_block_mask is not None and flex_attention is not None
        state = self._flex_state
        t = q.shape[2]
        if state.get("window_tensor") is not self.window_tensor:  # first call, or moved
            state.clear()
            state["window_tensor"] = self.window_tensor
            state["mask_mod"] = _hybrid_mask_mod(self.window_tensor, self.n_global_heads, self.causal)
            state["kernel"] = torch.compile(flex_attention, dynamic=False)
        key = (t, self.window, q.device)
        if state.get("mask_key") != key:
            state["block_mask"] = create_block_mask(
                state["mask_mod"], B=None, H=self.n_heads, Q_LEN=t, KV_LEN=t, device=q.device
            )
            state["mask_key"] = key
        kernel: Callable[..., torch.Tensor] = state["kernel"]
        return kernel(q, k, v, block_mask=state["block_mask"])


def _hybrid_mask_mod(window: torch.Tensor, n_global_heads: int, causal: bool) -> Callable[..., Any]:
    """FlexAttention mask_mod: global heads see all (earlier) keys, local heads their band."""

    def mask_mod(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        rel = q_idx - kv_idx
        if causal:
            return (rel >= 0) & ((h < n_global_heads) | (rel < window))
        return (h < n_global_heads) | (rel.abs() < window)

    return mask_mod


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
