"""Model as a torch module: conditional queries log p(x_{A minus B} | x_B) checked exactly on enumerable problems (both
networks), gradients through log_prob, outputs that follow the input's type and shape, generators and precision.

Networks are tiny randomly initialised transformers (inconsistent conditionals, so only identities that hold for any
network are checked on them) and the brute-force network of tests/exact.py (conditionals and marginals of one explicit
joint, where every order gives the exact conditional).
"""
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import mamlib
from exact import BruteForceNet, all_states, chain_log_joint
from mamlib import arm
from mamlib.api import Model, ModelUsageError
from mamlib.checkpoint import save_checkpoint
from mamlib.marginal import normalized_log_marginal
from mamlib.nets import build_backbone
from mamlib.orders import fixed_order, order_observed_first
from mamlib.runtime import resolve_precision

ARCH = {"name": "transformer", "d_model": 16, "num_layers": 1, "num_heads": 2, "mlp_dim": 32, "dropout": 0.0,
        "marginal_hidden": 16}
K, D = 3, 4


def transformer_model(marginal=True, kind="mam", order=None, info=None):
    torch.manual_seed(0)
    net = build_backbone(OmegaConf.create(ARCH), K, D, marginal=marginal)
    return Model(net, info or {"name": "toy", "K": K, "D": D}, kind, ARCH, has_marginal=marginal, order=order)


def exact_model():
    return Model(BruteForceNet(chain_log_joint(D, K, seed=1), D, K), {"name": "toy", "K": K, "D": D}, "energy", {},
                 has_marginal=True)


def queries(count=40, seed=0):
    """(x, A, B): random rows, random observed sets A and conditioning sets B inside A (empty and equal sets included)."""
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.integers(0, K, size=(count, D)))
    observed = torch.from_numpy(rng.random((count, D)) < 0.75)
    given = observed & torch.from_numpy(rng.random((count, D)) < 0.5)
    observed[0], given[0] = True, False
    given[1] = observed[1]
    return x, observed, given


def coded(x, mask):
    return torch.where(mask, x, torch.full_like(x, -1))


def test_marginal_conditional_is_the_difference_of_two_marginals_in_one_pass():
    model = transformer_model()
    x, observed, given = queries()
    calls = []
    model.net.register_forward_hook(lambda module, args, kwargs_or_out, *rest: calls.append(len(args[0])))
    conditional = model.log_prob(x, observed, given=given, method="marginal")
    assert calls == [2 * len(x)]  # one batched pass over the A rows and the B rows
    separate = model.log_prob(coded(x, observed), method="marginal") - model.log_prob(coded(x, given), method="marginal")
    assert conditional.dtype == torch.float64 and torch.allclose(conditional, separate, atol=1e-6)
    assert conditional[1] == 0  # B = A: log 1
    assert torch.allclose(conditional[0], model.log_prob(x[0], method="marginal"), atol=1e-6)  # B empty


def chain_along(net, x, observed, order):
    return arm.chain_rule_log_prob(net, x, observed, order=order)


def test_chain_conditional_is_the_chain_rule_along_one_order_with_the_given_positions_first():
    model = transformer_model()
    x, observed, given = queries()
    conditional = model.log_prob(x, observed, given=given, method="chain", generator=torch.Generator().manual_seed(4))
    # the order it used: the same generator draws a random order with A first, then B is moved to the front
    order = order_observed_first(observed, generator=torch.Generator().manual_seed(4))
    order = (order + (~given).long() * D).argsort(1).argsort(1)
    assert torch.equal(order < given.sum(1, keepdim=True), given)  # B first ...
    assert torch.equal(order < observed.sum(1, keepdim=True), observed)  # ... then the rest of A
    # log p(x_A) = log p(x_B) + log p(x_{A minus B} | x_B) along that one order, for any network
    identity = chain_along(model.net, x, observed, order) - chain_along(model.net, x, given, order)
    assert torch.allclose(conditional, identity, atol=1e-5)
    assert conditional[1] == 0

    # one missing-from-B position: the network's own conditional, whatever the order
    one = observed.clone()
    one[:, 0] = True
    base = one.clone()
    base[:, 0] = False
    single = model.log_prob(x, one, given=base, method="chain", orders=3, seed=0)
    table = model.log_conditionals(x, base)
    assert torch.allclose(single, table[:, 0].gather(1, x[:, :1]).squeeze(1), atol=1e-5)

    # several orders: log-mean-exp of the single-order conditional values drawn one after another
    generator = torch.Generator().manual_seed(9)
    singles = torch.stack([model.log_prob(x, observed, given=given, method="chain", generator=generator) for _ in range(3)])
    ensemble = model.log_prob(x, observed, given=given, method="chain", orders=3, generator=torch.Generator().manual_seed(9))
    assert torch.allclose(ensemble, torch.logsumexp(singles, 0) - math.log(3), atol=1e-9)


def test_conditional_is_exact_on_a_consistent_model():
    model = exact_model()
    states = all_states(D, K)
    log_joint = model.net.log_joint
    x, observed, given = queries(count=30, seed=2)

    def brute_force(mask):  # log of the sum of the joint over every completion of each row's x_mask
        agree = ((states.unsqueeze(0) == x.unsqueeze(1)) | ~mask.unsqueeze(1)).all(-1)
        return torch.logsumexp(torch.where(agree, log_joint, torch.tensor(-math.inf, dtype=torch.float64)), 1)

    exact = brute_force(observed) - brute_force(given)
    for method, orders in (("marginal", 1), ("chain", 1), ("chain", 3)):
        value = model.log_prob(x.numpy(), observed.numpy(), given=given.numpy(), method=method, orders=orders, seed=0)
        assert isinstance(value, np.ndarray) and np.allclose(value, exact.numpy(), atol=1e-5), method


def test_arm_baseline_conditions_on_a_prefix_of_its_order():
    model = transformer_model(marginal=False, kind="energy", order="forward")
    x = torch.randint(0, K, (5, D))
    observed = torch.ones(5, D, dtype=torch.bool)
    given = fixed_order(5, D) < 2
    order = fixed_order(5, D)
    expected = chain_along(model.net, x, observed, order) - chain_along(model.net, x, given, order)
    assert torch.allclose(model.log_prob(x, given=given, method="chain"), expected, atol=1e-6)


@pytest.mark.parametrize("method", ["marginal", "chain"])
def test_log_prob_is_differentiable(method):
    model = transformer_model()
    x, observed, given = queries(count=8)
    with torch.no_grad():
        expected = model.log_prob(x, observed, method=method, seed=1)
        expected_conditional = model.log_prob(x, observed, given=given, method=method, seed=1)
    value = model.log_prob(x, observed, method=method, seed=1)
    assert value.requires_grad and torch.equal(value.detach(), expected)
    (-value.mean()).backward()
    names = model.net.marginal_parameter_names() if method == "marginal" else model.net.conditional_parameter_names()
    parameters = dict(model.net.named_parameters())
    assert any(parameters[name].grad is not None and parameters[name].grad.abs().sum() > 0 for name in names)
    if method == "chain":  # the chain rule never touches the marginal head
        assert all(parameters[name].grad is None for name in model.net.marginal_parameter_names())
    model.zero_grad()
    conditional = model.log_prob(x, observed, given=given, method=method, seed=1)
    assert torch.equal(conditional.detach(), expected_conditional)
    conditional.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert not isinstance(model.log_prob(x.numpy(), observed.numpy(), method=method, seed=1), torch.Tensor)  # numpy: no graph


def test_a_training_step_changes_the_normaliser():
    model = transformer_model()
    x = torch.randint(0, K, (6, D))
    before = model.log_prob(x.numpy())  # caches f(empty)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    (-model.log_prob(x).mean()).backward()
    optimizer.step()
    after = model.log_prob(x.numpy())
    fresh = normalized_log_marginal(model.net, x, torch.ones_like(x, dtype=torch.bool)).detach().numpy()
    assert not np.allclose(before, after) and np.allclose(after, fresh, atol=1e-6)


def test_model_is_a_module_and_outputs_follow_the_input(tmp_path):
    model = transformer_model()
    assert isinstance(model, torch.nn.Module) and model.device == torch.device("cpu") and not model.training
    assert all(key.startswith("net.") for key in model.state_dict())
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in model.net.parameters())
    model.train()
    assert model.net.training
    assert model.to("cpu").eval() is model and not model.net.training
    row = [0, 1, 2, -1]
    assert isinstance(model.log_prob([row, row]), np.ndarray) and model.log_prob([row, row]).shape == (2,)
    assert np.ndim(model.log_prob(row)) == 0 and model.log_prob(torch.tensor(row)).dim() == 0  # one row, no batch axis
    assert torch.allclose(model(torch.tensor([row])), model.log_prob(torch.tensor([row])))
    filled = model.infill(torch.tensor(row), seed=0)
    assert isinstance(filled, torch.Tensor) and filled.shape == (D,) and torch.equal(filled[:3], torch.tensor([0, 1, 2]))
    assert model.log_conditionals(row).shape == (D, K)
    assert model.sample(3, seed=0, return_tensors="pt").device == model.device

    path = tmp_path / "last.pt"
    save_checkpoint(path, {"kind": "mam", "model": model.net.state_dict(), "dataset": {"name": "toy", "K": K, "D": D},
                           "arch": ARCH, "has_marginal": True, "config": {}, "step": 1})
    loaded = mamlib.load(path)  # device="auto": the CPU here
    assert loaded.device == torch.device("cpu") and not loaded.training and loaded.precision == "fp32"
    assert mamlib.load(path, precision="bf16").precision == "bf16"
    assert mamlib.load(path, precision="auto").precision == resolve_precision("auto", torch.device("cpu"))


def test_image_models_take_images():
    model = transformer_model(info={"name": "tiny_images", "kind": "image", "K": K, "D": D})
    assert model.dataset_info["image_shape"] == [2, 2]
    flat = torch.randint(-1, K, (3, D))
    images = flat.view(3, 2, 2)
    expected = model.log_prob(flat)
    assert torch.equal(model.log_prob(images), expected) and torch.equal(model.log_prob(images[:, None]), expected)
    assert model.infill(images, seed=0).shape == (3, 2, 2) and model.infill(images[:, None], seed=0).shape == (3, 1, 2, 2)
    assert torch.equal(model.infill(images, seed=0).view(3, D), model.infill(flat, seed=0))
    assert model.log_prob(images[0]).dim() == 0  # one (H, W) image
    with pytest.raises(ModelUsageError, match=r"\(B, 2, 2\)|\(B, H, W\)"):
        model.log_prob(torch.zeros(3, 2, 3, dtype=torch.long))


def test_generators_make_draws_reproducible():
    model = transformer_model()
    draw = lambda: model.sample(4, generator=torch.Generator().manual_seed(3))
    assert np.array_equal(draw(), draw())
    generator = torch.Generator().manual_seed(3)
    assert not np.array_equal(model.sample(4, generator=generator), model.sample(4, generator=generator))
    rows = np.array([[0, -1, -1, 2]] * 4)
    fill = lambda: model.infill(rows, generator=torch.Generator().manual_seed(5))
    assert np.array_equal(fill(), fill())
    samples, log_prob = model.sample_with_log_prob(4, generator=torch.Generator().manual_seed(3))
    assert np.array_equal(samples, draw()) and log_prob.shape == (4,)
    chain = lambda: model.log_prob(rows, method="chain", orders=2, generator=torch.Generator().manual_seed(1))
    assert np.array_equal(chain(), chain())
