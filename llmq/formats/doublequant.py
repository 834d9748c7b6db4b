"""Double quantization of per-group scales (QLoRA §3): scales -> uint8 in blocks of 256.

Scales S [Rs, G] are re-quantized per group column in blocks of 256 consecutive rows (the last block of a
column may be shorter): each block stores one fp32 offset (its minimum) and one fp32 step
(max - min) / 255, and each scale a uint8 code, S ≈ offset + step·code, rounded up
(so a stored scale is never below the requested one). Blocking per column lets GPTQ
double-quantize one group's scales as soon as it has computed them.
"""
from __future__ import annotations

import torch

DQ_BLOCK = 256  # scales re-quantized in blocks of this many rows


def n_blocks(rows: int) -> int:
    return -(-rows // DQ_BLOCK)


def quantize(S: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """S [Rs, G] fp32 -> (codes [Rs, G] uint8, step [G, nb] fp32, offset [G, nb] fp32)."""
    Rs, G = S.shape
    nb = n_blocks(Rs)
    pad = nb * DQ_BLOCK - Rs
    St = S.t().to(torch.float32)  # [G, Rs]
    lo = torch.nn.functional.pad(St, (0, pad), value=float("inf")).reshape(G, nb, DQ_BLOCK).amin(-1)
    hi = torch.nn.functional.pad(St, (0, pad), value=float("-inf")).reshape(G, nb, DQ_BLOCK).amax(-1)
    step = (hi - lo) / 255
    step = torch.where(step > 0, step, torch.ones_like(step))
    lo_r = lo.repeat_interleave(DQ_BLOCK, dim=1)[:, :Rs]
    step_r = step.repeat_interleave(DQ_BLOCK, dim=1)[:, :Rs]
    # ceil (less a hair for float noise): a stored scale is never below the requested one
    codes = torch.clamp(torch.ceil((St - lo_r) / step_r - 1e-4), 0, 255).to(torch.uint8)
    return codes.t().contiguous(), step.contiguous(), lo.contiguous()


def dequantize(codes: torch.Tensor, step: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Inverse of `quantize`: -> S [Rs, G] fp32."""
    Rs = codes.shape[0]
    step_r = step.repeat_interleave(DQ_BLOCK, dim=1)[:, :Rs]  # [G, Rs]
    off_r = offset.repeat_interleave(DQ_BLOCK, dim=1)[:, :Rs]
    return (off_r + step_r * codes.t().to(torch.float32)).t()
