"""The two-stage contract: strict loading of stage-1 checkpoints, clear errors, exactly the conditionals frozen."""
import pytest
import torch
from omegaconf import OmegaConf

from mamlib.checkpoint import CheckpointError, save_checkpoint
from mamlib.data.base import DiscreteDataset, tensor_dataset
from mamlib.experiment import Experiment
from mamlib.nets import build_backbone
from mamlib.runtime import DistInfo
from mamlib.stages.mam_mle import load_stage1

ARCH = {"name": "transformer", "d_model": 16, "num_layers": 1, "num_heads": 2, "mlp_dim": 32, "dropout": 0.0,
        "marginal_hidden": 16}


def dataset(name="array", K=3, D=5):
    rows = tensor_dataset(torch.zeros(4, D, dtype=torch.long))
    return DiscreteDataset(name=name, kind="array", num_classes=K, num_positions=D, train=rows, val=rows, test=rows)


def stage1_checkpoint(path, data, transform=lambda state: state):
    net = build_backbone(OmegaConf.create(ARCH), data.num_classes, data.num_positions)
    save_checkpoint(path, {"kind": "ao_arm", "model": transform(net.state_dict()), "dataset": data.describe(), "arch": ARCH,
                           "has_marginal": False})
    return net


def experiment(path, freeze=True):
    cfg = OmegaConf.create({"load_pretrain": True, "loadpath_pretrain": str(path), "freeze_conditional": freeze,
                            "arch": {"marginal_hidden": 16}})
    return Experiment(cfg, path.parent, DistInfo(), torch.device("cpu"), logger=None)


def test_happy_path_freezes_exactly_the_conditionals(tmp_path):
    data = dataset()
    stage1 = stage1_checkpoint(tmp_path / "s1.pt", data)
    net, _ = load_stage1(experiment(tmp_path / "s1.pt"), data)
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in net.named_parameters() if n.startswith("marginal_head.")}
    for name, value in stage1.state_dict().items():
        assert torch.equal(net.state_dict()[name], value)
    unfrozen, _ = load_stage1(experiment(tmp_path / "s1.pt", freeze=False), data)
    assert all(p.requires_grad for p in unfrozen.parameters())


@pytest.mark.parametrize("change, message", [
    (dict(K=4), r"K=3.*K=4"), (dict(D=6), r"D=5.*D=6"), (dict(name="text8"), r"name='array'.*name='text8'")])
def test_checkpoint_of_other_data_is_refused(tmp_path, change, message):
    stage1_checkpoint(tmp_path / "s1.pt", dataset())
    other = dataset(**{"name": "array", "K": 3, "D": 5, **change})
    with pytest.raises(CheckpointError, match=message):
        load_stage1(experiment(tmp_path / "s1.pt"), other)


def test_wrong_key_prefix_is_refused(tmp_path):
    data = dataset()
    stage1_checkpoint(tmp_path / "s1.pt", data, transform=lambda state: {f"module.{k}": v for k, v in state.items()})
    with pytest.raises(CheckpointError, match="missing.*unexpected"):
        load_stage1(experiment(tmp_path / "s1.pt"), data)


def test_stage2_needs_a_stage1_checkpoint(tmp_path):
    data = dataset()
    save_checkpoint(tmp_path / "mam.pt", {"kind": "mam", "model": {}, "dataset": data.describe(), "arch": ARCH,
                                          "has_marginal": True})
    with pytest.raises(CheckpointError, match="'mam' checkpoint, expected one of \\['ao_arm'\\]"):
        load_stage1(experiment(tmp_path / "mam.pt"), data)
    cfg = experiment(tmp_path / "mam.pt")
    cfg.cfg.load_pretrain = False
    with pytest.raises(ValueError, match="load_pretrain=True"):
        load_stage1(cfg, data)


def test_unet_stage1_checkpoint_with_the_removed_encoder_option_loads_unless_it_is_own(tmp_path):
    """Checkpoints written while arch.marginal_encoder existed store "shared" (the only kind still built): it is ignored,
    and with marginal_init=conditional the marginal up path starts as the trained one. "own" is refused, naming the fix."""
    unet = {"name": "unet", "channels": 8, "num_res_blocks": 1, "attention": False, "dropout": 0.0, "marginal_hidden": 8}
    rows = tensor_dataset(torch.zeros(4, 16, dtype=torch.long))
    data = DiscreteDataset(name="mnist_offline", kind="image", num_classes=2, num_positions=16, train=rows, val=rows,
                           test=rows, image_shape=(4, 4))
    stage1 = build_backbone(OmegaConf.create(unet), 2, 16, image_shape=(4, 4))
    cfg = OmegaConf.create({"load_pretrain": True, "loadpath_pretrain": str(tmp_path / "s1.pt"), "freeze_conditional": True,
                            "marginal_init": "conditional", "arch": {"marginal_hidden": 8, "marginal_head": "sum"}})
    for encoder in ("shared", "own"):
        save_checkpoint(tmp_path / "s1.pt", {"kind": "ao_arm", "model": stage1.state_dict(), "dataset": data.describe(),
                                             "arch": {**unet, "marginal_encoder": encoder}, "has_marginal": False})
        if encoder == "own":
            with pytest.raises(CheckpointError, match="arch.marginal_encoder='own', an option that was removed.*retrain"):
                load_stage1(Experiment(cfg, tmp_path, DistInfo(), torch.device("cpu"), logger=None), data)
            continue
        net, payload = load_stage1(Experiment(cfg, tmp_path, DistInfo(), torch.device("cpu"), logger=None), data)
        assert "marginal_encoder" not in payload["arch"]  # not carried into the stage-2 checkpoint
        assert {n for n, p in net.named_parameters() if p.requires_grad} == set(net.marginal_parameter_names())
        for name, value in stage1.up.state_dict().items():
            assert torch.equal(net.marginal_up.state_dict()[name], value)
