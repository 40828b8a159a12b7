"""Hybrid global/local self-attention and cross-attention.

Of `n_heads` heads, the first `n_global_heads` attend globally (causally in a decoder) and
the rest attend within a sliding window whose width is a runtime knob (`set_window`):

* causal local head, query t: keys t-w+1 .. t (w keys, itself included);
* non-causal local head, query t: keys s with |t - s| < w.

The local path costs O(T * w), forward and backward: `blocked_local_attention` splits the
queries into blocks of `c` positions and attends each block to its own band of keys only.
On CUDA the local heads go through FlexAttention with a band block mask built in closed
form from tile indices (`band_block_mask`), one per window tiling for the whole model
(`LocalMaskCache`); the window lives in a 0-d tensor the mask function reads, so moving it
recompiles nothing. The global heads stay on SDPA's flash kernel.

Imports torch only; must not import ray, mlflow or anything above the model layer.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from metalearner.model.rope import RotaryEmbedding

try:  # FlexAttention is optional: used only on CUDA.
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - depends on the torch build
    BlockMask = None
    flex_attention = None

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


# ----------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------
# FlexAttention for the local heads: closed-form block masks, one cache per model
# ----------------------------------------------------------------------------------------

# Devices whose local heads go through FlexAttention (tests add "cpu" for no-grad checks;
# FlexAttention has no CPU backward).
FLEX_DEVICES: tuple[str, ...] = ("cuda",)


def local_kernel_for(q: torch.Tensor, use_flex: bool = True) -> str:
    """The local path for these inputs: "flex" (CUDA, head size a power of two >= 16) or
    "blocked"."""
    d = q.shape[-1]
    flex_ok = (
        use_flex
        and flex_attention is not None
        and d >= 16
        and d & (d - 1) == 0
        and q.device.type in FLEX_DEVICES
        and (q.device.type == "cuda" or not torch.is_grad_enabled())
    )
    return "flex" if flex_ok else "blocked"


@dataclass(frozen=True)
class FlexConfig:
    """Tiling of the local band for FlexAttention.

    Args:
        q_block: query rows per block-mask tile (a multiple of `kv_block`).
        kv_block: key columns per block-mask tile. A causal window w touches about
            ceil(w / kv_block) + q_block / kv_block tiles per query tile; the tiles wholly
            inside the band are "full" and skip the mask function.
        kernel_options: FlexAttention `kernel_options` as sorted (name, value) pairs, e.g.
            (("BLOCK_M", 64), ("BLOCK_N", 64)); empty = its defaults.
    """

    q_block: int = 128
    kv_block: int = 128
    kernel_options: tuple[tuple[str, Any], ...] = ()

    def validate(self) -> FlexConfig:
        for name in ("q_block", "kv_block"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 16 or value & (value - 1):
                raise ValueError(f"{name}: got {value!r}, expected a power of two >= 16")
        if self.q_block % self.kv_block:
            raise ValueError(f"q_block: got {self.q_block}, expected a multiple of kv_block={self.kv_block}")
        return self


FLEX = FlexConfig()


def set_flex_config(config: FlexConfig) -> None:
    """Choose the band's tiling and kernel options for every later FlexAttention call."""
    global FLEX
    FLEX = config.validate()


def band_block_bounds(
    seq_len: int, window: int, causal: bool, q_block: int, kv_block: int
) -> tuple[list[int], list[int], list[int], list[int]]:
    """Per query tile n, the key tiles the band touches, [lo, hi], and those wholly inside
    it for every query of the tile, [full_lo, full_hi] (empty when full_lo > full_hi).

    Closed form, no T x T mask: query tile n holds t in [t0, t1], the band of t is
    [t - w + 1, t] (causal) or [t - w + 1, t + w - 1]. Tiles reaching past T are partial.
    """
    n_q = -(-seq_len // q_block)
    last_full_tile = seq_len // kv_block - 1  # key tiles inside T
    reach = 0 if causal else window - 1  # how far right of t the band goes
    lo, hi, flo, fhi = [], [], [], []
    for n in range(n_q):
        t0, t1 = n * q_block, min(seq_len, (n + 1) * q_block) - 1
        lo.append(max(0, t0 - window + 1) // kv_block)
        hi.append(min(seq_len - 1, t1 + reach) // kv_block)
        # tile j is full iff j*kv >= t1 - w + 1 and (j+1)*kv - 1 <= t0 + reach
        flo.append(max(0, -(-(t1 - window + 1) // kv_block)))
        fhi.append(min((t0 + reach + 1) // kv_block - 1, last_full_tile))
    return lo, hi, flo, fhi


def band_block_mask(
    seq_len: int,
    window: int,
    causal: bool,
    mask_mod: Callable[..., Any],
    device: torch.device,
    q_block: int,
    kv_block: int,
) -> Any:
    """The band's BlockMask, built from tile indices (`BlockMask.from_kv_blocks`).

    Partial tiles (band edges, the diagonal, tiles past T) run `mask_mod`; full tiles
    skip it. Returns a BlockMask on `device` with broadcast batch and head dimensions.
    """
    assert BlockMask is not None
    lo, hi, flo, fhi = (
        torch.tensor(x, dtype=torch.int32) for x in band_block_bounds(seq_len, window, causal, q_block, kv_block)
    )
    n_kv = -(-seq_len // kv_block)
    j = torch.arange(n_kv, dtype=torch.int32).view(1, -1)
    touched = (j >= lo[:, None]) & (j <= hi[:, None])
    full = (j >= flo[:, None]) & (j <= fhi[:, None])
    partial = touched & ~full

    def ordered(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # selected tiles first, in ascending order; the rest of each row is ignored
        order = torch.argsort((~sel).to(torch.int8), dim=1, stable=True).to(torch.int32)
        return sel.sum(1, dtype=torch.int32)[None, None].to(device), order[None, None].to(device)

    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(full)
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=(q_block, kv_block),
        mask_mod=mask_mod,
        seq_lengths=(seq_len, seq_len),
    )


def _band_mask_mod(window: torch.Tensor, reach: torch.Tensor) -> Callable[..., Any]:
    """FlexAttention mask_mod of the band: key s is seen by query t iff t - s < window and
    s - t < reach (reach 1: causal; reach = window: bidirectional). Both are 0-d tensors
    read by the kernel, so moving the window changes no code and compiles nothing."""

    def band(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        rel = q_idx - kv_idx
        return (rel < window) & (-rel < reach)

    return band


class LocalMaskCache:
    """Block masks of the local band, shared by every HybridAttention layer of a model.

    One block mask per (length, window tiling): a window move that stays inside the same
    key tiles only rewrites the window tensor the mask function reads (one in-place fill
    for the whole model); crossing a tile boundary builds one new mask in closed form.
    All layers sharing a cache use one window at a time (`apply_knobs` moves them
    together). Copies and pickles start empty (the tensors are per process and device).
    """

    def __init__(self, max_masks: int = 32) -> None:
        self.max_masks = max_masks
        self.builds = 0  # block masks built so far (tests and benchmarks read it)
        self._tensors: dict[tuple[torch.device, bool], tuple[torch.Tensor, torch.Tensor, Any]] = {}
        self._values: dict[tuple[torch.device, bool], int] = {}
        self._by_window: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self._by_tiles: OrderedDict[tuple[Any, ...], Any] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return {"max_masks": self.max_masks}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["max_masks"])  # type: ignore[misc]

    def block_mask(self, seq_len: int, window: int, causal: bool, device: torch.device) -> Any:
        """The band's BlockMask for these sizes; its mask function sees `window` now."""
        window_t, reach_t, mask_mod = self._mask_tensors(device, causal)
        if self._values.get((device, causal)) != window:  # host-side shadow: no device sync
            window_t.fill_(window)
            if not causal:
                reach_t.fill_(window)
            self._values[(device, causal)] = window
        cfg = FLEX
        key = (device, seq_len, window, causal, cfg.q_block, cfg.kv_block)
        mask = self._by_window.get(key)
        if mask is None:
            bounds = band_block_bounds(seq_len, window, causal, cfg.q_block, cfg.kv_block)
            tiles = (device, seq_len, causal, cfg.q_block, cfg.kv_block, str(bounds))
            mask = self._by_tiles.get(tiles)
            if mask is None:
                mask = band_block_mask(seq_len, window, causal, mask_mod, device, cfg.q_block, cfg.kv_block)
                self.builds += 1
                _put(self._by_tiles, tiles, mask, self.max_masks)
            _put(self._by_window, key, mask, 4 * self.max_masks)
        return mask

    def _mask_tensors(self, device: torch.device, causal: bool) -> tuple[torch.Tensor, torch.Tensor, Any]:
        entry = self._tensors.get((device, causal))
        if entry is None:
            window_t = torch.ones((), dtype=torch.int32, device=device)
            reach_t = torch.ones((), dtype=torch.int32, device=device)
            self._values[(device, causal)] = 1
            entry = (window_t, reach_t, _band_mask_mod(window_t, reach_t))
            self._tensors[(device, causal)] = entry
        return entry


def _put(cache: OrderedDict[tuple[Any, ...], Any], key: tuple[Any, ...], value: Any, limit: int) -> None:
    cache[key] = value
    if len(cache) > limit:
        cache.popitem(last=False)


_KERNEL: list[Callable[..., torch.Tensor]] = []


# Compiled entries FlexAttention may need in one process: causal / bidirectional x grad on /
# off x dtype x (static sizes, then symbolic sizes, batch 1 specialised). Bounded, but above
# dynamo's default of 8 for a speech model (encoder + decoder, train + eval); raised for this
# one call only.
FLEX_RECOMPILE_LIMIT = 32


def _flex_kernel() -> Callable[..., torch.Tensor]:
    """The process's one compiled FlexAttention. Dynamo's automatic dynamic shapes: the
    first input shape compiles with static sizes, a second shape recompiles once with
    symbolic sizes, which then serves every later shape (variable speech batches compile a
    bounded number of entries, not one per shape). Moving the window changes only tensor
    values."""
    if not _KERNEL:
        _KERNEL.append(torch.compile(flex_attention, dynamic=None))
    return _KERNEL[0]


def _recompile_limit_patch() -> Any:
    """`torch._dynamo.config.patch` raising the recompile limit to FLEX_RECOMPILE_LIMIT."""
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    return config.patch(**{name: max(int(getattr(config, name)), FLEX_RECOMPILE_LIMIT)})


def flex_local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    causal: bool,
    masks: LocalMaskCache | None = None,
) -> torch.Tensor:
    """Sliding-window attention through FlexAttention with a closed-form band block mask.

    Args:
        q, k, v: (B, H, T, D), last dimension contiguous; every head is local.
        window: local width w >= 1.
        causal: causal band t-w < s <= t if True, else |t - s| < w.
        masks: the block-mask cache to use (a model shares one); default a process-wide one.

    Returns:
        (B, H, T, D).
    """
    if window < 1:
        raise ValueError(f"window: got {window!r}, expected an int >= 1")
    masks = masks if masks is not None else _DEFAULT_MASKS
    t = q.shape[2]
    block_mask = masks.block_mask(t, min(int(window), t), causal, q.device)
    kernel = _flex_kernel()
    options = dict(FLEX.kernel_options) or None
    with _recompile_limit_patch():
        out = kernel(q, k, v, block_mask=block_mask, kernel_options=options)
    assert isinstance(out, torch.Tensor)
    return out


_DEFAULT_MASKS = LocalMaskCache()


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
