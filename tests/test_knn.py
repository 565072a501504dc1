import pytest
import torch

from ijepa.knn import knn_predict, knn_top1


def _clusters(n_per: int, dims: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.eye(dims)[:3] * 5.0
    x = torch.cat([c + torch.randn(n_per, dims, generator=gen) for c in centres])
    y = torch.arange(3).repeat_interleave(n_per)
    return x, y


def test_separable_clusters_are_classified():
    tx, ty = _clusters(40, 8, 0)
    qx, qy = _clusters(20, 8, 1)
    assert knn_top1(tx, ty, qx, qy, k=5) == 1.0
    # shuffled labels carry no information: far below perfect
    perm = torch.randperm(ty.numel(), generator=torch.Generator().manual_seed(2))
    assert knn_top1(tx, ty[perm], qx, qy, k=5) < 0.7


def test_cosine_ignores_feature_scale():
    tx, ty = _clusters(30, 6, 0)
    qx, _ = _clusters(10, 6, 1)
    scaled = tx * torch.linspace(0.1, 10.0, tx.shape[0])[:, None]  # each train row rescaled
    assert torch.equal(knn_predict(tx, ty, qx, k=7), knn_predict(scaled, ty, qx, k=7))


def test_k1_is_the_nearest_neighbour_and_weights_favour_close_votes():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[1.0, 0.05]])
    assert knn_predict(bank, labels, query, k=1).tolist() == [0]
    # k=3: two far votes for class 1 against one near vote for class 0; at a low temperature the
    # near one wins, at a high one (near-uniform weights) the majority wins
    assert knn_predict(bank, labels, query, k=3, temperature=0.05).tolist() == [0]
    assert knn_predict(bank, labels, query, k=3, temperature=100.0).tolist() == [1]


def test_k_larger_than_the_bank_and_chunked_queries():
    tx, ty = _clusters(2, 4, 0)  # 6 train rows
    qx, qy = _clusters(700, 4, 1)  # 2,100 queries: more than one similarity block
    assert knn_top1(tx, ty, qx, qy, k=50) > 0.9


@pytest.mark.parametrize("kwargs, match", [({"k": 0}, "k must be"), ({"temperature": 0.0}, "temperature")])
def test_bad_parameters_are_named(kwargs, match):
    tx, ty = _clusters(5, 4, 0)
    with pytest.raises(ValueError, match=match):
        knn_predict(tx, ty, tx, **kwargs)


def test_mismatched_shapes_are_refused():
    tx, ty = _clusters(5, 4, 0)
    with pytest.raises(ValueError, match=r"\[N, D\] and \[M, D\]"):
        knn_predict(tx, ty, torch.zeros(3, 5))
    with pytest.raises(ValueError, match="labels"):
        knn_predict(tx, ty[:-1], tx)


def test_standardise_keeps_loud_noise_dimensions_from_drowning_the_signal():
    # three clusters in 8 dims, plus 8 dimensions of pure noise 10x louder than the clusters'
    # spread: the raw cosine is ruled by the noise; standardised with the train statistics,
    # every dimension counts alike and the clusters' separation shows again
    tx, ty = _clusters(60, 8, 0)
    qx, qy = _clusters(30, 8, 1)
    gen = torch.Generator().manual_seed(3)
    loud = lambda x: torch.cat([x, 10.0 * torch.randn(x.shape[0], 8, generator=gen)], dim=1)
    tx, qx = loud(tx), loud(qx)
    raw = knn_top1(tx, ty, qx, qy, k=5)
    assert raw < 0.6
    assert knn_top1(tx, ty, qx, qy, k=5, standardise=True) > 0.9
