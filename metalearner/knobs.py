"""Runtime knobs of a transformer: the RoPE base frequency and the local-attention window.

This module is the bottom layer: plain Python, no torch. Controllers produce `Knobs`; the
model consumes them through `model.apply_knobs(knobs)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Knobs:
    """The two knobs the controllers move between optimizer steps.

    Args:
        rope_base: RoPE base frequency (theta), a positive float.
        window: local (sliding-window) attention width in tokens, an int >= 1. A causal
            local head at query t sees keys t-window+1 .. t.
    """

    rope_base: float
    window: int

    def __post_init__(self) -> None:
        if isinstance(self.window, bool) or not isinstance(self.window, int):
            raise ValueError(f"window: got {self.window!r}, expected an int >= 1")
        if self.window < 1:
            raise ValueError(f"window: got {self.window}, expected an int >= 1")
        base = float(self.rope_base)
        if not math.isfinite(base) or base <= 1.0:
            raise ValueError(f"rope_base: got {self.rope_base!r}, expected a finite float > 1")
        object.__setattr__(self, "rope_base", base)

    def as_dict(self) -> dict[str, float]:
        return {"rope_base": self.rope_base, "window": self.window}
