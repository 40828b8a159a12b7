"""The transformers the knobs act on: a decoder-only LM and a Whisper-shaped encoder-decoder.

Read top to bottom: `ModelConfig` (+ presets), `MLP`, `Block`, the knob plumbing shared by
both models, `DecoderLM`, `EncoderDecoder`, `build_model`.

Runtime knobs enter through exactly one method, `model.apply_knobs(knobs)`, which rewrites
every rotary table in place (`RotaryEmbedding.set_base`) and sets every hybrid attention
window (`HybridAttention.set_window`). The modules it touches are collected once, at
construction; it adds no parameters and replaces no tensors, so optimizers keep working.
All hybrid attention layers share one `LocalMaskCache`: on CUDA a window move fills one
window tensor and builds at most one block mask for the whole model.

Imports torch and `metalearner.knobs` only; must not import ray, mlflow, the train loop or
the tasks.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from metalearner.knobs import Knobs
from metalearner.model.attention import CrossAttention, HybridAttention, LocalMaskCache
from metalearner.model.rope import RotaryEmbedding

ARCHS = ("decoder", "encoder_decoder")


@dataclass
class ModelConfig:
    """Sizes and initial knobs of a model; `build_model(cfg)` turns it into a module.

    Args:
        arch: "decoder" (tokens -> logits) or "encoder_decoder" (features, tokens -> logits).
        vocab_size: number of token ids.
        d_model: residual width.
        n_layers: decoder blocks ("decoder"), encoder blocks ("encoder_decoder").
        n_heads: attention heads per block; d_model / n_heads must be even (rotary).
        n_global_heads: heads per block that attend globally; the rest are local.
        max_seq_len: longest token sequence (decoder rotary table size).
        rope_base: initial RoPE base (knob).
        window: initial local attention width (knob).
        mlp_ratio: MLP hidden width = mlp_ratio * d_model.
        dropout: dropout on embeddings and residual branches.
        n_mels: feature channels of the encoder input ("encoder_decoder").
        n_decoder_layers: decoder blocks of "encoder_decoder"; None means n_layers.
        max_source_frames: longest encoder sequence after the stride-2 conv stem.
        tie_embeddings: share the token embedding with the output projection.
    """

    arch: str = "decoder"
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_global_heads: int = 1
    max_seq_len: int = 256
    rope_base: float = 10_000.0
    window: int = 40
    mlp_ratio: int = 4
    dropout: float = 0.0
    n_mels: int = 80
    n_decoder_layers: int | None = None
    max_source_frames: int = 3000
    tie_embeddings: bool = True

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def decoder_layers(self) -> int:
        """Number of decoder blocks (n_layers for "decoder")."""
        if self.arch == "encoder_decoder" and self.n_decoder_layers is not None:
            return self.n_decoder_layers
        return self.n_layers

    def validate(self) -> ModelConfig:
        """Raise ValueError naming the first bad field; return self when all are sane."""

        def fail(field: str, expected: str) -> None:
            raise ValueError(f"{field}: got {getattr(self, field)!r}, expected {expected}")

        if self.arch not in ARCHS:
            fail("arch", f"one of {list(ARCHS)}")
        for field in (
            "vocab_size",
            "d_model",
            "n_layers",
            "n_heads",
            "max_seq_len",
            "mlp_ratio",
            "n_mels",
            "max_source_frames",
        ):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(field, "a positive int")
        if self.n_decoder_layers is not None and (
            isinstance(self.n_decoder_layers, bool)
            or not isinstance(self.n_decoder_layers, int)
            or self.n_decoder_layers < 1
        ):
            fail("n_decoder_layers", "a positive int or None (= n_layers)")
        if self.d_model % self.n_heads:
            fail("n_heads", f"a divisor of d_model={self.d_model}")
        if self.head_dim % 2:
            fail(
                "d_model",
                f"d_model / n_heads (head_dim, here {self.head_dim}) to be even for rotary",
            )
        if (
            isinstance(self.n_global_heads, bool)
            or not isinstance(self.n_global_heads, int)
            or not 0 <= self.n_global_heads <= self.n_heads
        ):
            fail("n_global_heads", f"an int in 0 .. n_heads={self.n_heads}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            fail("window", "an int >= 1")
        if (
            isinstance(self.rope_base, bool)
            or not isinstance(self.rope_base, int | float)
            or not math.isfinite(self.rope_base)
            or self.rope_base <= 1
        ):
            fail("rope_base", "a finite float > 1")
        if not isinstance(self.dropout, int | float) or not 0 <= self.dropout < 1:
            fail("dropout", "a float in [0, 1)")
        if not isinstance(self.tie_embeddings, bool):
            fail("tie_embeddings", "a bool")
        return self


# -- presets: named builder functions ---------------------------------------------------------


def _preset(name: str, defaults: dict[str, Any], overrides: dict[str, Any]) -> ModelConfig:
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for key in overrides:
        if key not in fields:
            raise ValueError(f"model.{key}: unknown field for preset {name!r}, expected one of {sorted(fields)}")
    return ModelConfig(**{**defaults, **overrides})


def tiny(**overrides: Any) -> ModelConfig:
    """A model for tests: d_model 32, 2 layers, 4 heads (1 global), 128 positions."""
    return _preset(
        "tiny",
        dict(d_model=32, n_layers=2, n_heads=4, n_global_heads=1, max_seq_len=128),
        overrides,
    )


def small(**overrides: Any) -> ModelConfig:
    """A model for experiments on 2 CPUs: d_model 128, 4 layers, 4 heads (1 global), 256 positions."""
    return _preset(
        "small",
        dict(d_model=128, n_layers=4, n_heads=4, n_global_heads=1, max_seq_len=256),
        overrides,
    )


# To add a preset: write a builder like `small` above and register it here.
PRESETS: dict[str, Callable[..., ModelConfig]] = {"tiny": tiny, "small": small}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The config of preset `name` with `overrides` applied, e.g. `preset("tiny", window=8)`."""
    if name not in PRESETS:
        raise ValueError(f"model.preset: got {name!r}, expected one of {sorted(PRESETS)}")
    return PRESETS[name](**overrides)


# -- building blocks --------------------------------------------------------------------------


class MLP(nn.Module):
    """d_model -> mlp_ratio * d_model -> GELU -> d_model."""

    def __init__(self, d_model: int, mlp_ratio: int, dropout: float) -> None:
        super().__init__()
        self.fc = nn.Linear(d_model, mlp_ratio * d_model, bias=False)
        self.proj = nn.Linear(mlp_ratio * d_model, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)) [+ cross(norm(x), memory)] + mlp(norm(x)).

    Args:
        cfg: sizes, initial window and dropout.
        rope: the stack's shared rotary embedding.
        causal: causal (decoder) or bidirectional (encoder) self-attention.
        cross: add cross-attention to `memory` (encoder-decoder decoder blocks).
    """

    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding, causal: bool, cross: bool = False) -> None:
        super().__init__()
        self.norm_attn = nn.RMSNorm(cfg.d_model)
        self.attn = HybridAttention(cfg.d_model, cfg.n_heads, cfg.n_global_heads, causal, rope, cfg.window, cfg.dropout)
        self.norm_cross = nn.RMSNorm(cfg.d_model) if cross else None
        self.cross = CrossAttention(cfg.d_model, cfg.n_heads, cfg.dropout) if cross else None
        self.norm_mlp = nn.RMSNorm(cfg.d_model)
        self.mlp = MLP(cfg.d_model, cfg.mlp_ratio, cfg.dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, d_model); memory: (B, S, d_model) for cross blocks."""
        x = x + self.attn(self.norm_attn(x))
        if self.cross is not None and self.norm_cross is not None:
            if memory is None:
                raise ValueError("memory: got None, expected encoder output for a cross-attention block")
            x = x + self.cross(self.norm_cross(x), memory)
        return x + self.mlp(self.norm_mlp(x))


def _init_gpt2(module: nn.Module, n_residual: int) -> None:
    """GPT-2 init: N(0, 0.02) weights, zero biases, residual projections / sqrt(n_residual)."""
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear | nn.Embedding):
            std = 0.02 / math.sqrt(n_residual) if name.endswith(".proj") else 0.02
            nn.init.normal_(sub.weight, mean=0.0, std=std)
            if getattr(sub, "bias", None) is not None:
                nn.init.zeros_(sub.bias)


class _KnobbedModel(nn.Module):
    """The knob plumbing both models share: `apply_knobs` and `knobs`."""

    def _collect_knob_targets(self, cfg: ModelConfig) -> None:
        """Remember (once) every rotary table and hybrid attention this model owns."""
        ropes: list[RotaryEmbedding] = []
        attns: list[HybridAttention] = []
        for sub in self.modules():  # nn.Module.modules() yields each shared module once
            if isinstance(sub, RotaryEmbedding):
                ropes.append(sub)
            elif isinstance(sub, HybridAttention):
                attns.append(sub)
        self._ropes = ropes  # plain lists: not registered twice, not in the state dict
        self._attns = attns
        self.masks = LocalMaskCache()  # one block-mask cache (and window tensor) for all layers
        for attn in attns:
            attn.share_masks(self.masks)
        self._knobs = Knobs(rope_base=cfg.rope_base, window=cfg.window)

    @property
    def knobs(self) -> Knobs:
        """The knobs the model uses now."""
        return self._knobs

    def apply_knobs(self, knobs: Knobs) -> None:
        """Set every rotary base and every local window; a no-op for unchanged knobs.

        Call between optimizer steps. Tables are rewritten in place; no parameter or buffer
        tensor is replaced, so optimizer state and references stay valid.
        """
        if knobs == self._knobs:
            return
        if knobs.rope_base != self._knobs.rope_base:
            for rope in self._ropes:
                rope.set_base(knobs.rope_base)
        if knobs.window != self._knobs.window:
            for attn in self._attns:
                attn.set_window(knobs.window)
        self._knobs = knobs


# -- the models -------------------------------------------------------------------------------


class DecoderLM(_KnobbedModel):
    """Decoder-only language model: tokens (B, T) -> logits (B, T, vocab_size).

    Example:
        >>> model = DecoderLM(tiny())
        >>> model(torch.randint(0, 256, (2, 16))).shape
        torch.Size([2, 16, 256])
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_base)
        self.blocks = nn.ModuleList(Block(cfg, self.rope, causal=True) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        _init_gpt2(self, n_residual=2 * cfg.n_layers)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self._collect_knob_targets(cfg)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: LongTensor (B, T), T <= max_seq_len -> logits (B, T, vocab_size)."""
        _check_len("tokens", tokens.shape[1], self.cfg.max_seq_len, "max_seq_len")
        x = self.drop(self.tok_emb(tokens))  # (B, T, C)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


class EncoderDecoder(_KnobbedModel):
    """Whisper-shaped model: features (B, n_mels, frames), tokens (B, T) -> logits (B, T, V).

    Encoder: Conv1d(n_mels, d, 3) + GELU + Conv1d(d, d, 3, stride 2) + GELU, then blocks with
    bidirectional hybrid self-attention (rotary over frames). Decoder: token embedding, blocks
    with causal hybrid self-attention (rotary over tokens), cross-attention and MLP. No padding
    masks: pad features and tokens to a common length (Whisper pads audio to a fixed length).

    Example:
        >>> model = EncoderDecoder(tiny(arch="encoder_decoder", n_mels=16))
        >>> model(torch.randn(2, 16, 50), torch.randint(0, 256, (2, 8))).shape
        torch.Size([2, 8, 256])
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d = cfg.d_model
        # encoder
        self.conv1 = nn.Conv1d(cfg.n_mels, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.enc_rope = RotaryEmbedding(cfg.head_dim, cfg.max_source_frames, cfg.rope_base)
        self.enc_blocks = nn.ModuleList(Block(cfg, self.enc_rope, causal=False) for _ in range(cfg.n_layers))
        self.enc_norm = nn.RMSNorm(d)
        # decoder
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.dec_rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_base)
        self.dec_blocks = nn.ModuleList(
            Block(cfg, self.dec_rope, causal=True, cross=True) for _ in range(cfg.decoder_layers)
        )
        self.dec_norm = nn.RMSNorm(d)
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        _init_gpt2(self.enc_blocks, n_residual=2 * cfg.n_layers)
        _init_gpt2(self.dec_blocks, n_residual=3 * cfg.decoder_layers)
        _init_gpt2(self.tok_emb, n_residual=1)
        _init_gpt2(self.lm_head, n_residual=1)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self._collect_knob_targets(cfg)

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """features: (B, n_mels, frames) -> memory (B, ceil(frames / 2), d_model)."""
        if features.dim() != 3 or features.shape[1] != self.cfg.n_mels:
            raise ValueError(
                f"features: got shape {tuple(features.shape)}, expected (B, n_mels={self.cfg.n_mels}, frames)"
            )
        x = F.gelu(self.conv1(features))
        x = F.gelu(self.conv2(x)).transpose(1, 2)  # (B, S, C)
        _check_len("features", x.shape[1], self.cfg.max_source_frames, "max_source_frames (after stride 2)")
        x = self.drop(x)
        for block in self.enc_blocks:
            x = block(x)
        return self.enc_norm(x)

    def decode(self, tokens: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """tokens: (B, T); memory: (B, S, d_model) from `encode` -> logits (B, T, vocab_size)."""
        _check_len("tokens", tokens.shape[1], self.cfg.max_seq_len, "max_seq_len")
        x = self.drop(self.tok_emb(tokens))
        for block in self.dec_blocks:
            x = block(x, memory)
        return self.lm_head(self.dec_norm(x))

    def forward(self, features: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.decode(tokens, self.encode(features))


def _check_len(name: str, length: int, limit: int, limit_name: str) -> None:
    if length > limit:
        raise ValueError(f"{name}: got length {length}, expected at most {limit_name}={limit}")


def build_model(cfg: ModelConfig) -> DecoderLM | EncoderDecoder:
    """Validate `cfg` and build its model (seed with torch.manual_seed before calling)."""
    cfg.validate()
    if cfg.arch == "decoder":
        return DecoderLM(cfg)
    return EncoderDecoder(cfg)
