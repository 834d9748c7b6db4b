"""Column groups: the view every format computes its per-group parameters on.

A weight W [R, C] (R = out_features, C = in_features) with group size g is seen as Wg [R, G, L]:
G = ceil(C / g) groups of L = g columns; when g does not divide C the last group is shorter and its
padding columns are masked out of every statistic. group_size -1 (per output channel) is one group of C
columns; 0 (per tensor) is one group of all R*C weights, so parameters have shape [1, 1].
"""
from __future__ import annotations

import torch

PER_CHANNEL = -1  # group_size for one scale per output row
PER_TENSOR = 0  # group_size for one scale for the whole matrix


def group_len(in_features: int, group_size: int) -> int:
    return in_features if group_size in (PER_CHANNEL, PER_TENSOR) else min(group_size, in_features)


def n_groups(in_features: int, group_size: int) -> int:
    L = group_len(in_features, group_size)
    return -(-in_features // L)


def param_shape(shape: tuple[int, int], group_size: int) -> tuple[int, int]:
    """Shape [Rs, G] of per-group parameters (scales, zeros) for a weight of `shape`."""
    R, C = shape
    if group_size == PER_TENSOR:
        return (1, 1)
    return (R, n_groups(C, group_size))


def to_groups(W: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W [R, C] -> (Wg [Rs, G, L] zero-padded, mask [G, L] of real columns or None when none is padded)."""
    R, C = W.shape
    if group_size == PER_TENSOR:
        return W.reshape(1, 1, R * C), None
    L = group_len(C, group_size)
    G = n_groups(C, group_size)
    pad = G * L - C
    if pad == 0:
        return W.reshape(R, G, L), None
    Wp = torch.nn.functional.pad(W, (0, pad))
    mask = torch.ones(G * L, dtype=torch.bool, device=W.device)
    mask[C:] = False
    return Wp.reshape(R, G, L), mask.reshape(G, L)


def from_groups(Xg: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of `to_groups`: [Rs, G, L] -> [R, C] (padding dropped)."""
    R, C = shape
    return Xg.reshape(R, -1)[:, :C] if Xg.shape[0] == R else Xg.reshape(R, C)


def expand(p: torch.Tensor, shape: tuple[int, int], group_size: int) -> torch.Tensor:
    """Per-group parameters p [Rs, G] broadcast to one value per weight, [R, C]."""
    R, C = shape
    if group_size == PER_TENSOR:
        return p.reshape(1, 1).expand(R, C)
    L = group_len(C, group_size)
    return p.repeat_interleave(L, dim=1)[:, :C]


def column_group(in_features: int, group_size: int) -> torch.Tensor:
    """Group index of each column, [C] int64 (all zero for per-channel / per-tensor)."""
    return torch.arange(in_features) // group_len(in_features, group_size)
