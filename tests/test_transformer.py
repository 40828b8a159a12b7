"""Tests for metalearner/model/transformer.py: configs, shapes, `apply_knobs`, training."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from metalearner.knobs import Knobs
from metalearner.model import (
    PRESETS,
    DecoderLM,
    EncoderDecoder,
    ModelConfig,
    build_model,
    preset,
    small,
    tiny,
)

ARCHS = ["decoder", "encoder_decoder"]
N_MELS = 8


def config(arch: str, **overrides) -> ModelConfig:
    extra = {"n_mels": N_MELS, "max_source_frames": 64} if arch == "encoder_decoder" else {}
    return tiny(arch=arch, **{**extra, **overrides})


def inputs(arch: str, batch: int = 2, seq: int = 30, frames: int = 90, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (batch, seq), generator=gen)
    if arch == "decoder":
        return (tokens,)
    return (torch.randn(batch, N_MELS, frames, generator=gen), tokens)


def build(cfg: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(cfg)


# -- config ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value",
    [
        ("arch", "mlp"),
        ("n_heads", 3),  # 32 % 3
        ("d_model", 12),  # head_dim 3 is odd
        ("n_global_heads", 5),
        ("n_global_heads", -1),
        ("window", 0),
        ("rope_base", 1.0),
        ("vocab_size", 0),
        ("n_layers", 0),
        ("max_seq_len", -4),
        ("n_decoder_layers", 0),
        ("dropout", 1.0),
    ],
)
def test_validate_names_the_field(field, value):
    cfg = dataclasses.replace(tiny(), **{field: value})
    with pytest.raises(ValueError, match=rf"^{field}: got {value!r}, expected"):
        cfg.validate()
    with pytest.raises(ValueError, match=field):
        build_model(cfg)


def test_presets():
    assert set(PRESETS) == {"tiny", "small"}
    cfg = preset("small")
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_global_heads, cfg.max_seq_len) == (
        128,
        4,
        4,
        1,
        256,
    )
    assert preset("tiny", window=8).window == 8 and tiny(d_model=64).d_model == 64
    assert small() == PRESETS["small"]()
    with pytest.raises(ValueError, match=r"model\.preset: got 'huge', expected one of \['small', 'tiny'\]"):
        preset("huge")
    with pytest.raises(ValueError, match=r"model\.widht"):
        preset("tiny", widht=3)


# -- shapes ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_shapes_and_model_class(arch):
    model = build(config(arch))
    assert isinstance(model, DecoderLM if arch == "decoder" else EncoderDecoder)
    logits = model(*inputs(arch, batch=3, seq=21))
    assert logits.shape == (3, 21, 256)
    assert torch.isfinite(logits).all()


def test_encode_decode_compose():
    model = build(config("encoder_decoder", n_decoder_layers=1)).eval()
    features, tokens = inputs("encoder_decoder", frames=91)
    memory = model.encode(features)
    assert memory.shape == (2, 46, 32)  # ceil(91 / 2) frames after the stride-2 conv
    assert len(model.dec_blocks) == 1 and len(model.enc_blocks) == 2
    assert torch.equal(model.decode(tokens, memory), model(features, tokens))


def test_length_limits():
    model = build(config("encoder_decoder"))
    with pytest.raises(ValueError, match="features"):
        model.encode(torch.randn(1, N_MELS, 129))  # 65 frames after stride 2 > 64
    with pytest.raises(ValueError, match="tokens"):
        model(*inputs("encoder_decoder", seq=129))


def test_decoder_is_causal_with_local_heads():
    model = build(config("decoder", n_global_heads=0, window=3))
    (tokens,) = inputs("decoder", seq=40)
    changed = tokens.clone()
    changed[:, 30:] = (changed[:, 30:] + 1) % 256
    a, b = model(tokens), model(changed)
    torch.testing.assert_close(a[:, :30], b[:, :30], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, 30:], b[:, 30:])


def test_tied_embeddings():
    model = build(config("decoder"))
    assert model.lm_head.weight is model.tok_emb.weight
    untied = build(config("decoder", tie_embeddings=False))
    assert untied.lm_head.weight is not untied.tok_emb.weight


# -- apply_knobs ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("base,window", [(123_456.0, 40), (10_000.0, 5), (2.5, 3), (777.0, 1000)])
def test_apply_knobs_equals_fresh_model(arch, base, window):
    model = build(config(arch, rope_base=10_000.0, window=40))
    fresh = build(config(arch, rope_base=base, window=window), seed=1)
    fresh.load_state_dict(model.state_dict())
    model.apply_knobs(Knobs(rope_base=base, window=window))
    assert model.knobs == fresh.knobs == Knobs(base, window)
    args = inputs(arch)
    assert torch.equal(model(*args), fresh(*args))


@pytest.mark.parametrize("arch", ARCHS)
def test_apply_knobs_keeps_parameters_and_buffers(arch):
    model = build(config(arch))
    params = dict(model.named_parameters())
    buffers = {name: (b, b.data_ptr()) for name, b in model.named_buffers()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = model(*inputs(arch)).logsumexp(-1).mean()
    loss.backward()
    optimizer.step()
    model.apply_knobs(Knobs(rope_base=55_555.0, window=7))
    assert dict(model.named_parameters()) == params  # same objects, none added
    for name, b in model.named_buffers():
        assert b is buffers[name][0] and b.data_ptr() == buffers[name][1]
    optimizer.zero_grad()
    model(*inputs(arch)).logsumexp(-1).mean().backward()
    optimizer.step()  # the optimizer still owns every parameter
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_apply_knobs_reaches_every_table_and_window():
    model = build(config("encoder_decoder"))
    model.apply_knobs(Knobs(rope_base=4_321.0, window=6))
    ropes = [model.enc_rope, model.dec_rope]
    attns = [b.attn for b in [*model.enc_blocks, *model.dec_blocks]]
    assert all(r.base == 4_321.0 for r in ropes)
    assert all(a.window == 6 and a.masks is model.masks for a in attns)


def test_apply_knobs_collects_modules_once_and_skips_unchanged(monkeypatch):
    model = build(config("decoder"))
    monkeypatch.setattr(type(model), "named_modules", lambda *a, **k: pytest.fail("walked the modules"))
    monkeypatch.setattr(type(model), "modules", lambda *a, **k: pytest.fail("walked the modules"))
    calls = []
    rope = model.rope
    monkeypatch.setattr(rope, "set_base", lambda base: calls.append(base))
    model.apply_knobs(Knobs(rope_base=model.knobs.rope_base, window=model.knobs.window))
    assert calls == []
    model.apply_knobs(Knobs(rope_base=model.knobs.rope_base, window=9))
    assert calls == [] and all(b.attn.window == 9 for b in model.blocks)
    model.apply_knobs(Knobs(rope_base=3_000.0, window=9))
    assert calls == [3_000.0]


@pytest.mark.parametrize("arch", ARCHS)
def test_window_beyond_sequence_equals_all_global_heads(arch):
    model = build(config(arch, window=2))
    all_global = build(config(arch, n_global_heads=4), seed=1)
    all_global.load_state_dict(model.state_dict())
    args = inputs(arch, seq=30, frames=60)  # encoder sees 30 frames
    assert not torch.allclose(model(*args), all_global(*args))
    model.apply_knobs(Knobs(rope_base=model.knobs.rope_base, window=30))
    assert torch.equal(model(*args), all_global(*args))
    # windows do nothing to a model without local heads
    before = all_global(*args)
    all_global.apply_knobs(Knobs(rope_base=all_global.knobs.rope_base, window=3))
    assert torch.equal(all_global(*args), before)


# -- training ------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_a_few_steps_reduce_loss(arch):
    model = build(config(arch, window=4))
    args = inputs(arch, batch=4, seq=24, frames=48)
    tokens = args[-1]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(8):
        if step == 4:
            model.apply_knobs(Knobs(rope_base=20_000.0, window=8))
        logits = model(*args[:-1], tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
