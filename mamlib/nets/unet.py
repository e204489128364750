"""Single-resolution U-Net over single-channel images, with an optional marginal branch.

Layout (``ch_mult=[1]``: every feature map stays H x W with ``channels`` channels):
  input embedding -> down path (``num_res_blocks`` stages) -> middle (res, attention, res)
  -> up path (``num_res_blocks + 1`` stages on concat[h, skip]) -> head (GroupNorm, SiLU, 3x3 conv -> K).
The skip stack is [embedded input, output of every down stage]; the up path consumes it last-in first-out.

Marginal branch (``marginal=True``): a second up path + head (``marginal_up``, ``marginal_head``) fed with
the middle output and the same skips and time embedding; its 1-channel map (B, H*W) goes through an
MLP D -> hidden -> hidden -> 1 (GELU) to give log_marginal. The conditional parameter names are the same
with or without the branch, so a stage-1 state dict loads into a stage-2 model with exactly
``marginal_prefixes`` missing.

Differences from the original on purpose:
  * the value embedding has K+1 rows (values 0..K-1 plus the missing symbol K) instead of 256 grey levels;
  * the float input channel is the value scaled to [-1, 1] (2v/(K-1) - 1) at observed pixels, 0 at missing
    ones (identical to the original's +-1 / 0 for binary images);
  * GroupNorm group counts shrink with the width (:func:`group_count`) so small CPU presets work.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .base import Backbone, MaskedSum, at_positions, check_marginal_head

NEAR_ZERO_SCALE = 1e-10  # the original replaces init scale 0 with this: outputs start ~0 but gradients flow
GROUP_NORM_EPS = 1e-6


def group_count(channels: int) -> int:
    """Largest divisor of ``channels`` not above min(32, channels // 4) (32 groups at the paper widths)."""
    target = max(1, min(32, channels // 4))
    return next(g for g in range(target, 0, -1) if channels % g == 0)


def group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(group_count(channels), channels, eps=GROUP_NORM_EPS)


def variance_scaling_(weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Uniform fan-average variance scaling (JAX ``variance_scaling(scale, 'fan_avg', 'uniform')``).

    Variance scale / ((fan_in + fan_out) / 2) is exactly Xavier-uniform with gain sqrt(scale).
    """
    with torch.no_grad():
        return nn.init.xavier_uniform_(weight, gain=math.sqrt(max(scale, NEAR_ZERO_SCALE)))


def conv3x3(in_channels: int, out_channels: int, init_scale: float = 1.0) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
    variance_scaling_(conv.weight, init_scale)
    nn.init.zeros_(conv.bias)
    return conv


def conv1x1(in_channels: int, out_channels: int, init_scale: float = 1.0) -> nn.Conv2d:
    conv = nn.Conv2d(in_channels, out_channels, 1)
    variance_scaling_(conv.weight, init_scale)
    nn.init.zeros_(conv.bias)
    return conv


def linear(in_features: int, out_features: int, init_scale: float = 1.0) -> nn.Linear:
    layer = nn.Linear(in_features, out_features)
    variance_scaling_(layer.weight, init_scale)
    nn.init.zeros_(layer.bias)
    return layer


def timestep_embedding(t: torch.Tensor, dim: int, max_time: int) -> torch.Tensor:
    """(B,) -> (B, dim): [sin(t f_k), cos(t f_k)] with f_k = max_time^(-k/(half-1)), zero-padded if dim is odd."""
    half = dim // 2
    frequencies = torch.exp(-math.log(max_time) * torch.arange(half, device=t.device) / max(half - 1, 1))
    angles = t.float().unsqueeze(1) * frequencies.unsqueeze(0)
    return F.pad(torch.cat([angles.sin(), angles.cos()], dim=1), (0, dim - 2 * half))


class InputEmbedding(nn.Module):
    """Tokens (B, H, W) with missing symbol K + observed mask -> (features (B, channels, H, W), time embedding (B, 4*channels)).

    Features = concat[3x3 conv of (scaled value, observed mask), per-pixel value embedding]; the time is the
    number of observed pixels.
    """

    def __init__(self, num_classes: int, channels: int, max_time: int):
        super().__init__()
        self.num_classes, self.channels, self.max_time = num_classes, channels, max_time
        float_channels = 3 * channels // 4
        embedding_dim = channels - float_channels  # 64 at channels=256, as in the original
        self.value_embedding = nn.Embedding(num_classes + 1, embedding_dim)  # row K = missing symbol
        self.value_projection = linear(embedding_dim, embedding_dim)
        self.float_conv = conv3x3(2, float_channels)
        self.time_mlp = nn.Sequential(linear(channels, 4 * channels), nn.SiLU(), linear(4 * channels, 4 * channels))

    def forward(self, tokens: torch.Tensor, observed: torch.Tensor):
        dtype = self.float_conv.weight.dtype
        scaled = tokens.to(dtype) * (2.0 / (self.num_classes - 1)) - 1.0
        value = torch.where(observed, scaled, torch.zeros_like(scaled))  # missing pixels carry no value
        float_features = self.float_conv(torch.stack([value, observed.to(dtype)], dim=1))
        embedded = self.value_projection(self.value_embedding(tokens)).permute(0, 3, 1, 2)
        num_observed = observed.flatten(1).sum(dim=1)
        time = self.time_mlp(timestep_embedding(num_observed, self.channels, self.max_time).to(dtype))
        return torch.cat([float_features, embedded], dim=1), time


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + projected time embedding, GroupNorm-SiLU-dropout-conv (near-zero init), residual."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int, dropout: float):
        super().__init__()
        self.norm_in = group_norm(in_channels)
        self.conv_in = conv3x3(in_channels, out_channels)
        self.time_projection = linear(time_dim, out_channels)
        self.norm_out = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv_out = conv3x3(out_channels, out_channels, init_scale=0.0)
        self.shortcut = conv1x1(in_channels, out_channels, init_scale=0.1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(F.silu(self.norm_in(x)))
        h = h + self.time_projection(F.silu(time))[:, :, None, None]
        h = self.conv_out(self.dropout(F.silu(self.norm_out(h))))
        return self.shortcut(x) + h


class SpatialAttention(nn.Module):
    """Single-head self-attention over all H*W pixels, residual; output projection starts near zero."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        for chunk in self.qkv.weight.split(channels, dim=0):  # scale each of q, k, v as its own C x C map
            variance_scaling_(chunk, 0.1)
        nn.init.zeros_(self.qkv.bias)
        self.output = conv1x1(channels, channels, init_scale=0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        # contiguous 4-D (B, 1 head, HW, C) inputs: 3-D strided ones take SDPA's slow unfused path on CPU
        qkv = self.qkv(self.norm(x)).view(batch, 3, channels, height * width).transpose(2, 3).contiguous()
        q, k, v = qkv.unsqueeze(2).unbind(1)
        attended = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # (B, HW, C), logits scaled by C^-1/2
        return x + self.output(attended.transpose(1, 2).reshape(batch, channels, height, width))


class Stage(nn.Module):
    """A residual block optionally followed by spatial attention."""

    def __init__(self, in_channels: int, out_channels: int, time_dim: int, dropout: float, attention: bool):
        super().__init__()
        self.res = ResBlock(in_channels, out_channels, time_dim, dropout)
        self.attention = SpatialAttention(out_channels) if attention else None

    def forward(self, x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        h = self.res(x, time)
        return self.attention(h) if self.attention is not None else h


def up_path(channels: int, num_stages: int, time_dim: int, dropout: float, attention: bool) -> nn.ModuleList:
    return nn.ModuleList(Stage(2 * channels, channels, time_dim, dropout, attention) for _ in range(num_stages))


def output_head(channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(group_norm(channels), nn.SiLU(), conv3x3(channels, out_channels, init_scale=0.0))


class MarginalHead(nn.Module):
    """GroupNorm-SiLU-conv to one channel, then (``pooled``, the original's) an MLP over all D pixels -> scalar log
    marginal, or (``sum``) the map summed over the observed pixels plus a learned f(empty)."""

    def __init__(self, channels: int, num_positions: int, num_classes: int, hidden: int, kind: str = "pooled"):
        super().__init__()
        self.kind = check_marginal_head(kind)
        self.to_map = output_head(channels, 1)  # zero-initialised conv: f = 0 at the start for the sum head
        if kind == "sum":
            self.sum = MaskedSum(num_positions, num_classes)
        else:
            self.mlp = nn.Sequential(nn.Linear(num_positions, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                     nn.Linear(hidden, 1))  # PyTorch default init, as in the original

    def forward(self, h: torch.Tensor, observed_mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        scores = self.to_map(h).flatten(1)
        if self.kind == "sum":
            return self.sum(scores, observed_mask, x)
        return self.mlp(scores).squeeze(-1)


class UNet(Backbone):
    """U-Net backbone for (H, W) single-channel images with K values per pixel; positions are pixels row-major."""

    def __init__(self, image_shape=(28, 28), num_classes: int = 2, channels: int = 256, num_res_blocks: int = 4,
                 attention: bool = True, dropout: float = 0.0, marginal: bool = False, marginal_hidden: int = 4096,
                 max_time: int = 1000, marginal_head: str = "pooled"):
        super().__init__()
        if len(image_shape) != 2 or min(image_shape) < 1:
            raise ValueError(f"image_shape must be (height, width) of a single-channel image, got {image_shape!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2 (values 0..K-1), got {num_classes}")
        if channels < 4:
            raise ValueError(f"channels must be at least 4 (3/4 go to the float input conv, 1/4 to the value embedding), "
                             f"got {channels}")
        if num_res_blocks < 0:
            raise ValueError(f"num_res_blocks must be >= 0, got {num_res_blocks}")
        self.checkpoint_stages = False  # train.activation_checkpointing (set_activation_checkpointing)
        self.image_shape = (int(image_shape[0]), int(image_shape[1]))
        self.num_classes = num_classes
        self.num_positions = self.image_shape[0] * self.image_shape[1]
        time_dim = 4 * channels
        self.embed = InputEmbedding(num_classes, channels, max_time)
        self.down = nn.ModuleList(Stage(channels, channels, time_dim, dropout, attention) for _ in range(num_res_blocks))
        self.middle_in = ResBlock(channels, channels, time_dim, dropout)
        self.middle_attention = SpatialAttention(channels)  # always present, as in the original
        self.middle_out = ResBlock(channels, channels, time_dim, dropout)
        self.up = up_path(channels, num_res_blocks + 1, time_dim, dropout, attention)
        self.head = output_head(channels, num_classes)
        if marginal:
            self.marginal_up = up_path(channels, num_res_blocks + 1, time_dim, dropout, attention)
            self.marginal_head = MarginalHead(channels, self.num_positions, self.num_classes, marginal_hidden, marginal_head)
            self.marginal_prefixes = ("marginal_up.", "marginal_head.")

    def set_activation_checkpointing(self, enabled: bool) -> None:
        self.checkpoint_stages = bool(enabled)

    def _run_block(self, module: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
        """module(*inputs), recomputed in backward instead of kept when checkpointing and the module trains: a stage's
        GroupNorm/SiLU/conv/attention intermediates at full resolution are most of a training step's memory."""
        if self.checkpoint_stages and torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()):
            return checkpoint(module, *inputs, use_reentrant=False)
        return module(*inputs)

    def marginal_score_bias(self):
        return self.marginal_head.to_map[-1].bias if self.has_marginal and self.marginal_head.kind == "sum" else None

    def warm_start_marginal(self) -> bool:
        """The marginal up path starts as a copy of the trained conditional up path (same shapes), not at random."""
        if not self.has_marginal:
            return False
        self.marginal_up.load_state_dict(self.up.state_dict())
        return True

    def _check_inputs(self, x: torch.Tensor, observed_mask: torch.Tensor):
        if x.dim() != 2 or x.shape[1] != self.num_positions:
            raise ValueError(f"x must be (batch, {self.num_positions}) = flattened {self.image_shape} images, "
                             f"got shape {tuple(x.shape)}")
        if observed_mask.shape != x.shape or observed_mask.dtype != torch.bool:
            raise ValueError(f"observed_mask must be a bool tensor shaped like x {tuple(x.shape)}, "
                             f"got {observed_mask.dtype} {tuple(observed_mask.shape)}")

    def _run_up(self, stages: nn.ModuleList, h: torch.Tensor, skips: list[torch.Tensor], time: torch.Tensor) -> torch.Tensor:
        for stage, skip in zip(stages, reversed(skips)):
            h = self._run_block(stage, torch.cat([h, skip], dim=1), time)
        return h

    def forward(self, x, observed_mask, need_logits: bool = True, need_marginal: bool = False, positions=None):
        if not (need_logits or need_marginal):
            raise ValueError("request at least one of need_logits / need_marginal")
        if need_marginal and not self.has_marginal:
            raise ValueError("this U-Net was built without a marginal branch; construct it with marginal=True")
        self._check_inputs(x, observed_mask)
        batch = x.shape[0]
        grid = (batch, *self.image_shape)
        tokens = self.input_tokens(x, observed_mask).view(grid)
        h, time = self.embed(tokens, observed_mask.view(grid))
        skips = [h]
        for stage in self.down:
            h = self._run_block(stage, h, time)
            skips.append(h)
        h = self._run_block(self.middle_in, h, time)
        h = self._run_block(self.middle_out, self._run_block(self.middle_attention, h), time)
        logits = log_marginal = None
        if need_logits:
            conditional = self.head(self._run_up(self.up, h, skips, time))  # (B, K, H, W)
            logits = at_positions(conditional.flatten(2).transpose(1, 2), positions)  # (B, H*W row-major, K)
        if need_marginal:
            log_marginal = self.marginal_head(self._run_up(self.marginal_up, h, skips, time), observed_mask, x)
        return log_marginal, logits
