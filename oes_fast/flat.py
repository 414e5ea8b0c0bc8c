"""The flat parameter space: every parameter of a model, flattened row-major and concatenated
in `model.named_parameters()` order. Masks, logits and the random stream's offsets all live in
it (parameter element j of the flat space draws its Gumbel noise at offset base + j)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn


@dataclass(frozen=True)
class FlatLayout:
    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    offsets: tuple[int, ...]  # start of each parameter in the flat space
    numel: int

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, torch.Size]) -> "FlatLayout":
        names, sizes, offsets, total = [], [], [], 0
        for name, shape in shapes.items():
            shape = torch.Size(shape)
            names.append(name)
            sizes.append(shape)
            offsets.append(total)
            total += shape.numel()
        return cls(tuple(names), tuple(sizes), tuple(offsets), total)

    @classmethod
    def from_model(cls, model: nn.Module) -> "FlatLayout":
        return cls.from_shapes({name: p.shape for name, p in model.named_parameters()})

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate per-parameter tensors (keyed by name) into one flat tensor."""
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise KeyError(f"no tensor for parameter {missing[0]!r}")
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-parameter views into a flat tensor (no copies: gradients flow into `flat`)."""
        if flat.dim() != 1 or flat.numel() != self.numel:
            raise ValueError(f"flat tensor must be 1-D with {self.numel} elements, got shape {tuple(flat.shape)}")
        # one split rather than a narrow per parameter: its backward is a single cat, where
        # each narrow's backward would write a zero-filled flat-sized gradient
        pieces = torch.split(flat, [s.numel() for s in self.shapes])
        return {n: piece.view(s) for n, s, piece in zip(self.names, self.shapes, pieces)}
