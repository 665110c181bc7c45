"""What the integrations share about training batches: the label that losses ignore, and packed
documents read off positions that restart at 0."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # transformers' and torchtitan's cross-entropy ignore it


def document_bounds(positions: torch.Tensor, *, rows_start_documents: bool) -> torch.Tensor:
    """Global int32 cu_seqlens of the documents in `positions` (b, s), its rows packed in order: a
    document starts wherever a position is 0 (and at every row's first token when
    `rows_start_documents`). The first bound is not 0 where the first token starts no document."""
    starts = positions == 0
    if rows_start_documents:
        starts[:, 0] = True
    bounds = [*torch.nonzero(starts.reshape(-1)).flatten().tolist(), positions.numel()]
    return torch.tensor(bounds, dtype=torch.int32)
