"""U-Net backbone: masking, shapes, compute-only-what-is-needed, the stage-1 -> stage-2 state-dict contract."""
import pytest
import torch

from mamlib.nets.unet import UNet, group_count, timestep_embedding

torch.set_num_threads(1)

SMALL = dict(image_shape=(8, 8), num_classes=2, channels=16, num_res_blocks=1, marginal_hidden=32)


def randomize_(model: UNet, seed: int = 0) -> UNet:
    """Replace every parameter with N(0, 0.3^2): the near-zero output inits would otherwise make
    every output (almost) constant, so tests about what the outputs depend on could not fail."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def make_inputs(batch=3, num_positions=64, num_classes=2, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randint(0, num_classes, (batch, num_positions), generator=generator)
    observed = torch.rand(batch, num_positions, generator=generator) < 0.5
    return x, observed


@pytest.mark.parametrize("num_classes", [2, 5])
def test_unobserved_values_do_not_matter_observed_values_do(num_classes):
    torch.manual_seed(0)
    model = randomize_(UNet(**{**SMALL, "num_classes": num_classes}, marginal=True))
    x, observed = make_inputs(num_classes=num_classes)
    log_marginal, logits = model(x, observed, need_logits=True, need_marginal=True)

    changed_hidden = torch.where(observed, x, (x + 1) % num_classes)  # every unobserved value changed
    log_marginal_2, logits_2 = model(changed_hidden, observed, need_logits=True, need_marginal=True)
    assert torch.equal(logits, logits_2)
    assert torch.equal(log_marginal, log_marginal_2)

    # changing one observed value in each example must move both outputs (shows the check above can fail)
    first_observed = observed.float().argmax(dim=1)
    changed_visible = x.clone()
    rows = torch.arange(x.shape[0])
    changed_visible[rows, first_observed] = (x[rows, first_observed] + 1) % num_classes
    log_marginal_3, logits_3 = model(changed_visible, observed, need_logits=True, need_marginal=True)
    assert ((logits_3 - logits).abs().flatten(1).amax(dim=1) > 1e-4).all()
    assert ((log_marginal_3 - log_marginal).abs() > 1e-6).all()


def test_observed_mask_itself_matters():
    # same values, one more pixel observed: the output must change (mask channel, missing token, time)
    model = randomize_(UNet(**SMALL))
    x, observed = make_inputs()
    more_observed = observed.clone()
    more_observed[:, (~observed).float().argmax(dim=1)] = True
    _, logits = model(x, observed)
    _, logits_more = model(x, more_observed)
    assert not torch.allclose(logits, logits_more)


@pytest.mark.parametrize("need_logits,need_marginal", [(True, False), (False, True), (True, True)])
def test_output_shapes_and_nones(need_logits, need_marginal):
    model = UNet(**{**SMALL, "image_shape": (6, 8), "num_classes": 3}, marginal=True).eval()
    x, observed = make_inputs(batch=2, num_positions=48, num_classes=3)
    log_marginal, logits = model(x, observed, need_logits=need_logits, need_marginal=need_marginal)
    assert (logits.shape == (2, 48, 3)) if need_logits else logits is None
    assert (log_marginal.shape == (2,)) if need_marginal else log_marginal is None


def test_logits_are_row_major_pixels():
    # non-square image so a transposed layout would be caught
    model = randomize_(UNet(**{**SMALL, "image_shape": (3, 5), "num_classes": 4}))
    x, observed = make_inputs(batch=2, num_positions=15, num_classes=4)
    captured = {}
    model.head.register_forward_hook(lambda module, args, out: captured.update(map=out))  # returns None: output kept
    _, logits = model(x, observed)
    head_map = captured["map"]  # (B, K, H, W)
    for row in range(3):
        for col in range(5):
            assert torch.equal(logits[:, row * 5 + col, :], head_map[:, :, row, col])


def test_bad_requests_raise():
    model = UNet(**SMALL, marginal=True)
    x, observed = make_inputs()
    with pytest.raises(ValueError, match="at least one"):
        model(x, observed, need_logits=False, need_marginal=False)
    with pytest.raises(ValueError, match="marginal=True"):
        UNet(**SMALL)(x, observed, need_marginal=True)
    with pytest.raises(ValueError, match=r"\(batch, 64\)"):
        model(x[:, :63], observed[:, :63])
    with pytest.raises(ValueError, match="bool"):
        model(x, observed.long())
    with pytest.raises(ValueError, match="channels"):
        UNet(**{**SMALL, "channels": 2})


def count_calls(modules):
    counter = {"calls": 0}

    def hook(module, args, output):
        counter["calls"] += 1

    handles = [module.register_forward_hook(hook) for module in modules]
    return counter, handles


def test_only_requested_branches_run():
    model = UNet(**SMALL, marginal=True).eval()
    x, observed = make_inputs()
    conditional, _ = count_calls([*model.up, model.head])
    marginal, _ = count_calls([*model.marginal_up, model.marginal_head])
    shared, _ = count_calls([model.embed, *model.down, model.middle_out])

    model(x, observed, need_logits=False, need_marginal=True)
    assert (conditional["calls"], marginal["calls"], shared["calls"]) == (0, 3, 3)
    model(x, observed, need_logits=True, need_marginal=False)
    assert (conditional["calls"], marginal["calls"], shared["calls"]) == (3, 3, 6)
    model(x, observed, need_logits=True, need_marginal=True)
    assert (conditional["calls"], marginal["calls"], shared["calls"]) == (6, 6, 9)


def test_stage1_state_dict_loads_with_exactly_marginal_keys_missing():
    torch.manual_seed(0)
    stage1 = randomize_(UNet(**SMALL, attention=True), seed=3)
    stage2 = UNet(**SMALL, attention=True, marginal=True).eval()
    assert UNet(**SMALL).marginal_prefixes == () and stage2.marginal_prefixes == ("marginal_up.", "marginal_head.")
    assert not any(key.startswith("marginal") for key in stage1.state_dict())

    result = stage2.load_state_dict(stage1.state_dict(), strict=False)
    expected_missing = {key for key in stage2.state_dict() if key.startswith(stage2.marginal_prefixes)}
    assert set(result.missing_keys) == expected_missing and expected_missing
    assert result.unexpected_keys == []
    assert set(stage2.conditional_parameter_names()) == {name for name, _ in stage1.named_parameters()}

    x, observed = make_inputs()
    _, logits_stage1 = stage1(x, observed)
    log_marginal, logits_stage2 = stage2(x, observed, need_marginal=True)
    assert torch.equal(logits_stage1, logits_stage2)
    assert log_marginal.shape == (3,)


def test_group_count_divides_and_matches_paper_width():
    assert group_count(256) == 32 and group_count(512) == 32  # the original's 32 groups
    for channels in [4, 12, 16, 24, 48, 64, 96, 192]:
        groups = group_count(channels)
        assert channels % groups == 0 and 1 <= groups <= max(1, channels // 4)


def test_timestep_embedding_formula():
    # dim 6: half 3, frequencies max_time^(-k/2) for k = 0, 1, 2; odd dim gets a zero column
    t = torch.tensor([0.0, 3.0])
    embedding = timestep_embedding(t, 7, max_time=100)
    frequencies = torch.tensor([1.0, 0.1, 0.01])
    expected = torch.cat([torch.sin(t[:, None] * frequencies), torch.cos(t[:, None] * frequencies), torch.zeros(2, 1)], 1)
    assert torch.allclose(embedding, expected, atol=1e-6)


def test_gradients_reach_marginal_branch_and_conditional_path():
    model = UNet(**SMALL, marginal=True)
    x, observed = make_inputs()
    log_marginal, logits = model(x, observed, need_marginal=True)
    (log_marginal.sum() + logits.sum()).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None]
    assert missing == []


def test_float_input_channels_are_scaled_value_and_mask():
    # what the 3x3 input conv sees: 2v/(K-1) - 1 at observed pixels, exactly 0 at missing ones, then the mask
    model = UNet(**{**SMALL, "num_classes": 5}).eval()
    x, observed = make_inputs(num_classes=5)
    captured = {}
    model.embed.float_conv.register_forward_hook(lambda module, args, out: captured.update(input=args[0]))
    model(x, observed)
    value_channel, mask_channel = captured["input"].flatten(2).unbind(1)
    expected_value = torch.where(observed, x.float() / 2.0 - 1.0, torch.zeros(()))
    assert torch.equal(value_channel, expected_value)
    assert torch.equal(mask_channel, observed.float())


def test_warm_start_copies_the_conditional_up_path_and_keeps_f_zero():
    """marginal_init=conditional: the marginal up path becomes the trained conditional one; the sum head still starts at
    f = 0 (its output conv is zero), so the first steps start from the same loss as a random marginal branch."""
    model = randomize_(UNet(**SMALL, marginal=True, marginal_head="sum"))
    with torch.no_grad():  # the heads' usual zero init (randomize_ overwrote it)
        model.marginal_head.to_map[-1].weight.zero_()
        model.marginal_head.to_map[-1].bias.zero_()
        model.marginal_head.sum.empty.zero_()
    up = {name: value.clone() for name, value in model.up.state_dict().items()}
    assert any(not torch.equal(value, model.marginal_up.state_dict()[name]) for name, value in up.items())
    assert model.warm_start_marginal()
    assert all(torch.equal(value, model.marginal_up.state_dict()[name]) for name, value in up.items())
    x, observed = make_inputs()
    assert torch.equal(model(x, observed, need_logits=False, need_marginal=True)[0], torch.zeros(len(x)))
    assert not UNet(**SMALL).warm_start_marginal()  # no marginal branch: nothing to copy


@pytest.mark.parametrize("marginal_only", [False, True])
def test_activation_checkpointing_gives_the_same_outputs_and_gradients(marginal_only):
    """Stage 1 (every block trains) and stage 2 (only the marginal branch): recomputing in backward changes nothing,
    dropout included (the recomputation replays the random state)."""
    results = []
    for enabled in (False, True):
        model = randomize_(UNet(**SMALL, attention=True, dropout=0.3, marginal=True)).train()
        model.set_activation_checkpointing(enabled)
        for name, parameter in model.named_parameters():
            parameter.requires_grad = not marginal_only or name.startswith(model.marginal_prefixes)
        x, observed = make_inputs()
        torch.manual_seed(5)
        log_marginal, logits = model(x, observed, need_marginal=True)
        (log_marginal.sum() + logits.float().pow(2).mean()).backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
        results.append((log_marginal.detach(), grads))
    (plain, plain_grads), (recomputed, recomputed_grads) = results
    assert torch.allclose(plain, recomputed, atol=1e-6)
    assert plain_grads.keys() == recomputed_grads.keys() and len(plain_grads) > 0
    for name, grad in plain_grads.items():
        assert torch.allclose(grad, recomputed_grads[name], rtol=1e-4, atol=1e-6), name


def test_activation_checkpointing_is_refused_where_not_implemented():
    from mamlib.nets import MLPPair

    with pytest.raises(ValueError, match="implemented for arch=unet only"):
        MLPPair(3, 4, hidden=8, num_layers=1).set_activation_checkpointing(True)
    MLPPair(3, 4, hidden=8, num_layers=1).set_activation_checkpointing(False)  # off is always fine


def test_bf16_conditional_precision_changes_only_the_conditional_passes_and_little():
    """``eval.precision=bf16``: chain rules run under bf16 autocast (so they differ from fp32), the marginal pass
    does not (identical), and the rounding stays small against the log-likelihoods themselves."""
    from mamlib import arm
    from mamlib.marginal import log_marginal

    net = randomize_(UNet(marginal=True, marginal_head="sum", **SMALL))
    x, observed = make_inputs(batch=4)
    order = torch.stack([torch.randperm(64, generator=torch.Generator().manual_seed(row)) for row in range(4)]).argsort(1)
    with torch.no_grad():
        exact = arm.chain_rule_log_prob(net, x, order=order, steps_per_pass=4)
        marginal = log_marginal(net, x, observed)
        net.set_conditional_precision("bf16")
        rounded = arm.chain_rule_log_prob(net, x, order=order, steps_per_pass=4)
        assert torch.equal(log_marginal(net, x, observed), marginal)
    difference = (rounded - exact).abs()
    # measured: 0.015-0.06 nats per row on these random weights (|log p| of 43-47 nats over 64 steps, logits of size
    # ~10); 1 nat is far below the spread between rows and far above what fp32 rounding alone gives (< 1e-4)
    assert difference.max() < 1.0 and difference.max() > 1e-4, difference
    with pytest.raises(ValueError, match="eval.precision"):
        net.set_conditional_precision("fp16")


def test_sum_head_adds_its_terms_in_fp32_under_autocast():
    from mamlib.marginal import log_marginal

    net = randomize_(UNet(marginal=True, marginal_head="sum", **SMALL))
    x, observed = make_inputs(batch=4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        value = log_marginal(net, x, observed)
    assert value.dtype == torch.float32
