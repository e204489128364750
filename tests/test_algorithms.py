"""Exact checks of orders, the AO-ARM algorithms and the self-consistency loss on enumerable problems."""
import itertools
import math

import pytest
import torch
from scipy import stats

from mamlib import arm
from mamlib.marginal import (log_marginal, normalized_log_marginal, self_consistency_loss, self_consistency_residual,
                             self_consistency_terms, surprise_proposal)
from mamlib.nets import MLPPair, Transformer
from mamlib.nets.base import Backbone, at_positions
from mamlib.orders import (fixed_order, from_missing_coded, index_at, order_observed_first, random_last_steps,
                           random_order, random_prefix, to_missing_coded)

from exact import BruteForceNet, all_states, chain_log_joint

torch.set_num_threads(1)
D, K = 4, 3


def small_transformer(seed=0, marginal=False):
    torch.manual_seed(seed)
    return Transformer(K, D, d_model=16, num_layers=1, num_heads=2, mlp_dim=32, marginal=marginal, marginal_hidden=16).eval()


def test_orders_are_permutations_and_observed_first():
    rank = random_order(50, 7)
    assert torch.equal(rank.sort(1).values, torch.arange(7).expand(50, 7))
    observed = torch.rand(50, 7) < 0.4
    order = order_observed_first(observed)
    counts = observed.sum(1, keepdim=True)
    assert torch.equal(order < counts, observed)  # observed positions occupy the first |S| steps
    assert torch.equal(index_at(fixed_order(2, 5, "backward"), 0), torch.tensor([4, 4]))
    with pytest.raises(ValueError, match="unknown order"):
        fixed_order(1, 3, "sideways")


def test_sortless_draws_have_the_distribution_of_a_random_order():
    # random_prefix: P(prefix = S, position = p) = 1 / (D² C(D-1, |S|)) for p not in S, as for a uniform order and a
    # uniform step; random_last_steps: every ordered pair of distinct positions is last equally often (1 / 12 for
    # D = 4) and the ranks are a permutation. 400,000 draws: the largest relative deviation over the cells is 0.018 /
    # 0.012 here (sampling noise: about 1 % per cell); a draw that favoured one size or position by 10 % fails 0.06.
    dim, draws, generator = 4, 400_000, torch.Generator().manual_seed(0)
    prefix, position = random_prefix(draws, dim, generator=generator)
    assert not prefix[torch.arange(draws), position].any()
    codes = (prefix.long() * 2 ** torch.arange(dim)).sum(1) * dim + position
    counts = torch.bincount(codes, minlength=2 ** dim * dim).double() / draws
    for subset in range(2 ** dim):
        members = [j for j in range(dim) if subset >> j & 1]
        for p in range(dim):
            expected = 0.0 if p in members else 1 / (dim ** 2 * math.comb(dim - 1, len(members)))
            observed = counts[subset * dim + p].item()
            assert observed == 0.0 if expected == 0.0 else abs(observed / expected - 1) < 0.06
    rank = random_last_steps(draws, dim, 2, generator=generator)
    assert torch.equal(rank.sort(1).values, torch.arange(dim).expand(draws, dim))
    pairs = index_at(rank, dim - 2) * dim + index_at(rank, dim - 1)
    pair_freq = torch.bincount(pairs, minlength=dim * dim).double() / draws
    for first, second in itertools.permutations(range(dim), 2):
        assert abs(pair_freq[first * dim + second].item() * 12 - 1) < 0.06


def test_missing_coding_round_trip():
    array = torch.tensor([[0, -1, 2], [-1, -1, 1]])
    x, mask = from_missing_coded(array)
    assert mask.tolist() == [[True, False, True], [False, False, True]]
    assert torch.equal(to_missing_coded(x, mask), array)


@torch.no_grad()
def test_chain_rule_normalises_for_any_order_and_chunking():
    net = small_transformer()
    states = all_states(D, K)
    for direction in ("forward", "backward"):
        order = fixed_order(len(states), D, direction)
        log_p = arm.chain_rule_log_prob(net, states, order=order)
        assert torch.logsumexp(log_p, 0).item() == pytest.approx(0.0, abs=1e-5)
        chunked = arm.chain_rule_log_prob(net, states, order=order, steps_per_pass=3)
        assert torch.allclose(log_p, chunked, atol=1e-6)


@torch.no_grad()
def test_partial_chain_rule_is_the_exact_marginal_of_that_order():
    net = small_transformer(seed=1)
    states = all_states(D, K)
    observed = torch.tensor([True, False, True, False])
    order = torch.tensor([0, 2, 1, 3])  # the observed positions 0 and 2 first
    joint = arm.chain_rule_log_prob(net, states, order=order.expand(len(states), D))
    x = torch.tensor([[2, 0, 1, 0]])
    partial = arm.chain_rule_log_prob(net, x, observed.unsqueeze(0), order=order.unsqueeze(0))
    agree = (states[:, observed] == x[:, observed]).all(1)
    assert partial.item() == pytest.approx(torch.logsumexp(joint[agree], 0).item(), abs=1e-5)


@torch.no_grad()
def test_one_step_estimator_is_unbiased_for_order_average():
    net = small_transformer(seed=2)
    x = torch.tensor([[1, 0, 2, 1]])
    exact = torch.stack([arm.chain_rule_log_prob(net, x, order=torch.tensor([p]).argsort(1).argsort(1))
                         for p in itertools.permutations(range(D))]).mean().item()  # E over all 24 orders
    draws = arm.one_step_log_prob(net, x.repeat(20000, 1), generator=torch.Generator().manual_seed(0))
    standard_error = draws.std().item() / math.sqrt(len(draws))
    assert abs(draws.mean().item() - exact) < 4 * standard_error


@torch.no_grad()
def test_sampling_log_prob_is_the_chain_rule_of_the_samples():
    net = small_transformer(seed=4)
    order = fixed_order(64, D, "backward")
    samples, log_prob = arm.sample_unconditional(net, 64, order=order, generator=torch.Generator().manual_seed(2),
                                                 return_log_prob=True)
    assert torch.allclose(log_prob, arm.chain_rule_log_prob(net, samples, order=order), atol=1e-5)
    # with evidence: log p(new values | evidence) = log p(all) - log p(evidence) along the same order
    observed = torch.tensor([[False, True, False, True]]).repeat(64, 1)
    order = order_observed_first(observed, generator=torch.Generator().manual_seed(3))
    filled, log_prob = arm.sample(net, samples, observed, order=order, return_log_prob=True)
    expected = arm.chain_rule_log_prob(net, filled, order=order) - arm.chain_rule_log_prob(net, filled, observed, order=order)
    assert torch.allclose(log_prob, expected, atol=1e-5)


@pytest.mark.parametrize("steps_per_pass", [1, 3])
def test_piecewise_chain_rule_backward_gives_the_whole_graph_gradient(steps_per_pass):
    net = small_transformer(seed=5).train()
    x = all_states(D, K)[::7]
    order = random_order(len(x), D, generator=torch.Generator().manual_seed(4))
    weights = torch.randn(len(x), generator=torch.Generator().manual_seed(5))
    net.zero_grad()
    whole = arm.chain_rule_log_prob(net, x, order=order)
    (weights.double() * whole).sum().backward()
    expected = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    returned = arm.backward_chain_rule(net, x, weights, order=order, steps_per_pass=steps_per_pass)
    assert torch.allclose(returned, whole.detach(), atol=1e-6)
    for parameter, reference in zip(net.parameters(), expected):
        assert torch.allclose(parameter.grad, reference, atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_conditional_samples_keep_evidence_and_match_model():
    net = small_transformer(seed=3)
    observed = torch.tensor([[False, True, False, True]])
    evidence = torch.tensor([[0, 2, 0, 1]])
    count = 6000
    order = torch.tensor([[2, 0, 3, 1]])  # observed 1 and 3 first, then 0, then 2
    samples = arm.sample(net, evidence.repeat(count, 1), observed.repeat(count, 1), order=order.repeat(count, 1),
                         generator=torch.Generator().manual_seed(1))
    assert torch.equal(samples[:, observed[0]], evidence[:, observed[0]].repeat(count, 1))
    # exact conditional p_sigma(x_0, x_2 | x_1, x_3) from the chain rule along the same order
    states = all_states(D, K)
    states = states[(states[:, observed[0]] == evidence[:, observed[0]]).all(1)]
    log_joint = arm.chain_rule_log_prob(net, states, order=order.repeat(len(states), 1))
    expected = torch.softmax(log_joint, 0).numpy() * count
    index = {tuple(s.tolist()): i for i, s in enumerate(states)}
    observed_counts = torch.bincount(torch.tensor([index[tuple(s.tolist())] for s in samples]), minlength=len(states)).numpy()
    assert stats.chisquare(observed_counts, expected).pvalue > 1e-3


def test_aoarm_loss_matches_its_definition():
    net = small_transformer(seed=4)
    x = torch.randint(0, K, (5, D))
    torch.manual_seed(7)
    loss, per_example = arm.aoarm_loss(net, x)
    torch.manual_seed(7)  # replay the same order and step draws
    rank = random_order(5, D)
    step = torch.randint(0, D, (5,))
    observed = rank < step.unsqueeze(1)
    log_p = arm.value_log_probs(arm.conditional_log_probs(net, x, observed), x)
    expected = torch.stack([-(log_p[b][~observed[b]]).mean() for b in range(5)])
    assert torch.allclose(per_example, expected.detach(), atol=1e-6)
    assert loss.item() == pytest.approx(expected.mean().item(), abs=1e-6)


def test_self_consistency_loss_is_zero_for_exact_marginals():
    log_joint = chain_log_joint(D, K, seed=5)
    net = BruteForceNet(log_joint, D, K)
    x = all_states(D, K)[torch.randperm(K ** D)[:40]]
    loss, parts = self_consistency_loss(net, x)
    assert parts["consistency"] < 1e-10 and abs(parts["log_z_model"]) < 1e-6 and loss.item() < 1e-6
    # a constant offset stays consistent but is caught by the normaliser term (f(empty) must be 0)
    shifted = BruteForceNet(log_joint, D, K, marginal_offset=0.7)
    residual, f_empty = self_consistency_residual(shifted, x)
    assert residual.abs().max().item() < 1e-5 and f_empty.item() == pytest.approx(0.7, abs=1e-5)
    loss_shifted, _ = self_consistency_loss(shifted, x)
    assert loss_shifted.item() == pytest.approx(0.49, abs=1e-4)
    assert torch.allclose(normalized_log_marginal(shifted, x, torch.ones_like(x, dtype=torch.bool)),
                          log_joint[[int("".join(map(str, r.tolist())), K) for r in x]], atol=1e-6)


def test_surprise_proposal_mixes_surprise_and_uniform_over_the_remaining_positions():
    surprise = torch.tensor([[0.0, 3.0, 1.0, 9.0], [0.0, 0.0, 0.0, 0.0]])
    remaining = torch.tensor([[True, True, True, False], [True, False, True, True]])
    proposal = surprise_proposal(surprise, remaining, 0.6)
    assert torch.allclose(proposal[0], torch.tensor([0.4 / 3, 0.6 * 0.75 + 0.4 / 3, 0.6 * 0.25 + 0.4 / 3, 0.0]))
    assert torch.allclose(proposal[1], torch.tensor([1 / 3, 0.0, 1 / 3, 1 / 3]))  # no surprise anywhere: uniform
    for share in (0.0, 1.0):
        with pytest.raises(ValueError, match="step_surprise_share"):
            surprise_proposal(surprise, remaining, share)


def test_surprise_weighted_steps_keep_the_expected_loss():
    # step_surprise_share: the next position is drawn in proportion to -log p (mixed with uniform) and the squared
    # residual importance-weighted, so over many draws the mean matches the uniform draw's (and the draws do favour
    # surprising steps). 40,000 draws of one untrained pair's constraints; the bound is 4 standard errors.
    torch.manual_seed(2)
    net = MLPPair(K, D, hidden=16, num_layers=2, marginal=True)
    x = torch.randint(0, K, (1, D)).repeat(40_000, 1)
    with torch.no_grad():
        uniform = self_consistency_terms(net, x, generator=torch.Generator().manual_seed(1))["squared_residual"]
        weighted = self_consistency_terms(net, x, generator=torch.Generator().manual_seed(1),
                                          surprise_share=0.7)["squared_residual"]
    standard_error = (uniform.var() / len(x) + weighted.var() / len(x)).sqrt()
    assert abs(uniform.mean() - weighted.mean()) < 4 * standard_error
    assert standard_error < 0.1 * uniform.mean()  # the comparison has the power to see a 40 % bias
    assert not torch.allclose(uniform, weighted)
    exact = BruteForceNet(chain_log_joint(D, K, seed=5), D, K)  # the drawn step is the one the extended set adds
    terms = self_consistency_terms(exact, x[:200], generator=torch.Generator().manual_seed(3), surprise_share=0.7)
    assert terms["residual"].abs().max() < 1e-5


def test_extra_rows_ride_in_the_consistency_pass_without_changing_it():
    # extra_rows appends other rows (complete rows for the energy KL) to the marginal pass: f_extra is their f and the
    # rest is unchanged
    torch.manual_seed(4)
    net = MLPPair(K, D, hidden=16, num_layers=2, marginal=True)
    x, order = torch.randint(0, K, (10, D)), random_order(10, D)
    other_x, other_mask = torch.randint(0, K, (7, D)), torch.rand(7, D) < 0.5
    plain = self_consistency_terms(net, x, order=order, generator=torch.Generator().manual_seed(2))
    joined = self_consistency_terms(net, x, order=order, generator=torch.Generator().manual_seed(2),
                                    extra_rows=(other_x, other_mask))
    assert "f_extra" not in plain
    assert torch.allclose(joined["f_extra"], log_marginal(net, other_x, other_mask), atol=1e-5)
    joined["f_extra"].sum().backward()  # the REINFORCE gradient reaches the marginal network through it
    assert net.marginal_mlp.input.weight.grad.abs().sum() > 0
    for key in ("residual", "squared_residual", "f_empty"):
        assert torch.allclose(joined[key], plain[key], atol=1e-5), key


class TableNet(Backbone):
    """D = 2, K = 2 backbone whose outputs are looked up in tables set by hand: f(x_S) and the logits at every position
    are indexed by the row's values with -1 at the missing positions (3 x 3 = 9 keys)."""

    num_positions, num_classes = 2, 2
    marginal_prefixes = ("f_table",)

    def __init__(self, f: dict, logits: dict):
        super().__init__()
        keys = list(itertools.product((-1, 0, 1), repeat=2))
        assert sorted(keys) == sorted(f) and sorted(keys) == sorted(logits)
        self.f_table = torch.nn.Parameter(torch.tensor([f[key] for key in keys]))
        self.logit_table = torch.nn.Parameter(torch.tensor([logits[key] for key in keys]))  # (9, D, K)
        self.index = {key: i for i, key in enumerate(keys)}

    def key_index(self, x, observed_mask):  # (B,) row of the tables, as keys are listed: (-1, -1), (-1, 0), ...
        values = torch.where(observed_mask, x, -1) + 1
        return 3 * values[:, 0] + values[:, 1]

    def forward(self, x, observed_mask, need_logits=True, need_marginal=False, positions=None):
        rows = self.key_index(x, observed_mask)
        return (self.f_table[rows] if need_marginal else None,
                at_positions(self.logit_table[rows], positions) if need_logits else None)


# p(x0, x1) of the consistent construction, and what the inconsistent one changes: f(1, 1) up by 0.3, and the
# conditional of x0 given nothing set to 1/2, 1/2 instead of p(x0) = 0.3, 0.7.
JOINT = {(0, 0): 0.1, (0, 1): 0.2, (1, 0): 0.3, (1, 1): 0.4}
F_SHIFT, X0_MARGINAL = 0.3, (0.3, 0.7)


def joint_tables():
    """f = log p(x_S) and logits = log p(x_S, x_j = k) at each missing position j, from JOINT: self-consistent."""
    mass = lambda key: sum(p for state, p in JOINT.items() if all(k in (-1, v) for k, v in zip(key, state)))  # noqa: E731
    f, logits = {}, {}
    for key in itertools.product((-1, 0, 1), repeat=2):
        f[key] = math.log(mass(key))
        logits[key] = [[math.log(mass(key[:j] + (k,) + key[j + 1:])) for k in range(2)] if key[j] == -1 else [0.0, 0.0]
                       for j in range(2)]
    return f, logits


def hand_residual(state, prefix, position):
    """f(x_prefix) + log p(x_j | x_prefix) - f(x_prefix + j) of the inconsistent construction, worked by hand."""
    if not prefix:  # the first step: f(empty) = log 1 = 0 on both sides of a correct conditional, except for x0's
        return math.log(0.5) - math.log(X0_MARGINAL[state[0]]) if position == 0 else 0.0
    return -F_SHIFT if state == (1, 1) else 0.0  # the last step reaches the complete row, whose f alone was shifted


def test_self_consistency_loss_of_a_hand_set_model_is_its_hand_worked_value():
    f, logits = joint_tables()
    consistent = TableNet(f, logits)
    f[(1, 1)] += F_SHIFT
    logits[(-1, -1)][0] = [0.0, 0.0]
    inconsistent = TableNet(f, logits)
    # every state under both orders (rank: forward [0, 1], backward [1, 0]), 25 times: the step is drawn per row
    states = torch.tensor(list(JOINT)).repeat_interleave(2, 0).repeat(25, 1)
    rank = torch.tensor([[0, 1], [1, 0]]).repeat(len(states) // 2, 1)
    log_z = -0.5  # f(empty) = 0, so the normaliser adds (0 + 0.5)^2
    terms = self_consistency_terms(inconsistent, states, order=rank, generator=torch.Generator().manual_seed(0))
    rows = torch.arange(len(states))
    steps = rank[rows, terms["position"]]  # the 0-based step whose position the draw added
    expected = []
    for state, order, step, position in zip(states.tolist(), rank.tolist(), steps.tolist(), terms["position"].tolist()):
        prefix = {j for j in range(2) if order[j] < step}  # the positions generated before that step, by hand
        expected.append(hand_residual(tuple(state), prefix, position))
    expected = torch.tensor(expected, dtype=torch.float64)
    assert {(tuple(s), tuple(o), t) for s, o, t in zip(states.tolist(), rank.tolist(), steps.tolist())} == \
        set(itertools.product(JOINT, [(0, 1), (1, 0)], [0, 1]))  # all 16 (state, order, step) constraints were drawn
    assert torch.allclose(terms["residual"].double(), expected, atol=1e-6, rtol=0)
    assert terms["f_empty"].item() == 0.0

    loss, parts = self_consistency_loss(inconsistent, states, log_z=log_z, order=rank,
                                        generator=torch.Generator().manual_seed(0))  # the same draws
    consistency = expected.pow(2).mean().item()
    assert parts["consistency"] == pytest.approx(consistency, abs=1e-6) and parts["normalizer"] == 0.25
    assert loss.item() == pytest.approx(2 * consistency + 0.25, abs=1e-6)
    # d loss / d f(key): each row adds 2 D / B * residual at its prefix's key and minus that at its extended key, and
    # the normaliser 2 (f(empty) - log z) at the empty key
    loss.backward()
    gradient = torch.zeros(9, dtype=torch.float64)
    extended = terms["extended_mask"]
    prefix_mask = extended.clone()
    prefix_mask[rows, terms["position"]] = False
    for prefix_row, extended_row, residual in zip(inconsistent.key_index(states, prefix_mask),
                                                  inconsistent.key_index(states, extended), expected):
        gradient[prefix_row] += 2 * 2 / len(states) * residual
        gradient[extended_row] -= 2 * 2 / len(states) * residual
    gradient[inconsistent.index[(-1, -1)]] += 2 * (0.0 - log_z)
    assert torch.allclose(inconsistent.f_table.grad.double(), gradient, atol=1e-6, rtol=0)

    # the drawn prefix without an order (random_prefix): the same hand residuals, at the prefix the draw reports
    terms = self_consistency_terms(inconsistent, states, generator=torch.Generator().manual_seed(1))
    prefixes = [{j for j in range(2) if row[j] and j != position}
                for row, position in zip(terms["extended_mask"].tolist(), terms["position"].tolist())]
    assert {len(prefix) for prefix in prefixes} == {0, 1} and set(terms["position"].tolist()) == {0, 1}
    assert terms["extended_mask"][rows, terms["position"]].all()
    assert torch.allclose(terms["residual"].double(), torch.tensor(
        [hand_residual(tuple(s), prefix, position) for s, prefix, position in
         zip(states.tolist(), prefixes, terms["position"].tolist())], dtype=torch.float64), atol=1e-6, rtol=0)

    # the consistent construction: every residual 0 and the loss 0 when log z = f(empty) = 0, up to float32 rounding of
    # the logs (largest residual measured 6e-8, one unit in the last place near 1; consistency 9e-16)
    for order in (rank, None):
        generator = lambda: torch.Generator().manual_seed(2)  # noqa: E731
        assert self_consistency_terms(consistent, states, order=order, generator=generator())["residual"].abs().max() < 1e-6
        loss, parts = self_consistency_loss(consistent, states, order=order, generator=generator())
        assert loss.item() < 1e-12 and parts["normalizer"] == 0.0


def test_metropolis_censor_and_resample_targets_f_whatever_the_conditionals():
    # 8 states, an arbitrary log f and an untrained conditional MLP as the proposal: after 100 moves the Metropolis
    # chains' histogram matches f / Z (total variation 0.006 measured with these seeds; 0.04 after 40 moves, still
    # converging; sampling noise ~0.01 for 6000 chains), while plain censor-and-resample stays at the MLP's own
    # distribution (0.56 measured).
    dim, generator = 3, torch.Generator().manual_seed(0)
    log_f_table = 2.0 * torch.randn(2 ** dim, generator=generator, dtype=torch.float64)
    weights = 2 ** torch.arange(dim - 1, -1, -1)

    def log_target(x):
        return log_f_table[(x * weights).sum(1)]

    torch.manual_seed(1)
    net = MLPPair(2, dim, hidden=16, num_layers=2, marginal=False)
    target = torch.softmax(log_f_table, 0)
    start = torch.zeros(6000, dim, dtype=torch.long)
    metropolis, plain = start.clone(), start.clone()
    accepted = []
    for _ in range(100):
        metropolis, accept, log_f = arm.metropolis_censor_and_resample(net, metropolis, 2, log_target, generator=generator)
        assert torch.equal(log_f, log_target(metropolis))
        plain = arm.censor_and_resample(net, plain, 2, generator=generator)
        accepted.append(accept.float().mean().item())

    def total_variation(states):
        counts = torch.bincount((states * weights).sum(1), minlength=2 ** dim).double()
        return 0.5 * (counts / counts.sum() - target).abs().sum().item()

    assert total_variation(metropolis) < 0.03
    assert total_variation(plain) > 0.2  # the check can tell a chain that does not target f
    assert 0.05 < sum(accepted) / len(accepted) < 0.95  # both accepted and rejected moves were exercised


def test_regenerated_onpolicy_rows_keep_data_and_redraw_a_uniform_number_of_steps():
    # onpolicy_init=regenerated: data rows (all zeros) with the last n ~ U{1..D} steps of a random order re-drawn by the
    # conditionals. A product target that puts probability 1 - 2e-9 on value 1 at every position makes every re-drawn
    # position a 1, so each row's count of ones is its n: at least 1, at most D, and spread over the whole range.
    from types import SimpleNamespace
    from omegaconf import OmegaConf
    from mamlib.stages.mam_mle import MarginalObjective

    dim, classes, rows = 6, 2, 600
    log_joint = 20.0 * all_states(dim, classes).sum(1).double()
    net = BruteForceNet(log_joint, dim, classes)
    cfg = OmegaConf.create({"include_onpolicy": True, "onpolicy_init": "regenerated", "seed": 0, "train": {"batch_size": rows}})
    dataset = SimpleNamespace(train=[torch.zeros(dim, dtype=torch.long)] * rows)
    objective = MarginalObjective(net, cfg, dataset, torch.device("cpu"))
    objective.on_epoch_start(0)
    redrawn = objective.samples.sum(1)
    counts = torch.bincount(redrawn, minlength=dim + 1)
    assert counts[0] == 0 and redrawn.max() <= dim
    assert (counts[1:] > rows / dim / 2).all()  # every n in 1..D occurs (expected 100 each; measured 90-111)
