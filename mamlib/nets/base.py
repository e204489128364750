"""The interface every backbone implements.

``forward(x, observed_mask, need_logits=True, need_marginal=False, positions=None)`` returns
``(log_marginal, logits)``:
  * ``log_marginal``: (B,) float, the marginal network's output f(x_S) (unnormalised log p(x_S)),
    or None when not requested / the backbone has no marginal head;
  * ``logits``: (B, D, K) float, the conditional logits log p(x_j | x_S) up to normalisation at
    every position j, or None when not requested. With ``positions`` ((B,) long) only the logits at
    position ``positions[b]`` of each row: (B, K). The chain rule, the one-step estimates and sampling need
    one position per row, and a backbone may skip the work for the others (the MLP's output layer is D*K wide).
``x`` is (B, D) long in 0..K-1; ``observed_mask`` is (B, D) bool. Values at unobserved positions
must not influence any output.

``marginal_prefixes`` lists the state-dict key prefixes that belong to the marginal head only;
stage 2 loads a stage-1 checkpoint and expects exactly these keys to be missing.
"""
from __future__ import annotations

import torch
from torch import nn


class Backbone(nn.Module):
    num_classes: int
    num_positions: int
    marginal_prefixes: tuple[str, ...] = ()
    conditional_precision: str = "fp32"  # read by mamlib.arm.conditional_logits for every conditional pass

    @property
    def has_marginal(self) -> bool:
        return bool(self.marginal_prefixes)

    def input_tokens(self, x: torch.Tensor, observed_mask: torch.Tensor) -> torch.Tensor:
        """Tokens with the missing symbol (index K) at unobserved positions."""
        return torch.where(observed_mask, x, torch.full_like(x, self.num_classes))

    def marginal_parameter_names(self) -> list[str]:
        return [n for n, _ in self.named_parameters() if n.startswith(self.marginal_prefixes)]

    def conditional_parameter_names(self) -> list[str]:
        return [n for n, _ in self.named_parameters() if not n.startswith(self.marginal_prefixes)]

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """``train.activation_checkpointing``: recompute trainable blocks in backward instead of keeping their
        activations. Only backbones whose activations dominate memory implement it (the U-Net)."""
        if enabled:
            raise ValueError(f"train.activation_checkpointing=true is implemented for arch=unet only, not "
                             f"{type(self).__name__}: set train.activation_checkpointing=false")

    def set_conditional_precision(self, precision: str) -> None:
        """``eval.precision``: run the conditional passes (chain rule, sampling) under bf16 autocast, or in fp32.
        Marginal-network passes are not affected: f(x_S) is one pass, and its sum over D positions needs fp32."""
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"eval.precision={precision!r} is unknown; use fp32 or bf16")
        self.conditional_precision = precision

    def marginal_sum_head(self):
        """The ``sum`` head's :class:`MaskedSum`, holding the level fit's tables ``cell_correction`` (D, K: added per
        observed (position, value)) and ``size_correction`` (D + 1: added by |S|); None for ``pooled``."""
        return next((module for module in self.modules() if isinstance(module, MaskedSum)), None)

    def marginal_score_bias(self) -> torch.Tensor | None:
        """The bias added to every per-position score of the ``sum`` marginal head (None for ``pooled``): shifting it by
        c moves f(x_S) - f(empty) by c * |S|, which is how :func:`mamlib.calibration.fit_level` sets the level."""
        return None

    def warm_start_marginal(self) -> bool:
        """Copy trained conditional layers into the marginal branch's matching layers; False when the branch has none
        of its own (transformer, MLP: the marginal head already reads the shared, trained features)."""
        return False


def at_positions(values: torch.Tensor, positions: torch.Tensor | None) -> torch.Tensor:
    """(B, D, ...) -> (B, ...) at one position per row; unchanged when ``positions`` is None."""
    if positions is None:
        return values
    return values[torch.arange(values.shape[0], device=values.device), positions]


MARGINAL_HEADS = ("pooled", "sum")

# arch options that configs and checkpoints written before they existed do not have: their absence means this value
ARCH_DEFAULTS = {"marginal_head": "pooled"}


def check_marginal_head(kind: str) -> str:
    if kind not in MARGINAL_HEADS:
        raise ValueError(f"arch.marginal_head={kind!r} is unknown; use one of {MARGINAL_HEADS}")
    return kind


class MaskedSum(nn.Module):
    """f(x_S) = f(empty) + sum over observed j of (score_j + cell_correction[j, x_j]) + size_correction[|S|]: a marginal
    output that scales with |S|.

    log p(x_S) is a sum of |S| chain-rule terms, so a per-position score summed over S starts at the right scale
    for every |S|, and f(empty) is a parameter of its own that the normaliser term sets directly.
    ``cell_correction`` (D, K) and ``size_correction`` (D + 1) are buffers, zero unless a level fit with
    ``level_fit_cells`` (and ``level_fit_size_buckets``) set them after training (:func:`mamlib.calibration.fit_cells`):
    one additive term per (position, value) and one per |S|, not trained by the optimizer.
    """

    def __init__(self, num_positions: int, num_classes: int):
        super().__init__()
        self.empty = nn.Parameter(torch.zeros(()))
        self.register_buffer("cell_correction", torch.zeros(num_positions, num_classes))
        self.register_buffer("size_correction", torch.zeros(num_positions + 1))  # by |S|; entry 0 stays 0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A checkpoint with this head but written before the tables existed holds no correction: zeros are its model.
        # (A stage-1 checkpoint has no head at all, and its keys stay missing, as stage 2 expects.)
        if prefix + "empty" in state_dict:
            for name in ("cell_correction", "size_correction"):
                state_dict.setdefault(prefix + name, torch.zeros_like(getattr(self, name)))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, scores: torch.Tensor, observed_mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        cells = self.cell_correction[torch.arange(x.shape[1], device=x.device), torch.where(observed_mask, x, 0)]
        # fp32 sum: D bf16 terms would lose ~0.5 nats
        return (self.empty + ((scores.float() + cells) * observed_mask).sum(1)
                + self.size_correction[observed_mask.sum(1)])
