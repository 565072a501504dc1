"""Class-balanced low-shot subsets of a labelled train split (the ImageNet-1% analogue).

Per class, `max(1, floor(fraction * n_c + 0.5))` labels of the n_c train examples of that class,
or exactly `per_class`; drawn without replacement by a torch.Generator seeded with the given
seed, so each seed is reproducible and seeds differ. The probe stage and the val score of the
tuner draw the same subsets for every model.
"""
from __future__ import annotations

import math

import torch

from ijepa.probe_inputs import ProbeError

__all__ = ["lowshot_counts", "lowshot_indices"]


def lowshot_counts(labels: torch.Tensor, fraction: float | None = None,
                   per_class: int | None = None) -> dict[int, int]:
    """Labels to take per class: `per_class`, else max(1, floor(fraction * n_c + 0.5))."""
    classes, counts = torch.unique(labels.long(), return_counts=True)
    out = {}
    for c, n in zip(classes.tolist(), counts.tolist()):
        if per_class is not None:
            if per_class > n:
                raise ProbeError(f"lowshot_per_class={per_class} but class {c} has only {n} train examples")
            out[c] = per_class
        else:
            if fraction is None:
                raise ValueError("lowshot_counts needs fraction or per_class")
            out[c] = min(n, max(1, math.floor(fraction * n + 0.5)))
    return out


def lowshot_indices(labels: torch.Tensor, seed: int, fraction: float | None = None,
                    per_class: int | None = None) -> torch.Tensor:
    """Sorted indices of a class-balanced subset of `labels` (module docstring); same seed, same subset."""
    labels = labels.long()
    gen = torch.Generator().manual_seed(int(seed))
    picks = []
    for c, k in sorted(lowshot_counts(labels, fraction, per_class).items()):
        idx = torch.nonzero(labels == c, as_tuple=True)[0]
        picks.append(idx[torch.randperm(idx.numel(), generator=gen)[:k]])
    return torch.sort(torch.cat(picks)).values
