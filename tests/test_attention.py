"""Tests for metalearner/model/attention.py: every path against a dense masked softmax."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F

from metalearner.model import attention as attention_mod
from metalearner.model.attention import (
    CrossAttention,
    FlexConfig,
    HybridAttention,
    LocalMaskCache,
    band_block_bounds,
    band_block_mask,
    blocked_local_attention,
    local_block_size,
)
from metalearner.model.flex import band_mask_mod
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


def test_set_window_validates():
    attn = make_attn(True, 1, 8)
    attn.set_window(12)
    assert attn.window == 12 and type(attn.window) is int
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


# -- FlexAttention: the band's block mask (built on CPU here), the path itself on CUDA ------


def band(seq_len: int, window: int, causal: bool) -> torch.Tensor:
    """(T, T) bool: the local band, True where query t may attend key s."""
    return dense_mask(seq_len, window, causal, 1, 0)[0]


@pytest.mark.parametrize("causal", [True, False])
def test_band_mask_mod_matches_dense_band_and_reads_the_window_tensors(causal):
    window, reach = torch.tensor(5, dtype=torch.int32), torch.tensor(1, dtype=torch.int32)
    mask_mod = band_mask_mod(window, reach)
    q_idx = torch.arange(SEQ).view(-1, 1)
    kv_idx = torch.arange(SEQ).view(1, -1)
    zero = torch.zeros((), dtype=torch.long)
    for w in (5, 1, 12):
        window.fill_(w)  # what a window move does: same function, new value, no recompile
        reach.fill_(1 if causal else w)
        assert torch.equal(mask_mod(zero, zero, q_idx, kv_idx), band(SEQ, w, causal))


def visible_from_block_mask(bm, seq_len: int, window: int, causal: bool) -> torch.Tensor:
    """What FlexAttention computes with `bm`: full tiles whole, partial tiles through mask_mod."""
    q_block, kv_block = bm.BLOCK_SIZE
    allowed = band(seq_len, window, causal)
    out = torch.zeros(seq_len, seq_len, dtype=torch.bool)
    n_q = bm.kv_num_blocks.shape[-1]
    for n in range(n_q):
        rows = slice(n * q_block, (n + 1) * q_block)
        partial = bm.kv_indices[0, 0, n, : int(bm.kv_num_blocks[0, 0, n])].tolist()
        full = bm.full_kv_indices[0, 0, n, : int(bm.full_kv_num_blocks[0, 0, n])].tolist()
        assert not set(partial) & set(full), f"tile row {n}: a tile is both partial and full"
        for j in full:
            out[rows, j * kv_block : (j + 1) * kv_block] = True
        for j in partial:
            cols = slice(j * kv_block, (j + 1) * kv_block)
            out[rows, cols] = allowed[rows, cols]
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("tiles", [(128, 64), (64, 64), (128, 128), (32, 16)])
@pytest.mark.parametrize("seq_len", [37, 128, 300, 513])
def test_band_block_mask_covers_exactly_the_band(causal, tiles, seq_len):
    q_block, kv_block = tiles
    windows = sorted({1, 5, 63, 64, 65, 128, 129, 200, seq_len - 1, seq_len})
    for window in (w for w in windows if 1 <= w <= seq_len):
        mod = band_mask_mod(torch.tensor(window), torch.tensor(1 if causal else window))
        bm = band_block_mask(seq_len, window, causal, mod, torch.device("cpu"), q_block, kv_block)
        got = visible_from_block_mask(bm, seq_len, window, causal)
        assert torch.equal(got, band(seq_len, window, causal)), (window, tiles)
        assert bm.q_num_blocks is not None  # the transposed tiles the backward pass walks


def test_band_block_mask_uses_full_tiles_and_skips_far_ones():
    # T=1024, w=200, 64x64 tiles: a query tile touches 5 key tiles (200 keys + the diagonal),
    # of which 2 lie wholly inside every query's band
    lo, hi, flo, fhi = band_block_bounds(1024, 200, True, 64, 64)
    assert (lo[10], hi[10], flo[10], fhi[10]) == (6, 10, 8, 9)
    mod = band_mask_mod(torch.tensor(200), torch.tensor(1))
    bm = band_block_mask(1024, 200, True, mod, torch.device("cpu"), 64, 64)
    assert int(bm.kv_num_blocks.max()) == 3 and int(bm.full_kv_num_blocks.max()) == 2
    # the CPU part of a build is closed form: no T x T evaluation of the mask function
    calls = []
    counting = lambda b, h, q, kv: calls.append(1) or mod(b, h, q, kv)  # noqa: E731
    band_block_mask(1024, 200, True, counting, torch.device("cpu"), 64, 64)
    assert calls == []


def test_mask_cache_rebuilds_only_across_tiles_and_moves_one_window_tensor():
    cache = LocalMaskCache()
    cpu = torch.device("cpu")
    first = cache.block_mask(512, 100, True, cpu)
    window_t = cache._tensors[(cpu, True)][0]
    for w in range(66, 128):  # same key tiles for 128 x 64 tiling: no new mask
        assert cache.block_mask(512, w, True, cpu) is first
        assert int(window_t) == w  # the one tensor the mask function reads, moved in place
    assert cache.builds == 1
    other = cache.block_mask(512, 130, True, cpu)
    assert other is not first and cache.builds == 2
    assert cache._tensors[(cpu, True)][0] is window_t


def test_model_layers_share_one_mask_cache():
    from metalearner.model import build_model, tiny

    model = build_model(tiny(arch="encoder_decoder", n_mels=8))
    attns = [b.attn for b in [*model.enc_blocks, *model.dec_blocks]]
    assert all(a.masks is model.masks for a in attns)
    import copy
    import pickle

    clone = copy.deepcopy(model)
    assert clone.masks is not model.masks and all(b.attn.masks is clone.masks for b in clone.enc_blocks)
    assert pickle.loads(pickle.dumps(model.masks)).builds == 0


def test_flex_config_validates():
    with pytest.raises(ValueError, match="q_block"):
        FlexConfig(q_block=96).validate()
    with pytest.raises(ValueError, match="q_block"):
        FlexConfig(q_block=64, kv_block=128).validate()
    assert FlexConfig(q_block=128, kv_block=32).validate().kv_block == 32


def test_local_kernel_choice():
    x = torch.zeros(1, 2, 64, 16)
    assert attention_mod.local_kernel_for(x) == "blocked"  # CPU: the blocked band
    assert attention_mod.local_kernel_for(x.bfloat16()) == "blocked"


def test_flex_only_for_head_sizes_it_supports():
    assert make_attn(True, 1, 8, d_model=64).use_flex  # head_dim 16
    assert not make_attn(True, 1, 8, d_model=32).use_flex  # head_dim 8


@needs_cuda
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n_global", [0, 1])
def test_flex_path_matches_blocked_path(causal, n_global):
    torch._dynamo.reset()  # this process's earlier compiles must not crowd the limit
    attn = make_attn(causal, n_global, 16, d_model=64).float().cuda()  # head_dim 16
    assert attn.use_flex
    x = torch.randn(2, 300, 64, device="cuda", requires_grad=True)
    for window in (16, 64, 7, 65, 200, 299):  # inside a tile, across tiles, near T
        attn.set_window(window)
        outs, grads = [], []
        for use_flex in (True, False):
            attn.use_flex = use_flex
            out = attn(x)
            outs.append(out)
            grads.append(torch.autograd.grad(out.square().sum(), [x, attn.qkv.weight]))
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)
        for g_flex, g_blocked in zip(*grads, strict=True):
            torch.testing.assert_close(g_flex, g_blocked, rtol=1e-3, atol=1e-3)


@needs_cuda
def test_hybrid_module_under_bf16_autocast_matches_float32():
    torch._dynamo.reset()
    attn = make_attn(True, 1, 100, d_model=256).float().cuda()  # 4 heads of 64, 1 global
    x = torch.randn(2, 450, 256, device="cuda")
    ref = attn(x)  # float32
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = attn(x)  # bf16 q, k, v: FlexAttention band + SDPA flash global head
    err = float((out.float() - ref).norm() / ref.norm())
    assert err < 2e-2, err


@needs_cuda
def test_flex_bf16_matches_float64_dense():
    torch._dynamo.reset()
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(2, 4, 1000, 64, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(3))
    for causal, window in ((True, 128), (True, 333), (False, 100)):
        out = attention_mod.flex_local_attention(q, k, v, window, causal)
        ref = dense_attention(q.double().cpu(), k.double().cpu(), v.double().cpu(), window, causal)
        err = (out.double().cpu() - ref).norm() / ref.norm()
        assert err < 1e-2, (causal, window, float(err))


def test_sdpa_reference_agrees_with_dense_helper():
    # sanity of the test helper itself
    q, k, v = (x.detach() for x in qkv64((1, 2, 9, 4)))
    torch.testing.assert_close(
        dense_attention(q, k, v, 9, True), F.scaled_dot_product_attention(q, k, v, is_causal=True)
    )
