"""Training metrics: model FLOPs and MFU, a per-step JSONL log, a progress bar.

A step's record is one dict; the keys this module and plot_metrics.py know are `step` (the
number of optimizer steps done when it was written, as checkpoints count them), `loss`,
`tokens_per_s` (all GPUs), `tokens_per_s_per_gpu`, `mfu` (a fraction, or None when the GPU's
peak is unknown) and `peak_memory_gib`; the trainer may add others.
"""

import json
import os
import re
import tempfile
from pathlib import Path


def model_flops_per_token(
    n_params_non_embedding: int, n_layers: int, n_heads: int, head_dim: float, seq_len: int, causal: bool = True
) -> float:
    """Model FLOPs of one training step (forward and backward) per token:

        6 * N + 12 * n_layers * n_heads * head_dim * seq_len * (1/2 if causal else 1)

    - Weights: each parameter that multiplies activations costs a multiply and an add per token
      in the forward (2 FLOPs) and twice that in the backward (gradients of the input and of the
      weight): 6 * N. N is every such parameter: attention and MLP projections and the output
      projection, but not the embedding table, which is a lookup (with tied embeddings, count
      the output projection in N anyway).
    - Attention has no weights: per layer, each query token takes dot products with seq_len keys
      (Q K^T: 2 * seq_len * head_dim FLOPs per head) and sums seq_len values (P V: the same),
      so 4 * seq_len * n_heads * head_dim in the forward. Causal, a token sees half the keys on
      average ((seq_len + 1) / 2 exactly; seq_len / 2 here, as FlashAttention's benchmarks
      count). The backward is twice the forward (dP, dV, dQ, dK), so training is 3x the forward:
      12 * n_layers * n_heads * head_dim * seq_len, halved when causal.
    - n_heads is the number of query heads: with GQA the key/value heads only shrink the K and
      V projections (in N), not the attention matmuls.
    - seq_len is the full sequence a token attends over, not one context-parallel rank's slice.
    - Recomputation (activation checkpointing, FlashAttention recomputing Q K^T in its backward)
      is work the hardware does but the model does not need, so it is not counted (PaLM's MFU).
    """
    attention = 12 * n_layers * n_heads * head_dim * seq_len * (0.5 if causal else 1.0)
    return 6.0 * n_params_non_embedding + attention


def document_flops_per_token(
    n_params_non_embedding: int, n_layers: int, n_heads: int, head_dim: float, doc_lengths: list[int]
) -> float:
    """`model_flops_per_token` for packed documents, counted on the document mask: a token
    attends within its own document only, so the attention term averages each document's causal
    FLOPs over the step's tokens: 12 * n_layers * n_heads * head_dim * sum(L^2 / 2) / sum(L)."""
    tokens = sum(doc_lengths)
    attention = 12 * n_layers * n_heads * head_dim * sum(length * length * 0.5 for length in doc_lengths) / tokens
    return 6.0 * n_params_non_embedding + attention


def mfu(tokens_per_second_per_gpu: float, flops_per_token: float, peak_flops_per_gpu: float) -> float:
    """Model FLOPs utilization: the fraction of one GPU's peak that the model's FLOPs use."""
    if peak_flops_per_gpu <= 0:
        raise ValueError(f"peak_flops_per_gpu must be positive, got {peak_flops_per_gpu}")
    return tokens_per_second_per_gpu * flops_per_token / peak_flops_per_gpu


# Dense bf16 tensor-core peaks (no 2:4 sparsity) from NVIDIA's datasheets, SXM parts. PCIe and
# NVL parts run lower clocks and are not listed, so they report no MFU rather than a wrong one.
_PEAK_BF16_FLOPS = {"h100": 989.4e12, "h200": 989.4e12, "b200": 2.25e15}


def peak_bf16_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a GPU from its name (torch.cuda.get_device_name()); None if unknown."""
    words = re.findall(r"[a-z0-9]+", device_name.lower())  # whole words: "GB200" is not a "B200"
    if "pcie" in words or "nvl" in words:
        return None
    return next((peak for model, peak in _PEAK_BF16_FLOPS.items() if model in words), None)


class MetricsLog:
    """Append-only JSONL: one JSON object per logged step, flushed as it is written.

    `resume_step=None` starts a new log. A run resumed from the checkpoint taken after
    `resume_step` steps keeps the records with step <= resume_step and drops the rest (they were
    logged after that checkpoint and will run again, or were cut off by a crash), so the log
    holds each step once. The caller picks the one rank that writes.
    """

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and path.exists():
            # every kept line ends in a newline, even a last one a crash cut right before its "\n"
            kept = [line + "\n" for line in path.read_text().splitlines() if _step_at_most(line, resume_step)]
            _replace(path, "".join(kept))
        self._file = open(path, "w" if resume_step is None else "a")

    def write(self, record: dict) -> None:
        if not isinstance(record.get("step"), int):
            raise ValueError(f"a metrics record needs an int 'step', got {record!r}")
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _step_at_most(line: str, step: int) -> bool:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return False
    return isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step


def _replace(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file, so a crash leaves the old log or the new one."""
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".partial")
    os.fchmod(descriptor, 0o644)  # as open() would have made it; mkstemp makes it private
    with os.fdopen(descriptor, "w") as out:
        out.write(text)
    os.replace(temporary, path)


def _si(value: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{suffix}"
    return f"{value:.0f}"


# What the progress line shows, in order: record key -> (label, how the value is written).
_SHOWN = {
    "loss": ("loss", lambda value: f"{value:.4f}"),
    "tokens_per_s": ("tok/s", _si),
    "tokens_per_s_per_gpu": ("tok/s/gpu", _si),
    "mfu": ("mfu", lambda value: f"{value:.1%}"),
    "peak_memory_gib": ("mem", lambda value: f"{value:.1f}GiB"),
}


def format_metrics(metrics: dict) -> dict[str, str]:
    """The shown metrics of a record as label -> text; missing and None values are left out."""
    return {label: write(metrics[key]) for key, (label, write) in _SHOWN.items() if metrics.get(key) is not None}


class Progress:
    """A progress bar over training steps: tqdm when it is installed, else one printed line every
    `print_every` steps (and at the last). `enabled=False` (ranks other than 0) does nothing."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True, print_every: int = 10) -> None:
        """`total` steps in the run, `initial` of them done before it (a resumed run)."""
        self.total, self.print_every, self.enabled = total, print_every, enabled
        self._bar = None
        if not enabled:
            return
        try:
            from tqdm import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, step: int, metrics: dict) -> None:
        """Report `step` steps done (as the record's "step" counts), with the record."""
        if not self.enabled:
            return
        shown = format_metrics(metrics)
        if self._bar is not None:
            self._bar.set_postfix(shown, refresh=False)
            self._bar.update(step - self._bar.n)
        elif step % self.print_every == 0 or step == self.total:
            fields = "  ".join(f"{label} {text}" for label, text in shown.items())
            print(f"step {step}/{self.total}  {fields}", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
