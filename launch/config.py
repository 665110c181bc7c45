"""Training configuration: presets, command-line overrides, and the checks that run before any
heavy allocation."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

from fa4_cp.comm.transport import TRANSPORTS
from fa4_cp.kernels import BACKEND_NAMES
from fa4_cp.plan.head_chunks import HeadChunks
from fa4_cp.validation import heads_split


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256  # byte-level
    d_model: int = 2048
    n_layers: int = 16
    n_heads: int = 32
    n_kv_heads: int = 8
    ffn_hidden: int = 8192
    rope_theta: float = 500_000.0
    norm_eps: float = 1e-5
    qk_head_dim: int | None = None  # q's and k's head_dim; None: d_model / n_heads
    v_head_dim: int | None = None  # v's (MLA-like layers: 192 / 128); None: the q/k head_dim

    @property
    def head_dim(self) -> int:
        """q's and k's."""
        return self.d_model // self.n_heads if self.qk_head_dim is None else self.qk_head_dim

    @property
    def value_head_dim(self) -> int:
        return self.head_dim if self.v_head_dim is None else self.v_head_dim

    @property
    def attention_head_dim(self) -> float:
        """The head_dim whose square attention's FLOPs follow: QK^T reads q/k's, PV v's."""
        return (self.head_dim + self.value_head_dim) / 2


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig
    seq_len: int
    steps: int
    stop_at: int | None = None  # end this run after this step (a time-limited job); the schedule spans `steps`
    lr: float = 3e-4
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    dp_shard: int = 1
    cp: int = 1
    # Ulysses ranks inside each cp group: a ulysses x (cp / ulysses) mesh; "auto": the split
    # fa4_cp.plan_mesh predicts fastest, per batch (its documents); None: "auto" with --packing
    # documents, else 1 (a plain ring)
    ulysses: int | str | None = None
    # Head chunks of a 2-D split's all-to-all pipeline (ring_attention's ulysses_chunks) where a
    # batch runs on one; "auto": the count plan_mesh predicts fastest with the split it picks
    ulysses_chunks: int | str = 1
    device: str = "cuda"
    compute_dtype: str = "bfloat16"  # FSDP2 parameter dtype; master weights and optimizer stay fp32
    data: str = "python-sources"  # or "synthetic"
    packing: str = "none"  # or "documents": the corpus's files as packed documents
    corpus_path: str | None = None
    seed: int = 0
    # "layer": recompute each layer in backward; "except-attention": recompute all of it but ring
    # attention, whose q, k, v and output stay saved (about 3.5x the memory of "layer", and no
    # second attention forward, the bulk of the FLOPs at long context); "none".
    activation_checkpointing: str = "layer"
    offload_activations: bool = False
    loss_chunk: int = 8192  # tokens per cross-entropy chunk
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    keep_checkpoints: int | None = None  # None keeps every checkpoint
    resume: bool = False
    metrics_path: str | None = None
    attention_backend: str | None = None  # fa4_cp backend: None picks FA4 on Hopper/Blackwell
    transport: str | None = None
    deterministic: bool = False  # ring attention's gradients summed in a fixed order

    def schedule(self) -> dict:
        """The LR schedule, which a resumed run may change (it says so)."""
        return {"steps": self.steps, "lr": self.lr, "warmup_steps": self.warmup_steps, "min_lr_ratio": self.min_lr_ratio}

    def fingerprint(self) -> dict:
        """What a checkpoint must share with the run that resumes it."""
        return {
            "model": dataclasses.asdict(self.model),
            "seq_len": self.seq_len,
            "dp_shard": self.dp_shard,
            "data": self.data,
            "packing": self.packing,
            "seed": self.seed,
        }


ACTIVATION_CHECKPOINTING = ("layer", "except-attention", "none")

PRESETS: dict[str, TrainConfig] = {
    # CPU tests: a few seconds per step on gloo.
    "tiny": TrainConfig(
        model=ModelConfig(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=128),
        seq_len=256, steps=4, warmup_steps=1, device="cpu", compute_dtype="float32", data="synthetic", loss_chunk=96,
    ),
    # A quick GPU run (about 180M parameters): head_dim 128 as FA4 prefers.
    "small": TrainConfig(
        model=ModelConfig(d_model=1024, n_layers=12, n_heads=8, n_kv_heads=2, ffn_hidden=4096), seq_len=131072, steps=50,
        activation_checkpointing="except-attention",
    ),
    # About 1.0B parameters (Llama-3.2-1B shape with a byte vocabulary).
    "1b": TrainConfig(model=ModelConfig(), seq_len=1 << 20, steps=10, activation_checkpointing="except-attention"),
}

# Every flag: (type, help). A flag left out keeps the preset's value (shown in --help).
def ulysses_flag(value: str) -> int | str:
    """--ulysses as argparse reads it: a count, or "auto"."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or 'auto', got {value!r}") from None


_OVERRIDES: dict[str, tuple[type, str]] = {
    "seq_len": (int, "tokens per training sequence (one sequence per dp_shard replica per step)"),
    "steps": (int, "length of the LR schedule, in steps"),
    "stop_at": (int, "end this run after this step (a time-limited job; the schedule still spans --steps)"),
    "lr": (float, "peak learning rate"),
    "warmup_steps": (int, "linear LR warm-up steps"),
    "min_lr_ratio": (float, "the cosine decay ends at this fraction of --lr"),
    "weight_decay": (float, "AdamW weight decay"),
    "grad_clip": (float, "gradient-norm clip"),
    "dp_shard": (int, "FSDP data-parallel size; dp_shard x cp must equal the world size"),
    "cp": (int, "context-parallel size (ranks per sequence)"),
    "ulysses": (
        ulysses_flag, "Ulysses head all-to-all ranks inside each cp group, the ring spanning cp / ulysses; auto: the split "
        "fa4_cp.plan_mesh predicts fastest for each batch's documents (default auto with --packing documents, else 1)",
    ),
    "ulysses_chunks": (
        ulysses_flag, "head chunks of a 2-D split (u > 1), each chunk's all-to-all behind the previous chunk's ring; auto: "
        "plan_mesh's count for the split it picks (a batch on the plain ring runs one chunk)",
    ),
    "device": (str, "cuda or cpu"),
    "compute_dtype": (str, "FSDP2 parameter dtype: bfloat16 or float32 (master weights stay fp32)"),
    "data": (str, "python-sources (the installed packages' Python files, byte-level) or synthetic"),
    "packing": (str, "none (one sequence per step) or documents (the corpus's files, packed; attention stays within each)"),
    "corpus_path": (str, "where the python-sources corpus is built (default ~/.cache/fa4_cp/python_sources.bin)"),
    "seed": (int, "model init and data seed"),
    "activation_checkpointing": (str, "layer, except-attention or none (see docs/training.md)"),
    "loss_chunk": (int, "tokens per cross-entropy chunk"),
    "checkpoint_dir": (str, "where DCP checkpoints go (and --resume reads them)"),
    "checkpoint_every": (int, "save every N steps (0: never)"),
    "keep_checkpoints": (int, "keep only the newest N complete checkpoints (default: keep all)"),
    "metrics_path": (str, "JSONL metrics log (rank 0)"),
    "attention_backend": (str, "fa4_cp kernels: auto, fa4 or reference (default auto: FA4 on Hopper/Blackwell)"),
    "transport": (str, "how KV moves between GPUs: auto, nccl or copy_engine (default auto)"),
}
_MODEL_OVERRIDES: dict[str, tuple[type, str]] = {
    "d_model": (int, "model width"),
    "n_layers": (int, "decoder layers"),
    "n_heads": (int, "query heads"),
    "n_kv_heads": (int, "key/value heads (GQA; divides n_heads)"),
    "ffn_hidden": (int, "SwiGLU hidden size"),
    "qk_head_dim": (int, "q and k head_dim (default d_model / n_heads); with --v-head-dim, an MLA-like layer (DeepSeek-V3: 192 / 128)"),
    "v_head_dim": (int, "v head_dim (default: the q/k head_dim)"),
}


_CHOICES: dict[str, tuple[str, ...]] = {
    "device": ("cuda", "cpu"),
    "compute_dtype": ("bfloat16", "float32"),
    "data": ("python-sources", "synthetic"),
    "packing": ("none", "documents"),
    "activation_checkpointing": ACTIVATION_CHECKPOINTING,
    "attention_backend": BACKEND_NAMES,
    "transport": TRANSPORTS,
}
"""Flags that take one of a few words: argparse refuses anything else, naming the flag."""


def _preset_defaults(name: str, of_model: bool) -> str:
    values = {preset: getattr(config.model if of_model else config, name) for preset, config in PRESETS.items()}
    if len(set(values.values())) == 1:
        return str(next(iter(values.values())))
    return ", ".join(f"{preset}: {value}" for preset, value in values.items())


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    parser = argparse.ArgumentParser(
        description="Train a Llama-style decoder with fa4_cp ring attention (torchrun). Every flag but --preset "
        "overrides the preset's value; defaults are listed per preset.",
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny", help="tiny (CPU tests), small (~180M) or 1b (default: tiny)")
    for table, of_model in ((_OVERRIDES, False), (_MODEL_OVERRIDES, True)):
        for name, (kind, text) in table.items():
            parser.add_argument(
                f"--{name.replace('_', '-')}", type=kind, default=None, choices=_CHOICES.get(name),
                help=text if "(default" in text else f"{text} (default {_preset_defaults(name, of_model)})",
            )
    parser.add_argument("--resume", action="store_true", help="continue from the latest complete checkpoint in --checkpoint-dir")
    parser.add_argument("--offload-activations", action="store_true", help="keep the tensors saved for backward in pinned CPU memory")
    parser.add_argument("--deterministic", action="store_true", help="bitwise-reproducible ring attention gradients (slower)")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    model = dataclasses.replace(preset.model, **{k: v for k in _MODEL_OVERRIDES if (v := getattr(args, k)) is not None})
    changes = {k: v for k in _OVERRIDES if (v := getattr(args, k)) is not None}
    config = dataclasses.replace(
        preset, model=model, resume=args.resume or preset.resume,
        offload_activations=args.offload_activations or preset.offload_activations,
        deterministic=args.deterministic or preset.deterministic, **changes,
    )
    check_config(config)
    return config


def ulysses_of(config: TrainConfig) -> int | str:
    """--ulysses as the run uses it: a count, or "auto" (chosen per batch)."""
    if config.ulysses is None:
        return "auto" if config.packing == "documents" else 1
    return config.ulysses


def check_config(config: TrainConfig) -> None:
    """Errors that need no process group: shapes and choices."""
    model = config.model
    if model.qk_head_dim is None and model.d_model % model.n_heads:
        raise ValueError(f"d_model: {model.d_model} must be a multiple of n_heads ({model.n_heads}), or set --qk-head-dim")
    for name in ("qk_head_dim", "v_head_dim"):
        value = getattr(model, name)
        if value is not None and (value < 2 or value % 2):
            raise ValueError(f"{name}: expected an even head_dim of 2 or more (RoPE rotates pairs), got {value}")
    if model.n_heads % model.n_kv_heads:
        raise ValueError(f"n_kv_heads: {model.n_kv_heads} must divide n_heads ({model.n_heads})")
    for name in ("seq_len", "steps"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name}: expected a positive count, got {getattr(config, name)}")
    if config.stop_at is not None and not 1 <= config.stop_at <= config.steps:
        raise ValueError(f"stop_at: expected a step from 1 to --steps ({config.steps}), got {config.stop_at}")
    if config.warmup_steps < 0:
        raise ValueError(f"warmup_steps: expected a count of 0 or more, got {config.warmup_steps}")
    if config.checkpoint_every < 0:
        raise ValueError(f"checkpoint_every: expected a step count (0: never), got {config.checkpoint_every}")
    if config.checkpoint_every and not config.checkpoint_dir:
        raise ValueError(f"checkpoint_every: saving every {config.checkpoint_every} steps needs --checkpoint-dir")
    if config.cp < 1 or config.dp_shard < 1:
        raise ValueError(f"cp and dp_shard: expected positive sizes, got cp={config.cp}, dp_shard={config.dp_shard}")
    ulysses = ulysses_of(config)
    if ulysses != "auto" and (ulysses < 1 or config.cp % ulysses):
        raise ValueError(f"ulysses: expected a positive divisor of cp ({config.cp}) or 'auto', got {ulysses}")
    if ulysses != "auto" and not heads_split(model.n_heads, model.n_kv_heads, ulysses):
        raise ValueError(
            f"ulysses: {config.ulysses} must divide n_heads ({model.n_heads}), and n_kv_heads ({model.n_kv_heads}) must be "
            "a multiple or a divisor of it"
        )
    chunks = config.ulysses_chunks
    if chunks != "auto" and chunks < 1:
        raise ValueError(f"ulysses_chunks: expected a positive count or 'auto', got {chunks}")
    if chunks != "auto" and ulysses != "auto" and ulysses > 1:  # the heads' split, before any process starts
        HeadChunks.of(model.n_heads // ulysses, max(model.n_kv_heads // ulysses, 1), chunks)
    if config.packing == "none" and config.seq_len % (2 * config.cp):
        raise ValueError(
            f"seq_len: {config.seq_len} is not divisible by 2 * cp = {2 * config.cp} (the zigzag layout cuts the "
            "sequence into 2 * cp chunks)"
        )
    if config.device not in ("cuda", "cpu"):
        raise ValueError(f"device: expected 'cuda' or 'cpu', got {config.device!r}")
    if config.compute_dtype not in ("bfloat16", "float32"):
        raise ValueError(f"compute_dtype: expected 'bfloat16' or 'float32', got {config.compute_dtype!r}")
    if config.data not in ("python-sources", "synthetic"):
        raise ValueError(f"data: expected 'python-sources' or 'synthetic', got {config.data!r}")
    if config.packing not in ("none", "documents"):
        raise ValueError(f"packing: expected 'none' or 'documents', got {config.packing!r}")
    if config.packing == "documents" and config.data != "python-sources":
        raise ValueError("packing: 'documents' packs the python-sources corpus's files; --data synthetic has none")
    if config.resume and not config.checkpoint_dir:
        raise ValueError("resume: needs --checkpoint-dir")
    if config.activation_checkpointing not in ACTIVATION_CHECKPOINTING:
        raise ValueError(
            f"activation_checkpointing: expected one of {', '.join(ACTIVATION_CHECKPOINTING)}, got {config.activation_checkpointing!r}"
        )
    if config.loss_chunk < 1:
        raise ValueError(f"loss_chunk: expected a positive token count, got {config.loss_chunk}")
    if config.keep_checkpoints is not None and config.keep_checkpoints < 1:
        raise ValueError(f"keep_checkpoints: expected a positive count, got {config.keep_checkpoints}")
    if config.attention_backend not in (None, *BACKEND_NAMES):
        raise ValueError(f"attention_backend: expected one of {', '.join(BACKEND_NAMES)}, got {config.attention_backend!r}")
    if config.attention_backend == "fa4" and config.device == "cpu":
        raise ValueError("attention_backend: 'fa4' needs --device cuda (on CPU use auto or reference)")
    if config.transport not in (None, *TRANSPORTS):
        raise ValueError(f"transport: expected one of {', '.join(TRANSPORTS)}, got {config.transport!r}")


def check_world(config: TrainConfig, world_size: int, cuda_available: bool) -> None:
    """Errors that depend on the launch: checked before the process group starts."""
    if config.dp_shard * config.cp != world_size:
        raise ValueError(
            f"dp_shard x cp = {config.dp_shard} x {config.cp} = {config.dp_shard * config.cp} does not match the "
            f"world size {world_size} (torchrun --nproc-per-node x nodes)"
        )
    if config.device == "cuda" and not cuda_available:
        raise ValueError("device: 'cuda' was asked for but this machine has no CUDA GPU (use --device cpu)")
