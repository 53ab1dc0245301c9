"""The Shapley estimator on toy games whose exact values are known by enumeration."""

from __future__ import annotations

import pytest
import torch

from trojanprune.errors import ConfigError
from trojanprune.shapley import estimate_shapley, exact_shapley

WEIGHTS = torch.tensor([3.0, 1.0, 0.5, 0.0, -1.0, 2.0], dtype=torch.float64)


def toy_game(keep: torch.Tensor) -> torch.Tensor:
    """6 players with additive parts and interactions (pairs and a triple), one negative."""
    k = keep.double()
    return (k @ WEIGHTS + 4.0 * k[:, 0] * k[:, 1] - 2.0 * k[:, 2] * k[:, 4]
            + 3.0 * k[:, 5] * k[:, 0] * k[:, 3])


def test_exact_shapley_by_hand():
    exact = exact_shapley(toy_game, 6)
    # interactions split evenly: 0 gets 3 + 4/2 + 3/3, 4 gets -1 - 2/2, ...
    assert exact.tolist() == pytest.approx([6.0, 3.0, -0.5, 1.0, -2.0, 3.0])
    # efficiency: the values add up to v(all) - v(none)
    ends = toy_game(torch.tensor([[True] * 6, [False] * 6]))
    assert float(exact.sum()) == pytest.approx(float(ends[0] - ends[1]))


def test_plain_permutation_sampling_matches_exact():
    exact = exact_shapley(toy_game, 6)
    est = estimate_shapley(toy_game, 6, permutations=3000, truncation_tol=0, discard=None,
                           epsilon=None, seed=0)
    assert (est.values - exact).abs().max() < 0.1
    # plain sampling evaluates every inner coalition of every permutation
    assert est.evaluations == est.evaluations_plain == 2 + 3000 * 5
    assert est.counts.tolist() == [3000] * 6 and est.truncated == 0
    assert est.ranking()[0] == 0


@pytest.mark.parametrize("greedy_rank", ["mean", "ucb"])
def test_accelerated_estimate_keeps_the_top_players_right(greedy_rank):
    exact = exact_shapley(toy_game, 6)
    est = estimate_shapley(toy_game, 6, permutations=3000, truncation_tol=0, discard="auto",
                           epsilon=0.2, top_k=2, warmup=30, greedy_rank=greedy_rank, seed=0)
    top = exact.argsort(descending=True)[:2]
    assert set(est.ranking()[:2].tolist()) == set(top.tolist())
    assert (est.values[top] - exact[top]).abs().max() < 0.2
    # the accelerations spend fewer evaluations, mostly on the top players
    assert est.evaluations < 0.8 * est.evaluations_plain
    assert est.counts[top].min() > est.counts[exact.argsort()[:2]].max()


def redundant_game(n: int = 60, key=(5, 20, 41)):
    """A backdoor-like game: a big effect while at least 2 of 3 key players remain, plus small
    additive noise for everybody. Shapley values: 5/3 for each key player, ~noise otherwise."""
    noise = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.01

    def game(keep):
        k = keep.double()
        return (k[:, list(key)].sum(1) >= 2).double() * 5 + k @ noise
    return game, noise


def test_truncation_discarding_and_greedy_save_evaluations_on_a_sparse_game():
    game, _ = redundant_game()
    plain = estimate_shapley(game, 60, permutations=60, truncation_tol=0, discard=None,
                             epsilon=None, seed=1)
    fast = estimate_shapley(game, 60, permutations=60, top_k=5, warmup=8, seed=1)
    for est in (plain, fast):
        assert set(est.ranking()[:3].tolist()) == {5, 20, 41}
        assert est.values[[5, 20, 41]].sum() == pytest.approx(5.0, abs=0.75)
    assert fast.truncated > 0
    assert fast.evaluations < 0.3 * plain.evaluations
    assert fast.evaluations_plain == plain.evaluations_plain
    assert int(fast.active.sum()) < 60  # some players were discarded


def test_numeric_discard_threshold_and_evaluation_cap():
    game, _ = redundant_game()
    est = estimate_shapley(game, 60, permutations=40, discard=0.05, epsilon=None, warmup=5,
                           truncation_tol=0, seed=0)
    assert est.threshold == pytest.approx(0.05 * 5, rel=0.05)
    assert set(torch.nonzero(est.active).flatten().tolist()) >= {5, 20, 41}
    capped = estimate_shapley(game, 60, permutations=40, truncation_tol=0, discard=None,
                              epsilon=None, max_evaluations=300, seed=0)
    assert capped.stopped == "max_evaluations" and capped.evaluations <= 300


def test_bad_arguments():
    with pytest.raises(ConfigError):
        estimate_shapley(toy_game, 0)
    with pytest.raises(ConfigError):
        estimate_shapley(toy_game, 6, epsilon=1.5)
    with pytest.raises(ConfigError):
        estimate_shapley(toy_game, 6, discard="sometimes")
    with pytest.raises(ConfigError):
        estimate_shapley(lambda keep: torch.zeros(1), 6)  # wrong number of values
    with pytest.raises(ConfigError):
        exact_shapley(toy_game, 30)


def test_ucb_rank_also_samples_an_uncertain_player_that_may_belong_to_the_top():
    from trojanprune.shapley import _epsilon_greedy, _upper
    # player 0: mean 1.0 from 3 spread samples (0, 0, 3); players 1-3: 1.1-1.3 known precisely
    total = torch.tensor([3.0, 110.0, 120.0, 130.0], dtype=torch.float64)
    total_sq = torch.tensor([9.0, 121.0, 144.0, 169.0], dtype=torch.float64)
    counts = torch.tensor([3, 100, 100, 100])
    active = torch.ones(4, dtype=torch.bool)
    gen = torch.Generator().manual_seed(0)
    by_mean = _epsilon_greedy(total / counts, active, 2, 0.0, gen)
    by_ucb = _epsilon_greedy(_upper(total, total_sq, counts, 2.0), active, 2, 0.0, gen)
    assert torch.nonzero(by_mean).flatten().tolist() == [2, 3]
    assert 0 in torch.nonzero(by_ucb).flatten().tolist()
    with pytest.raises(ConfigError, match="greedy_rank"):
        estimate_shapley(toy_game, 6, greedy_rank="best")
