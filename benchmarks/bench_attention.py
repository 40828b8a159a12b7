"""Does the local attention path's cost follow the window? (CPU, forward + backward)

Times one training step (forward + backward) of a stack of pre-norm hybrid attention layers
with local heads only (n_global_heads=0) at T=1024, window 64 against window 1024 (where the
local heads equal global causal heads and run as one fused SDPA call). Both are measured
side by side in the same run, interleaved, and the median of the repeats is compared.

    python benchmarks/bench_attention.py            # full run
    python benchmarks/bench_attention.py --quick    # smoke run, a few seconds

Goal: local (w=64) / full (w=1024) <= 0.35 for the attention stack (norm, qkv projection,
rotary, attention, output projection). Also printed: the attention op alone (q, k, v -> o:
`blocked_local_attention` against causal SDPA), and with --model the whole DecoderLM, whose
embeddings, MLPs and LM head do not depend on the window.

On a machine shared with other jobs, compare with --threads 1: two OpenMP threads fighting
other processes for two cores slow the many small kernels of the local path far more than
the single fused SDPA kernel.
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
from metalearner.model import (  # noqa: E402
    HybridAttention,
    RotaryEmbedding,
    blocked_local_attention,
    build_model,
    small,
)

GOAL = 0.35


class AttentionStack(nn.Module):
    """n_layers of x + HybridAttention(RMSNorm(x)), sharing one rotary table."""

    def __init__(self, d_model: int, n_heads: int, n_layers: int, seq_len: int, window: int) -> None:
        super().__init__()
        self.rope = RotaryEmbedding(d_model // n_heads, seq_len)
        self.norms = nn.ModuleList(nn.RMSNorm(d_model) for _ in range(n_layers))
        self.attns = nn.ModuleList(
            HybridAttention(d_model, n_heads, 0, True, self.rope, window) for _ in range(n_layers)
        )

    def set_window(self, window: int) -> None:
        for attn in self.attns:
            attn.set_window(window)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for norm, attn in zip(self.norms, self.attns, strict=True):
            x = x + attn(norm(x))
        return x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: T=256, batch 2, 2 repeats")
    parser.add_argument("--seq-len", type=int, default=1024, help="sequence length T (also the full window)")
    parser.add_argument("--window", type=int, default=64, help="local window to compare with the full one")
    parser.add_argument("--batch", type=int, default=8, help="batch size")
    parser.add_argument("--d-model", type=int, default=128, help="model width (preset 'small')")
    parser.add_argument("--n-heads", type=int, default=4, help="attention heads")
    parser.add_argument("--n-layers", type=int, default=4, help="layers")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per variant (median)")
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1), help="torch threads")
    parser.add_argument("--model", action="store_true", help="also time the whole DecoderLM")
    args = parser.parse_args()
    if args.quick:
        args.seq_len, args.window, args.batch, args.repeats = 256, 32, 2, 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t, w = args.seq_len, args.window

    stack = AttentionStack(args.d_model, args.n_heads, args.n_layers, t, w)
    x = torch.randn(args.batch, t, args.d_model)

    def stack_step(window: int) -> Callable[[], None]:
        def step() -> None:
            stack.set_window(window)
            stack.zero_grad(set_to_none=True)
            stack(x).square().mean().backward()

        return step

    steps = {f"stack w={w}": stack_step(w), f"stack w={t}": stack_step(t)}

    # the attention op alone (what the window controls): q, k, v -> o, no projections
    h, d = args.n_heads, args.d_model // args.n_heads
    q, k, v = (torch.randn(args.batch, t, h, d).transpose(1, 2).requires_grad_() for _ in range(3))
    grad = torch.randn(args.batch, h, t, d)

    def core_step(local: bool) -> Callable[[], None]:
        def step() -> None:
            if local:
                out = blocked_local_attention(q, k, v, w, causal=True)
            else:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            torch.autograd.grad(out, (q, k, v), grad)

        return step

    steps |= {f"core w={w}": core_step(True), f"core w={t}": core_step(False)}

    if args.model:
        cfg = small(
            max_seq_len=t,
            n_global_heads=0,
            window=w,
            d_model=args.d_model,
            n_heads=args.n_heads,
            n_layers=args.n_layers,
        )
        model = build_model(cfg)
        tokens = torch.randint(0, cfg.vocab_size, (args.batch, t))

        def model_step(window: int) -> Callable[[], None]:
            def step() -> None:
                model.apply_knobs(Knobs(rope_base=cfg.rope_base, window=window))
                model.zero_grad(set_to_none=True)
                logits = model(tokens)
                F.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()

            return step

        steps |= {f"model w={w}": model_step(w), f"model w={t}": model_step(t)}

    print(
        f"T={t} batch={args.batch} d_model={args.d_model} heads={args.n_heads} (all local) "
        f"layers={args.n_layers} threads={args.threads} repeats={args.repeats}"
    )
    med = median_times(steps, args.repeats, warmup=1)
    for name, sec in med.items():
        print(f"  {name:>16}: {sec * 1e3:8.1f} ms / step (fwd+bwd)")
    ratio = med[f"stack w={w}"] / med[f"stack w={t}"]
    verdict = "ok" if ratio <= GOAL else "ABOVE GOAL"
    print(f"attention stack  local w={w} / full w={t}: {ratio:.3f}   (goal <= {GOAL})  {verdict}")
    ratio = med[f"core w={w}"] / med[f"core w={t}"]
    print(f"attention op     local w={w} / full w={t}: {ratio:.3f}   (blocked path vs causal SDPA)")
    if args.model:
        ratio = med[f"model w={w}"] / med[f"model w={t}"]
        print(f"whole model      local w={w} / full w={t}: {ratio:.3f}   (informational)")


if __name__ == "__main__":
    main()
