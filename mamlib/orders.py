"""Orders, masks and the value convention shared by every model in the project.

Value convention (the only one used inside the library):
  * an assignment ``x`` is a LongTensor of shape (B, D) with values in 0..K-1;
  * which positions are known is a separate BoolTensor ``observed_mask`` of the same shape;
  * values at unobserved positions are ignored by every network (they are replaced by the
    missing symbol, index K of a (K+1)-symbol input vocabulary, inside the network).
Files exchanged with users (``mode=score``) use -1 for a missing position; :func:`from_missing_coded`
and :func:`to_missing_coded` convert.

An *order* is a LongTensor ``rank`` of shape (B, D) holding a permutation per row:
``rank[b, j]`` is the step at which position j is generated (0 = first).
"""
from __future__ import annotations

import torch

MISSING = -1  # the missing marker in user-facing integer arrays


def random_order(batch_size: int, num_positions: int, device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform random permutation per row, as ranks."""
    noise = torch.rand(batch_size, num_positions, device=device, generator=generator)
    positions = noise.argsort(dim=1)  # positions[b, t] = the position generated at step t
    steps = torch.arange(num_positions, device=positions.device).expand(batch_size, num_positions)
    return torch.empty_like(positions).scatter_(1, positions, steps)  # its inverse (= a second argsort, cheaper)


def random_prefix(batch_size: int, num_positions: int, device=None, generator: torch.Generator | None = None):
    """(prefix_mask, position): the first d-1 positions of a uniformly random order and its d-th, d ~ U{1..D}.

    The same distribution as ``random_order`` with a uniform step, without sorting: with iid noise per position,
    the positions whose noise is below that of a uniformly chosen position are a uniform random subset whose size
    is uniform on 0..D-1.
    """
    noise = torch.rand(batch_size, num_positions, device=device, generator=generator)
    position = torch.randint(0, num_positions, (batch_size,), device=device, generator=generator)
    prefix_mask = noise < noise.gather(1, position.unsqueeze(1))
    return prefix_mask, position


def random_last_steps(batch_size: int, num_positions: int, num_last: int, device=None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Ranks of an order whose last ``num_last`` steps are a uniformly random ordered subset of the positions.

    The other positions come first in index order: for callers that only use the last steps (censor-and-resample
    re-draws them given the rest), a top-k of the noise instead of a sort of all D values.
    """
    noise = torch.rand(batch_size, num_positions, device=device, generator=generator)
    last = noise.topk(num_last, dim=1).indices  # (B, num_last), a uniformly random ordered subset
    first = torch.ones(batch_size, num_positions, dtype=torch.bool, device=noise.device).scatter_(1, last, False)
    rank = first.long().cumsum(1) - 1
    last_steps = torch.arange(num_positions - num_last, num_positions, device=noise.device).expand(batch_size, -1)
    return rank.scatter_(1, last, last_steps)


def fixed_order(batch_size: int, num_positions: int, direction: str = "forward", device=None) -> torch.Tensor:
    """Deterministic order: ``forward`` generates position 0 first, ``backward`` position D-1 first."""
    steps = torch.arange(num_positions, device=device)
    if direction == "backward":
        steps = steps.flip(0)
    elif direction != "forward":
        raise ValueError(f"unknown order direction {direction!r}; use 'forward', 'backward' or 'random'")
    return steps.unsqueeze(0).expand(batch_size, -1).contiguous()


def make_order(kind: str, batch_size: int, num_positions: int, device=None, generator=None) -> torch.Tensor:
    """``random`` | ``forward`` | ``backward`` (one naming everywhere, unlike the original)."""
    if kind == "random":
        return random_order(batch_size, num_positions, device=device, generator=generator)
    return fixed_order(batch_size, num_positions, kind, device=device)


def order_observed_first(observed_mask: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A random order that generates every observed position before any unobserved one.

    Within each group the order is uniformly random (continuous noise, so no ties).
    """
    noise = torch.rand(observed_mask.shape, device=observed_mask.device, generator=generator)
    key = noise + (~observed_mask).float() * 2.0  # observed keys in [0,1), unobserved in [2,3)
    return key.argsort(dim=1).argsort(dim=1)


def given_first(order: torch.Tensor, given_mask: torch.Tensor) -> torch.Tensor:
    """``order`` rearranged so that the ``given_mask`` positions come first; the relative order is otherwise kept."""
    return (order + (~given_mask).long() * order.shape[1]).argsort(dim=1).argsort(dim=1)


def observed_before(rank: torch.Tensor, step) -> torch.Tensor:
    """Mask of positions generated strictly before ``step`` (int or (B,) tensor)."""
    if torch.is_tensor(step) and step.dim() == 1:
        step = step.unsqueeze(1)
    return rank < step


def position_at(rank: torch.Tensor, step) -> torch.Tensor:
    """Mask of the single position generated at ``step`` (int or (B,) tensor)."""
    if torch.is_tensor(step) and step.dim() == 1:
        step = step.unsqueeze(1)
    return rank == step


def index_at(rank: torch.Tensor, step) -> torch.Tensor:
    """(B,) index of the position generated at ``step``."""
    return position_at(rank, step).float().argmax(dim=1)


def from_missing_coded(array) -> tuple[torch.Tensor, torch.Tensor]:
    """User array with -1 for missing -> (x, observed_mask)."""
    tokens = torch.as_tensor(array).long()
    observed_mask = tokens >= 0
    return tokens.clamp(min=0), observed_mask


def to_missing_coded(x: torch.Tensor, observed_mask: torch.Tensor) -> torch.Tensor:
    return torch.where(observed_mask, x, torch.full_like(x, MISSING))
