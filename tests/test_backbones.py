"""Every backbone: masking really masks, shapes, and computing only the requested heads."""
import pytest
import torch
from omegaconf import OmegaConf

from mamlib.nets import build_backbone

torch.set_num_threads(1)
K = 3
ARCHES = {
    "transformer": ({"name": "transformer", "d_model": 16, "num_layers": 1, "num_heads": 2, "mlp_dim": 32, "dropout": 0.0,
                     "marginal_hidden": 16}, 12, None),
    "mlp": ({"name": "mlp", "hidden": 16, "num_layers": 2, "residual": True}, 12, None),
    "unet": ({"name": "unet", "channels": 16, "num_res_blocks": 1, "attention": True, "dropout": 0.0, "marginal_hidden": 16},
             16, (4, 4)),
}


def make(name, marginal=True, seed=0):
    cfg, dim, shape = ARCHES[name]
    torch.manual_seed(seed)
    net = build_backbone(OmegaConf.create(cfg), K, dim, image_shape=shape, marginal=marginal).eval()
    with torch.no_grad():  # the U-Net zero-initialises its output convs; jitter so every path carries signal
        for parameter in net.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return net, dim


@pytest.mark.parametrize("name", sorted(ARCHES))
@torch.no_grad()
def test_hidden_values_do_not_leak(name):
    net, dim = make(name)
    torch.manual_seed(1)
    x = torch.randint(0, K, (6, dim))
    mask = torch.rand(6, dim) < 0.5
    other = torch.where(mask, x, torch.randint(0, K, x.shape))  # same observed part, new hidden values
    assert not torch.equal(other, x)
    a, b = net(x, mask, need_marginal=True), net(other, mask, need_marginal=True)
    assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[1], b[1], atol=1e-5)
    flipped = x.clone()
    row, col = mask.nonzero()[0]
    flipped[row, col] = (x[row, col] + 1) % K  # changing an observed value must change the outputs
    c = net(flipped, mask, need_marginal=True)
    assert not torch.allclose(a[1][row], c[1][row]) and not torch.allclose(a[0][row], c[0][row])


@pytest.mark.parametrize("name", sorted(ARCHES))
@torch.no_grad()
def test_shapes_and_requested_heads(name):
    net, dim = make(name)
    x, mask = torch.randint(0, K, (3, dim)), torch.ones(3, dim, dtype=torch.bool)
    log_marginal, logits = net(x, mask, need_logits=True, need_marginal=True)
    assert log_marginal.shape == (3,) and logits.shape == (3, dim, K)
    assert net(x, mask, need_logits=False, need_marginal=True)[1] is None
    assert net(x, mask, need_logits=True, need_marginal=False)[0] is None
    with pytest.raises(ValueError):
        net(x, mask, need_logits=False, need_marginal=False)
    # heads that were not requested do not run
    calls = {"marginal": 0, "conditional": 0}
    marginal_modules = [m for n, m in net.named_children() if n.startswith(tuple(p.rstrip(".") for p in net.marginal_prefixes))]
    conditional_head = {"transformer": "conditional_head", "mlp": "conditional_mlp", "unet": None}[name]
    hooks = [m.register_forward_hook(lambda *_: calls.__setitem__("marginal", calls["marginal"] + 1)) for m in marginal_modules]
    if conditional_head:
        hooks.append(getattr(net, conditional_head).register_forward_hook(
            lambda *_: calls.__setitem__("conditional", calls["conditional"] + 1)))
    net(x, mask, need_logits=True, need_marginal=False)
    assert calls["marginal"] == 0 and (calls["conditional"] > 0 or conditional_head is None)
    calls.update(marginal=0, conditional=0)
    net(x, mask, need_logits=False, need_marginal=True)
    assert calls["marginal"] > 0 and calls["conditional"] == 0
    for hook in hooks:
        hook.remove()


@pytest.mark.parametrize("name", sorted(ARCHES))
def test_stage1_weights_load_into_marginal_model(name):
    stage1, dim = make(name, marginal=False)
    stage2, _ = make(name, marginal=True, seed=5)
    result = stage2.load_state_dict(stage1.state_dict(), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all(k.startswith(stage2.marginal_prefixes) for k in result.missing_keys)
    x, mask = torch.randint(0, K, (2, dim)), torch.rand(2, dim) < 0.5
    with torch.no_grad():
        assert torch.equal(stage1(x, mask)[1], stage2(x, mask)[1])
    with pytest.raises(ValueError, match="marginal"):
        stage1(x, mask, need_marginal=True)


@pytest.mark.parametrize("name", sorted(ARCHES))
def test_logits_at_positions_match_the_full_logits(name):
    """positions= (one per row) gives the same logits and gradients as selecting from the full (B, D, K) output."""
    net, dim = make(name)
    torch.manual_seed(2)
    x, mask = torch.randint(0, K, (5, dim)), torch.rand(5, dim) < 0.5
    positions = torch.randint(0, dim, (5,))
    full = net(x, mask)[1][torch.arange(5), positions]
    picked = net(x, mask, positions=positions)[1]
    assert picked.shape == (5, K)
    assert torch.allclose(picked, full, atol=1e-5)
    gradients = []
    for logits in (full, picked):
        net.zero_grad()
        logits.sum().backward(retain_graph=True)
        gradients.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
    assert torch.allclose(gradients[0], gradients[1], atol=1e-5)
