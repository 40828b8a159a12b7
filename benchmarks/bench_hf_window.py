"""Does an HF model's train step follow the window with attn_implementation="metalearner_local"? (CPU)

Times one training step (forward, cross-entropy, backward, AdamW step) of a Qwen2-shaped
transformers model (random init, every layer sliding-window, grouped-query attention) at
T=1024, window 64 against window 1024, side by side in one run, interleaved, medians:

* ``local w=64`` / ``local w=1024``  `attn_implementation="metalearner_local"`
  (`metalearner/model/hf_local.py`): the band at w=64; at w=1024 = T the window covers the
  sequence and the layer runs causal SDPA. -> THE FIGURE, goal <= 0.6.
* ``sdpa w=64`` / ``sdpa w=1024``  HF's `sdpa`: the window is a dense (B, 1, T, T) mask, so
  the ratio is expected near 1.0.

The MLP is SwiGLU (three matrices), sized as LLaMA sizes it: intermediate = 8/3 x hidden, the
FLOPs of a plain 4x MLP (our own `DecoderLM`'s). Qwen2's own checkpoints run wider MLPs
(about 5.4x hidden), where attention is a smaller share of the step: `--intermediate 512`
(4x) shows how the ratio moves.

Each variant has its own model and AdamW (same initial weights). Also printed: the attention
function alone (q, k, v -> o, fwd+bwd: `local_attention_forward` at w=64 against w=1024,
and HF's sdpa function with the dense w=64 mask), and what the model's mask creation costs
per forward (`create_sliding_window_causal_mask`: sdpa builds a B x T x T boolean mask,
metalearner_local returns None). `--rounds` repeats the whole side-by-side measurement to
show how stable the ratios are.

    python benchmarks/bench_hf_window.py            # full run, 2 rounds, a few minutes
    python benchmarks/bench_hf_window.py --quick    # smoke run, seconds (figures mean little)

Runs with one torch thread (``--threads``): on a shared 2-core machine two OpenMP threads
add more noise than signal. Ends with `RESULT hf_window: ratio=X goal<=0.6 (met|NOT met)`
(the worst round).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._timing import median_times  # noqa: E402
from metalearner.model.hf_local import ATTN_NAME, local_attention_forward, register_local_attention  # noqa: E402

GOAL = 0.6


def qwen2_model(args: argparse.Namespace, window: int, attn: str) -> torch.nn.Module:
    """A Qwen2-shaped causal LM, every layer sliding-window, seeded (same weights each call)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate or 8 * (-(-8 * args.hidden // 3) // 8),
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seq_len,
        use_sliding_window=True,
        sliding_window=window,
        max_window_layers=0,  # layers >= max_window_layers slide: all of them
        use_cache=False,
    )
    torch.manual_seed(0)
    return Qwen2ForCausalLM._from_config(config, attn_implementation=attn).float().train()


def train_step(model: torch.nn.Module, tokens: torch.Tensor) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids=tokens, use_cache=False).logits
        F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten()).backward()
        optimizer.step()

    return step


def attention_steps(args: argparse.Namespace, w: int) -> dict[str, Callable[[], None]]:
    """The attention function alone, fwd+bwd, on the shapes a layer of the model passes."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask, sliding_window_causal_mask_function

    b, t, h, hkv, d = args.batch, args.seq_len, args.heads, args.kv_heads, args.hidden // args.heads
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal = h // hkv, True
    q = torch.randn(b, t, h, d).transpose(1, 2).requires_grad_()  # (B, H, T, D) as HF passes it
    k, v = (torch.randn(b, t, hkv, d).transpose(1, 2).requires_grad_() for _ in range(2))
    grad = torch.randn(b, t, h, d)
    dense = sdpa_mask(b, t, t, mask_function=sliding_window_causal_mask_function(w), allow_is_causal_skip=False)

    def core(window: int | None, fn: Callable[..., tuple[torch.Tensor, None]], mask: torch.Tensor | None) -> Callable[[], None]:
        def step() -> None:
            out, _ = fn(module, q, k, v, mask, dropout=0.0, scaling=d**-0.5, sliding_window=window)
            torch.autograd.grad(out, (q, k, v), grad)

        return step

    return {
        f"attn local w={w}": core(w, local_attention_forward, None),
        f"attn local w={t}": core(t, local_attention_forward, None),
        f"attn sdpa w={w}": core(w, sdpa_attention_forward, dense),
    }


def mask_cost(args: argparse.Namespace, w: int) -> str:
    """Seconds and bytes of the mask each implementation builds per forward."""
    from transformers.masking_utils import create_sliding_window_causal_mask

    tokens = torch.zeros(args.batch, args.seq_len, dtype=torch.long)
    parts = []
    for attn in ("sdpa", ATTN_NAME):
        model = qwen2_model(argparse.Namespace(**{**vars(args), "layers": 1}), w, attn)
        emb = model.get_input_embeddings()(tokens)
        start = time.perf_counter()
        for _ in range(5):
            mask = create_sliding_window_causal_mask(model.config, emb, None, None)
        sec = (time.perf_counter() - start) / 5
        size = "None" if mask is None else f"{tuple(mask.shape)} {mask.dtype}, {mask.numel() * mask.element_size() / 2**20:.1f} MiB"
        parts.append(f"{attn}: {size}, {sec * 1e3:.2f} ms")
    return "; ".join(parts)


# integer options, one a line: name, default, help; --quick replaces some of them
OPTIONS = """
seq_len      1024  sequence length T (also the full window)
window         64  local window to compare with the full one
batch           4  batch size
hidden        128  hidden size
intermediate    0  SwiGLU width; 0 = 8/3 x hidden rounded up to a multiple of 8 (344 for 128)
heads           4  attention heads
kv_heads        2  key/value heads (grouped-query attention)
layers          4  layers, all sliding-window
vocab         512  vocabulary size
repeats         7  timed repeats per variant (median)
rounds          2  side-by-side measurements, each printed
threads         1  torch threads
"""
QUICK = {"seq_len": 128, "window": 16, "batch": 1, "hidden": 64, "layers": 2, "repeats": 1, "rounds": 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"smoke run, seconds: {QUICK}")
    for line in OPTIONS.strip().splitlines():
        name, default, text = line.split(maxsplit=2)
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=int(default), help=text)
    args = parser.parse_args()
    if args.quick:
        vars(args).update(QUICK)
    torch.set_num_threads(args.threads)
    register_local_attention()
    t, w = args.seq_len, args.window
    tokens = torch.randint(0, args.vocab, (args.batch, t), generator=torch.Generator().manual_seed(0))
    steps = {
        f"{attn} w={window}": train_step(qwen2_model(args, window, attn_name), tokens)
        for attn, attn_name in (("local", ATTN_NAME), ("sdpa", "sdpa"))
        for window in (w, t)
    }
    steps |= attention_steps(args, w)

    print(
        f"Qwen2-shaped: T={t} batch={args.batch} hidden={args.hidden} heads={args.heads} kv_heads={args.kv_heads} "
        f"layers={args.layers} (all sliding) vocab={args.vocab} threads={args.threads} repeats={args.repeats}"
    )
    print(f"mask built per forward at w={w}: {mask_cost(args, w)}")
    worst = 0.0
    for r in range(args.rounds):
        med = median_times(steps, args.repeats, warmup=1)
        print(f"round {r}:")
        for name, sec in med.items():
            print(f"  {name:>18}: {sec * 1e3:8.1f} ms / step")
        local = med[f"local w={w}"] / med[f"local w={t}"]
        sdpa = med[f"sdpa w={w}"] / med[f"sdpa w={t}"]
        worst = max(worst, local)
        print(f"  train step  metalearner_local w={w} / w={t}: {local:.3f}   (goal <= {GOAL})")
        print(f"  train step  sdpa              w={w} / w={t}: {sdpa:.3f}   (expected ~1.0)")
        print(f"  train step  metalearner_local / sdpa at w={w}: {med[f'local w={w}'] / med[f'sdpa w={w}']:.3f}")
        attn = med[f"attn local w={w}"] / med[f"attn local w={t}"]
        print(f"  attention fn alone  band w={w} / causal SDPA w={t}: {attn:.3f}")
        attn = med[f"attn local w={w}"] / med[f"attn sdpa w={w}"]
        print(f"  attention fn alone  band w={w} / HF sdpa dense mask w={w}: {attn:.3f}")
    print(f"RESULT hf_window: ratio={worst:.3f} goal<={GOAL} ({'met' if worst <= GOAL else 'NOT met'})")


if __name__ == "__main__":
    main()
