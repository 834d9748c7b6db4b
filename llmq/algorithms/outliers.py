"""Which weights to keep exact (fp16, stored sparse): pure functions returning a boolean mask.

Two criteria:
- `by_magnitude` (used without a Hessian, by RTN): the largest |w|. Without second-order information the
  only harm a weight does to its group is the range it forces, and the largest weights force it.
- `by_sensitivity` (used by GPTQ): SpQR's saliency (w - q(w))² / [H⁻¹]ᵢᵢ — the output error that
  quantizing this one weight causes after the optimal update of the others (OBS; SpQR eq. 3), with q the
  grid of the weight's own group.
"""
from __future__ import annotations

import torch


def count(numel: int, fraction: float) -> int:
    return int(round(numel * fraction))


def top_mask(score: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean mask of the `fraction` highest scores (exactly round(numel·fraction) of them)."""
    k = count(score.numel(), fraction)
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if k > 0:
        mask[torch.topk(score.reshape(-1), k, sorted=False).indices] = True
    return mask.reshape(score.shape)


def by_magnitude(W: torch.Tensor, fraction: float) -> torch.Tensor:
    return top_mask(W.abs(), fraction)


def by_sensitivity(W: torch.Tensor, W_hat: torch.Tensor, Hinv_diag: torch.Tensor, fraction: float) -> torch.Tensor:
    """W, W_hat [R, C] (W_hat = W quantized on its group grid), Hinv_diag [C]."""
    return top_mask((W - W_hat).square() / Hinv_diag.clamp_min(1e-12).unsqueeze(0), fraction)
