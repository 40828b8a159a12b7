"""FlexAttention for the local heads on CUDA: closed-form band block masks, one cache per model.

The band's block mask is built from tile indices (`band_block_bounds`, `band_block_mask`),
one per window tiling for the whole model (`LocalMaskCache`); the window lives in a 0-d
tensor the mask function reads, so moving it recompiles nothing. `local_kernel_for` picks
this path or the blocked band (`metalearner.model.band`); `set_flex_config` chooses the
tiling (the GPU benchmark tunes it).

Imports torch only; must not import ray, mlflow or anything above the model layer.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

try:  # FlexAttention is optional: used only on CUDA.
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - depends on the torch build
    BlockMask = None
    flex_attention = None

__all__ = [
    "FLEX_DEVICES",
    "FlexConfig",
    "LocalMaskCache",
    "band_block_bounds",
    "band_block_mask",
    "band_mask_mod",
    "flex_local_attention",
    "local_kernel_for",
    "set_flex_config",
]


# Devices whose local heads go through FlexAttention (tests add "cpu" for no-grad checks;
# FlexAttention has no CPU backward).
FLEX_DEVICES: tuple[str, ...] = ("cuda",)


def local_kernel_for(q: torch.Tensor, use_flex: bool = True) -> str:
    """The local path for these inputs: "flex" (CUDA, head size a power of two >= 16) or
    "blocked"."""
    d = q.shape[-1]
    flex_ok = (
        use_flex
        and flex_attention is not None
        and d >= 16
        and d & (d - 1) == 0
        and q.device.type in FLEX_DEVICES
        and (q.device.type == "cuda" or not torch.is_grad_enabled())
    )
    return "flex" if flex_ok else "blocked"


@dataclass(frozen=True)
class FlexConfig:
    """Tiling of the local band for FlexAttention.

    Args:
        q_block: query rows per block-mask tile (a multiple of `kv_block`).
        kv_block: key columns per block-mask tile. A causal window w touches about
            ceil(w / kv_block) + q_block / kv_block tiles per query tile; the tiles wholly
            inside the band are "full" and skip the mask function.
        kernel_options: FlexAttention `kernel_options` as sorted (name, value) pairs, e.g.
            (("BLOCK_M", 64), ("BLOCK_N", 64)); empty = its defaults.
    """

    q_block: int = 128
    kv_block: int = 128
    kernel_options: tuple[tuple[str, Any], ...] = ()

    def validate(self) -> FlexConfig:
        for name in ("q_block", "kv_block"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 16 or value & (value - 1):
                raise ValueError(f"{name}: got {value!r}, expected a power of two >= 16")
        if self.q_block % self.kv_block:
            raise ValueError(f"q_block: got {self.q_block}, expected a multiple of kv_block={self.kv_block}")
        return self


FLEX = FlexConfig()


def set_flex_config(config: FlexConfig) -> None:
    """Choose the band's tiling and kernel options for every later FlexAttention call."""
    global FLEX
    FLEX = config.validate()


def band_block_bounds(
    seq_len: int, window: int, causal: bool, q_block: int, kv_block: int
) -> tuple[list[int], list[int], list[int], list[int]]:
    """Per query tile n, the key tiles the band touches, [lo, hi], and those wholly inside
    it for every query of the tile, [full_lo, full_hi] (empty when full_lo > full_hi).

    Closed form, no T x T mask: query tile n holds t in [t0, t1], the band of t is
    [t - w + 1, t] (causal) or [t - w + 1, t + w - 1]. Tiles reaching past T are partial.
    """
    n_q = -(-seq_len // q_block)
    last_full_tile = seq_len // kv_block - 1  # key tiles inside T
    reach = 0 if causal else window - 1  # how far right of t the band goes
    lo, hi, flo, fhi = [], [], [], []
    for n in range(n_q):
        t0, t1 = n * q_block, min(seq_len, (n + 1) * q_block) - 1
        lo.append(max(0, t0 - window + 1) // kv_block)
        hi.append(min(seq_len - 1, t1 + reach) // kv_block)
        # tile j is full iff j*kv >= t1 - w + 1 and (j+1)*kv - 1 <= t0 + reach
        flo.append(max(0, -(-(t1 - window + 1) // kv_block)))
        fhi.append(min((t0 + reach + 1) // kv_block - 1, last_full_tile))
    return lo, hi, flo, fhi


def band_block_mask(
    seq_len: int,
    window: int,
    causal: bool,
    mask_mod: Callable[..., Any],
    device: torch.device,
    q_block: int,
    kv_block: int,
) -> Any:
    """The band's BlockMask, built from tile indices (`BlockMask.from_kv_blocks`).

    Partial tiles (band edges, the diagonal, tiles past T) run `mask_mod`; full tiles
    skip it. Returns a BlockMask on `device` with broadcast batch and head dimensions.
    """
    assert BlockMask is not None
    lo, hi, flo, fhi = (
        torch.tensor(x, dtype=torch.int32) for x in band_block_bounds(seq_len, window, causal, q_block, kv_block)
    )
    n_kv = -(-seq_len // kv_block)
    j = torch.arange(n_kv, dtype=torch.int32).view(1, -1)
    touched = (j >= lo[:, None]) & (j <= hi[:, None])
    full = (j >= flo[:, None]) & (j <= fhi[:, None])
    partial = touched & ~full

    def ordered(sel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # selected tiles first, in ascending order; the rest of each row is ignored
        order = torch.argsort((~sel).to(torch.int8), dim=1, stable=True).to(torch.int32)
        return sel.sum(1, dtype=torch.int32)[None, None].to(device), order[None, None].to(device)

    kv_num, kv_idx = ordered(partial)
    full_num, full_idx = ordered(full)
    return BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        full_num,
        full_idx,
        BLOCK_SIZE=(q_block, kv_block),
        mask_mod=mask_mod,
        seq_lengths=(seq_len, seq_len),
    )


def band_mask_mod(window: torch.Tensor, reach: torch.Tensor) -> Callable[..., Any]:
    """FlexAttention mask_mod of the band: key s is seen by query t iff t - s < window and
    s - t < reach (reach 1: causal; reach = window: bidirectional). Both are 0-d tensors
    read by the kernel, so moving the window changes no code and compiles nothing."""

    def band(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> Any:
        rel = q_idx - kv_idx
        return (rel < window) & (-rel < reach)

    return band


class LocalMaskCache:
    """Block masks of the local band, shared by every HybridAttention layer of a model.

    One block mask per (length, window tiling): a window move that stays inside the same
    key tiles only rewrites the window tensor the mask function reads (one in-place fill
    for the whole model); crossing a tile boundary builds one new mask in closed form.
    All layers sharing a cache use one window at a time (`apply_knobs` moves them
    together). Copies and pickles start empty (the tensors are per process and device).
    """

    def __init__(self, max_masks: int = 32) -> None:
        self.max_masks = max_masks
        self.builds = 0  # block masks built so far (tests and benchmarks read it)
        self._tensors: dict[tuple[torch.device, bool], tuple[torch.Tensor, torch.Tensor, Any]] = {}
        self._values: dict[tuple[torch.device, bool], int] = {}
        self._by_window: OrderedDict[tuple[Any, ...], Any] = OrderedDict()
        self._by_tiles: OrderedDict[tuple[Any, ...], Any] = OrderedDict()

    def __getstate__(self) -> dict[str, Any]:
        return {"max_masks": self.max_masks}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["max_masks"])  # type: ignore[misc]

    def block_mask(self, seq_len: int, window: int, causal: bool, device: torch.device) -> Any:
        """The band's BlockMask for these sizes; its mask function sees `window` now."""
        window_t, reach_t, mask_mod = self._mask_tensors(device, causal)
        if self._values.get((device, causal)) != window:  # host-side shadow: no device sync
            window_t.fill_(window)
            if not causal:
                reach_t.fill_(window)
            self._values[(device, causal)] = window
        cfg = FLEX
        key = (device, seq_len, window, causal, cfg.q_block, cfg.kv_block)
        mask = self._by_window.get(key)
        if mask is None:
            bounds = band_block_bounds(seq_len, window, causal, cfg.q_block, cfg.kv_block)
            tiles = (device, seq_len, causal, cfg.q_block, cfg.kv_block, str(bounds))
            mask = self._by_tiles.get(tiles)
            if mask is None:
                mask = band_block_mask(seq_len, window, causal, mask_mod, device, cfg.q_block, cfg.kv_block)
                self.builds += 1
                _put(self._by_tiles, tiles, mask, self.max_masks)
            _put(self._by_window, key, mask, 4 * self.max_masks)
        return mask

    def _mask_tensors(self, device: torch.device, causal: bool) -> tuple[torch.Tensor, torch.Tensor, Any]:
        entry = self._tensors.get((device, causal))
        if entry is None:
            window_t = torch.ones((), dtype=torch.int32, device=device)
            reach_t = torch.ones((), dtype=torch.int32, device=device)
            self._values[(device, causal)] = 1
            entry = (window_t, reach_t, band_mask_mod(window_t, reach_t))
            self._tensors[(device, causal)] = entry
        return entry


def _put(cache: OrderedDict[tuple[Any, ...], Any], key: tuple[Any, ...], value: Any, limit: int) -> None:
    cache[key] = value
    if len(cache) > limit:
        cache.popitem(last=False)


_KERNEL: list[Callable[..., torch.Tensor]] = []


# Compiled entries FlexAttention may need in one process: causal / bidirectional x grad on /
# off x dtype x (static sizes, then symbolic sizes, batch 1 specialised). Bounded, but above
# dynamo's default of 8 for a speech model (encoder + decoder, train + eval); raised for this
# one call only.
FLEX_RECOMPILE_LIMIT = 32


def _flex_kernel() -> Callable[..., torch.Tensor]:
    """The process's one compiled FlexAttention. Dynamo's automatic dynamic shapes: the
    first input shape compiles with static sizes, a second shape recompiles once with
    symbolic sizes, which then serves every later shape (variable speech batches compile a
    bounded number of entries, not one per shape). Moving the window changes only tensor
    values."""
    if not _KERNEL:
        _KERNEL.append(torch.compile(flex_attention, dynamic=None))
    return _KERNEL[0]


def _recompile_limit_patch() -> Any:
    """`torch._dynamo.config.patch` raising the recompile limit to FLEX_RECOMPILE_LIMIT."""
    import torch._dynamo

    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    return config.patch(**{name: max(int(getattr(config, name)), FLEX_RECOMPILE_LIMIT)})


def flex_local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    window: int,
    causal: bool,
    masks: LocalMaskCache | None = None,
) -> torch.Tensor:
    """Sliding-window attention through FlexAttention with a closed-form band block mask.

    Args:
        q, k, v: (B, H, T, D), last dimension contiguous; every head is local.
        window: local width w >= 1.
        causal: causal band t-w < s <= t if True, else |t - s| < w.
        masks: the block-mask cache to use (a model shares one); default a process-wide one.

    Returns:
        (B, H, T, D).
    """
    if window < 1:
        raise ValueError(f"window: got {window!r}, expected an int >= 1")
    masks = masks if masks is not None else _DEFAULT_MASKS
    t = q.shape[2]
    block_mask = masks.block_mask(t, min(int(window), t), causal, q.device)
    kernel = _flex_kernel()
    options = dict(FLEX.kernel_options) or None
    with _recompile_limit_patch():
        out = kernel(q, k, v, block_mask=block_mask, kernel_options=options)
    assert isinstance(out, torch.Tensor)
    return out


_DEFAULT_MASKS = LocalMaskCache()
