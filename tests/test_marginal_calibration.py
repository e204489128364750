"""Exact and statistical checks of the stage-2 additions: the AO-ARM loss's expectation, the
censor-and-resample sampler, the sum head, the evaluation protocol (independent AO-ARM-S, nested censor sets) and the
calibration summaries. Small problems (D=4, K=3) so every expectation is enumerated or estimated to 4 standard errors."""
import copy
import itertools
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from scipy import stats

from mamlib import arm
from mamlib.calibration import (CalibrationSet, consistency_drift, fit_cells, fit_level, gap_summary, group_error_summary,
                                 random_observed_masks, shift_level)
from mamlib.evaluation import aggregate_correlations
from mamlib.marginal import normalized_log_marginal, self_consistency_loss
from mamlib.nets import MLPPair, Transformer
from mamlib.nets.unet import UNet
from mamlib.stages.mam_mle import ensemble_and_single_order, regenerated_groups

from exact import BruteForceNet, all_states, chain_log_joint

torch.set_num_threads(1)
D, K = 4, 3
ALL_ORDERS = [torch.tensor(p).argsort().argsort() for p in itertools.permutations(range(D))]  # ranks of each permutation


def small_transformer(seed=0, **kwargs):
    torch.manual_seed(seed)
    return Transformer(K, D, d_model=16, num_layers=1, num_heads=2, mlp_dim=32, marginal_hidden=16, **kwargs).eval()


def order_average_log_prob(net, x, observed=None):
    """E_sigma log p_sigma(x_S) over all D! orders (those putting S first give every order of S equally often)."""
    observed = torch.ones_like(x, dtype=torch.bool) if observed is None else observed
    values = []
    for rank in ALL_ORDERS:
        # observed positions first, in the relative order of this permutation
        key = rank.float().unsqueeze(0) + (~observed).float() * D
        values.append(arm.chain_rule_log_prob(net, x, observed, order=key.argsort(1).argsort(1)))
    return torch.stack(values).mean(0)


@torch.no_grad()
def test_expected_aoarm_loss_is_the_order_averaged_nll_per_dimension():
    net = small_transformer(seed=1)  # untrained: its orders disagree, so the identity is not trivially true
    x = torch.tensor([[2, 0, 1, 1]])
    losses = []
    for rank in ALL_ORDERS:
        for step in range(D):
            _, per_example = arm.aoarm_loss(net, x, order=rank.unsqueeze(0), step=torch.tensor([step]))
            losses.append(per_example.item())
    expected = -order_average_log_prob(net, x).item() / D
    assert np.mean(losses) == pytest.approx(expected, abs=1e-6)
    spread = [arm.chain_rule_log_prob(net, x, order=r.unsqueeze(0)).item() for r in ALL_ORDERS]
    assert max(spread) - min(spread) > 0.05  # the orders really differ (otherwise the check would be weak)


@torch.no_grad()
def test_censor_and_resample_keeps_the_first_positions_and_redraws_the_rest():
    net = small_transformer(seed=3)
    x = torch.tensor([[2, 1, 0, 2]])
    order = torch.tensor([[1, 3, 0, 2]])  # position 2 first, then 0, then 3, then 1
    count, erased = 6000, 2  # positions 3 and 1 are re-drawn
    out = arm.censor_and_resample(net, x.repeat(count, 1), erased, order=order.repeat(count, 1),
                                  generator=torch.Generator().manual_seed(4))
    kept = (order < D - erased)[0]
    assert torch.equal(out[:, kept], x[:, kept].repeat(count, 1))
    # the re-drawn pair follows the chain rule along the same order, given the kept positions
    states = all_states(D, K)
    states = states[(states[:, kept] == x[:, kept]).all(1)]
    expected = torch.softmax(arm.chain_rule_log_prob(net, states, order=order.repeat(len(states), 1)), 0).numpy() * count
    index = {tuple(s.tolist()): i for i, s in enumerate(states)}
    counts = np.bincount([index[tuple(s.tolist())] for s in out], minlength=len(states))
    assert stats.chisquare(counts, expected).pvalue > 1e-3
    assert (counts > 0).sum() > 1  # something really was re-drawn


@pytest.mark.parametrize("build", [
    lambda: small_transformer(seed=4, marginal=True, marginal_head="sum"),
    lambda: MLPPair(K, D, hidden=16, num_layers=2, marginal=True, marginal_head="sum"),
])
def test_sum_head_starts_at_zero_scales_with_observed_positions_and_trains(build):
    net = build()
    x = torch.randint(0, K, (8, D), generator=torch.Generator().manual_seed(0))
    observed = torch.rand(8, D, generator=torch.Generator().manual_seed(1)) < 0.5
    assert torch.equal(net(x, observed, need_logits=False, need_marginal=True)[0], torch.zeros(8))  # f = 0 at the start
    loss, _ = self_consistency_loss(net, x)
    loss.backward()
    assert all(p.grad is not None for n, p in net.named_parameters() if n.startswith(net.marginal_prefixes))
    with torch.no_grad():
        for _, parameter in net.named_parameters():
            parameter.add_(0.1)
        empty = torch.zeros_like(observed)
        f_empty = net(x, empty, need_logits=False, need_marginal=True)[0]
        # with nothing observed the output is exactly the learned f(empty), whatever the values
        assert torch.allclose(f_empty, net.marginal_sum.empty.expand(8))
        # values at unobserved positions do not matter
        other = torch.where(observed, x, (x + 1) % K)
        assert torch.allclose(net(x, observed, need_logits=False, need_marginal=True)[0],
                              net(other, observed, need_logits=False, need_marginal=True)[0], atol=1e-5)


@torch.no_grad()
def test_ao_arm_s_uses_an_order_independent_of_ao_arm_e():
    net = small_transformer(seed=5)
    x = torch.tensor([[0, 2, 1, 1]]).repeat(3000, 1)
    torch.manual_seed(0)
    ensemble, single, order_mean = ensemble_and_single_order(net, x, None, orders=1, batch_size=3000, device="cpu")
    # with one E order, a shared order would make E == S for every row; independent orders correlate ~0
    correlation = np.corrcoef(ensemble.numpy(), single.numpy())[0, 1]
    assert abs(correlation) < 0.1, correlation  # sd of a null correlation: 1/sqrt(3000) = 0.018
    assert (ensemble != single).float().mean() > 0.5
    assert torch.allclose(order_mean, ensemble)  # one order: its mean is its log-mean-exp
    ensemble, _, order_mean = ensemble_and_single_order(net, x[:200], None, orders=3, batch_size=200, device="cpu")
    jensen = ensemble - order_mean  # log-mean-exp >= mean, with equality only where the orders agree
    assert (jensen >= -1e-9).all() and jensen.mean() > 1e-3  # 0.008 here: this net's orders disagree a little


@torch.no_grad()
def test_regenerated_groups_have_nested_censor_sets_and_keep_the_observed_values():
    net = small_transformer(seed=6)
    cfg = OmegaConf.create({"seed": 0, "eval": {"variants_per_level": 2, "mask_steps": [1, 2, 4]}})
    rows = torch.randint(0, K, (3, D), generator=torch.Generator().manual_seed(2))
    groups = regenerated_groups(SimpleNamespace(cfg=cfg, device=torch.device("cpu")), net, rows)
    assert len(groups) == 3
    for row, group in zip(rows, groups):
        observed, variants = group["observed"], group["variants"]
        assert group["steps"].tolist() == [1, 1, 2, 2, 4, 4]
        assert observed.sum(1).tolist() == [3, 3, 2, 2, 0, 0]
        for wider, narrower in zip(observed[::2], observed[2::2]):  # more masked -> a subset of the kept positions
            assert torch.equal(narrower & wider, narrower)
        assert torch.equal(torch.where(observed, variants, -1), torch.where(observed, row.expand_as(variants), -1))


def test_calibration_summaries_on_known_values():
    # differences 1 and -3: mean -1, sample std 2 * sqrt(2), standard error 2 * sqrt(2) / sqrt(2) = 2
    assert gap_summary([1.0, -3.0], [0.0, 0.0]) == {"gap_nats": -1.0, "abs_gap_nats": 2.0, "n": 2, "gap_se_nats": 2.0}
    assert math.isnan(gap_summary([1.0], [0.0])["gap_se_nats"])
    summary = group_error_summary([(np.zeros(3), np.array([1.0, 2.0, 3.0])), (np.zeros(2), np.array([-1.0, -1.0]))])
    assert summary["error_mean_nats"] == pytest.approx(0.5) and summary["error_var_nats2"] == pytest.approx(1 / 3)
    masks = random_observed_masks(50, 8, 0.25, torch.Generator().manual_seed(0))
    assert masks.sum(1).eq(2).all() and masks.any(0).all()
    # groups with no defined correlation are counted, not silently dropped
    result = aggregate_correlations([(np.array([0.0, 10.0, 20.0]), np.array([1.0, 2.0, 3.0])),
                                     (np.array([0.0, 0.1]), np.array([1.0, 2.0]))], threshold=1.0)
    assert result["num_groups"] == 1 and result["num_undefined"] == 1


@torch.no_grad()
def test_calibration_set_is_exact_for_exact_marginals():
    log_joint = chain_log_joint(D, K, seed=7)
    net = BruteForceNet(log_joint, D, K, marginal_offset=0.3)  # the offset cancels in f(x_S) - f(empty)
    rows = all_states(D, K)[torch.multinomial(log_joint.exp(), 6, generator=torch.Generator().manual_seed(3))]
    calibration = CalibrationSet(net, rows, [1.0, 0.5], orders=2, batch_size=4, device="cpu")
    summaries = calibration.measure(net)
    assert set(summaries) == {"full", "observed_50"}
    assert all(s["abs_gap_nats"] < 1e-6 and s["n"] == 6 for s in summaries.values())
    # and it sees a wrong marginal network: log p + 1 nat on every query
    class Shifted(BruteForceNet):
        def forward(self, x, observed_mask, need_logits=True, need_marginal=False, positions=None):
            log_marginal, logits = super().forward(x, observed_mask, need_logits, need_marginal, positions)
            if log_marginal is not None:
                log_marginal = log_marginal + observed_mask.sum(1) / D
            return log_marginal, logits
    shifted = calibration.measure(Shifted(log_joint, D, K))
    assert shifted["full"]["gap_nats"] == pytest.approx(1.0, abs=1e-6)
    assert shifted["observed_50"]["gap_nats"] == pytest.approx(0.5, abs=1e-6)
    assert normalized_log_marginal(net, rows, torch.ones_like(rows, dtype=torch.bool)).shape == (6,)
    # the reference-free drift sees the same: 0 for exact marginals, +1 nat (every step's residual -1/D) when shifted
    exact_drift = consistency_drift(net, rows, batch_size=4, device="cpu")
    assert abs(exact_drift["drift_nats"]) < 1e-5 and exact_drift["n"] == 6
    assert consistency_drift(Shifted(log_joint, D, K), rows, batch_size=4, device="cpu")["drift_nats"] == pytest.approx(1.0, abs=1e-5)


@torch.no_grad()
def test_consistency_drift_estimates_the_gap_to_the_order_averaged_chain_rule():
    net = small_transformer(seed=8, marginal=True)  # untrained: f is far from any chain rule, and the orders disagree
    x = torch.tensor([[2, 0, 1, 1], [0, 0, 2, 1]])
    ones = torch.ones_like(x, dtype=torch.bool)
    exact = (normalized_log_marginal(net, x, ones) - order_average_log_prob(net, x).double()).mean().item()
    drift = consistency_drift(net, x.repeat(20000, 1), batch_size=5000, device="cpu", generator=torch.Generator().manual_seed(0))
    assert abs(exact) > 0.5  # a level far from zero, so the check is not trivially passed by an estimate near 0
    assert drift["drift_nats"] == pytest.approx(exact, abs=4 * drift["drift_se_nats"]), (drift, exact)
    assert drift["drift_se_nats"] < 0.1 * abs(exact)
    # draws beyond the rows cycle through them with fresh steps: the same residuals as the rows repeated, batch for batch
    cycled = consistency_drift(net, x, batch_size=3, device="cpu", generator=torch.Generator().manual_seed(1), draws=7)
    repeated = consistency_drift(net, x.repeat(4, 1)[:7], batch_size=3, device="cpu", generator=torch.Generator().manual_seed(1))
    assert cycled == repeated and cycled["n"] == 7
    assert consistency_drift(net, x, batch_size=3, device="cpu", draws=1)["n"] == 1


@torch.no_grad()
@pytest.mark.parametrize("build", [
    lambda: small_transformer(seed=4, marginal=True, marginal_head="sum"),
    lambda: MLPPair(K, D, hidden=16, num_layers=2, marginal=True, marginal_head="sum"),
    lambda: UNet(image_shape=(2, 2), num_classes=K, channels=8, num_res_blocks=1, attention=False, marginal=True,
                 marginal_hidden=8, marginal_head="sum"),
])
def test_shift_level_moves_the_normalised_marginal_by_the_observed_share(build):
    net = build().eval()
    for parameter in net.parameters():  # away from the zero start, so the check does not pass on a constant f
        parameter.add_(0.05 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(parameter.numel())))
    x = torch.randint(0, K, (16, D), generator=torch.Generator().manual_seed(0))
    observed = torch.rand(16, D, generator=torch.Generator().manual_seed(1)) < 0.5
    observed[0], observed[1] = True, False  # a complete row and an empty one
    before = normalized_log_marginal(net, x, observed)
    shift_level(net, 1.5)
    after = normalized_log_marginal(net, x, observed)
    assert torch.allclose(before - after, 1.5 * observed.sum(1).double() / D, atol=1e-5)
    with pytest.raises(ValueError, match="sum marginal head"):
        shift_level(small_transformer(seed=4, marginal=True, marginal_head="pooled"), 1.0)


@torch.no_grad()
def test_fit_cells_removes_each_rows_own_gap_where_one_level_cannot():
    net = small_transformer(seed=9, marginal=True, marginal_head="sum")
    net.marginal_score_bias().fill_(0.7)
    net.marginal_sum_head().cell_correction[:, 2] += 0.5  # rows with more 2s sit higher: a per-row error one shared level cannot take
    x = torch.tensor([[2, 0, 1, 1], [0, 1, 2, 2]])  # no (position, value) in common: each row has its own cells
    ones = torch.ones_like(x, dtype=torch.bool)

    def exact_gaps(model=net):  # f(x) - f(empty) - E_sigma log p_sigma(x), every order of D = 4 enumerated
        return (normalized_log_marginal(model, x, ones) - order_average_log_prob(model, x).double()).numpy()

    before = exact_gaps()
    assert before.min() > 2.0 and abs(before[1] - before[0]) > 0.4, before
    rows, seed = x.repeat(10000, 1), torch.Generator().manual_seed(0)
    drift = consistency_drift(net, rows, batch_size=5000, device="cpu", generator=seed, by_cell=True)
    assert drift["cell_counts"].sum() == 20000 and int((drift["cell_counts"] > 0).sum()) == 8  # the rows' 8 cells only
    snapshot, level_only = net.marginal_sum_head().cell_correction.clone(), copy.deepcopy(net)
    fit_cells(net, drift, prior_draws=1e-9)  # plain means on the drawn cells; the undrawn take the shared level
    after = exact_gaps()
    # each row's gap is gone up to the estimate's noise (about 4 standard errors of one row's half of the draws)
    assert np.abs(after).max() < 4 * math.sqrt(2) * drift["drift_se_nats"] < 0.1, (after, drift)
    # one shared level leaves the rows' difference: what the cells remove and a level fit cannot
    fit_level(level_only, rows, batch_size=5000, device="cpu", generator=torch.Generator().manual_seed(0))
    leveled = exact_gaps(level_only)
    assert abs(leveled.mean()) < 0.1 and np.abs(leveled).min() > 0.2, leveled
    # least squares on the same draws: every drawn cell's mean residual is now zero, the undrawn cells are untouched
    again = consistency_drift(net, rows, batch_size=5000, device="cpu", generator=torch.Generator().manual_seed(0), by_cell=True)
    assert torch.allclose(again["cell_sums"], torch.zeros_like(again["cell_sums"]), atol=1e-6 * 20000)
    undrawn = drift["cell_counts"] == 0  # cells no draw added take the shared level, as one level fit would set them
    moved = net.marginal_sum_head().cell_correction[undrawn] - snapshot[undrawn]
    assert torch.allclose(moved, torch.full_like(moved, -drift["drift_nats"] / D), atol=1e-5)
    with pytest.raises(ValueError, match="prior_draws"):  # plain cell means are undefined for undrawn cells
        fit_cells(net, drift, prior_draws=0.0)
    with pytest.raises(ValueError, match="sum marginal head"):
        fit_cells(small_transformer(seed=4, marginal=True, marginal_head="pooled"), drift)


@torch.no_grad()
def test_fit_cells_with_a_size_table_solves_the_joint_least_squares():
    net = small_transformer(seed=9, marginal=True, marginal_head="sum")
    rows = torch.randint(0, K, (64, D), generator=torch.Generator().manual_seed(2)).repeat(200, 1)
    drift = consistency_drift(net, rows, batch_size=4096, device="cpu", generator=torch.Generator().manual_seed(0), by_cell=True)
    sizes = drift["draw_sizes"]
    assert sorted(sizes.unique().tolist()) == list(range(D)) and int((drift["cell_counts"] > 0).sum()) == D * K
    by_size_before = torch.stack([drift["draw_residuals"][sizes == d].mean() for d in range(D)])
    fit = fit_cells(net, drift, prior_draws=0.0, size_buckets=D)  # one bucket per prefix size
    assert net.marginal_sum_head().size_correction[0] == 0  # f(empty) is not moved
    # on the same draws, every cell's and every prefix size's mean residual is now zero: both normal equations hold
    again = consistency_drift(net, rows, batch_size=4096, device="cpu", generator=torch.Generator().manual_seed(0), by_cell=True)
    by_size = torch.stack([again["draw_residuals"][sizes == d].mean() for d in range(D)])
    assert (by_size_before.abs() > 0.05).any(), by_size_before  # the untrained net's level is not linear in |S|
    assert by_size.abs().max() < 1e-4, by_size
    assert (again["cell_sums"] / again["cell_counts"]).abs().max() < 1e-4
    assert fit["size_buckets"] == D and set(fit["size_correction_nats"]) == {"25%", "50%", "75%", "100%"}


@torch.no_grad()
def test_cell_table_reads_observed_values_only_and_old_checkpoints_load_with_zeros():
    net = small_transformer(seed=3, marginal=True, marginal_head="sum")
    observed = torch.tensor([[True, False, True, False]])
    x, other = torch.tensor([[2, 0, 1, 1]]), torch.tensor([[2, 2, 1, 0]])  # the same values where observed
    before = net(x, observed, need_logits=False, need_marginal=True)[0]
    net.marginal_sum_head().cell_correction.copy_(torch.arange(D * K, dtype=torch.float32).view(D, K))
    shifted = net(x, observed, need_logits=False, need_marginal=True)[0]
    assert shifted - before == pytest.approx(2.0 + 7.0, abs=1e-5)  # cells (0, 2) and (2, 1): 0 * 3 + 2 and 2 * 3 + 1
    assert torch.equal(net(other, observed, need_logits=False, need_marginal=True)[0], shifted)
    net.marginal_sum_head().size_correction[2] = 0.25  # two observed positions: the size table's entry 2
    assert net(x, observed, need_logits=False, need_marginal=True)[0] - shifted == pytest.approx(0.25, abs=1e-6)
    net.marginal_sum_head().size_correction.zero_()
    # a checkpoint written before the table existed: the same network, with no correction
    state = {key: value for key, value in net.state_dict().items() if not key.endswith(("cell_correction", "size_correction"))}
    fresh = small_transformer(seed=5, marginal=True, marginal_head="sum")
    fresh.load_state_dict(state)
    assert torch.equal(fresh.marginal_sum_head().cell_correction, torch.zeros(D, K))
    assert torch.equal(fresh.marginal_sum_head().size_correction, torch.zeros(D + 1))
    assert torch.equal(fresh(x, observed, need_logits=False, need_marginal=True)[0], before)


@torch.no_grad()
def test_fit_level_removes_the_gap_to_the_order_averaged_chain_rule():
    net = small_transformer(seed=9, marginal=True, marginal_head="sum")
    net.marginal_score_bias().fill_(0.7)  # every observed position adds 0.7 nats: f(x) - f(empty) = 2.8, far too high
    x = torch.tensor([[2, 0, 1, 1], [0, 0, 2, 1]])
    ones = torch.ones_like(x, dtype=torch.bool)

    def exact_gap():
        return (normalized_log_marginal(net, x, ones) - order_average_log_prob(net, x).double()).mean().item()

    gap_before = exact_gap()
    drift = fit_level(net, x.repeat(20000, 1), batch_size=5000, device="cpu", generator=torch.Generator().manual_seed(0))
    assert gap_before > 5.0 and drift["drift_nats"] == pytest.approx(gap_before, abs=4 * drift["drift_se_nats"])
    assert abs(exact_gap()) < 4 * drift["drift_se_nats"] < 0.05 * gap_before  # what is left is the estimate's noise
