"""The honest eviction ratio every evicting policy reports (H2O and the hf runtime's presses alike)."""

from __future__ import annotations


class HeldRatio:
    """Accumulates, over the decode steps, the tokens a full cache would hold (every token seen) and the tokens
    each layer really holds during that step's attention; ``lossy`` is their ratio over ``layers`` (the evicting
    layers), ``lossy_model`` over every layer. Token counts stand for bytes: every token of a model has the same
    size, so the ratios are those of fp16 bytes (original-runtime.md §7.2, measured on what is held)."""

    def __init__(self, layers: range) -> None:
        self.layers = layers
        self.reset()

    def reset(self) -> None:
        self._full = self._held = self._model_full = self._model_held = 0

    def sample(self, layer: int, seen: int, held: int) -> None:
        """One decode step of ``layer``: ``seen`` tokens so far, ``held`` of them in the cache (its widest head)."""
        self._model_full += seen
        self._model_held += held
        if layer in self.layers:
            self._full += seen
            self._held += held

    @property
    def lossy(self) -> float:
        return self._full / self._held if self._held else 1.0

    @property
    def lossy_model(self) -> float:
        return self._model_full / self._model_held if self._model_held else 1.0
