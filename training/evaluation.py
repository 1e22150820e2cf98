"""Paired before/after comparison: the same prompts on the same noise, scored with and without the LoRA.

Pairing removes the noise-to-noise variance, so the standard error is that of the per-image differences:
a change is measurable when |mean difference| is several standard errors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class PairedResult:
    before: float  # mean score without the LoRA
    after: float  # mean score with it
    diff: float  # mean of the per-image differences (after − before)
    se: float  # standard error of that mean
    n: int

    @property
    def z(self) -> float:
        """The difference in standard errors (inf when every pair moved by the same amount)."""
        if self.se > 0:
            return self.diff / self.se
        return 0.0 if self.diff == 0 else math.copysign(math.inf, self.diff)

    def line(self, label: str = "reward") -> str:
        return (f"{label}: {self.before:.4f} → {self.after:.4f}  (Δ {self.diff:+.4f} ± {self.se:.4f} SE, "
                f"{self.z:+.1f} SE, {self.n} paired images)")


def paired(before: torch.Tensor, after: torch.Tensor) -> PairedResult:
    """Paired statistics of two score vectors of the same images (NaN pairs are left out)."""
    b, a = before.detach().float().flatten().cpu(), after.detach().float().flatten().cpu()
    if b.shape != a.shape:
        raise ValueError(f"paired scores need the same number of images, got {b.numel()} and {a.numel()}")
    keep = torch.isfinite(b) & torch.isfinite(a)
    b, a = b[keep], a[keep]
    n = int(b.numel())
    if n == 0:
        raise ValueError("no image has a finite score both before and after")
    d = a - b
    se = float(d.std(unbiased=True) / math.sqrt(n)) if n > 1 else 0.0
    return PairedResult(float(b.mean()), float(a.mean()), float(d.mean()), se, n)
