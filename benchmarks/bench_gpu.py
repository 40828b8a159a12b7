"""On a GPU, does the window buy compute, and are knob moves free? (one run, one GPU)

Every ratio of issue 10, measured side by side in one process: the variants of a ratio run
interleaved (a, b, a, b, ...), each timed with CUDA events, the median of >= 10 repeats
after a warm-up is compared. Sizes (bf16):

* kernel alone (q, k, v in, output out; forward + backward), T=8192, batch 2, 16 heads x 64:
  FlexAttention band at window 128 (also 512, 2048) / `scaled_dot_product_attention(is_causal=True)`;
* attention module (qkv projection, rotary, attention, output projection; fwd + bwd), same
  sizes, all heads local: window 128 and 2048 / full window (SDPA flash);
* hybrid mix, 4 global + 12 local heads at window 128: the module's attention / (SDPA on
  the 4 global heads + FlexAttention on the 12 local heads, timed apart);
* whole-model train step (forward, cross-entropy, backward, AdamW step, `loss.item()`),
  DecoderLM T=4096, d_model 768, 8 layers, 12 heads (2 global), batch 4, bf16 autocast:
  window 256 (and 1024) / window 4096;
* knob moves: the same step at window 256 with the window moving every step (inside one
  key tile; across tiles, which builds a block mask), the RoPE base moving every step, and
  both / the fixed step.

    python benchmarks/bench_gpu.py              # on a GPU (about 3 min with compiles)
    python benchmarks/bench_gpu.py --sweep      # first time FlexAttention tilings, pick the best
    python benchmarks/bench_gpu.py --quick      # tiny sizes; on CPU a dry run of the machinery

On CPU (`--quick` without CUDA) the local path is the blocked one and the figures mean
nothing: it checks that the script runs. Ends with one `RESULT name: ratio=X goal<=Y (met|NOT
met)` line per goal.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metalearner.knobs import Knobs  # noqa: E402
from metalearner.model import HybridAttention, RotaryEmbedding, build_model  # noqa: E402
from metalearner.model import attention as attn_mod  # noqa: E402
from metalearner.model import flex as flex_mod  # noqa: E402
from metalearner.model.transformer import ModelConfig  # noqa: E402

GOALS = {
    "kernel_w128_vs_sdpa": 0.25,
    "module_w128_vs_full": 0.45,
    "module_w2048_vs_full": 0.80,
    "hybrid_vs_parts": 1.00,
    "model_w256_vs_full": 0.85,
    "window_moving_vs_fixed": 1.03,
    "window_crossing_tiles_vs_fixed": 1.03,
    "base_moving_vs_fixed": 1.03,
    "both_moving_vs_fixed": 1.03,
}

# FlexAttention tilings tried by --sweep: (q_block, kv_block, kernel_options)
SWEEP: list[tuple[int, int, tuple[tuple[str, Any], ...]]] = [
    (128, 128, ()),
    (256, 128, ()),
    (128, 128, (("PRESCALE_QK", True), ("ROWS_GUARANTEED_SAFE", True))),
]  # (on torch 2.11 tiles narrower than 128 keys leave FlexAttention's backward no config)


@dataclass
class Sizes:
    batch: int = 2
    heads: int = 16
    head_dim: int = 64
    seq: int = 8192
    model_seq: int = 4096
    model_batch: int = 4
    d_model: int = 768
    n_layers: int = 8
    model_heads: int = 12
    model_global: int = 2
    repeats: int = 15
    warmup: int = 3


QUICK = Sizes(
    batch=1,
    heads=4,
    head_dim=16,
    seq=512,
    model_seq=256,
    model_batch=2,
    d_model=64,
    n_layers=2,
    model_heads=4,
    model_global=1,
    repeats=10,
    warmup=2,
)


class Timer:
    """Interleaved timing with CUDA events (host clock + synchronize on CPU)."""

    def __init__(self, device: torch.device, repeats: int, warmup: int) -> None:
        self.device, self.repeats, self.warmup = device, repeats, warmup

    def medians(self, fns: dict[str, Callable[[], Any]]) -> dict[str, float]:
        """Median milliseconds of each fn, run interleaved (order rotated each round)."""
        for _ in range(self.warmup):
            for fn in fns.values():
                fn()
        self.sync()
        times: dict[str, list[float]] = {k: [] for k in fns}
        names = list(fns)
        for r in range(self.repeats):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                times[name].append(self.time_one(fns[name]))
        return {k: statistics.median(v) for k, v in times.items()}

    def time_one(self, fn: Callable[[], Any]) -> float:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def fresh_compiles() -> None:
    """Each measured size gets its own static compile, as a fixed-shape training run does."""
    torch._dynamo.reset()


def qkv(sizes: Sizes, device: torch.device, dtype: torch.dtype, heads: int | None = None) -> list[torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    shape = (sizes.batch, heads or sizes.heads, sizes.seq, sizes.head_dim)
    return [torch.randn(shape, device=device, dtype=dtype, generator=g).requires_grad_() for _ in range(3)]


def fwd_bwd(fn: Callable[..., torch.Tensor], *args: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        out = fn(*args)
        out.backward(torch.ones_like(out))

    return step


KERNELS: dict[str, Callable[..., torch.Tensor]] = {
    "flex": lambda q, k, v, w: attn_mod.flex_local_attention(q, k, v, w, True),
    "blocked": lambda q, k, v, w: attn_mod.blocked_local_attention(q, k, v, w, True),
}


def local_kernel(q: torch.Tensor) -> Callable[..., torch.Tensor]:
    """The causal local path HybridAttention picks for these inputs (`local_kernel_for`)."""
    return KERNELS[attn_mod.local_kernel_for(q)]


def sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def bench_kernel(
    sizes: Sizes,
    timer: Timer,
    dtype: torch.dtype,
    windows: tuple[int, ...],
    reset: bool = True,
    kernels: tuple[str, ...] = ("flex",),
) -> dict[str, float]:
    """fwd+bwd ms of SDPA causal and of each kernel's band at each window ("<kernel>_w<w>")."""
    if reset:
        fresh_compiles()
    q, k, v = qkv(sizes, timer.device, dtype)
    fns = {"sdpa_causal": fwd_bwd(sdpa_causal, q, k, v)}
    for kernel in kernels:
        for w in windows:
            fns[f"{kernel}_w{w}"] = fwd_bwd(lambda a, b, c, w=w, f=KERNELS[kernel]: f(a, b, c, w), q, k, v)
    return timer.medians(fns)


def run_sweep(sizes: Sizes, timer: Timer, dtype: torch.dtype) -> attn_mod.FlexConfig:
    """Time the band at windows 128 and 2048 under each tiling; return the fastest at 128."""
    best: tuple[float, attn_mod.FlexConfig] | None = None
    print("\n== sweep: FlexAttention tilings (kernel alone, fwd+bwd, ms; ratio to SDPA causal) ==", flush=True)
    for q_block, kv_block, options in SWEEP:
        cfg = attn_mod.FlexConfig(q_block, kv_block, tuple(sorted(options)))
        flex_mod.set_flex_config(cfg)
        t0 = time.perf_counter()
        try:
            fresh_compiles()
            err = band_error(sizes, timer.device, dtype)  # compiles the bench's shape
            ms = bench_kernel(sizes, timer, dtype, (128, 2048), reset=False)
        except Exception as e:  # a tiling the installed torch rejects: report, try the next
            print(f"  {q_block}x{kv_block} {dict(options)}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        r128, r2048 = ms["flex_w128"] / ms["sdpa_causal"], ms["flex_w2048"] / ms["sdpa_causal"]
        print(
            f"  {q_block}x{kv_block} {dict(options)}: sdpa {ms['sdpa_causal']:.3f}  w128 {ms['flex_w128']:.3f} "
            f"({r128:.3f})  w2048 {ms['flex_w2048']:.3f} ({r2048:.3f})  rel.err out/grads {err:.1e}  "
            f"[{time.perf_counter() - t0:.0f} s]",
            flush=True,
        )
        if err > 2e-2:
            print("    rejected: wrong result", flush=True)
            continue
        if best is None or ms["flex_w128"] < best[0]:
            best = (ms["flex_w128"], cfg)
    if best is None:
        raise SystemExit("sweep: every tiling failed")
    print(f"  chosen: {best[1]}", flush=True)
    return best[1]


def band_error(sizes: Sizes, device: torch.device, dtype: torch.dtype) -> float:
    """Worst relative error (output and q, k, v gradients) of the FlexAttention band at
    windows 128 and 333 against SDPA with a boolean band mask, on the benchmark's sizes."""
    q, k, v = qkv(sizes, device, dtype)
    t = torch.arange(sizes.seq, device=device)
    rel = t[:, None] - t[None, :]
    worst = 0.0
    for w in (128, 333):
        mask = (rel >= 0) & (rel < w)
        grad = torch.randn_like(q)
        outs = []
        for fn in (
            lambda w=w: attn_mod.flex_local_attention(q, k, v, w, True),
            lambda mask=mask: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        ):
            out = fn()
            outs.append([out.float(), *(g.float() for g in torch.autograd.grad(out, (q, k, v), grad))])
        for got, want in zip(*outs, strict=True):
            worst = max(worst, float((got - want).norm() / want.norm()))
    return worst


def make_module(sizes: Sizes, n_global: int, window: int, device: torch.device, dtype: torch.dtype) -> HybridAttention:
    torch.manual_seed(0)
    d_model = sizes.heads * sizes.head_dim
    rope = RotaryEmbedding(sizes.head_dim, sizes.seq)
    return HybridAttention(d_model, sizes.heads, n_global, True, rope, window).to(device, dtype)


def bench_module(sizes: Sizes, timer: Timer, dtype: torch.dtype) -> dict[str, float]:
    # same q, k, v shape as the kernel section: its compiled kernel serves
    d_model = sizes.heads * sizes.head_dim
    g = torch.Generator(device=timer.device).manual_seed(1)
    x = torch.randn(sizes.batch, sizes.seq, d_model, device=timer.device, dtype=dtype, generator=g)
    x.requires_grad_()
    fns = {}
    for name, window in (("w128", 128), ("w2048", 2048), ("full", sizes.seq)):
        fns[name] = fwd_bwd(make_module(sizes, 0, window, timer.device, dtype), x)
    return timer.medians(fns)


def bench_hybrid(sizes: Sizes, timer: Timer, dtype: torch.dtype) -> dict[str, float]:
    """The module's attention with 4 global + 12 local heads against the two parts apart."""
    fresh_compiles()
    n_global = sizes.heads // 4
    attn = make_module(sizes, n_global, 128, timer.device, dtype)
    q, k, v = qkv(sizes, timer.device, dtype)
    glob_q, glob_k, glob_v = (t[:, :n_global] for t in (q, k, v))  # the same views the module uses
    loc_q, loc_k, loc_v = (t[:, n_global:] for t in (q, k, v))
    local = local_kernel(loc_q)
    fns = {
        "hybrid": fwd_bwd(attn._attend, q, k, v),
        "global_part": fwd_bwd(sdpa_causal, glob_q, glob_k, glob_v),
        "local_part": fwd_bwd(lambda a, b, c: local(a, b, c, 128), loc_q, loc_k, loc_v),
    }
    return timer.medians(fns)


def model_config(sizes: Sizes, window: int) -> ModelConfig:
    return ModelConfig(
        arch="decoder",
        vocab_size=256,
        d_model=sizes.d_model,
        n_layers=sizes.n_layers,
        n_heads=sizes.model_heads,
        n_global_heads=sizes.model_global,
        max_seq_len=sizes.model_seq,
        window=window,
    )


class ModelStep:
    """One train step as `TrainingRun.train_step` does it: forward (bf16 autocast on CUDA),
    cross-entropy, backward, AdamW step, `loss.item()`, then `apply_knobs(next knobs)`."""

    def __init__(
        self, sizes: Sizes, window: int, device: torch.device, knobs: Callable[[int], Knobs] | None = None
    ) -> None:
        torch.manual_seed(0)
        self.model = build_model(model_config(sizes, window)).to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        g = torch.Generator().manual_seed(0)
        data = torch.randint(0, 256, (sizes.model_batch, sizes.model_seq + 1), generator=g).to(device)
        self.tokens, self.targets = data[:, :-1], data[:, 1:]
        self.device, self.knobs, self.i = device, knobs, 0

    def __call__(self) -> None:
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            logits = self.model(self.tokens)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), self.targets.reshape(-1))
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        float(loss.item())
        self.i += 1
        if self.knobs is not None:
            self.model.apply_knobs(self.knobs(self.i))


def bench_model(sizes: Sizes, timer: Timer) -> dict[str, float]:
    fresh_compiles()
    w = min(256, sizes.model_seq // 2)
    fns = {f"w{w}": ModelStep(sizes, w, timer.device), "full": ModelStep(sizes, sizes.model_seq, timer.device)}
    w2 = min(1024, 3 * sizes.model_seq // 4)
    fns[f"w{w2}"] = ModelStep(sizes, w2, timer.device)
    return timer.medians(fns)


def bench_knobs(sizes: Sizes, timer: Timer) -> tuple[dict[str, float], dict[str, int]]:
    # same shapes as the model section: its compiled kernels serve (a recompile would show)
    w = min(256, sizes.model_seq // 2)
    base = 10_000.0
    movers: dict[str, Callable[[int], Knobs] | None] = {
        "fixed": None,
        "fixed_b": None,  # A/A control: the noise of this comparison
        # inside one 64-key tile (w and w+1 share tiles): the window tensor moves, no new mask
        "window_moving": lambda i: Knobs(base, w + i % 2),
        # w <-> w+64 crosses key tiles each step: a block mask per move until both are cached,
        # so also a cold variant that clears the cache each move (a build every step)
        "window_crossing_tiles": lambda i: Knobs(base, w + 64 * (i % 2)),
        "base_moving": lambda i: Knobs(base * (1.01 if i % 2 else 1 / 1.01), w),
        "both_moving": lambda i: Knobs(base * (1.01 if i % 2 else 1 / 1.01), w + i % 2),
    }
    steps = {name: ModelStep(sizes, w, timer.device, mover) for name, mover in movers.items()}
    cold = steps["window_cold_builds"] = ModelStep(sizes, w, timer.device, movers["window_crossing_tiles"])

    def cold_step() -> None:
        cold.model.masks._by_window.clear()
        cold.model.masks._by_tiles.clear()
        cold()

    fns: dict[str, Callable[[], None]] = {name: step for name, step in steps.items()}
    fns["window_cold_builds"] = cold_step
    graphs = dynamo_graphs()
    ms = timer.medians(fns)
    if dynamo_graphs() != graphs:
        print(f"  note: {dynamo_graphs() - graphs} graph(s) compiled during the knob runs", flush=True)
    builds = {name: step.model.masks.builds for name, step in steps.items()}
    return ms, builds


def dynamo_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def profile_kernels(sizes: Sizes, device: torch.device, dtype: torch.dtype, window: int = 128) -> None:
    """Per fwd+bwd at `window`: CUDA-event time against the summed GPU kernel time (the gap
    is launch and host overhead) and the largest kernels, for each kernel."""
    from torch.profiler import ProfilerActivity, profile

    q, k, v = qkv(sizes, device, dtype)
    for kernel in ("flex",):
        step = fwd_bwd(lambda a, b, c, f=KERNELS[kernel]: f(a, b, c, window), q, k, v)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        iters = 10
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            start.record()
            for _ in range(iters):
                step()
            end.record()
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0]
        gpu_us = sum(e.self_device_time_total for e in events) / iters
        print(
            f"  {kernel} w{window}: {start.elapsed_time(end) / iters:.3f} ms per fwd+bwd (events, profiled), "
            f"GPU kernels {gpu_us / 1e3:.3f} ms",
            flush=True,
        )
        for e in sorted(events, key=lambda e: -e.self_device_time_total)[:6]:
            print(f"      {e.self_device_time_total / iters / 1e3:7.3f} ms  x{e.count // iters}  {e.key[:90]}")


def mask_build_ms(sizes: Sizes, device: torch.device, repeats: int = 20) -> float:
    """Host time of one closed-form block-mask build for the model's length (median)."""
    cache = attn_mod.LocalMaskCache()
    times = []
    for i in range(repeats):
        cache._by_window.clear()
        cache._by_tiles.clear()
        t0 = time.perf_counter()
        cache.block_mask(sizes.model_seq, 256 + 64 * (i % 2), True, device)
        times.append((time.perf_counter() - t0) * 1e3)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return statistics.median(times)


def result(name: str, ratio: float) -> str:
    goal = GOALS[name]
    return f"RESULT {name}: ratio={ratio:.3f} goal<={goal} ({'met' if ratio <= goal else 'NOT met'})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny sizes (on CPU: a dry run of the machinery)")
    p.add_argument("--sweep", action="store_true", help="time FlexAttention tilings first and use the fastest")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per variant (>= 10)")
    p.add_argument("--knob-repeats", type=int, default=30, help="timed repeats of the knob-move steps")
    p.add_argument("--profile", action="store_true", help="profile the FlexAttention band at w=128 (CUDA)")
    p.add_argument("--only", default="", help="comma list of sections: kernel,module,hybrid,model,knobs")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.quick:
        print("bench_gpu: no CUDA device; use --quick for a CPU dry run", file=sys.stderr)
        return 2
    sizes = QUICK if args.quick else Sizes()
    if args.repeats is not None:
        if args.repeats < 10:
            print(f"--repeats: got {args.repeats}, expected >= 10", file=sys.stderr)
            return 2
        sizes.repeats = args.repeats
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    timer = Timer(device, sizes.repeats, sizes.warmup)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (dry run: figures mean nothing)"
    print(
        f"device: {name}; torch {torch.__version__}; dtype {dtype}; repeats {sizes.repeats} (median), "
        f"warm-up {sizes.warmup}; sizes {sizes}",
        flush=True,
    )
    only = set(filter(None, args.only.split(","))) or {"kernel", "module", "hybrid", "model", "knobs"}
    if args.sweep and device.type == "cuda":
        flex_mod.set_flex_config(run_sweep(sizes, timer, dtype))
    print(f"FlexAttention tiling: {flex_mod.FLEX}", flush=True)
    results: list[str] = []
    t_start = time.perf_counter()

    if "kernel" in only:
        kernels = ("flex",) if device.type == "cuda" else ("blocked",)
        ms = bench_kernel(sizes, timer, dtype, (16, 32, 128, 512, 2048), kernels=kernels)
        print(f"\n== kernel alone, T={sizes.seq} B={sizes.batch} H={sizes.heads} D={sizes.head_dim}, fwd+bwd (ms) ==")
        for k, v in ms.items():
            print(f"  {k:<14} {v:8.3f}   {v / ms['sdpa_causal']:.3f} x sdpa_causal")
        probe = torch.zeros(1, 1, 1, sizes.head_dim, device=device, dtype=dtype)
        auto = attn_mod.local_kernel_for(probe)
        results.append(result("kernel_w128_vs_sdpa", ms[f"{auto}_w128"] / ms["sdpa_causal"]))
        if args.profile and device.type == "cuda":
            print("\n== profile ==")
            profile_kernels(sizes, device, dtype)
    if "module" in only:
        ms = bench_module(sizes, timer, dtype)
        print("\n== attention module, all heads local, fwd+bwd (ms) ==")
        for k, v in ms.items():
            print(f"  {k:<14} {v:8.3f}   {v / ms['full']:.3f} x full")
        results.append(result("module_w128_vs_full", ms["w128"] / ms["full"]))
        results.append(result("module_w2048_vs_full", ms["w2048"] / ms["full"]))
    if "hybrid" in only:
        ms = bench_hybrid(sizes, timer, dtype)
        parts = ms["global_part"] + ms["local_part"]
        print(
            f"\n== hybrid mix, {sizes.heads // 4} global + {sizes.heads - sizes.heads // 4} local heads, w=128 (ms) =="
        )
        for k, v in ms.items():
            print(f"  {k:<14} {v:8.3f}")
        print(f"  parts apart    {parts:8.3f}")
        results.append(result("hybrid_vs_parts", ms["hybrid"] / parts))
    if "model" in only:
        ms = bench_model(sizes, timer)
        print(
            f"\n== whole-model train step, T={sizes.model_seq} d={sizes.d_model} L={sizes.n_layers} "
            f"H={sizes.model_heads} ({sizes.model_global} global) B={sizes.model_batch} (ms) =="
        )
        for k, v in ms.items():
            print(f"  {k:<14} {v:8.3f}   {v / ms['full']:.3f} x full")
        w = min(256, sizes.model_seq // 2)
        results.append(result("model_w256_vs_full", ms[f"w{w}"] / ms["full"]))
    if "knobs" in only:
        ms, builds = bench_knobs(sizes, Timer(device, max(args.knob_repeats, sizes.repeats), sizes.warmup))
        print("\n== knob moves every step vs fixed, window 256 (ms per step; block masks built) ==")
        for k, v in ms.items():
            print(f"  {k:<22} {v:8.3f}   {v / ms['fixed']:.3f} x fixed   builds {builds.get(k, '-')}")
        print(f"  one block-mask build (host, T={sizes.model_seq}): {mask_build_ms(sizes, device):.3f} ms")
        aa = ms["fixed_b"] / ms["fixed"]
        if abs(aa - 1) > 0.01:
            print(f"  warning: the A/A control is off by {100 * (aa - 1):+.1f}%: ratios near 1.03 are noise here")
        results.append(result("window_moving_vs_fixed", ms["window_moving"] / ms["fixed"]))
        results.append(result("window_crossing_tiles_vs_fixed", ms["window_crossing_tiles"] / ms["fixed"]))
        results.append(result("base_moving_vs_fixed", ms["base_moving"] / ms["fixed"]))
        results.append(result("both_moving_vs_fixed", ms["both_moving"] / ms["fixed"]))
        print(
            f"  (informational) a cold block-mask build every step: {ms['window_cold_builds'] / ms['fixed']:.3f} x fixed"
        )
    print(
        f"\nbench_gpu: {time.perf_counter() - t_start:.0f} s; device {name}; torch {torch.__version__}; "
        f"tiling {flex_mod.FLEX}; dynamo graphs compiled {dynamo_graphs()}"
    )
    for line in results:
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
