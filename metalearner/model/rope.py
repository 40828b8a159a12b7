"""Rotary position embedding (RoPE) whose base frequency is a runtime knob.

The cos/sin tables are buffers that `RotaryEmbedding.set_base` rewrites in place
(`buf.copy_(...)`), so optimizers, compiled graphs and anyone else holding a reference keep
working when the base changes between optimizer steps. Every table comes from one function,
`rope_tables`, so `set_base(b)` yields bitwise the tables a fresh `RotaryEmbedding(..., base=b)`
has.

Imports torch only; must not import ray, mlflow or anything above the model layer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def rope_tables(
    head_dim: int, max_seq_len: int, base: float, device: torch.device | str | None = None
) -> tuple[torch.Tensor, ...]:
    """The rotary tables for one base, computed in float64 and rounded once to float32.

    Args:
        head_dim: even size of one attention head.
        max_seq_len: number of positions in the tables.
        base: the RoPE base frequency (theta), > 1.
        device: where to compute the (T, D/2) tables (default CPU). The frequencies always
            come from the CPU (one pow per pair), so a GPU's tables differ from the CPU's
            only where float64 cos/sin differ by an ulp and that flips a float32 rounding.

    Returns:
        `(inv_freq, cos, sin)`: float32 tensors of shapes (head_dim/2,), (max_seq_len,
        head_dim/2) and (max_seq_len, head_dim/2); `cos[t, i] = cos(t * base**(-2i/head_dim))`.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    inv_freq = (float(base) ** (-exponents)).to(device)  # (D/2,)
    positions = torch.arange(max_seq_len, dtype=torch.float64, device=inv_freq.device)
    angles = torch.outer(positions, inv_freq)  # (T, D/2)
    return (
        inv_freq.to(torch.float32),
        torch.cos(angles).to(torch.float32),
        torch.sin(angles).to(torch.float32),
    )


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE over the last dimension, with tables that `set_base` rewrites in place.

    The tables are non-persistent buffers: they follow `.to(device)` but stay out of the
    state dict (the base is a knob, restored through `model.apply_knobs`, not a weight).

    Args:
        head_dim: even size of one attention head.
        max_seq_len: the longest sequence (plus offset) the tables cover.
        base: initial base frequency, finite and > 1.

    Example:
        >>> rope = RotaryEmbedding(head_dim=16, max_seq_len=128, base=10_000.0)
        >>> q = torch.randn(2, 4, 32, 16)          # (B, H, T, D)
        >>> rope(q).shape
        torch.Size([2, 4, 32, 16])
        >>> rope.set_base(500_000.0)               # same buffers, new values
    """

    inv_freq: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, head_dim: int, max_seq_len: int, base: float = 10_000.0) -> None:
        super().__init__()
        if head_dim < 2 or head_dim % 2:
            raise ValueError(f"head_dim: got {head_dim!r}, expected an even int >= 2")
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len: got {max_seq_len!r}, expected an int >= 1")
        base = _check_base(base)
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self._base = base
        inv_freq, cos, sin = rope_tables(head_dim, max_seq_len, base)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("cos", cos, persistent=False)  # (max_seq_len, D/2)
        self.register_buffer("sin", sin, persistent=False)  # (max_seq_len, D/2)

    @property
    def base(self) -> float:
        """The base frequency the tables currently hold."""
        return self._base

    @torch.no_grad()
    def set_base(self, base: float) -> None:
        """Rewrite `inv_freq`, `cos` and `sin` in place for a new base; no-op if unchanged."""
        base = _check_base(base)
        if base == self._base:
            return
        # computed where the tables live: on a GPU a few kernels instead of ~T*D host
        # transcendentals and a host-to-device copy on every knob move
        for buf, table in zip(
            (self.inv_freq, self.cos, self.sin),
            rope_tables(self.head_dim, self.max_seq_len, base, self.cos.device),
            strict=True,
        ):
            buf.copy_(table)  # casts to the buffer's dtype/device, as `.to()` would
        self._base = base

    def forward(self, x: torch.Tensor, offset: int = 0, seq_dim: int = -2) -> torch.Tensor:
        """Rotate `x` by its positions `offset, offset + 1, ...` along `seq_dim`.

        Args:
            x: tensor whose last dimension is `head_dim`, e.g. (B, H, T, D) with the default
                `seq_dim=-2`, or (B, T, H, D) / (B, T, 2, H, D) with `seq_dim=1`.
            offset: position of the first element along `seq_dim`.
            seq_dim: the dimension that indexes positions.

        Returns:
            A new tensor of `x`'s shape and dtype (rotate-half convention: the first half of
            the last dimension pairs with the second half).
        """
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"x: got last dim {x.shape[-1]}, expected head_dim={self.head_dim}")
        seq_dim = seq_dim % x.dim()
        cos, sin = self._tables(offset, x.shape[seq_dim], x.dtype)
        shape = [1] * x.dim()
        shape[seq_dim] = x.shape[seq_dim]
        shape[-1] = self.head_dim // 2
        out = _Rotate.apply(x, cos.view(shape), sin.view(shape))
        assert isinstance(out, torch.Tensor)
        return out

    def split_qkv(self, qkv: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, ...]:
        """Split a fused projection into rotated queries, rotated keys and values.

        One fused step (forward and backward) instead of slicing, rotating and transposing
        separately: the outputs are fresh head-major tensors, and the gradient of `qkv` is
        assembled in one buffer.

        Args:
            qkv: (B, T, 3, H, D), e.g. `linear(x).view(B, T, 3, H, D)`.
            offset: position of the first token.

        Returns:
            `(q, k, v)`, each contiguous (B, H, T, D); q and k rotated, v copied.
        """
        if qkv.dim() != 5 or qkv.shape[2] != 3 or qkv.shape[-1] != self.head_dim:
            raise ValueError(f"qkv: got shape {tuple(qkv.shape)}, expected (B, T, 3, H, {self.head_dim})")
        cos, sin = self._tables(offset, qkv.shape[1], qkv.dtype)
        out = _SplitRotateQKV.apply(qkv, cos, sin)
        assert isinstance(out, tuple)
        return out

    def _tables(self, offset: int, seq_len: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin rows for positions offset .. offset + seq_len - 1: (seq_len, D/2) each."""
        if offset < 0 or offset + seq_len > self.max_seq_len:
            raise ValueError(
                f"offset: got positions {offset}..{offset + seq_len - 1}, expected them "
                f"within max_seq_len={self.max_seq_len}"
            )
        rows = slice(offset, offset + seq_len)
        return self.cos[rows].to(dtype), self.sin[rows].to(dtype)


def _rotate_into(out: torch.Tensor, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> None:
    """out = [x1 cos - sign x2 sin, x2 cos + sign x1 sin]; sign -1 is the inverse rotation."""
    x1, x2 = x.chunk(2, dim=-1)
    o1, o2 = out.chunk(2, dim=-1)
    torch.mul(x1, cos, out=o1)
    o1.addcmul_(x2, sin, value=-sign)
    torch.mul(x2, cos, out=o2)
    o2.addcmul_(x1, sin, value=sign)


class _Rotate(torch.autograd.Function):
    """Rotate-half RoPE; the backward is the inverse rotation. Saves only the tables, so
    rewriting them (set_base) between forward and backward is caught by autograd."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(cos, sin)
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        _rotate_into(out, x, cos, sin, 1.0)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        cos, sin = ctx.saved_tensors
        dx = torch.empty(grad.shape, dtype=grad.dtype, device=grad.device)
        _rotate_into(dx, grad, cos, sin, -1.0)
        return dx, None, None


class _SplitRotateQKV(torch.autograd.Function):
    """(B, T, 3, H, D) -> rotated q, rotated k, v: each (B, H, T, D) contiguous."""

    @staticmethod
    def forward(ctx: Any, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        ctx.save_for_backward(cos, sin)
        b, t, _, h, d = qkv.shape
        q, k, v = (qkv.new_empty(b, h, t, d) for _ in range(3))
        _rotate_into(q, qkv[:, :, 0].transpose(1, 2), cos, sin, 1.0)
        _rotate_into(k, qkv[:, :, 1].transpose(1, 2), cos, sin, 1.0)
        v.copy_(qkv[:, :, 2].transpose(1, 2))
        return q, k, v

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(
        ctx: Any, dq: torch.Tensor | None, dk: torch.Tensor | None, dv: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        cos, sin = ctx.saved_tensors
        b, h, t, d = next(g for g in (dq, dk, dv) if g is not None).shape
        dqkv = cos.new_empty(b, t, 3, h, d)
        for i, g in enumerate((dq, dk, dv)):
            slot = dqkv[:, :, i].transpose(1, 2)  # (B, H, T, D) view
            if g is None:
                slot.zero_()
            elif i < 2:
                _rotate_into(slot, g, cos, sin, -1.0)
            else:
                slot.copy_(g)
        return dqkv, None, None


def _check_base(base: float) -> float:
    value = float(base)
    if not math.isfinite(value) or value <= 1.0:
        raise ValueError(f"rope_base: got {base!r}, expected a finite float > 1")
    return value
