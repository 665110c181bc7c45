"""A ring call's dK and dV, finished in PyTorch: the local sums plus the partial sums that
travelled home, dK scaled into its units, each rounded once to k's dtype; and what the backward
passes that keep dq in q's layout share."""

from __future__ import annotations

import torch

from .interface import IndexedSums, accumulator_dtype


def finished_dkv(
    local: torch.Tensor | None, travelled: list[torch.Tensor], k: torch.Tensor, v: torch.Tensor, dk_scale: float,
    dtype: torch.dtype | None = None, indexed: tuple[IndexedSums, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """local: (2, ..., s, h, width) or None; travelled: (2, ..., rows, h, width) sums over k's first
    rows; indexed: sums at rows of their own; width the wider of k's and v's head_dims, each the
    first columns of its half. dK and dV come in `dtype` (default: k's and v's)."""
    total = summed_dkv(local, travelled, k, v, indexed)
    dk = torch.mul(total[0][..., : k.shape[-1]], dk_scale, out=torch.empty(k.shape, dtype=dtype or k.dtype, device=k.device))
    return dk, total[1][..., : v.shape[-1]].to(dtype or v.dtype, copy=True)


def summed_dkv(
    local: torch.Tensor | None, travelled: list[torch.Tensor], k: torch.Tensor, v: torch.Tensor, indexed: tuple[IndexedSums, ...] = (),
    *, owned: bool = False,
) -> torch.Tensor:
    """The pair of `finished_dkv`'s sums, unscaled and unrounded: `local` (added to in place) or,
    unless `owned`, the first of `travelled` where it covers every row (transport buffers that a
    later call reuses: `owned` keeps the sums in a tensor of their own)."""
    if local is None and travelled and travelled[0].shape[-3] == k.shape[-3]:
        total, travelled = (travelled[0].clone() if owned else travelled[0]), travelled[1:]
    elif local is None:
        width = max(k.shape[-1], v.shape[-1])
        total = torch.zeros((2, *k.shape[:-1], width), dtype=accumulator_dtype(k.dtype), device=k.device)
    else:
        total = local
    for part in travelled:
        total.narrow(-3, 0, part.shape[-3]).add_(part)
    for part in indexed:
        # index_put_ with accumulate has a deterministic CUDA kernel; index_add_ would trip torch's
        # deterministic mode (its rows are distinct, but torch cannot know)
        total.movedim(-3, 0).index_put_((part.rows,), part.sums.movedim(-3, 0), accumulate=True)
    return total


class TorchFinishedGradients:
    """For a backward pass whose dq accumulates in `dq_acc` (q's layout), whose dK is in true units
    and whose steps may write any block first."""

    dk_scale = 1.0
    dq_acc: torch.Tensor

    def can_write_first(self, k: torch.Tensor) -> bool:
        return True

    def can_write_rounded(self, k: torch.Tensor) -> bool:
        return False

    def dq(self) -> torch.Tensor:
        return self.dq_acc

    def finish_dkv(
        self, local: torch.Tensor | None, travelled: list[torch.Tensor], k: torch.Tensor, v: torch.Tensor,
        indexed: tuple[IndexedSums, ...] = (),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return finished_dkv(local, travelled, k, v, self.dk_scale, indexed=indexed)
