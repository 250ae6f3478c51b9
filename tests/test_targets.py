"""Stored fields -> teacher distributions must be exact against a dense softmax."""

import numpy as np
import pytest
import torch

from softlabels.errors import InvalidTargetsError
from softlabels.targets import (
    ground_truth_distribution,
    similarity_distribution,
    summarize_logits,
    tail_mass,
    temperature_index,
    topk_distribution,
    uniform_label_smoothing,
)

TEMPS = (1.0, 2.0, 4.0, 8.0)


def _logits(seed: int, n: int = 64, c: int = 37, scale: float = 4.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g, dtype=torch.float64).float() * scale


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("temperature", TEMPS)
def test_full_k_is_exactly_the_dense_softmax(seed, temperature):
    z = _logits(seed)
    f = summarize_logits(z, k=z.shape[1], temperatures=TEMPS)
    t = temperature_index(TEMPS, temperature)
    dist = topk_distribution(f["topk_values"], f["topk_indices"], f["logsumexp"][:, t], temperature, z.shape[1])
    dense = torch.softmax(z.double() / temperature, dim=-1)
    assert torch.allclose(dist.double(), dense, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("k", [1, 3, 10])
@pytest.mark.parametrize("temperature", TEMPS)
def test_topk_probabilities_are_exact_and_tail_is_uniform(k, temperature):
    z = _logits(7)
    c = z.shape[1]
    f = summarize_logits(z, k=k, temperatures=TEMPS)
    lse = f["logsumexp"][:, temperature_index(TEMPS, temperature)]
    dist = topk_distribution(f["topk_values"], f["topk_indices"], lse, temperature, c)
    dense = torch.softmax(z.double() / temperature, dim=-1)
    top_idx = torch.topk(z, k, dim=-1).indices
    # the kept classes carry exactly the teacher's probability (no renormalisation)
    assert torch.allclose(dist.gather(1, top_idx).double(), dense.gather(1, top_idx), atol=1e-6)
    # the tail is the exact missing mass, spread uniformly
    missing = 1 - dense.gather(1, top_idx).sum(1)
    mask = torch.ones_like(dist, dtype=torch.bool).scatter_(1, top_idx, False)
    tail = dist[mask].view(z.shape[0], c - k).double()
    assert torch.allclose(tail, (missing / (c - k)).unsqueeze(1).expand_as(tail), atol=1e-6)
    assert torch.allclose(dist.sum(1).double(), torch.ones(z.shape[0], dtype=torch.float64), atol=1e-5)
    assert torch.allclose(tail_mass(f["topk_values"], lse, temperature).double(), missing, atol=1e-6)


@pytest.mark.parametrize("temperature", TEMPS)
def test_ground_truth_distribution_is_exact(temperature):
    z = _logits(3)
    c = z.shape[1]
    labels = torch.randint(0, c, (z.shape[0],), generator=torch.Generator().manual_seed(0))
    f = summarize_logits(z, k=2, temperatures=TEMPS, labels=labels)
    lse = f["logsumexp"][:, temperature_index(TEMPS, temperature)]
    dist = ground_truth_distribution(f["label_logit"], lse, labels, temperature, c)
    p_y = torch.softmax(z.double() / temperature, -1).gather(1, labels[:, None]).squeeze(1)
    assert torch.allclose(dist.gather(1, labels[:, None]).squeeze(1).double(), p_y, atol=1e-6)
    others = (1 - p_y) / (c - 1)
    row = dist[0].double().clone()
    row[labels[0]] = others[0]
    assert torch.allclose(row, others[0].expand(c), atol=1e-6)
    assert torch.allclose(dist.sum(1), torch.ones(z.shape[0]), atol=1e-5)


def test_float16_values_stay_close():
    """fp16 storage (the default) of *normalised* logits: rounding error scales with |log p|,
    so probabilities stay within 2e-4 absolute even for peaked teachers (measured: 1.8e-4)."""
    z = _logits(5, c=1000, scale=12.0)
    f = summarize_logits(z, k=5, temperatures=TEMPS)
    v16 = f["topk_values"].half()
    for j, t in enumerate(TEMPS):
        exact = topk_distribution(f["topk_values"], f["topk_indices"], f["logsumexp"][:, j], t, z.shape[1])
        approx = topk_distribution(v16, f["topk_indices"], f["logsumexp"][:, j], t, z.shape[1])
        assert (approx - exact).abs().max() < 2.5e-4


def test_similarity_and_label_smoothing():
    w = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 5, 2])
    sim = similarity_distribution(w, labels, rho=1.0, temperature=1.0)
    wn = torch.nn.functional.normalize(w, dim=1)
    assert torch.allclose(sim, torch.softmax((wn @ wn.T)[labels], -1), atol=1e-6)
    assert sim.argmax(1).tolist() == labels.tolist()  # a class is most similar to itself
    ls = uniform_label_smoothing(labels, 6, 0.1)
    assert torch.allclose(ls[0], torch.tensor([0.9 + 0.1 / 6] + [0.1 / 6] * 5))


def test_errors_are_clear():
    z = _logits(0, c=5)
    with pytest.raises(InvalidTargetsError, match=r"k=6 is outside 1\.\.5"):
        summarize_logits(z, k=6, temperatures=TEMPS)
    z[3, 2] = float("nan")
    with pytest.raises(InvalidTargetsError, match="NaN/inf logits for 1 sample"):
        summarize_logits(z, k=2, temperatures=TEMPS)
    with pytest.raises(InvalidTargetsError, match=r"temperature 3 is not in the store's grid \[1,2,4,8\]"):
        temperature_index(TEMPS, 3.0)
    assert temperature_index(TEMPS, 4) == 2
    assert np.isclose(TEMPS[temperature_index(TEMPS, 8.0)], 8.0)


def test_fast_paths_give_the_bits_of_the_plain_computation():
    """summarize_logits skips isfinite(z).all() when z.sum() is finite and z / 1.0 at T = 1:
    the stored fields must stay bit for bit those of the plain formulas (stores are compared
    byte for byte across versions), and huge but finite logits must still pass."""
    z = _logits(3, n=300, c=1000)
    z[0, :4] = 3e38  # finite logits whose sum overflows: the exact check must run, and pass
    got = summarize_logits(z, k=10, temperatures=TEMPS)
    norm = z - torch.logsumexp(z, dim=-1, keepdim=True)
    values, indices = torch.topk(norm, 10, dim=-1)
    lse = torch.stack([torch.logsumexp(norm / t, dim=-1) for t in TEMPS], dim=-1)
    for name, want in (("topk_values", values), ("topk_indices", indices), ("logsumexp", lse)):
        assert torch.equal(got[name], want), name
    z[5, 7] = float("inf")
    with pytest.raises(InvalidTargetsError, match="NaN/inf logits for 1 sample"):
        summarize_logits(z, k=2, temperatures=TEMPS)
