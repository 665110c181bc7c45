"""Train a Llama-style decoder on one long sequence per step with FSDP2 + fa4_cp ring attention.

    torchrun --nproc-per-node 4 launch/train.py --preset 1b --cp 4 --seq-len 1048576

Mesh (dp_shard, cp): FSDP2 shards parameters, gradients and optimizer state over dp_shard x cp;
ring attention runs on the cp group; every dp_shard replica trains on its own sequence. Inputs,
pre-shifted labels and global positions are zigzag-sharded with fa4_cp.shard_inputs. The loss is
the sum over local tokens divided by the global count of valid tokens (counted before sharding),
and gradients are summed over ranks, so they equal the unsharded run's.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("PYTORCH_ALLOC_CONF", "expandable_segments:True")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import fa4_cp  # noqa: E402
import checkpoint  # noqa: E402
from config import TrainConfig, check_world, parse_config  # noqa: E402
from data import TokenStream, build_corpus  # noqa: E402
from loss import IGNORE_INDEX  # noqa: E402
from metrics import MetricsLog, Progress, document_flops_per_token, mfu, model_flops_per_token, peak_bf16_flops  # noqa: E402
from model import Decoder  # noqa: E402
from parallel import build_mesh, context_splits, shard_model  # noqa: E402

StepHook = Callable[[int, Decoder, float], None]


def init_distributed(config: TrainConfig) -> torch.device:
    """The process group from torchrun's environment (or one the caller started)."""
    world_size = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    check_world(config, world_size, torch.cuda.is_available())
    if config.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    return device


def lr_at(config: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine decay to min_lr_ratio of the peak (a multiplier of lr)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def data_stream(config: TrainConfig) -> TokenStream:
    corpus = None
    if config.data == "python-sources":
        corpus = Path(config.corpus_path or Path.home() / ".cache" / "fa4_cp" / "python_sources.bin")
        if dist.get_rank() == 0:
            build_corpus(corpus)
        dist.barrier()
    stream = TokenStream(config.data, config.seq_len, config.seed, corpus, config.packing)
    # Each node builds its corpus from its own installed packages: they must agree.
    fingerprints: list = [None] * dist.get_world_size()
    dist.all_gather_object(fingerprints, stream.state_dict())
    if any(f != fingerprints[0] for f in fingerprints):
        raise ValueError(f"data: the ranks read different corpora ({corpus}); install the same packages on every node or pass --corpus-path")
    return stream


def train(config: TrainConfig, on_step: StepHook | None = None) -> list[float]:
    """Run the training; returns the loss of every step run here."""
    resume_step = None
    if config.resume:
        resume_step = checkpoint.latest_step(config.checkpoint_dir)
        if resume_step is None:
            raise ValueError(f"resume: no complete checkpoint under {config.checkpoint_dir}")
    device = init_distributed(config)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if resume_step is not None:  # refuse a foreign checkpoint before building anything heavy
        meta = checkpoint.read_meta(config.checkpoint_dir, resume_step)
        checkpoint.check_resumable(config, world_size, meta, config.checkpoint_dir)
        if rank == 0:  # on stderr, with the progress bar
            print(f"resuming from step {resume_step} of {config.steps} ({checkpoint.step_dir(config.checkpoint_dir, resume_step)})", file=sys.stderr, flush=True)
            for change in checkpoint.schedule_changes(config, meta):
                print(f"resume: the LR schedule changes from the checkpoint's, now recomputed from step {resume_step}: {change}", file=sys.stderr, flush=True)
    data = data_stream(config)

    mesh = build_mesh(config)
    model = Decoder(config.model)
    model.init_weights(config.seed)
    splits = context_splits(config, mesh)
    model.ring = {"group": None, "backend": config.attention_backend, "transport": config.transport, "deterministic": config.deterministic}
    model = shard_model(model.to(device), mesh, config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(config, step))
    start = 0
    if resume_step is not None:
        meta = checkpoint.load(config.checkpoint_dir, resume_step, model, optimizer, scheduler)
        data.check_state(meta["data"])
        start = meta["step"]

    dp_rank = mesh["dp_shard"].get_local_rank()
    shape = (model.parameter_count(include_embedding=False), config.model.n_layers, config.model.n_heads, config.model.attention_head_dim)
    dense_flops_per_token = model_flops_per_token(*shape, config.seq_len)
    peak = peak_bf16_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    log = MetricsLog(Path(config.metrics_path), resume_step=resume_step) if config.metrics_path and rank == 0 else None
    progress = Progress(total=config.steps, initial=start, enabled=rank == 0)
    offload = torch.autograd.graph.save_on_cpu(pin_memory=True) if config.offload_activations else contextlib.nullcontext()
    losses = []
    last_step = min(config.steps, config.stop_at or config.steps)
    for step in range(start, last_step):
        began = time.perf_counter()
        input_ids, labels = data.batch(step * config.dp_shard + dp_rank)
        cu_seqlens = data.documents(step * config.dp_shard + dp_rank)
        ulysses, context, chunks = splits.choose(cu_seqlens, config.seq_len)
        model.ring["group"] = context
        model.ring["ulysses_chunks"] = 1 if ulysses == 1 else chunks if config.ulysses_chunks == "auto" else config.ulysses_chunks
        local = fa4_cp.shard_inputs(input_ids[None], labels[None], group=context, cu_seqlens=cu_seqlens)
        valid = torch.tensor(float((labels != IGNORE_INDEX).sum()), device=device)
        if config.dp_shard > 1:
            dist.all_reduce(valid, group=mesh["dp_shard"].get_group())
        with offload:
            inputs = (local[key].to(device) for key in ("input_ids", "position_ids", "labels"))
            loss_sum = model(*inputs, config.loss_chunk, cu_seqlens)
        # Each rank's gradient is a partial sum of the true one; FSDP averages over the
        # world, so scale by the world size to sum (gloo has no pre-multiplied sum).
        (loss_sum * (world_size / valid)).backward()
        if step + 1 < last_step:  # the next batch's placement, on a worker thread while the GPU runs this step
            splits.plan_ahead(data.documents((step + 1) * config.dp_shard + dp_rank), config.seq_len, causal=True)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        if on_step is not None:
            on_step(step, model, float(loss_sum.detach()))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        total = loss_sum.detach().clone()
        dist.all_reduce(total)
        loss = float(total / valid)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - began
        tokens_per_gpu = config.seq_len * config.dp_shard / world_size / seconds
        flops_per_token = dense_flops_per_token
        if cu_seqlens is not None:  # counted on the document mask (this replica's documents)
            flops_per_token = document_flops_per_token(*shape, (cu_seqlens[1:] - cu_seqlens[:-1]).tolist())
        metrics = {
            "step": step + 1, "loss": loss, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
            "step_seconds": seconds, "tokens_per_s": tokens_per_gpu * world_size, "tokens_per_s_per_gpu": tokens_per_gpu,
            "mfu": mfu(tokens_per_gpu, flops_per_token, peak) if peak else None,
            "documents": None if cu_seqlens is None else len(cu_seqlens) - 1,
            "ulysses": ulysses,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        }
        losses.append(loss)
        progress.update(step + 1, metrics)
        if log is not None:
            log.write(metrics)
        if config.checkpoint_dir and config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
            checkpoint.save(config.checkpoint_dir, step + 1, model, optimizer, scheduler, data.state_dict(), config)
    progress.close()
    if log is not None:
        log.close()
    return losses


def main(argv: list[str] | None = None) -> None:
    try:
        config = parse_config(argv)
        check_world(config, int(os.environ.get("WORLD_SIZE", "1")), torch.cuda.is_available())
    except ValueError as error:  # a bad flag: its cause once per launch, not a traceback per rank
        if os.environ.get("RANK", "0") == "0":
            print(f"train.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    train(config)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
