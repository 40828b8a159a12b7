"""What does the hybrid model cost at full window, against a plain SDPA transformer? (CPU)

Times one training step (forward, cross-entropy, backward) of `DecoderLM` with the window at
the sequence length (every head global: the fast path, one fused causal SDPA call per layer)
against a plain nanoGPT-style reference of the same size: same d_model, layers, heads, MLP,
RMSNorm, tied embeddings, with learned absolute positions instead of rotary and
`F.scaled_dot_product_attention(is_causal=True)`. Both are measured side by side in the same
run, interleaved, and the medians are compared.

    python benchmarks/bench_model_vs_sdpa.py            # preset "small", T=256, batch 16
    python benchmarks/bench_model_vs_sdpa.py --quick    # smoke run, a few seconds

Goal: model / reference <= 1.10. `--reference-rope` gives the reference the same rotary
embedding, isolating the attention plumbing from the cost of RoPE itself.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._timing import median_times  # noqa: E402
from metalearner.knobs import Knobs  # noqa: E402
from metalearner.model import ModelConfig, RotaryEmbedding, build_model, preset  # noqa: E402

GOAL = 1.10


class PlainBlock(nn.Module):
    """x + attn(norm(x)); x + mlp(norm(x)) with one causal SDPA call."""

    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding | None) -> None:
        super().__init__()
        self.n_heads, self.rope = cfg.n_heads, rope
        self.norm1, self.norm2 = nn.RMSNorm(cfg.d_model), nn.RMSNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=False)
        self.fc_proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.n_heads, c // self.n_heads).unbind(2)
        if self.rope is not None:
            q, k = self.rope(q, seq_dim=1), self.rope(k, seq_dim=1)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.fc_proj(F.gelu(self.fc(self.norm2(x))))


class PlainLM(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: bool) -> None:
        super().__init__()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len) if rope else None
        self.pos_emb = None if rope else nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(PlainBlock(cfg, self.rope) for _ in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok_emb(tokens)
        if self.pos_emb is not None:
            x = x + self.pos_emb.weight[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.norm(x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: preset tiny, batch 4, 2 repeats")
    parser.add_argument("--preset", default="small", help="model preset (sizes)")
    parser.add_argument("--seq-len", type=int, default=None, help="sequence length (default: preset max_seq_len)")
    parser.add_argument("--batch", type=int, default=16, help="batch size")
    parser.add_argument("--repeats", type=int, default=9, help="timed repeats per variant (median)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads")
    parser.add_argument("--reference-rope", action="store_true", help="give the reference RoPE too")
    args = parser.parse_args()
    if args.quick:
        args.preset, args.batch, args.repeats = "tiny", 4, 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cfg = preset(args.preset)
    t = args.seq_len or cfg.max_seq_len
    cfg = preset(args.preset, max_seq_len=t, window=t)  # full window: all heads global
    model = build_model(cfg)
    model.apply_knobs(Knobs(rope_base=cfg.rope_base, window=t))
    reference = PlainLM(cfg, rope=args.reference_rope)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, t))

    def train_step(net: nn.Module) -> Callable[[], None]:
        def step() -> None:
            net.zero_grad(set_to_none=True)
            logits = net(tokens)
            F.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()

        return step

    print(
        f"preset={args.preset} T={t} batch={args.batch} d_model={cfg.d_model} layers={cfg.n_layers} "
        f"heads={cfg.n_heads} threads={args.threads} repeats={args.repeats} "
        f"reference rope={args.reference_rope}"
    )
    med = median_times({"model": train_step(model), "reference": train_step(reference)}, args.repeats, warmup=1)
    for name, sec in med.items():
        print(f"  {name:>10}: {sec * 1e3:8.1f} ms / step (fwd+bwd)")
    ratio = med["model"] / med["reference"]
    verdict = "ok" if ratio <= GOAL else "ABOVE GOAL"
    print(f"model (full window) / plain SDPA reference: {ratio:.3f}   (goal <= {GOAL})  {verdict}")


if __name__ == "__main__":
    main()
