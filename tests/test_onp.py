"""ONP (Optimized Neuron Pruning): the layer graphs, the PPO agent learning on a real backdoor
(and cutting the true trigger's ASR, which the defense never sees), determinism, the probes,
and bad inputs."""

from __future__ import annotations

import json
import math

import pytest
import torch

import trojanprune as tp
from trojanprune import models
from trojanprune.defenses.base import CleanData
from trojanprune.engine import MaskEvaluator, discover_units
from trojanprune.errors import ConfigError, DataError, TrojanPruneError
from trojanprune.metrics import evaluate
from trojanprune.onp.graphs import (GraphBuildError, build_graphs, channel_weights,
                                    cosine_similarity_matrix)
from trojanprune.onp.probes import PROBES, FeatureTriggerProbe, Probe, create_probe, register_probe
from trojanprune.testing import ONP_FIXTURE_OPTIONS



def _report_flags(monkeypatch, reverse_name: str, classes: list[int]) -> None:
    """Make ``trojanprune.reverse.<reverse_name>`` report ``classes`` as its MAD flags (target:
    the first), the rest of its result real. Which classes a short reverse flags on the fixture
    is borderline and moves with the CPU's floating point; these tests are about what the probes
    do with the flags, so they fix them."""
    import dataclasses

    import trojanprune.reverse as reverse

    original = getattr(reverse, reverse_name)
    monkeypatch.setattr(reverse, reverse_name, lambda *a, **k: dataclasses.replace(
        original(*a, **k), flagged=list(classes), target=classes[0] if classes else None))


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model, state):
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# -- cheap probes for the tests of the plumbing (registered once, test-only) ------------------

class _TestProbe(Probe):
    """Signal: a seeded random column; score: the kept fraction of the first 8 units. Cheap;
    it knows nothing about backdoors (the real probes are tested separately)."""

    name = "test-cheap"
    signal_names = ("noise",)

    def __init__(self, model, units, fit, held, options, seed=0, progress=False):
        super().__init__(model, units, fit, held, options, seed, progress)
        g = torch.Generator().manual_seed(seed)
        self._signal = torch.randn(units.total, 1, generator=g)

    def signal(self):
        return self._signal

    def score(self, masks):
        return torch.as_tensor(masks, dtype=torch.float32)[:, :8].mean(1)


class _NaNProbe(_TestProbe):
    name = "test-nan"

    def score(self, masks):
        return torch.full((len(masks),), float("nan"))


for _cls in (_TestProbe, _NaNProbe):
    if _cls.name not in PROBES:
        register_probe(_cls)

CHEAP = dict(probe="test-cheap", episodes=8, episodes_per_update=4)


def _small_clean(case, n):
    x, y = case.clean.tensors()
    return x[:n], y[:n]


# -- graphs -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def resnet_graphs():
    torch.manual_seed(0)
    model = models.create("resnet20", 10).eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 3, 32, 32, generator=g), torch.arange(16) % 10
    units = discover_units(model, x[:1])
    signal = torch.randn(units.total, generator=g)
    return model, units, x, y, signal


def test_graph_nodes_are_channels_and_residual_groups_share_nodes(resnet_graphs):
    model, units, x, y, signal = resnet_graphs
    graphs = build_graphs(model, units, x, y, signal, ["probe"])
    assert graphs.num_nodes == units.total == sum(g.size for g in units)
    assert len(graphs.layers) == len(units)
    residual = [g for g in units if g.residual]
    assert residual, "resnet20 must have residual unit groups"
    for layer, group, offset in zip(graphs.layers, units, units.offsets):
        assert layer.size == group.size and layer.offset == offset  # one node per channel
        assert int((graphs.batch == graphs.layers.index(layer)).sum()) == group.size
    # a residual group is ONE graph whose node c stands for channel c of every conv writing
    # into the stream: its weight vector concatenates all of their filters
    stream = residual[0]
    producers = [model.get_submodule(p) for p in stream.producers]
    assert len(producers) > 1
    w = channel_weights(model, stream)
    assert w.shape == (stream.size, sum(p.weight[0].numel() for p in producers))
    layer = graphs.layers[units.names.index(stream.name)]
    assert torch.allclose(layer.raw["l1_norm"], sum(p.weight.detach().abs().flatten(1).sum(1) for p in producers))
    assert bool(graphs.feature("residual")[units.offset(stream.name)]) is True
    # edges stay inside their layer and features are finite
    lo = torch.tensor(units.offsets)[graphs.batch[graphs.edge_index[0]]]
    hi = lo + torch.tensor([g.size for g in units])[graphs.batch[graphs.edge_index[0]]]
    assert bool(((graphs.edge_index >= lo) & (graphs.edge_index < hi)).all())
    assert torch.isfinite(graphs.x).all()
    assert graphs.x.shape == (units.total, len(graphs.feature_names))
    assert {"l1_norm", "act_mean", "act_std", "bn_scale", "bn_shift", "depth", "probe",
            "probe_global"} <= set(graphs.feature_names)
    depth = graphs.feature("depth")
    assert float(depth[0]) == 0.0 and float(depth[-1]) == 1.0
    data = graphs.to_pyg()
    assert data.num_nodes == units.total and data.edge_index.shape == graphs.edge_index.shape


@pytest.mark.parametrize("rule", ["quantile", "neighbours"])
def test_edges_follow_the_threshold_and_dormant_channels_stay_unlinked(resnet_graphs, rule):
    model, units, x, y, signal = resnet_graphs
    graphs = build_graphs(model, units, x, y, signal, edge_rule=rule, edge_quantile=0.8,
                          edge_neighbours=3)
    some_dormant = False
    for layer, group in zip(graphs.layers, units):
        sim = cosine_similarity_matrix(channel_weights(model, group))
        expected = (sim > layer.threshold)
        expected.fill_diagonal_(False)
        got = torch.zeros_like(expected)
        got[layer.edge_index[0], layer.edge_index[1]] = True
        assert torch.equal(got, expected), layer.group  # exactly the pairs above the threshold
        assert torch.equal(got, got.T)
        assert layer.threshold >= layer.rule_threshold
        if layer.dormant.any():
            some_dormant = True
            assert not got[layer.dormant].any() and not got[:, layer.dormant].any()
        else:
            assert layer.threshold == layer.rule_threshold
    assert some_dormant  # an untrained resnet20 has dead channels after its ReLUs
    # the neighbour rule gives a typical node about that many neighbours, unless dormant
    # channels forced the threshold up
    if rule == "neighbours":
        free = [g for g in graphs.layers if not g.dormant.any() and g.size > 8]
        degrees = [2 * g.num_edges / g.size for g in free]
        assert free and all(1.5 <= d <= 6 for d in degrees), degrees


def test_graph_builder_names_the_layer_it_cannot_map(resnet_graphs, backdoor_case):
    model, units, x, y, _ = resnet_graphs
    broken = models.create("resnet20", 10).eval()
    with torch.no_grad():
        broken.get_submodule("layer2.0.conv1").weight[3, 0, 0, 0] = float("nan")
    with pytest.raises(GraphBuildError, match="layer2.0.conv1"):
        build_graphs(broken, discover_units(broken, x[:1]), x, y)
    other = discover_units(backdoor_case.model, backdoor_case.clean.tensors()[0][:1])
    with pytest.raises(GraphBuildError, match="features"):  # units of a different model
        build_graphs(model, other, x, y)
    with pytest.raises(ConfigError, match="edge_rule"):
        build_graphs(model, units, x, y, edge_rule="knn")


# -- the agent on a real backdoor ----------------------------------------------------------------

@pytest.fixture(scope="module")
def onp_run(backdoor_case):
    """ONP as shipped, with fewer episodes (128 instead of 192) and a shorter trigger reverse."""
    case = backdoor_case
    state = _state(case.model)
    result = tp.repair(case.model, case.clean, method="onp", seed=0, **ONP_FIXTURE_OPTIONS)
    return result, state


def test_agent_learns_and_the_pruning_removes_the_backdoor(backdoor_case, onp_run):
    case = backdoor_case
    result, state = onp_run
    d = result.details
    curve = d["reward_curve"]  # mean reward of each PPO batch of 16 episodes
    after = evaluate(result.model, case.test, case.attack)
    print("ONP: before", case.before, "after", after, "pruned", result.pruned, "curve", curve,
          "choice", d["choice"], f"{result.seconds:.1f}s", "evaluations", result.evaluations)
    # the reward improves over episodes: the policy starts from the probe's signal, pruning
    # ~2% of the channels more or less at random, which often costs accuracy (and the penalty
    # beyond 2 points); it learns which channels carry the reversed trigger and which are
    # needed. Measured on seeds 0-3 (benchmarks/onp_fixture_seeds.py, two machines): seed 0's
    # second half beats the first by 0.12-0.17 with the stop-14 probe and 0.51 with the stop-15
    # one; across seeds 0.03-0.51 (seed 2, whose suspects include a false flag, 8, gains least).
    assert len(curve) == 8
    assert sum(curve[4:]) / 4 > sum(curve[:4]) / 4 + 0.06, curve
    # the default probe suspects the real target (pixel space flags it), and the final pruning
    # cuts the TRUE trigger's ASR, which ONP never saw, while keeping accuracy
    assert d["probe"]["probe"] == "suspects"
    assert any(s["space"] == "pixel" and s["class"] == 0 for s in d["probe"]["suspects"])
    assert result.target == 0
    assert after["asr"] < 20, after
    assert case.before["acc"] - after["acc"] < 4, after
    assert 0 < len(result.pruned) <= 0.1 * result.total_units
    assert d["choice"]["held_out_acc"] >= d["unpruned"]["acc"] - 0.02 - 1e-9
    assert d["choice"]["all_clean_acc"] >= d["choice"]["all_clean_acc_unpruned"] - 0.02 - 1e-9
    # the input model is untouched, nothing left hooked
    assert _same_state(case.model, state), "the input model was modified"
    assert not any(m._forward_hooks for m in case.model.modules())
    assert not any(m._forward_hooks for m in result.model.modules())


def test_result_records_policy_scores_curve_and_evaluations(backdoor_case, onp_run):
    result, _ = onp_run
    d = result.details
    units = discover_units(backdoor_case.model, backdoor_case.clean.tensors()[0][:1])
    probs = d["policy_prune_probability"]
    assert list(probs) == list(units.names)
    assert all(len(probs[g.name]) == g.size for g in units)
    assert all(0 <= p <= 1 for v in probs.values() for p in v)
    assert len(d["episodes"]["reward"]) == 128
    assert result.evaluations == sum(d["evaluations_by_part"].values())
    # the one-line account: the final pruning's figures on all the clean images
    estimate = d["choice"]["clean_estimate"]
    assert estimate["images"] == len(backdoor_case.clean)
    assert estimate["backdoor_score"][1] < estimate["backdoor_score"][0]
    assert estimate["soft"][1] < estimate["soft"][0] + 0.05 and 0 < estimate["top1"][1] <= 1
    assert result.decision == d["choice"]["reason"]
    assert result.decision.startswith(f"pruned {len(result.pruned)} of {units.total} channels")
    # two evaluations per episode (held-out accuracy and reversed-trigger success) at least
    assert d["evaluations_by_part"]["reward_accuracy"] >= 129
    assert d["evaluations_by_part"]["probe"] >= d["probe"]["reverse"]["evaluations"] + 129
    # wall time per stage, each measured (the probe's reverse and the episodes cannot take 0 s)
    assert list(d["seconds"]) == ["probe", "graphs", "episodes", "final_choice", "give_back"]
    assert d["seconds"]["probe"] > 0 and d["seconds"]["episodes"] > 0
    assert {"reversed_trigger_mask_class0", "reversed_trigger_pattern_class0"} <= set(result.images)
    # what is pruned is what the engine removed: the pruned channels are zero
    for name, ch in result.pruned:
        assert float(result.model.get_submodule(name).weight[ch].abs().sum()) == 0.0
    json.dumps(result.to_dict())


def test_final_choice_is_confirmed_on_all_clean_images():
    """The best-reward pruning on the held-out half is rejected when it loses accuracy on all
    the clean images (the winner's curse); the next one by reward is taken."""
    from trojanprune.defenses.onp import ONP
    from trojanprune.onp.agent import PPOHistory

    total = 6
    history = PPOHistory()
    history.actions.append(torch.tensor([[1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0]], dtype=torch.bool))
    history.info.append({"reward": torch.tensor([0.9, 0.8]), "acc": torch.tensor([0.9, 0.9]),
                         "backdoor": torch.tensor([0.0, 0.1]), "pruned": torch.tensor([1.0, 1.0])})

    def measure(keep):  # the policy's own prunings score badly here
        n = len(keep)
        return {"reward": torch.full((n,), -1.0), "acc": torch.full((n,), 0.9),
                "backdoor": torch.ones(n), "pruned": (keep < 0.5).float().sum(1)}

    base = {"reward": torch.tensor([-0.1]), "acc": torch.tensor([0.9]), "backdoor": torch.tensor([1.0]),
            "pruned": torch.tensor([0.0])}

    class AllClean:  # pruning unit 0 costs 10 points on all the clean images
        def accuracy(self, keep):
            return 0.85 - 0.1 * (keep[:, 0] < 0.5).float()

    probs = torch.full((total,), 0.1)
    defense = ONP(seed=0)
    chosen, choice = defense._choose(probs, history, measure, base, total, None)
    assert choice["source"] == "episode 1" and float(chosen[0]) == 0
    chosen, choice = defense._choose(probs, history, measure, base, total, AllClean())
    assert choice["source"] == "episode 2" and float(chosen[1]) == 0 and float(chosen[0]) == 1
    assert choice["rejected_by_confirmation"] == 1 and abs(choice["all_clean_acc"] - 0.85) < 1e-6

    class SoftOnly:  # top-1 sees nothing; the label's probability falls when unit 0 is pruned
        def accuracy(self, keep):
            return torch.full((len(keep),), 0.85)

        def soft_accuracy(self, keep):
            return 0.85 - 0.1 * (keep[:, 0] < 0.5).float()

    assert defense._choose(probs, history, measure, base, total, SoftOnly())[1]["source"] == "episode 1"
    soft = ONP(seed=0, accuracy="soft")
    assert soft._choose(probs, history, measure, base, total, SoftOnly())[1]["source"] == "episode 2"


def test_soft_accuracy_option_measures_the_reward_and_the_guards_by_label_probability():
    """accuracy="soft": the reward's accuracy term and the confirmation guard read the mean
    softmax probability of the label, not the top-1 accuracy."""
    from trojanprune.defenses.onp import ONP, RewardTerms

    class Evaluator:  # top-1 never moves; the label's probability falls with each pruned unit
        evaluations = 0

        def accuracy(self, keep):
            return torch.full((len(keep),), 0.9)

        def soft_accuracy(self, keep):
            return 0.8 - 0.03 * (keep < 0.5).float().sum(1)

    class Probe:
        def score(self, keep):
            return 1 - 0.5 * (keep[:, 0] < 0.5).float()

    keep = torch.ones(2, 4)
    keep[1, :2] = 0
    reward = {}
    for measure, acc in (("top1", [0.9, 0.9]), ("soft", [0.8, 0.74])):
        o = ONP(seed=0, accuracy=measure).options
        terms = RewardTerms(o, Evaluator(), Probe(), 4)
        m = terms(keep)
        assert torch.allclose(m["acc"], torch.tensor(acc))
        assert abs(terms.floor - (acc[0] - 0.02)) < 1e-6
        reward[measure] = m["reward"]
    # top-1 sees no cost in the two-unit pruning and prefers it; the soft measure sees it
    # 0.06 below the unpruned model, beyond the 0.02 tolerance, and the penalty rejects it
    assert float(reward["top1"][1]) > float(reward["top1"][0])
    assert float(reward["soft"][1]) < float(reward["soft"][0])
    with pytest.raises(ConfigError, match="accuracy must be one of top1, soft"):
        ONP(seed=0, accuracy="probability")


def test_refinement_adds_channels_greedily_within_the_accuracy_guard():
    """refine_steps: each step prunes the pool channel that raises the reward most, skipping
    those that break the held-out guard or the confirmation on all clean images; it stops when
    nothing raises the reward."""
    from trojanprune.defenses.onp import ONP

    gain = torch.tensor([0.0, 0.0, 0.4, 0.3, 0.5, 0.45])  # how much pruning each unit lowers the score

    def measure(keep, acc=None):
        pruned = (keep < 0.5).float()
        acc = 0.9 - 0.05 * pruned[:, 4]  # unit 4 costs 5 points on the held-out half
        backdoor = 1 - pruned @ gain
        return {"reward": acc - backdoor, "acc": acc, "backdoor": backdoor, "pruned": pruned.sum(1)}

    class AllClean:  # unit 5 costs 10 points on all the clean images
        def accuracy(self, keep):
            return 0.85 - 0.1 * (keep[:, 5] < 0.5).float()

    class Units:
        def unit_of(self, i):
            return ("layer", i)

    class Terms:  # RewardTerms' interface: the accuracy first, then the terms of the tries within the floor
        def __init__(self, terms):
            self.terms = terms

        def improving(self, keep, reward, floor=None, backdoor=None):
            within = measure(keep)["acc"] >= floor
            if not bool(within.any()):
                return within, None
            m = self.terms(keep[within])
            better = m["reward"] > reward + 1e-9
            qualified = within.clone()
            qualified[within] = better
            return qualified, ({k: v[better] for k, v in m.items()} if bool(better.any()) else None)

    defense = ONP(seed=0, refine_steps=5, refine_pool=2)
    probs = torch.tensor([0.9, 0.8, 0.1, 0.1, 0.1, 0.1])  # the policy's top 2: units 0 and 1
    signal = torch.tensor([[0.0], [0.0], [0.9], [0.8], [0.7], [0.6]])  # the signal's top 2: 2 and 3
    keep, info = defense._refine(torch.ones(6), -0.1, probs, signal, Terms(measure), 0.9, AllClean(), 0.85, Units())
    assert [s["unit"] for s in info["steps"]] == [["layer", 2], ["layer", 3]] and info["pool"] == 4
    assert keep.tolist() == [1, 1, 0, 0, 1, 1]
    # a constant signal column (a space without suspects) adds nothing to the pool
    # (the policy's top 2 are units 4 and 5 here; a zero column's "top 2" would be units 0 and 1)
    flat = torch.cat([signal, torch.zeros(6, 1)], 1)
    late = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.9, 0.8])
    _, info = defense._refine(torch.ones(6), -0.1, late, flat, Terms(measure), 0.9, AllClean(), 0.85, Units())
    assert info["pool"] == 4
    # a larger pool reaches unit 5, which the confirmation refuses, and unit 4, which the guard does
    wide = ONP(seed=0, refine_steps=5, refine_pool=6)
    keep, info = wide._refine(torch.ones(6), -0.1, probs, signal, Terms(measure), 0.9, AllClean(), 0.85, Units())
    assert keep.tolist() == [1, 1, 0, 0, 1, 1]
    without_confirmation, _ = wide._refine(torch.ones(6), -0.1, probs, signal, Terms(measure), 0.9, None, None, Units())
    assert without_confirmation.tolist() == [1, 1, 0, 0, 1, 0]
    # with the held-out accuracy alone first, the probe scores only the tries within the guard
    scored = []

    def counting(keep, acc=None):
        scored.append(len(keep))
        return measure(keep)

    same, _ = wide._refine(torch.ones(6), -0.1, probs, signal, Terms(counting), 0.9, None, None, Units())
    assert same.tolist() == [1, 1, 0, 0, 1, 0] and scored[0] == 5  # unit 4 is never scored
    with pytest.raises(ConfigError, match="refine_steps must be an integer >= 0"):
        ONP(seed=0, refine_steps=-1)


class Filtered:
    """RewardTerms' interface over a function of keep masks: ``improving`` filters its terms."""

    def __init__(self, measure):
        self.measure, self.tried = measure, []

    def __call__(self, keep):
        return self.measure(keep)

    def improving(self, keep, reward, floor=None, backdoor=None):
        self.tried.append(len(keep))
        m = self.measure(keep)
        ok = m["reward"] > reward + 1e-9
        if floor is not None:
            ok &= m["acc"] >= floor
        if backdoor is not None:
            ok &= m["backdoor"] <= backdoor + 1e-9
        return ok, ({k: v[ok] for k, v in m.items()} if bool(ok.any()) else None)


def test_give_back_returns_channels_that_cost_accuracy_and_hold_no_backdoor():
    """give_back: each step returns the pruned channel whose return raises the reward most;
    "score" skips returns that raise the probe's backdoor score, "reward" trades them."""
    from trojanprune.defenses.onp import ONP

    cost = torch.tensor([0.0, 0.02, 0.01, 0.03, 0.0])  # held-out accuracy each pruned unit costs
    held = torch.tensor([0.0, 0.0, 0.0, 0.01, 0.5])  # backdoor score each returned unit brings back

    def measure(keep, acc=None):
        pruned = (keep < 0.5).float()
        acc = 0.9 - pruned @ cost
        backdoor = (1 - pruned) @ held
        return {"reward": acc - backdoor, "acc": acc, "backdoor": backdoor, "pruned": pruned.sum(1)}

    class Units:
        def unit_of(self, i):
            return ("layer", i)

    chosen = torch.tensor([1.0, 0, 0, 0, 0])  # units 1-4 pruned
    keep, info = ONP(seed=0, give_back="score")._give_back(chosen, Filtered(measure), Units())
    # unit 1 first (the largest gain), then 2; unit 3 raises the score, unit 4 the reward never
    assert [r["unit"] for r in info["returned"]] == [["layer", 1], ["layer", 2]]
    assert keep.tolist() == [1, 1, 1, 0, 0]
    keep, info = ONP(seed=0, give_back="reward")._give_back(chosen, Filtered(measure), Units())
    # unit 3's 3 points outweigh its 0.01 of score; unit 4's 0.5 of score outweighs nothing
    assert [r["unit"] for r in info["returned"]] == [["layer", 3], ["layer", 1], ["layer", 2]]
    assert keep.tolist() == [1, 1, 1, 1, 0]
    # lazily: a channel whose return did not qualify is not tried again. Unit 3's return pays
    # only once unit 1 is back, so the first step refuses it and it stays pruned, although
    # after the other returns it would raise the reward
    def coupled(keep, acc=None):
        pruned = (keep < 0.5).float()
        acc = 0.9 - 0.02 * pruned[:, 1] - 0.01 * pruned[:, 2] + 0.01 * (1 - pruned[:, 3]) * (1 - 2 * pruned[:, 1])
        return {"reward": acc, "acc": acc, "backdoor": torch.zeros(len(keep)), "pruned": pruned.sum(1)}

    terms = Filtered(coupled)
    keep, info = ONP(seed=0, give_back="score")._give_back(torch.tensor([1.0, 0, 0, 0]), terms, Units())
    assert [r["unit"] for r in info["returned"]] == [["layer", 1], ["layer", 2]]
    assert keep.tolist() == [1, 1, 1, 0]
    assert float(coupled(torch.ones(1, 4))["reward"][0]) > float(coupled(keep[None])["reward"][0])
    assert terms.tried == [3, 1]  # the second step tried unit 2 alone
    with pytest.raises(ConfigError, match="give_back must be one of off, score, reward"):
        ONP(seed=0, give_back="all")


def test_refine_focus_scores_only_the_suspect_classes_the_choice_answered():
    """refine_focus="answered": after the final choice, the refinement scores only the suspects
    of the classes one of whose stand-ins the choice has at least halved; nothing is restricted
    when the choice answered no suspect class or all of them."""
    from trojanprune.defenses.onp import ONP, RewardTerms
    from trojanprune.onp.probes import SuspectsProbe

    class Part:  # a stand-in trigger that works as long as its channels are kept
        def __init__(self, target, channels):
            self.target, self.channels = target, channels

        def score(self, masks):
            return masks[:, self.channels].float().mean(1)

    probe = object.__new__(SuspectsProbe)
    probe.parts = [Part(0, [0, 1]), Part(1, [2, 3]), Part(0, [4, 5])]
    probe.suspects = [("pixel", 0, None), ("pixel", 1, None), ("feature", 0, "layer")]
    probe.weights = torch.full((3,), 1 / 3)
    probe.combine = "trigger"

    def keep_without(*pruned):
        keep = torch.ones(6)
        keep[list(pruned)] = 0
        return keep

    assert probe.answered(keep_without()) is None  # nothing answered
    assert probe.answered(keep_without(0, 2)) is None  # both classes answered
    assert probe.answered(keep_without(2, 4)) is None
    view = probe.answered(keep_without(0))  # class 0's pixel stand-in halved, class 1 untouched
    assert view.answered_classes == [0] and view.suspects == [probe.suspects[0], probe.suspects[2]]
    assert view.lost_share == [0.5, 0.0, 0.0]
    assert probe.answered(keep_without(0), share=0.6) is None
    # the view scores the answered class's stand-ins alone; the probe keeps every suspect
    masks = torch.stack([keep_without(0), keep_without(0, 1), keep_without(0, 1, 2, 3)])
    assert torch.allclose(view.score(masks), torch.tensor([0.75, 0.5, 0.5]))
    assert torch.allclose(probe.score(masks), torch.tensor([2.5 / 3, 2 / 3, 1 / 3]))
    # suspect_combine="class": the answered class's strongest stand-in
    probe.combine = "class"
    assert torch.allclose(probe.answered(keep_without(0)).score(masks), torch.tensor([1.0, 1.0, 1.0]))
    probe.combine = "trigger"

    class Held:  # each pruned channel costs one point of held-out accuracy
        def accuracy(self, keep):
            return 0.9 - 0.01 * (keep < 0.5).float().sum(1)

    defense = ONP(seed=0, refine_focus="answered")
    terms = RewardTerms(defense.options, Held(), probe, 6)
    focused, info = defense._focus(keep_without(0), probe, terms, Held(), 6)
    assert focused is not terms and info["answered_classes"] == [0]
    assert torch.allclose(focused(masks)["backdoor"], view.score(masks))
    same, info = defense._focus(keep_without(), probe, terms, Held(), 6)
    assert same is terms and info["answered_classes"] is None
    # a probe without suspects (one reversed trigger) is never restricted
    single, _ = defense._focus(keep_without(0), Part(0, [0, 1]), terms, Held(), 6)
    assert single is terms
    with pytest.raises(ConfigError, match="refine_focus must be one of all, answered"):
        ONP(seed=0, refine_focus="some")

    # "answered-triggers": an answered class's feature stand-in counts only if the choice
    # halved it too; its pixel stand-in counts whatever it lost
    view = probe.answered(keep_without(0), per_trigger=True)
    assert view.answered_classes == [0] and view.suspects == [probe.suspects[0]]
    assert torch.allclose(view.score(masks), torch.tensor([0.5, 0.0, 0.0]))
    assert probe.answered(keep_without(), per_trigger=True) is None  # nothing answered
    assert probe.answered(keep_without(0, 2, 4), per_trigger=True) is None  # every stand-in
    # the feature stand-in halved, the pixel one untouched: both stay, as per class
    feature = probe.answered(keep_without(4), per_trigger=True)
    assert feature.suspects == [probe.suspects[0], probe.suspects[2]]
    assert feature.suspects == probe.answered(keep_without(4)).suspects
    triggers = ONP(seed=0, refine_focus="answered-triggers")
    focused, info = triggers._focus(keep_without(0), probe, terms, Held(), 6)
    assert info["suspects"] == [list(probe.suspects[0])] and "stand-in triggers" in info["rule"]
    assert torch.allclose(focused(masks)["backdoor"], torch.tensor([0.5, 0.0, 0.0]))


def test_same_seed_same_pruning(backdoor_case):
    case = backdoor_case
    opts = dict(seed=3, episodes=16, episodes_per_update=8, reverse_steps=10, reverse_batch_size=4,
                feature_steps=20, feature_per_class=3, warp_steps=10, refine_steps=0, give_back="off")
    a = tp.repair(case.model, case.clean, method="onp", **opts)
    b = tp.repair(case.model, case.clean, method="onp", **opts)
    assert a.pruned == b.pruned
    assert a.details["episodes"] == b.details["episodes"]
    assert a.details["policy_prune_probability"] == b.details["policy_prune_probability"]
    # the refinement runs through the defense: it starts from the same choice, records its
    # steps, and keeps the accuracy guard
    refined = tp.repair(case.model, case.clean, method="onp", **{**opts, "refine_steps": 2})
    info = refined.details["choice"]["refine"]
    assert refined.details["choice"]["source"] == a.details["choice"]["source"]
    assert len(info["steps"]) <= 2 and info["pool"] > 0
    assert len(refined.pruned) == len(a.pruned) + len(info["steps"])
    assert set(map(tuple, a.pruned)) <= set(map(tuple, refined.pruned))
    assert all(st["held_out_acc"] >= refined.details["unpruned"]["acc"] - 0.02 - 1e-9 for st in info["steps"])
    assert "refine" not in a.details["choice"] and "give_back" not in a.details["choice"]
    # so does the give-back step (the default): it only unprunes channels of the same choice
    given = tp.repair(case.model, case.clean, method="onp", **{**opts, "give_back": "score"})
    returned = {tuple(r["unit"]) for r in given.details["choice"]["give_back"]["returned"]}
    assert set(map(tuple, given.pruned)) == set(map(tuple, a.pruned)) - returned


# -- the probes ----------------------------------------------------------------------------------

def test_reversed_trigger_probe_score_target_and_fallback(backdoor_case, monkeypatch):

    from trojanprune.defenses.onp import Options

    case = backdoor_case
    x, y = case.clean.tensors()
    fit, held = CleanData(x, y, 10).split(0.5, seed=0)
    units = discover_units(case.model, x[:1])
    quick = dict(reverse_steps=5, reverse_batch_size=4)
    plain = create_probe("reversed-trigger", case.model, units, fit, held,
                         Options(score_margin=0.0, **quick), seed=0)
    t = plain.target
    masks = torch.ones(3, units.total)
    masks[1, :40] = 0
    masks[2, 100:] = 0
    # score_margin=0: exactly the reversed trigger's success rate on the stamped held-out images
    stamped = plain.reversed.apply(held.x[held.y != t], t)
    expected = MaskEvaluator(case.model, units, stamped).target_rate(masks, t)
    assert torch.equal(plain.score(masks).cpu(), expected.cpu())
    strict = create_probe("reversed-trigger", case.model, units, fit, held,
                          Options(score_margin=2.0, **quick), seed=0)
    assert bool((strict.score(masks) >= plain.score(masks)).all())
    assert strict.evaluations >= strict.reversed.evaluations + 3 * 1
    assert strict.signal().shape == (units.total, 2)
    # no class flagged: the smallest reversed mask is the presumed target; the user may fix it
    _report_flags(monkeypatch, "reverse_triggers", [])
    fallback = create_probe("reversed-trigger", case.model, units, fit, held, Options(**quick), seed=0)
    assert fallback.target == int(fallback.reversed.mask_norms.argmin())
    assert "smallest reversed mask" in fallback.details()["target_source"]
    fixed = create_probe("reversed-trigger", case.model, units, fit, held, Options(target=7, **quick), seed=0)
    assert fixed.target == 7 and "user" in fixed.details()["target_source"]
    with pytest.raises(ConfigError, match="target must be a class"):
        create_probe("reversed-trigger", case.model, units, fit, held, Options(target=12, **quick))


@pytest.mark.parametrize("probe,opts", [("anp", {"anp_iterations": 20}),
                                        ("unlearn", {"unlearn_epochs": 5, "recover_epochs": 3}),
                                        ("feature-trigger", {"feature_steps": 60, "feature_per_class": 5})])
def test_other_probes_give_signals_and_scores(backdoor_case, probe, opts):
    from trojanprune.defenses.onp import Options

    case = backdoor_case
    x, y = case.clean.tensors()
    fit, held = CleanData(x, y, 10).split(0.5, seed=0)
    units = discover_units(case.model, x[:1])
    p = create_probe(probe, case.model, units, fit, held, Options(probe=probe, **opts), seed=0)
    s = p.signal()
    assert s.shape == (units.total, len(p.signal_names)) and torch.isfinite(s).all()
    keep_all, prune_suspects = torch.ones(units.total), torch.ones(units.total)
    prune_suspects[s[:, 0].argsort(descending=True)[:20]] = 0
    scores = p.score(torch.stack([keep_all, prune_suspects]))
    assert abs(float(scores[0]) - 1) < 1e-5 and float(scores[1]) < float(scores[0])
    assert p.evaluations > 0
    json.dumps(p.details())


def test_auto_probe_follows_the_feature_reverse_only_when_it_disagrees(backdoor_case, monkeypatch):

    from trojanprune.defenses.onp import Options

    case = backdoor_case
    x, y = case.clean.tensors()
    fit, held = CleanData(x, y, 10).split(0.5, seed=0)
    units = discover_units(case.model, x[:1])
    quick = dict(probe="auto", reverse_steps=60, reverse_batch_size=4, feature_steps=60,
                 feature_per_class=5)
    # the pixel reverse flags the true target, the feature-space one nothing: the pixel probe is kept
    _report_flags(monkeypatch, "reverse_triggers", [0])
    _report_flags(monkeypatch, "reverse_feature_triggers", [])
    agree = create_probe("auto", case.model, units, fit, held, Options(**quick), seed=0)
    assert agree.vote["pixel_target"] == 0 and agree.vote["chosen"] == "reversed-trigger"
    assert agree.target == 0 and agree.signal_names == ("trigger_act_shift", "trigger_taylor")
    assert agree.evaluations == sum(p.evaluations for p in agree.parts) and len(agree.parts) == 2
    # a feature-space flag that disagrees with the pixel-space target (as on WaNet and SIG,
    # where the pixel reverse flags a wrong class) is followed
    _report_flags(monkeypatch, "reverse_feature_triggers", [3])
    overruled = create_probe("auto", case.model, units, fit, held, Options(**quick), seed=0)
    assert overruled.vote == {"pixel_target": 0, "pixel_flagged": True, "feature_target": 3,
                              "chosen": "feature-trigger"}
    assert overruled.target == 3 and overruled.signal_names == FeatureTriggerProbe.signal_names
    keep = torch.ones(2, units.total)
    keep[1] = 1 - (overruled.signal()[:, 0] > 0.3).float()  # prune the written-in channels
    scores = overruled.score(keep)
    assert float(scores[0]) > 0.9 and float(scores[1]) < float(scores[0])
    # a user target skips the vote
    fixed = create_probe("auto", case.model, units, fit, held, Options(target=0, **quick), seed=0)
    assert fixed.vote["chosen"] == "reversed-trigger" and len(fixed.parts) == 1
    json.dumps(overruled.details())


def test_suspects_probe_scores_every_flagged_trigger(backdoor_case, monkeypatch):

    from trojanprune.defenses.onp import Options

    case = backdoor_case
    x, y = case.clean.tensors()
    fit, held = CleanData(x, y, 10).split(0.5, seed=0)
    units = discover_units(case.model, x[:1])
    # suspect_warps: the warp reverse has its own test (it flags nothing on this BadNets model)
    quick = dict(probe="suspects", reverse_steps=60, reverse_batch_size=4, feature_steps=60,
                 feature_per_class=5, suspect_warps=False)
    _report_flags(monkeypatch, "reverse_triggers", [0])
    _report_flags(monkeypatch, "reverse_feature_triggers", [3])
    one_layer = dict(quick, suspect_large_masks=False, suspect_last_layer=False)
    p = create_probe("suspects", case.model, units, fit, held, Options(**one_layer), seed=0)
    # the pixel reverse flags the true target 0; the (forced) feature flag 3 joins it, no vote
    layer = p.features.layer
    assert p.suspects == [("pixel", 0, None), ("feature", 3, layer)] and p.target is None
    assert p.signal().shape == (units.total, 4) and torch.isfinite(p.signal()).all()
    # prune the feature trigger's top channels (1, 2, ... 40 of them, one mask each) and the
    # pixel trigger's top 30
    feature_order = p.signal()[:, 2].argsort(descending=True)
    keep = torch.ones(41, units.total)
    for k in range(1, 41):
        keep[k, feature_order[:k]] = 0
    pixel_pruned = torch.ones(1, units.total)
    pixel_pruned[0, p.signal()[:, 1].argsort(descending=True)[:30]] = 0
    parts = torch.stack([q.score(keep).cpu() for q in p.parts])
    assert torch.allclose(p.score(keep), parts.mean(0))
    assert float(parts[0, 0]) > 0.9 and float(parts[1, 0]) > 0.9
    # disabling one suspect lowers the score by that suspect's share and leaves the other's:
    # the fewest feature channels that stop the feature trigger leave the pixel trigger working
    disabled = (parts[1] < 0.5).nonzero().flatten()
    assert len(disabled) > 0, parts[1]
    k = int(disabled[0])
    assert float(parts[0, k]) > 0.9 and float(p.score(keep)[k]) < float(p.score(keep)[0])
    pixel_parts = [float(q.score(pixel_pruned)[0]) for q in p.parts]
    assert pixel_parts[0] < float(parts[0, 0]) - 0.5, pixel_parts
    # both reverses are counted once, with every scoring pass
    assert p.setup_evaluations == p.reversed.evaluations + p.features.evaluations
    # (the feature suspects are scored together on all the held-out images, on the probe's
    # own evaluator: one evaluation per mask and suspect, as separately)
    shared = p._held_ev.evaluations
    assert shared > 0
    assert p.evaluations == p.setup_evaluations + sum(q.evaluations for q in p.parts) + shared
    assert [q.setup_evaluations for q in p.parts] == [3, 1]  # their own signal passes only
    score, logits = p.score_and_held_logits(keep[:3])
    assert p._held_ev.evaluations - shared == 3 * 2  # the feature suspect and the plain logits
    assert torch.allclose(score, p.score(keep[:3]))
    plain = MaskEvaluator(case.model, units, held.x).logits(keep[:3])
    assert torch.allclose(logits, plain, atol=1e-5)
    # screened stages: the first layer's feature suspect comes with the held-out logits; the
    # pixel suspect is scored only for the masks the screen keeps on the lower bound (here:
    # the feature suspect's half of the score, the pixel one's counted as 0)
    _, score_rows = p.staged_score(keep)
    pixel_before = p.parts[0].evaluations
    screened, screened_score = score_rows(torch.ones(len(keep), dtype=torch.bool),
                                          screen=lambda rows, lower: lower < 0.3)
    expect = (parts[1] / 2 < 0.3).nonzero().flatten()
    assert torch.equal(screened, expect) and 0 < len(expect) < len(keep)
    assert p.parts[0].evaluations - pixel_before == len(expect)
    assert torch.allclose(screened_score, p.score(keep)[expect], atol=1e-6)
    # the refinement's and the give-back's question: which masks raise the reward (within an
    # accuracy floor, at most a backdoor score): the same masks and numbers as filtering the
    # plain reward terms
    from trojanprune.defenses.onp import RewardTerms

    terms = RewardTerms(Options(**one_layer), MaskEvaluator(case.model, units, held.x, held.y), p, units.total)
    direct = terms(keep)
    floor = float(terms.unpruned["acc"][0]) - 0.02
    reward, lowest = float(direct["reward"].median()), float(direct["reward"].min())
    median = float(direct["backdoor"].median())
    for reward, bounds in ((reward, dict(floor=floor)), (reward, dict(backdoor=median)),
                           (lowest, dict(floor=0.8, backdoor=median))):
        qualified, improving = terms.improving(keep, reward, **bounds)
        expect = direct["reward"] > reward + 1e-9
        if "floor" in bounds:
            expect &= direct["acc"] >= bounds["floor"]
        if "backdoor" in bounds:
            expect &= direct["backdoor"] <= bounds["backdoor"] + 1e-9
        assert torch.equal(qualified, expect) and 0 < int(expect.sum()) < len(keep), bounds
        for name, value in improving.items():
            assert torch.allclose(value, direct[name][expect], atol=1e-6), name
    none, nothing = terms.improving(keep, reward, floor=2.0)
    assert not bool(none.any()) and nothing is None
    json.dumps(p.details())
    # a user target: that class in both spaces
    fixed = create_probe("suspects", case.model, units, fit, held, Options(target=5, **one_layer), seed=0)
    assert fixed.suspects == [("pixel", 5, None), ("feature", 5, layer)] and fixed.target == 5
    # suspect_combine="class": one class's triggers are one term, the largest of their scores,
    # so disabling one of them (pruning the channels a feature trigger is written into) does
    # not pay while the other still works
    same = create_probe("suspects", case.model, units, fit, held,
                        Options(target=3, suspect_combine="class", **one_layer), seed=0)
    assert same.suspects == [("pixel", 3, None), ("feature", 3, layer)]
    order = same.signal()[:, 2].argsort(descending=True)
    cut = torch.ones(41, units.total)
    for k in range(1, 41):
        cut[k, order[:k]] = 0
    both = torch.stack([q.score(cut).cpu() for q in same.parts])
    assert torch.allclose(same.score(cut), both.amax(0))
    per_trigger = create_probe("suspects", case.model, units, fit, held,
                               Options(target=3, **one_layer), seed=0)
    assert torch.allclose(per_trigger.score(cut), both.mean(0))
    apart = (both[0] - both[1]).abs() > 0.1  # where one trigger is disabled more than the other
    assert bool(apart.any()), both
    assert (same.score(cut)[apart] > per_trigger.score(cut)[apart] + 0.05).all()
    assert same.details()["combine"] == "class"
    with pytest.raises(ConfigError, match="suspect_combine must be one of trigger, class"):
        Options(suspect_combine="max")
    # pixel_when_agreed: Neural Cleanse's target, when a feature reverse flags it too, keeps
    # only its pixel trigger, and the other suspects go; otherwise the option changes nothing
    _report_flags(monkeypatch, "reverse_triggers", [0, 4])
    _report_flags(monkeypatch, "reverse_feature_triggers", [3, 0])
    agreed = create_probe("suspects", case.model, units, fit, held,
                          Options(pixel_when_agreed=True, **one_layer), seed=0)
    assert agreed.suspects == [("pixel", 0, None)] and agreed.target == 0
    assert torch.allclose(agreed.score(keep), agreed.parts[0].score(keep).cpu())
    assert agreed.details()["pixel_when_agreed"] == [0]
    assert not bool(agreed.signal()[:, 2:].any())  # no feature trigger, no feature signal
    # only Neural Cleanse's target counts: here it is 4, which no feature reverse flags
    _report_flags(monkeypatch, "reverse_triggers", [4, 0])
    not_target = create_probe("suspects", case.model, units, fit, held,
                              Options(pixel_when_agreed=True, **one_layer), seed=0)
    assert not_target.details()["pixel_when_agreed"] == [] and len(not_target.parts) == 4
    _report_flags(monkeypatch, "reverse_triggers", [0])
    _report_flags(monkeypatch, "reverse_feature_triggers", [3])
    apart_flags = create_probe("suspects", case.model, units, fit, held,
                               Options(pixel_when_agreed=True, **one_layer), seed=0)
    assert apart_flags.suspects == p.suspects and apart_flags.details()["pixel_when_agreed"] == []
    with pytest.raises(ConfigError, match="pixel_when_agreed must be true or false"):
        Options(pixel_when_agreed="yes")
    # nothing flagged anywhere: the smallest pixel mask, as the reversed-trigger probe
    _report_flags(monkeypatch, "reverse_feature_triggers", [])
    _report_flags(monkeypatch, "reverse_triggers", [])
    alone = create_probe("suspects", case.model, units, fit, held, Options(**one_layer), seed=0)
    assert alone.suspects == [("pixel", int(alone.reversed.mask_norms.argmin()), None)]
    assert alone.target == alone.suspects[0][1]
    # only the feature reverse flags: Neural Cleanse's best guess, the smallest pixel mask, is a
    # suspect beside it when the feature reverse flags the same class, not otherwise
    smallest = int(alone.reversed.mask_norms.argmin())
    _report_flags(monkeypatch, "reverse_feature_triggers", [smallest])
    guess = create_probe("suspects", case.model, units, fit, held, Options(**one_layer), seed=0)
    assert guess.suspects == [("pixel", smallest, None), ("feature", smallest, layer)]
    assert [round(float(w), 4) for w in guess.weights] == [0.5, 0.5]
    other = (smallest + 1) % 10
    _report_flags(monkeypatch, "reverse_feature_triggers", [other])
    unbacked = create_probe("suspects", case.model, units, fit, held, Options(**one_layer), seed=0)
    assert unbacked.suspects == [("feature", other, layer)] and unbacked.target == other


def test_suspects_probe_adds_large_pixel_masks_and_the_last_layer(backdoor_case, monkeypatch):
    import dataclasses

    import trojanprune.reverse as reverse
    from trojanprune.defenses.onp import Options
    from trojanprune.reverse.feature import last_conv_layer

    case = backdoor_case
    x, y = case.clean.tensors()
    fit, held = CleanData(x, y, 10).split(0.5, seed=0)
    units = discover_units(case.model, x[:1])
    quick = dict(reverse_steps=30, reverse_batch_size=4, feature_steps=30, feature_per_class=3,
                 suspect_warps=False)
    last = last_conv_layer(units)
    assert last == [g.name for g in units if g.kind == "conv"][-1]
    # the pixel reverse: class 0 a small-mask outlier, class 7 a LARGE-mask one
    norms = torch.tensor([2.0, 40, 41, 39, 42, 38, 40, 300, 41, 39])
    pixel_original = reverse.reverse_triggers
    monkeypatch.setattr(reverse, "reverse_triggers", lambda *a, **k: dataclasses.replace(
        pixel_original(*a, **k), mask_norms=norms, anomaly_index=reverse.anomaly_index(norms),
        target=0, flagged=[0]))
    layers_seen = []
    original = reverse.reverse_feature_triggers

    def feature(*a, **k):  # the last layer flags class 4, the three-quarter one nothing
        found = original(*a, **k)
        layers_seen.append(found.layer)
        flagged = [4] if found.layer == last else []
        return dataclasses.replace(found, flagged=flagged, target=flagged[0] if flagged else None)

    monkeypatch.setattr(reverse, "reverse_feature_triggers", feature)
    # the model still recognises its clean 7s, so the large mask alone makes no suspect ...
    recognised = create_probe("suspects", case.model, units, fit, held, Options(**quick), seed=0)
    accuracy = recognised.details()["fit_class_accuracy"]
    assert accuracy[7] > 0.5 * sorted(accuracy)[4] and recognised.large_masks == []
    assert recognised.suspects == [("pixel", 0, None), ("feature", 4, last)]
    # ... below the accuracy bar (here raised above every class) it does
    layers_seen.clear()
    p = create_probe("suspects", case.model, units, fit, held,
                     Options(large_mask_accuracy_ratio=2.0, **quick), seed=0)
    assert layers_seen[0] != last and layers_seen[1:] == [last]
    assert p.suspects == [("pixel", 0, None), ("pixel", 7, None), ("feature", 4, last)]
    assert p.large_masks == [7] and p.details()["large_mask_suspects"] == [7]
    assert p.setup_evaluations == 1 + p.reversed.evaluations + sum(f.evaluations for f in p.feature_reverses)
    assert "feature_reverse_last" in p.details() and json.dumps(p.details())
    # each can be switched off; a user target gets its trigger at both layers
    layers_seen.clear()
    off = create_probe("suspects", case.model, units, fit, held,
                       Options(suspect_large_masks=False, suspect_last_layer=False, **quick), seed=0)
    assert off.suspects == [("pixel", 0, None)] and len(layers_seen) == 1
    fixed = create_probe("suspects", case.model, units, fit, held, Options(target=2, **quick), seed=0)
    assert fixed.suspects == [("pixel", 2, None), ("feature", 2, layers_seen[1]), ("feature", 2, last)]

    # suspect_weights="anomaly": each suspect weighs its anomaly index; the score is the
    # weighted mean of the parts' scores (a user target keeps equal weights)
    weighted = create_probe("suspects", case.model, units, fit, held,
                            Options(suspect_weights="anomaly", large_mask_accuracy_ratio=2.0, **quick),
                            seed=0)
    index = torch.tensor([float(weighted.reversed.anomaly_index[0]), float(weighted.reversed.anomaly_index[7]),
                          float(weighted.feature_reverses[1].anomaly_index[4])])
    assert torch.allclose(weighted.weights, index / index.sum())
    assert weighted.weights[1] > weighted.weights[0]  # the 300-norm mask is the larger outlier
    masks = torch.ones(3, units.total)
    masks[1, :5] = 0
    masks[2, ::3] = 0
    parts = torch.stack([q.score(masks).float() for q in weighted.parts])
    assert torch.allclose(weighted.score(masks), (weighted.weights[:, None] * parts).sum(0))
    assert [s["weight"] for s in weighted.details()["suspects"]] == [round(float(w), 4) for w in weighted.weights]
    assert torch.allclose(p.weights, torch.full((3,), 1 / 3))
    assert torch.allclose(p.score(masks), parts.mean(0))
    fixed_weighted = create_probe("suspects", case.model, units, fit, held,
                                  Options(target=2, suspect_weights="anomaly", **quick), seed=0)
    assert torch.allclose(fixed_weighted.weights, torch.full((3,), 1 / 3))
    with pytest.raises(ConfigError, match="suspect_weights must be one of equal, anomaly"):
        Options(suspect_weights="max")


def test_unlearn_probe_runs_through_the_defense(backdoor_case):
    case = backdoor_case
    r = tp.repair(case.model, case.clean, method="onp", probe="unlearn", unlearn_epochs=5,
                  recover_epochs=3, episodes=8, episodes_per_update=4)
    assert r.details["probe"]["probe"] == "unlearn" and len(r.details["reward_curve"]) == 2


def test_encoders_convs_and_edge_rules(backdoor_case):
    case = backdoor_case
    for extra in ({"encoder": "mlp"}, {"conv": "gat"}, {"edge_rule": "neighbours", "gnn_layers": 3},
                  {"refine_focus": "answered"}):
        r = tp.repair(case.model, case.clean, method="onp", **CHEAP, **extra)
        assert len(r.details["episodes"]["reward"]) == 8, extra
        assert r.options[next(iter(extra))] == next(iter(extra.values()))
    # the cheap probe has no suspects to restrict: the refinement scores as the agent's reward
    assert r.details["choice"]["refine_focus"]["answered_classes"] is None


# -- bad input -----------------------------------------------------------------------------------

def test_bad_inputs_give_clear_errors_and_leave_the_model_alone(backdoor_case):
    case = backdoor_case
    state = _state(case.model)
    x, y = case.clean.tensors()
    with pytest.raises(DataError, match="at least 50"):
        tp.repair(case.model, (x[:40], y[:40]), method="onp", **CHEAP)
    with pytest.raises(DataError, match="too few clean images for ONP's split"):
        tp.repair(case.model, (x[:60], y[:60]), method="onp", holdout=0.05, **CHEAP)
    with pytest.raises(ConfigError, match="episodes must be an integer >= 1"):
        tp.repair(case.model, case.clean, method="onp", episodes=0)
    with pytest.raises(ConfigError, match="unknown probe"):
        tp.repair(case.model, case.clean, method="onp", probe="oracle")
    with pytest.raises(ConfigError, match="encoder"):
        tp.repair(case.model, case.clean, method="onp", encoder="transformer")
    with pytest.raises(ConfigError, match="target"):
        tp.repair(case.model, case.clean, method="onp", target="zero")
    with pytest.raises(DataError, match="reward is NaN"):
        tp.repair(case.model, case.clean, method="onp", **{**CHEAP, "probe": "test-nan"})
    broken = models.create("vgg_small", 10, 1, dataset="mnist", widths=((16, 16), (32, 32), (64, 64)))
    broken.load_state_dict(case.model.state_dict())
    with torch.no_grad():
        broken.features[7].weight[0, 0, 0, 0] = float("inf")
    broken_state = _state(broken)
    with pytest.raises(GraphBuildError, match="features.7"):
        tp.repair(broken, case.clean, method="onp", **CHEAP)
    assert issubclass(GraphBuildError, TrojanPruneError)
    assert _same_state(broken, broken_state)
    assert _same_state(case.model, state)
    assert not any(m._forward_hooks for m in case.model.modules())


def test_fewer_than_500_images_warns_but_runs(backdoor_case):
    case = backdoor_case
    with pytest.warns(UserWarning, match="only 120 clean images"):
        r = tp.repair(case.model, _small_clean(case, 120), method="onp", **CHEAP)
    parts = r.details["clean_images"]
    assert parts["fit"] + parts["held_out"] == 120 and abs(parts["fit"] - parts["held_out"]) <= 10


def test_options_from_cli_strings(backdoor_case):
    from trojanprune.defenses.base import make_options
    from trojanprune.defenses.onp import Options

    o = make_options(Options, {"target": "3", "reverse_steps": "none", "episodes": "64",
                               "score_margin": "0", "encoder": "mlp"}, "onp")
    assert (o.target, o.reverse_steps, o.episodes, o.score_margin, o.encoder) == (3, None, 64, 0.0, "mlp")
    assert math.isclose(Options().backdoor_weight, 1.0)
    with pytest.raises(ConfigError, match="backdoor_weight"):
        make_options(Options, {"backdoor_weight": "nan"}, "onp")
    assert make_options(Options, {"confirm_on_all": "off"}, "onp").confirm_on_all is False
    with pytest.raises(ConfigError, match="confirm_on_all of onp is true or false, got 'maybe'"):
        make_options(Options, {"confirm_on_all": "maybe"}, "onp")
    # a number or "off": the option parses its own words, the CLI does not force a float
    assert make_options(Options, {"small_mask_ratio": "off"}, "onp").small_mask_ratio is None
    assert make_options(Options, {"small_mask_ratio": "4"}, "onp").small_mask_ratio == 4.0
    with pytest.raises(ConfigError, match="small_mask_ratio takes a number or 'off'"):
        make_options(Options, {"small_mask_ratio": "abc"}, "onp")


def test_the_pixel_reverse_stops_each_class_as_it_settles_only_when_asked(monkeypatch):
    import trojanprune.reverse as reverse
    from trojanprune.defenses.onp import Options
    from trojanprune.onp.probes import pixel_reverse

    seen = []
    monkeypatch.setattr(reverse, "reverse_triggers", lambda *a, **k: seen.append(k["per_class_stop"]))
    fit = CleanData(torch.zeros(4, 3, 8, 8), torch.tensor([0, 1, 0, 1]), 2)
    pixel_reverse(None, fit, Options(), 0, False)
    pixel_reverse(None, fit, Options(reverse_per_class_stop=True), 0, False)
    pixel_reverse(None, fit, Options(), 0, False, per_class_stop=True)  # a caller's choice wins
    pixel_reverse(None, fit, object(), 0, False)  # options without the field: the batched stop
    assert seen == [False, True, True, False]
    with pytest.raises(ConfigError, match="reverse_per_class_stop must be true or false"):
        Options(reverse_per_class_stop="yes")


def test_the_small_mask_ratio_reaches_both_mask_reverses(monkeypatch):
    import trojanprune.reverse as reverse
    from trojanprune.defenses.onp import Options
    from trojanprune.onp.probes import feature_reverse, pixel_reverse

    seen = []
    monkeypatch.setattr(reverse, "reverse_triggers", lambda *a, **k: seen.append(("pixel", k["small_mask_ratio"])))
    monkeypatch.setattr(reverse, "reverse_feature_triggers",
                        lambda *a, **k: seen.append(("feature", k["small_mask_ratio"])))
    fit = CleanData(torch.zeros(4, 3, 8, 8), torch.tensor([0, 1, 0, 1]), 2)
    pixel_reverse(None, fit, Options(), 0, False)
    feature_reverse(None, None, fit, Options(small_mask_ratio="off"), 0, False, layer="x")
    pixel_reverse(None, fit, Options(small_mask_ratio=4), 0, False)
    assert seen == [("pixel", 3.0), ("feature", None), ("pixel", 4.0)]
    with pytest.raises(ConfigError, match="small_mask_ratio"):
        Options(small_mask_ratio=0.5)


class _Dense(torch.nn.Module):
    """DenseNet-style: a layer's channels are a slice of the BatchNorm that reads the concat."""

    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.conv1 = torch.nn.Conv2d(8, 6, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(14)
        self.conv2 = torch.nn.Conv2d(14, 6, 3, padding=1)
        self.bn2 = torch.nn.BatchNorm2d(20)
        self.fc = torch.nn.Linear(20, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.bn1(torch.cat([x, self.conv1(x)], 1)))
        x = torch.relu(self.bn2(torch.cat([x, self.conv2(x)], 1)))
        return self.fc(x.mean((2, 3)))


def test_feature_probes_run_on_a_concatenating_model():
    """The feature reverse writes into a BatchNorm that also carries other layers' channels
    (here the three-quarter layer is the last conv group, so the suspects probe runs it once);
    the feature-trigger probe's signal is per unit. It once wrote all 20 channels of ``bn2``
    and failed to fill conv2's 6-unit signal column."""
    torch.manual_seed(0)
    model = _Dense().eval()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(60, 3, 8, 8, generator=g), torch.arange(60) % 10
    for probe_name in ("suspects", "feature-trigger"):
        result = tp.repair(model, (x, y), method="onp", probe=probe_name, episodes=16,
                           reverse_steps=5, feature_steps=5, feature_per_class=3, warp_steps=5)
        assert result.details["probe"]["feature_reverse"]["layer"] == "conv2"
    signal = dict(zip(result.details["node_features"], range(99)))
    assert "feature_trigger_mask" in signal
    assert sum(len(p) for p in result.details["policy_prune_probability"].values()) == 8 + 6 + 6


def test_activation_features_of_a_block_applied_twice():
    """A module called twice per forward fires its hook twice: one row per image still (the
    mean of the calls), where the rows once doubled and the graph builder failed."""
    from odd_models import SharedBlock
    from trojanprune.onp.graphs import channel_activations

    torch.manual_seed(0)
    model = SharedBlock().eval()
    x = torch.rand(7, 3, 16, 16)
    units = discover_units(model, x[:1])
    mean, std, per_image = channel_activations(model, units, x, batch_size=4)
    assert per_image.shape == (7, units.total) and mean.shape == std.shape == (units.total,)
    assert torch.isfinite(per_image).all() and bool((per_image >= 0).all())


def test_warp_probe_tracks_a_warping_backdoor(wanet_case):
    """The reversed-warp probe on a model with a real WaNet backdoor: it names the target, and
    the channels its signal ranks first carry the real warp (pruning them lowers both its score
    and the true ASR), while as many random channels leave both."""
    from trojanprune.defenses.onp import Options

    case = wanet_case
    x, y = case.clean.tensors()
    fit, held = CleanData(x, y, 10).split(0.5, seed=0)
    units = discover_units(case.model, x[:1])
    p = create_probe("reversed-warp", case.model, units, fit, held,
                     Options(probe="reversed-warp", warp_steps=30), seed=0)
    assert p.target == 0 and p.target_source.startswith("flagged"), p.details()
    assert p.signal().shape == (units.total, 2) and "reversed_warp_displacement" in p.images
    keep = torch.ones(2, units.total)
    keep[0, p.signal()[:, 0].argsort(descending=True)[:8]] = 0
    keep[1, torch.randperm(units.total, generator=torch.Generator().manual_seed(0))[:8]] = 0
    score = p.score(keep)
    tx, ty = case.test.tensors()
    true_asr = MaskEvaluator(case.model, units, case.attack.apply(tx[ty != 0])).target_rate(keep, 0)
    accuracy = MaskEvaluator(case.model, units, tx, ty).accuracy(keep)
    assert float(score[0]) < 0.2 and float(true_asr[0]) < 0.1 and float(accuracy[0]) > 0.9
    assert float(score[1]) > 0.8 and float(true_asr[1]) > 0.8
    json.dumps(p.details())


def test_suspects_probe_adds_the_warp_reverses_flags(wanet_case, backdoor_case, monkeypatch):
    from trojanprune.defenses.onp import Options

    quick = dict(reverse_steps=30, reverse_batch_size=4, feature_steps=30, feature_per_class=3,
                 warp_steps=30, suspect_large_masks=False, suspect_last_layer=False)
    _report_flags(monkeypatch, "reverse_triggers", [])
    _report_flags(monkeypatch, "reverse_feature_triggers", [3])
    x, y = wanet_case.clean.tensors()
    fit, held = CleanData(x, y, 10).split(0.5, seed=0)
    units = discover_units(wanet_case.model, x[:1])
    p = create_probe("suspects", wanet_case.model, units, fit, held, Options(**quick), seed=0)
    layer = p.features.layer
    # the warp reverse's flag joins the others' (here: a forced feature flag), no vote
    assert p.suspects == [("warp", 0, None), ("feature", 3, layer)] and p.target is None
    assert p.details()["warp_reverse"]["flagged"] == [0]
    assert p.setup_evaluations == p.reversed.evaluations + p.features.evaluations + p.warps.evaluations
    assert p.signal().shape == (units.total, 4)
    assert torch.equal(p.signal()[:, :2], p.warp[0].signal())  # the input-space columns
    assert "reversed_warp_displacement_class0" in p.images
    # a user target: that class in every space, the warp's too
    fixed = create_probe("suspects", wanet_case.model, units, fit, held, Options(target=5, **quick), seed=0)
    assert ("warp", 5, None) in fixed.suspects and fixed.target == 5
    # off: no warp reverse, no warp suspect
    off = create_probe("suspects", wanet_case.model, units, fit, held,
                       Options(suspect_warps=False, **quick), seed=0)
    assert off.warps is None and off.suspects == [("feature", 3, layer)]
    assert "warp_reverse" not in off.details()
    # where the warp reverse flags nothing (a patch backdoor), the probe is what it was without it
    bx, by = backdoor_case.clean.tensors()
    bfit, bheld = CleanData(bx, by, 10).split(0.5, seed=0)
    bunits = discover_units(backdoor_case.model, bx[:1])
    on = create_probe("suspects", backdoor_case.model, bunits, bfit, bheld, Options(**quick), seed=0)
    without = create_probe("suspects", backdoor_case.model, bunits, bfit, bheld,
                           Options(suspect_warps=False, **quick), seed=0)
    assert on.warps.flagged == [] and on.suspects == without.suspects
    assert torch.equal(on.signal(), without.signal())
    masks = torch.ones(2, bunits.total)
    masks[1, :10] = 0
    assert torch.equal(on.score(masks), without.score(masks))
    with pytest.raises(ConfigError, match="warp_steps"):
        Options(warp_steps=0)
    with pytest.raises(ConfigError, match="warp_strength"):
        Options(warp_strength=-1.0)
