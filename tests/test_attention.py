"""Tests for metalearner/model/attention.py: every path against a dense masked softmax."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from metalearner.model.attention import (
    CrossAttention,
    HybridAttention,
    _hybrid_mask_mod,
    blocked_local_attention,
    local_block_size,
)
from metalearner.model.rope import RotaryEmbedding

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def dense_mask(seq_len: int, window: int, causal: bool, n_heads: int, n_global: int) -> torch.Tensor:
    """(H, T, T) bool: True where query t may attend key s."""
    t = torch.arange(seq_len)
    rel = t[:, None] - t[None, :]  # t - s
    glob = rel >= 0 if causal else torch.ones_like(rel, dtype=torch.bool)
    local = (rel >= 0) & (rel < window) if causal else rel.abs() < window
    is_global = (torch.arange(n_heads) < n_global).view(-1, 1, 1)
    return torch.where(is_global, glob, local)


def dense_attention(q, k, v, window: int, causal: bool, n_global: int = 0) -> torch.Tensor:
    """Plain masked softmax over the whole T x T matrix. q, k, v: (B, H, T, D)."""
    mask = dense_mask(q.shape[2], window, causal, q.shape[1], n_global)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v


def dense_hybrid(attn: HybridAttention, x: torch.Tensor) -> torch.Tensor:
    """HybridAttention's math with dense attention, reusing the module's weights and rope."""
    b, t, c = x.shape
    qkv = attn.qkv(x).view(b, t, 3, attn.n_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # (B, H, T, D)
    if attn.rope is not None:
        q, k = attn.rope(q), attn.rope(k)
    y = dense_attention(q, k, v, attn.window, attn.causal, attn.n_global_heads)
    return attn.proj(y.transpose(1, 2).reshape(b, t, c))


def qkv64(shape, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3)]


SEQ = 37  # not a multiple of any block size used below


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [1, 3, 17, SEQ - 1, SEQ, 2 * SEQ])
@pytest.mark.parametrize("block", [None, 4, 16])
def test_blocked_matches_dense_forward_and_grads(causal, window, block):
    q, k, v = qkv64((2, 3, SEQ, 8))
    out = blocked_local_attention(q, k, v, window, causal, block_size=block)
    ref = dense_attention(q, k, v, window, causal)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(ref, (q, k, v), grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
def test_blocked_gradcheck(causal):
    q, k, v = qkv64((1, 1, 11, 2), seed=1)
    assert torch.autograd.gradcheck(lambda q, k, v: blocked_local_attention(q, k, v, 3, causal, 4), (q, k, v))


@pytest.mark.parametrize("causal", [True, False])
def test_blocked_float32_is_tight(causal):
    q, k, v = (x.detach().float().requires_grad_() for x in qkv64((2, 2, 200, 16), seed=2))
    out = blocked_local_attention(q, k, v, 24, causal)
    ref = dense_attention(q.double(), k.double(), v.double(), 24, causal)
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=2e-6)
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


def test_blocked_accepts_strided_inputs_and_short_sequences():
    x = torch.randn(2, 5, 3, 8, dtype=torch.float64)  # (B, T, H, D) viewed as (B, H, T, D)
    q = k = v = x.transpose(1, 2)
    for window in (1, 2, 5):
        torch.testing.assert_close(
            blocked_local_attention(q, k, v, window, True), dense_attention(q, k, v, window, True)
        )


def test_block_size_rule():
    assert local_block_size(64, 1024) == 32
    assert local_block_size(1, 1024) == 16
    assert local_block_size(1000, 1024) == 64
    assert local_block_size(40, 5) == 8  # never far beyond the sequence


def test_no_nan_gradients_when_padding_rows_have_no_keys():
    # window 1 with a long block: padded query rows see only themselves (padding zeros)
    q, k, v = (torch.randn(1, 1, 17, 4, requires_grad=True) for _ in range(3))
    out = blocked_local_attention(q, k, v, 1, False, block_size=16)
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    torch.testing.assert_close(out, v)  # each query attends only to itself


# -- HybridAttention ----------------------------------------------------------------------


def make_attn(causal: bool, n_global: int, window: int, rope: bool = True, d_model: int = 32) -> HybridAttention:
    torch.manual_seed(0)
    n_heads = 4
    rotary = RotaryEmbedding(d_model // n_heads, 512, base=500.0) if rope else None
    return HybridAttention(d_model, n_heads, n_global, causal, rotary, window).double()


@pytest.mark.parametrize(
    "causal,n_global,window",
    list(itertools.product([True, False], [0, 1, 4], [1, 3, 17, SEQ - 1, SEQ, 2 * SEQ])),
)
def test_hybrid_matches_dense(causal, n_global, window):
    attn = make_attn(causal, n_global, window)
    x = torch.randn(2, SEQ, 32, dtype=torch.float64, requires_grad=True)
    out = attn(x)
    ref = dense_hybrid(attn, x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    params = [x, *attn.parameters()]
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, params, grad)
    want = torch.autograd.grad(ref, params, grad)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-11)


@pytest.mark.parametrize("causal", [True, False])
def test_hybrid_without_rope(causal):
    attn = make_attn(causal, 1, 5, rope=False)
    x = torch.randn(1, 20, 32, dtype=torch.float64)
    torch.testing.assert_close(attn(x), dense_hybrid(attn, x), rtol=0, atol=1e-12)


def test_window_at_least_seq_len_is_all_global():
    x = torch.randn(2, 30, 32, dtype=torch.float64)
    local = make_attn(True, 1, 30)
    glob = make_attn(True, 4, 3)
    glob.load_state_dict(local.state_dict())
    assert torch.equal(local(x), glob(x))
    local.set_window(29)
    assert not torch.allclose(local(x), glob(x))


def test_local_heads_are_causal():
    attn = make_attn(True, 0, 4)
    x = torch.randn(1, 25, 32, dtype=torch.float64)
    y = attn(x)
    x2 = x.clone()
    x2[:, 20:] += 1.0
    y2 = attn(x2)
    torch.testing.assert_close(y[:, :20], y2[:, :20], rtol=0, atol=1e-12)
    assert not torch.allclose(y[:, 20:], y2[:, 20:])


def test_set_window_updates_in_place_and_validates():
    attn = make_attn(True, 1, 8)
    tensor = attn.window_tensor
    attn.set_window(12)
    assert attn.window == 12 and type(attn.window) is int
    assert attn.window_tensor is tensor and int(tensor) == 12
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="window"):
            attn.set_window(bad)


def test_constructor_validates_heads():
    with pytest.raises(ValueError, match="n_heads"):
        HybridAttention(30, 4, 1, True, None, 8)
    with pytest.raises(ValueError, match="n_global_heads"):
        HybridAttention(32, 4, 5, True, None, 8)


def test_cross_attention_matches_reference():
    torch.manual_seed(0)
    cross = CrossAttention(32, 4).double()
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    mem = torch.randn(2, 11, 32, dtype=torch.float64)
    q = cross.q(x).view(2, 7, 4, 8).transpose(1, 2)
    k, v = cross.kv(mem).view(2, 11, 2, 4, 8).permute(2, 0, 3, 1, 4)
    att = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, dim=-1) @ v
    ref = cross.proj(att.transpose(1, 2).reshape(2, 7, 32))
    torch.testing.assert_close(cross(x, mem), ref)


# -- CUDA: FlexAttention ------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
def test_flex_mask_mod_matches_dense_mask_and_reads_the_window_tensor(causal):
    window = torch.tensor(5, dtype=torch.int32)
    mask_mod = _hybrid_mask_mod(window, 1, causal)
    h = torch.arange(4).view(-1, 1, 1)
    q_idx = torch.arange(SEQ).view(1, -1, 1)
    kv_idx = torch.arange(SEQ).view(1, 1, -1)
    b = torch.zeros((), dtype=torch.long)
    for w in (5, 1, 12):
        window.fill_(w)  # what set_window does: no new closure, no recompile
        got = mask_mod(b, h, q_idx, kv_idx).expand(4, SEQ, SEQ)
        assert torch.equal(got, dense_mask(SEQ, w, causal, 4, 1))


def test_flex_only_for_head_sizes_it_supports():
    assert make_attn(True, 1, 8, d_model=64).use_flex  # head_dim 16
    assert not make_attn(True, 1, 8, d_model=32).use_flex  # head_dim 8


@needs_cuda
@pytest.mark.parametrize("causal", [True, False])
def test_flex_path_matches_blocked_path(causal):
    attn = make_attn(causal, 1, 16, d_model=64).float().cuda()  # head_dim 16
    assert attn.use_flex
    x = torch.randn(2, 300, 64, device="cuda")
    for window in (16, 64, 7):  # changing the window reuses the compiled kernel
        attn.set_window(window)
        attn.use_flex = True
        flex = attn(x)
        attn.use_flex = False
        blocked = attn(x)
        torch.testing.assert_close(flex, blocked, rtol=1e-4, atol=1e-4)


@needs_cuda
def test_flex_path_backward_matches():
    attn = make_attn(True, 1, 16, d_model=64).float().cuda()
    x = torch.randn(2, 256, 64, device="cuda", requires_grad=True)
    grads = []
    for use_flex in (True, False):
        attn.use_flex = use_flex
        grads.append(torch.autograd.grad(attn(x).square().sum(), x)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-3, atol=1e-3)


def test_sdpa_reference_agrees_with_dense_helper():
    # sanity of the test helper itself
    q, k, v = (x.detach() for x in qkv64((1, 2, 9, 4)))
    torch.testing.assert_close(
        dense_attention(q, k, v, 9, True), F.scaled_dot_product_attention(q, k, v, is_causal=True)
    )
