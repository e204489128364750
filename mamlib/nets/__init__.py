"""Backbones: image U-Net, bidirectional transformer, residual MLP pair. All share the interface in base.py."""
from __future__ import annotations

from .base import ARCH_DEFAULTS, Backbone
from .mlp import MLPPair
from .transformer import Transformer

ARCH_NAMES = ("unet", "transformer", "mlp")


def build_backbone(arch_cfg, num_classes: int, num_positions: int, image_shape=None, marginal: bool = False) -> Backbone:
    """Build the backbone named by ``arch_cfg.name`` with sizes from the config."""
    name = arch_cfg.name
    if name == "transformer":
        return Transformer(num_classes, num_positions, d_model=arch_cfg.d_model, num_layers=arch_cfg.num_layers,
                           num_heads=arch_cfg.num_heads, mlp_dim=arch_cfg.mlp_dim, dropout=arch_cfg.dropout,
                           marginal=marginal, marginal_hidden=arch_cfg.marginal_hidden,
                           marginal_head=arch_cfg.get("marginal_head", ARCH_DEFAULTS["marginal_head"]))
    if name == "mlp":
        return MLPPair(num_classes, num_positions, hidden=arch_cfg.hidden, num_layers=arch_cfg.num_layers,
                       residual=arch_cfg.residual, marginal=marginal,
                       marginal_head=arch_cfg.get("marginal_head", ARCH_DEFAULTS["marginal_head"]))
    if name == "unet":
        from .unet import UNet

        if image_shape is None or image_shape[0] * image_shape[1] != num_positions:
            raise ValueError(f"arch=unet needs an image dataset; this dataset has D={num_positions} and image_shape={image_shape}. "
                             "Use arch=transformer or arch=mlp for sequences")
        return UNet(image_shape=tuple(image_shape), num_classes=num_classes, channels=arch_cfg.channels,
                    num_res_blocks=arch_cfg.num_res_blocks, attention=arch_cfg.attention, dropout=arch_cfg.dropout,
                    marginal=marginal, marginal_hidden=arch_cfg.marginal_hidden,
                    marginal_head=arch_cfg.get("marginal_head", ARCH_DEFAULTS["marginal_head"]))
    raise ValueError(f"unknown arch {name!r}; choose one of {ARCH_NAMES}")


__all__ = ["Backbone", "MLPPair", "Transformer", "build_backbone", "ARCH_NAMES"]
