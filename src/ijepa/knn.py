"""Weighted k-nearest-neighbour classification on frozen features (cosine similarity).

The cheap monitor of the self-supervised literature (Wu et al. 2018; DINO's evaluation): features
are L2-normalised, each query takes its `k` most similar train features, and each neighbour votes
for its label with weight exp(similarity / temperature). No training, no hyper-parameter search,
so the score can be taken often (along pretraining) and compared across models as it is.

`knn_top1(..., standardise=True)` first standardises every feature dimension with the train
split's statistics, as the linear heads read the features (`ijepa.linear.Normaliser`): a few
high-variance dimensions otherwise dominate the cosine. The probe stage and the probes along
training both score this way, so the same encoder gets the same kind of kNN score from each.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ijepa.linear import Normaliser

__all__ = ["knn_predict", "knn_top1"]

_CHUNK = 1024  # query rows per similarity block: [chunk, N_train] floats stay small


@torch.no_grad()
def knn_predict(train_x: torch.Tensor, train_y: torch.Tensor, query_x: torch.Tensor, *, k: int = 20,
                temperature: float = 0.07, n_classes: int | None = None) -> torch.Tensor:
    """Predicted labels [M] of `query_x` [M, D] from the labelled bank (`train_x` [N, D], `train_y` [N])."""
    if k < 1:
        raise ValueError(f"knn: k must be >= 1, got {k}")
    if not temperature > 0:
        raise ValueError(f"knn: temperature must be > 0, got {temperature}")
    if train_x.ndim != 2 or query_x.ndim != 2 or train_x.shape[1] != query_x.shape[1]:
        raise ValueError(f"knn: features must be [N, D] and [M, D], got {tuple(train_x.shape)} and "
                         f"{tuple(query_x.shape)}")
    if train_x.shape[0] == 0 or train_x.shape[0] != train_y.shape[0]:
        raise ValueError(f"knn: {train_x.shape[0]} train features for {train_y.shape[0]} labels")
    train_y = train_y.long()
    classes = int(n_classes if n_classes is not None else int(train_y.max()) + 1)
    k = min(k, train_x.shape[0])
    bank = F.normalize(train_x.float(), dim=1)
    out = []
    for q in query_x.float().split(_CHUNK):
        sim, idx = (F.normalize(q, dim=1) @ bank.T).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], classes)
        votes.scatter_add_(1, train_y[idx], (sim / temperature).exp())
        out.append(votes.argmax(dim=1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def knn_top1(train_x: torch.Tensor, train_y: torch.Tensor, query_x: torch.Tensor, query_y: torch.Tensor, *,
             k: int = 20, temperature: float = 0.07, n_classes: int | None = None,
             standardise: bool = False) -> float:
    """Top-1 accuracy of `knn_predict` on the labelled queries; `standardise`: per-dimension
    standardisation with the train features' statistics first (module docstring)."""
    if query_y.numel() == 0:
        raise ValueError("knn: no query labels")
    if standardise:
        norm = Normaliser.fit(train_x)
        train_x, query_x = norm(train_x), norm(query_x)
    pred = knn_predict(train_x, train_y, query_x, k=k, temperature=temperature, n_classes=n_classes)
    return float((pred == query_y.long()).float().mean())
