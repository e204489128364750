"""Short real trainings on an enumerable distribution, checked against exact answers.

p_data: a chain over D=6 positions with K=3 values and strong pairwise couplings (729 states).
Stage 1 (ao_arm/seq) must reach a small exact KL(p_data || p_phi) under several orders; stage 2 (mam/seq), with the
sum head and cosine schedule and with the paper's pooled head and constant learning rate, must give marginals that are
self-consistent when checked by brute-force summation. Threads and seeds are fixed, so every run
on a machine gives the same numbers; the thresholds keep a margin over what was measured across seeds.
"""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from mamlib import arm
from mamlib.checkpoint import load_checkpoint
from mamlib.marginal import normalized_log_marginal
from mamlib.nets import build_backbone
from mamlib.orders import fixed_order, random_order
from mamlib.stages import ao_arm, mam_mle

from exact import all_states, chain_log_joint

ROOT = Path(__file__).resolve().parents[1]
D, K = 6, 3
ARCH = ["arch=transformer", "arch.d_model=32", "arch.num_layers=2", "arch.num_heads=2", "arch.mlp_dim=64", "arch.marginal_hidden=64"]
COMMON = ["logger.mode=disabled", "train.checkpoint_every=null", "train.eval_every=null", "train.log_every=100",
          "train.n_epochs=1000", "eval.val_examples=64"]


def config(name, overrides):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(name, overrides=overrides)


# stage 2 on the stage-1 checkpoint: the same problem, budget and optimizer for both marginal heads
STAGE2 = COMMON + ["arch=transformer", "arch.marginal_hidden=64", "load_pretrain=True", "train.batch_size=128",
                   "train.max_steps=800", "train.lr=3e-3", "eval.gap_val_examples=0"]
SUM_HEAD = ["arch.marginal_head=sum", "train.lr_schedule=cosine"]  # the sum head with a cosine schedule (README ablation)
PAPER_HEAD = ["arch.marginal_head=pooled", "train.lr_schedule=constant"]  # the paper's stage 2


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("exact")
    log_joint = chain_log_joint(D, K, seed=0)
    states = all_states(D, K)
    draws = torch.multinomial(log_joint.exp(), 20000, replacement=True, generator=torch.Generator().manual_seed(0))
    np.save(work / "tokens.npy", states[draws].numpy())
    data = [f"dataset.path={work / 'tokens.npy'}", f"dataset.K={K}"]
    ao_arm.run(config("ao_arm_seq", data + ARCH + COMMON + ["train.batch_size=128", "train.max_steps=500", "train.lr=3e-3"]),
               run_dir=work / "stage1")
    return work, log_joint, states, data


def train_stage2(stage1, name, head):
    work, log_joint, states, data = stage1
    torch.set_num_threads(1)
    checkpoint = work / "stage1" / "checkpoints" / "last.pt"
    mam_mle.run(config("mam_seq", data + STAGE2 + head + [f"loadpath_pretrain={checkpoint}"]), run_dir=work / name)
    return work / name / "checkpoints" / "last.pt", log_joint, states


@pytest.fixture(scope="module")
def trained(stage1):
    return train_stage2(stage1, "stage2", SUM_HEAD)


@pytest.fixture(scope="module")
def trained_pooled(stage1):
    return train_stage2(stage1, "stage2_pooled", PAPER_HEAD)


def load_net(path):
    payload = load_checkpoint(path)
    from omegaconf import OmegaConf

    net = build_backbone(OmegaConf.create(payload["arch"]), K, D, marginal=payload["has_marginal"])
    net.load_state_dict(payload["model"])
    return net.eval()


@torch.no_grad()
def test_stage1_learns_the_distribution_in_any_order(stage1):
    work, log_joint, states, _ = stage1
    net = load_net(work / "stage1" / "checkpoints" / "last.pt")
    p_data = log_joint.exp()
    entropy = -(p_data * log_joint).sum().item()  # about 4.3 nats; a uniform model would be at KL ~ 2.3
    orders = {"forward": fixed_order(len(states), D, "forward"), "backward": fixed_order(len(states), D, "backward"),
              "random": random_order(1, D, generator=torch.Generator().manual_seed(3)).repeat(len(states), 1)}
    log_model = {name: arm.chain_rule_log_prob(net, states, order=order) for name, order in orders.items()}
    for name, values in log_model.items():
        assert torch.logsumexp(values, 0).item() == pytest.approx(0.0, abs=1e-4)
        kl = (p_data * (log_joint - values)).sum().item()
        print(f"exact: stage-1 KL {name} {kl!r}")  # `pytest -s` shows every measured value (determinism checks)
        # measured 0.02-0.03 nats after 500 steps (20000 samples alone cost ~0.02); a uniform model is at ~2.3; margin 3x
        assert kl < 0.1, f"KL(p_data || p_phi) along the {name} order is {kl:.3f} nats (entropy {entropy:.2f})"
    # different orders give (nearly) the same likelihood where the data is
    gap = (p_data * (log_model["forward"] - log_model["backward"]).abs()).sum().item()
    assert gap < 0.15  # measured about 0.04 nats


@torch.no_grad()
def stage2_figures(checkpoint, log_joint, states, label):
    """Log total mass of f over all states, and the mean |error| of 300 partial marginals against brute-force sums of
    f itself and of the conditionals' chain rule."""
    net = load_net(checkpoint)
    full = torch.ones_like(states, dtype=torch.bool)
    log_full = normalized_log_marginal(net, states, full)
    total_mass = torch.logsumexp(log_full, 0).item()
    generator = torch.Generator().manual_seed(1)
    queries = states[torch.multinomial(log_joint.exp(), 300, replacement=True, generator=generator)]  # where q puts mass
    observed = torch.rand(300, D, generator=generator) < 0.5
    predicted = normalized_log_marginal(net, queries, observed)
    agree = ((states.unsqueeze(0) == queries.unsqueeze(1)) | ~observed.unsqueeze(1)).all(-1)
    summed = torch.logsumexp(torch.where(agree, log_full.unsqueeze(0), torch.tensor(-math.inf, dtype=torch.float64)), 1)
    error = (predicted - summed).abs().mean().item()
    # the conditionals' own exact marginals (brute-force sums of the chain rule)
    chain = arm.chain_rule_log_prob(net, states, order=fixed_order(len(states), D))
    exact = torch.logsumexp(torch.where(agree, chain.unsqueeze(0), torch.tensor(-math.inf, dtype=torch.float64)), 1)
    error_vs_conditionals = (predicted - exact).abs().mean().item()
    print(f"exact: stage-2 {label}log total mass {total_mass!r}, error vs own sums {error!r}")  # `pytest -s` shows them
    print(f"exact: stage-2 {label}error vs the conditionals {error_vs_conditionals!r}")
    return total_mass, error, error_vs_conditionals


def test_stage2_marginals_are_self_consistent(trained):
    total_mass, error, error_vs_conditionals = stage2_figures(*trained, label="")
    # measured over seeds 0, 1, 2 on one machine (sum head, cosine, 800 steps): |log mass| 0.002-0.02, mean error 0.025-0.028 nats
    assert abs(total_mass) < 0.05, total_mass
    assert error < 0.05, error
    # the marginal network also agrees with the conditionals' own exact marginals
    assert error_vs_conditionals < 0.06  # measured 0.033-0.037 nats


def test_paper_stage2_marginals_are_self_consistent(trained_pooled):
    """The paper's stage 2 (pooled head, constant learning rate) on the same problem and budget."""
    total_mass, error, error_vs_conditionals = stage2_figures(*trained_pooled, label="pooled head, constant lr: ")
    # measured over seeds 0-2 (this seed-0 run in brackets): |log mass| 0.05-0.24 [0.24], error 0.055-0.15 [0.15], vs the
    # conditionals 0.09-0.18 [0.18] nats; untrained 6.0, 2.8, 1.0: 3-10x less exact than the sum head at this budget
    assert abs(total_mass) < 0.35, total_mass
    assert error < 0.2, error
    assert error_vs_conditionals < 0.25, error_vs_conditionals
