"""Tests for metalearner/model/rope.py: in-place base changes and the rotation itself."""

from __future__ import annotations

import pytest
import torch

from metalearner.model.rope import RotaryEmbedding, rope_tables

BUFFERS = ("inv_freq", "cos", "sin")


def test_set_base_is_in_place_and_bitwise_equal_to_fresh():
    rope = RotaryEmbedding(16, 64, base=10_000.0)
    before = {name: getattr(rope, name) for name in BUFFERS}
    ptrs = {name: t.data_ptr() for name, t in before.items()}
    for base in (12_345.678, 2.5, 1e9, 10_000.0):
        rope.set_base(base)
        fresh = RotaryEmbedding(16, 64, base=base)
        for name in BUFFERS:
            buf = getattr(rope, name)
            assert buf is before[name] and buf.data_ptr() == ptrs[name]
            assert torch.equal(buf, getattr(fresh, name))
        assert rope.base == base


def test_set_base_follows_the_buffer_dtype():
    rope = RotaryEmbedding(8, 32, base=10_000.0).to(torch.float64)
    cos = rope.cos
    rope.set_base(777.0)
    fresh = RotaryEmbedding(8, 32, base=777.0).to(torch.float64)
    assert rope.cos is cos and rope.cos.dtype == torch.float64
    assert torch.equal(rope.cos, fresh.cos) and torch.equal(rope.sin, fresh.sin)


def test_set_base_unchanged_is_a_noop(monkeypatch):
    rope = RotaryEmbedding(8, 16, base=500.0)
    calls = []
    monkeypatch.setattr("metalearner.model.rope.rope_tables", lambda *a: calls.append(a))
    rope.set_base(500.0)
    assert calls == []


def test_tables_are_not_parameters_nor_state():
    rope = RotaryEmbedding(8, 16)
    assert list(rope.parameters()) == []
    assert rope.state_dict() == {}  # the base is a knob, restored through apply_knobs
    assert {name for name, _ in rope.named_buffers()} == set(BUFFERS)


def test_tables_values():
    inv_freq, cos, sin = rope_tables(4, 3, 100.0)
    torch.testing.assert_close(inv_freq, torch.tensor([1.0, 0.1]))
    torch.testing.assert_close(cos[2], torch.cos(torch.tensor([2.0, 0.2])))
    torch.testing.assert_close(sin[1], torch.sin(torch.tensor([1.0, 0.1])))


def test_rotation_depends_on_relative_position_only():
    rope = RotaryEmbedding(8, 64, base=100.0).double()
    q = torch.randn(8, dtype=torch.float64).expand(1, 1, 64, 8)
    k = torch.randn(8, dtype=torch.float64).expand(1, 1, 64, 8)
    scores = (rope(q) @ rope(k).transpose(-1, -2))[0, 0]  # (T, T)
    for delta in (0, 3, -5):
        diag = torch.diagonal(scores, offset=delta)
        # tables are float32-rounded, so equal only to ~1e-7 relative
        torch.testing.assert_close(diag, diag[0].expand_as(diag), rtol=0, atol=1e-5)
    # and it preserves norms
    torch.testing.assert_close(rope(q).norm(dim=-1), q.norm(dim=-1))


def test_rotate_half_convention():
    rope = RotaryEmbedding(4, 8, base=100.0).double()
    x = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64).view(1, 1, 1, 4)
    y = rope(x, offset=1)[0, 0, 0]
    c, s = (
        torch.cos(torch.tensor([1.0, 0.1], dtype=torch.float64)),
        torch.sin(torch.tensor([1.0, 0.1], dtype=torch.float64)),
    )
    want = torch.cat([x[0, 0, 0, :2] * c - x[0, 0, 0, 2:] * s, x[0, 0, 0, 2:] * c + x[0, 0, 0, :2] * s])
    torch.testing.assert_close(y, want)


def test_offset_and_seq_dim():
    rope = RotaryEmbedding(8, 32)
    x = torch.randn(2, 3, 20, 8)  # (B, H, T, D)
    full = rope(x)
    torch.testing.assert_close(rope(x[:, :, 5:], offset=5), full[:, :, 5:])
    bthd = rope(x.transpose(1, 2).contiguous(), seq_dim=1)  # (B, T, H, D)
    torch.testing.assert_close(bthd.transpose(1, 2), full)


def test_validation():
    with pytest.raises(ValueError, match="head_dim"):
        RotaryEmbedding(7, 16)
    with pytest.raises(ValueError, match="rope_base"):
        RotaryEmbedding(8, 16, base=1.0)
    rope = RotaryEmbedding(8, 16)
    with pytest.raises(ValueError, match="rope_base"):
        rope.set_base(float("nan"))
    with pytest.raises(ValueError, match="offset"):
        rope(torch.randn(1, 1, 10, 8), offset=7)


def test_rotation_gradients():
    rope = RotaryEmbedding(4, 16, base=50.0).double()
    x = torch.randn(2, 3, 7, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: rope(x, offset=2), (x,))
    qkv = torch.randn(2, 5, 3, 2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: rope.split_qkv(t), (qkv,))
    assert torch.autograd.gradcheck(lambda t: rope.split_qkv(t)[0], (qkv,))  # unused k, v grads


def test_split_qkv_matches_slicing():
    rope = RotaryEmbedding(8, 32)
    qkv = torch.randn(2, 20, 3, 4, 8)
    q, k, v = rope.split_qkv(qkv)
    for got, i in ((q, 0), (k, 1)):
        torch.testing.assert_close(got, rope(qkv[:, :, i].transpose(1, 2)), rtol=0, atol=0)
    assert torch.equal(v, qkv[:, :, 2].transpose(1, 2))
    assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()


def test_set_base_between_forward_and_backward_is_caught():
    rope = RotaryEmbedding(8, 16)
    x = torch.randn(1, 1, 16, 8, requires_grad=True)
    y = rope(x).sum()
    rope.set_base(20_000.0)  # knobs move between optimizer steps, never inside one
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
