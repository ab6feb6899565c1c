"""What the ratio profile needs to know about a model's rotary position embedding (RoPE) to predict a
K row from an earlier one: K rows are stored after RoPE, so one token's K at two positions differs by a
rotation through the position difference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class RopeSpec:
    """A model's RoPE: ``theta`` (the frequency base, ``rope_theta``; 10000.0 in LLaMA, 100000.0 in
    SmolLM2) and ``layout``: ``"half"`` (rotate-half, the transformers/LLaMA convention: dim ``i`` pairs
    with ``i + head_dim/2``) or ``"interleaved"`` (dim ``2i`` pairs with ``2i + 1``, GPT-J style).

    Raises ``ValueError`` for a theta that is not a finite number > 1 or an unknown layout.
    """

    theta: float
    layout: Literal["half", "interleaved"] = "half"

    def __post_init__(self) -> None:
        if not (isinstance(self.theta, (int, float)) and 1.0 < float(self.theta) < float("inf")):
            raise ValueError(f"RoPE theta must be a finite number > 1, got {self.theta!r}")
        if self.layout not in ("half", "interleaved"):
            raise ValueError(f"RoPE layout must be 'half' or 'interleaved', got {self.layout!r}")


def model_rope(theta: float | None) -> RopeSpec | None:
    """The rotate-half RoPE of a model whose config gives ``theta`` (our loader's LlamaConfig and transformers'
    LLaMA-family models use rotate-half), or None where there is no usable theta (then no RoPE matching)."""
    try:
        return RopeSpec(float(theta)) if theta is not None else None
    except (TypeError, ValueError):
        return None
