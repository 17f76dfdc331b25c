"""Bootstrap resamples re-derive pooled statistics exactly (lensdyn.resampling) and each analysis's resample agrees."""
import numpy as np
import pytest
import torch

from lensdyn.ops import aggregate_ratio
from lensdyn.resampling import CovarianceMoments, pooled_ratio, prompt_counts, ratio_parts, resampled_tokens


@pytest.fixture
def clouds():
    g = torch.Generator().manual_seed(0)
    scale = torch.linspace(4.0, 0.1, 16, dtype=torch.float64)
    vectors = torch.randn(2, 90, 16, generator=g, dtype=torch.float64) * scale
    owners = np.sort(np.random.default_rng(0).integers(0, 7, 90))
    return vectors, owners


@pytest.mark.parametrize("aggregation", ["ratio_of_means", "mean_of_ratios"])
def test_pooled_ratio_equals_aggregate_ratio_on_the_drawn_tokens(aggregation):
    rng = np.random.default_rng(1)
    num, den = rng.uniform(0.5, 2, (3, 40)), rng.uniform(0.5, 2, (3, 40))
    owners = np.sort(rng.integers(0, 5, 40))
    parts = ratio_parts(num, den, owners, 5, aggregation)
    for _ in range(5):
        counts = prompt_counts(rng, 5)
        drawn = resampled_tokens(owners, counts)
        brute = aggregate_ratio(torch.from_numpy(num[:, drawn]), torch.from_numpy(den[:, drawn]), aggregation).numpy()
        assert pooled_ratio(parts[0], parts[1], counts) == pytest.approx(brute, rel=1e-12)


def test_participation_ratio_of_a_resample_equals_the_dense_eigendecomposition(clouds):
    vectors, owners = clouds
    moments = CovarianceMoments.from_tokens(vectors, owners, 7, rank=4)
    rng = np.random.default_rng(2)
    for _ in range(4):
        counts = prompt_counts(rng, 7)
        drawn = resampled_tokens(owners, counts)
        for state in range(2):
            x = vectors[state, drawn]
            x = x - x.mean(dim=0)
            lam = torch.linalg.eigvalsh(x.T @ x).numpy()
            assert moments.participation_ratio(counts)[state] == pytest.approx(lam.sum() ** 2 / (lam**2).sum(), rel=1e-9)


def test_ritz_overlap_is_near_the_exact_overlap(clouds):
    """Rayleigh-Ritz in the span of the data's top directions: near, not exact (a stated approximation)."""
    vectors, owners = clouds
    moments = CovarianceMoments.from_tokens(vectors, owners, 7, rank=8)
    counts = np.ones(7, dtype=np.int64)

    def top(x, k):
        x = x - x.mean(dim=0)
        return torch.linalg.eigh(x.T @ x)[1][:, -k:]

    exact = float(((top(vectors[0], 3).T @ top(vectors[1], 3)) ** 2).sum() / 3)
    assert moments.subspace_overlap(counts, 3)[0, 1] == pytest.approx(exact, abs=1e-6)  # the data: its own span


@pytest.mark.slow
def test_each_resample_with_every_prompt_once_reproduces_the_claims(smollm2, smollm2_diverse):
    """A resample that draws every prompt once is the data: each claim reads the same value."""
    from lensdyn.analyses import curvature, expansion, gains, metastability

    cap = smollm2_diverse
    results = [expansion.measure(cap, model=smollm2, control=None, n_permutations=20), gains.measure(cap, control=None),
               metastability.measure(cap, model=smollm2, control=None, repeated=False)]

    class Identity(np.random.Generator):
        """A generator whose multinomial draw is every prompt once."""

        def multinomial(self, n, pvals):
            return np.ones(len(pvals), dtype=np.int64)

    for result in results:
        again = result.resample(Identity(np.random.PCG64(0)))
        for claim in type(result).claims:
            assert claim.test(again)[0] == claim.test(result)[0], claim.claim
    assert curvature.null_p_value(np.array([1.0, 2.0]), 1.5) == pytest.approx(2 / 3)
