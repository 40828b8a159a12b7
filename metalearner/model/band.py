"""The blocked sliding-window band: local attention whose cost follows the window.

`blocked_local_attention` splits the queries into blocks of `c` positions and attends
each block to its own band of keys only, forward and backward (a custom autograd
function), so the local heads cost O(T * w) on CPU and on any device without
FlexAttention. `round_up` and `local_block_size` are the padding arithmetic it shares with
the speech task's feature padding.

Imports torch only; must not import ray, mlflow or anything above the model layer.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

__all__ = ["blocked_local_attention", "local_block_size", "round_up"]



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
    return min(c, round_up(seq_len, 8))


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


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= ``n`` (the padded length of a
    sequence cut into blocks; the speech task pads its feature frames the same way).

    Args:
        n: a length (>= 0).
        multiple: the block size (> 0).
    Returns:
        ``n`` rounded up to a multiple of ``multiple``.
    """
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
    t_pad = round_up(t, c)
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
        t_pad = round_up(t, c)
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
        t_pad = round_up(t, c)

        def unpack(flat: torch.Tensor) -> torch.Tensor:  # drop the lead/tail/pad rows
            return flat[m * c : (m + g) * c].view(b, h, t_pad, d)[:, :, :t]

        return dq.view(b, h, t_pad, d)[:, :, :t], unpack(dk), unpack(dv), None, None, None
