"""Train a stock transformers LlamaForCausalLM through accelerate with fa4_cp ring attention.

GPU (FSDP2 + ParallelismConfig from the config file; the ring runs on its "cp" dim):
    accelerate launch --config_file launch/accelerate_fsdp2_cp4.yaml launch/accelerate_train.py --seq-len 131072
The same run with accelerate's own context parallelism (torch, SDPA) for comparison:
    accelerate launch --config_file launch/accelerate_fsdp2_cp4.yaml launch/accelerate_train.py --seq-len 131072 --attention sdpa
CPU (accelerate refuses ParallelismConfig there; the plugin builds the cp mesh):
    torchrun --nproc-per-node 2 launch/accelerate_train.py --cpu --cp-size 2 --seq-len 512 --steps 2 --tiny
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from config import ulysses_flag  # noqa: E402
from data import TokenStream  # noqa: E402

from fa4_cp.integrations.accelerate import RingAttentionPlugin  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attention", choices=["fa4_cp", "sdpa"], default="fa4_cp", help="sdpa: accelerate's own CP (torch)")
    parser.add_argument("--seq-len", type=int, default=131072)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--data", choices=["python-sources", "synthetic"], default="synthetic")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model for CPU smoke runs")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--cp-size", type=int, help="CPU only: the ring size (on GPU it comes from ParallelismConfig)")
    parser.add_argument("--warmup-steps", type=int, default=3, help="steps left out of the timing summary")
    parser.add_argument("--out", type=Path, help="write the per-step log and a timing summary here (JSON)")
    parser.add_argument("--deterministic", action="store_true", help="fa4_cp: bitwise-reproducible ring attention gradients")
    parser.add_argument(
        "--ulysses", type=ulysses_flag, default=1,
        help="fa4_cp: Ulysses ranks inside the cp group (a 2-D split), or auto: the split fa4_cp.plan_mesh predicts fastest per batch",
    )
    return parser.parse_args()


def model_config(tiny: bool, attn_implementation: str) -> LlamaConfig:
    """A small Llama (about 180M parameters; head_dim 128) with a byte vocabulary."""
    size = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2) if tiny else dict(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=2
    )
    return LlamaConfig(
        vocab_size=256, max_position_embeddings=1 << 21, rope_theta=500_000.0, attn_implementation=attn_implementation,
        use_cache=False,  # training: a KV cache would also double the keys in checkpointing's recompute
        **size,
    )


def main() -> None:
    args = parse_args()
    if args.attention == "sdpa" and args.cpu:
        sys.exit(
            "accelerate_train.py: --attention sdpa runs accelerate's own context parallelism, which needs "
            "ParallelismConfig, and accelerate refuses that on CPU processes; on CPU use --attention fa4_cp"
        )
    if args.deterministic and args.attention != "fa4_cp":
        sys.exit("accelerate_train.py: --deterministic is fa4_cp's flag; it needs --attention fa4_cp")
    if args.ulysses != 1 and args.attention != "fa4_cp":
        sys.exit("accelerate_train.py: --ulysses is fa4_cp's flag; it needs --attention fa4_cp")
    accelerator = Accelerator(cpu=args.cpu)
    ring = None
    if args.attention == "fa4_cp":
        ring = RingAttentionPlugin(
            accelerator, cp_size=args.cp_size, ulysses=args.ulysses, model_config=model_config(args.tiny, "eager"),
            backend="reference" if args.cpu else None, deterministic=args.deterministic,
        )
    cp_size = ring.cp_size if ring else accelerator.parallelism_config.cp_size
    torch.manual_seed(0)
    model = LlamaForCausalLM(model_config(args.tiny, ring.attn_implementation if ring else "sdpa"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    model, optimizer = accelerator.prepare(model, optimizer)
    data = TokenStream(args.data, args.seq_len, seed=0, corpus_path=Path.home() / ".cache" / "fa4_cp" / "python_sources.bin")
    dp_rank, dp_size = accelerator.process_index // cp_size, accelerator.num_processes // cp_size  # cp is the inner mesh dim
    records = []
    for step in range(args.steps):
        began = time.perf_counter()
        input_ids = data.batch(step * dp_size + dp_rank)[0][None]
        batch = {"input_ids": input_ids, "labels": input_ids.clone()}
        if ring is not None:
            loss = model(**ring.shard(batch)).loss
            accelerator.backward(loss)
        else:
            batch = {key: value.to(accelerator.device) for key, value in batch.items()}
            batch["position_ids"] = torch.arange(args.seq_len, device=accelerator.device)[None]
            buffers = [batch["input_ids"], batch["labels"], batch["position_ids"]]
            with accelerator.maybe_context_parallel(buffers=buffers, buffer_seq_dims=[1, 1, 1], no_restore_buffers=set(buffers)):
                loss = model(**batch).loss
                accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        mean_loss = accelerator.reduce(loss.detach(), reduction="mean").item()
        seconds = time.perf_counter() - began  # .item() above waited for the step's GPU work
        tokens_per_s = args.seq_len * dp_size / seconds
        records.append({"step": step + 1, "loss": mean_loss, "step_seconds": seconds, "tokens_per_s": tokens_per_s})
        per = "GPU" if accelerator.device.type == "cuda" else "process"
        accelerator.print(
            f"step {step + 1}/{args.steps} loss {mean_loss:.4f} {seconds * 1e3:.0f} ms "
            f"tokens/s {tokens_per_s:.0f} per {per} {tokens_per_s / accelerator.num_processes:.0f}"
        )
    if args.out is not None and accelerator.is_main_process:
        write_summary(args, accelerator, cp_size, records)
    accelerator.end_training()


def write_summary(args: argparse.Namespace, accelerator: Accelerator, cp_size: int, records: list[dict]) -> None:
    """The run's steps and the median over the steps after warm-up (rank 0's wall clock per step)."""
    timed = [record["step_seconds"] for record in records[args.warmup_steps:]]
    median = statistics.median(timed) if timed else None
    tokens_per_s = args.seq_len * (accelerator.num_processes // cp_size) / median if median else None
    on_gpu = accelerator.device.type == "cuda"
    summary = {
        "benchmark": "launch/accelerate_train.py", "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name(accelerator.device) if on_gpu else "cpu", "torch": torch.__version__,
        "attention": args.attention, "seq_len": args.seq_len, "processes": accelerator.num_processes, "cp_size": cp_size,
        "steps": args.steps, "warmup_steps": args.warmup_steps, "median_step_seconds": median, "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_gpu": tokens_per_s / accelerator.num_processes if tokens_per_s else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(accelerator.device) / 2**30 if on_gpu else None,
        "steps_log": records,
    }
    args.out.write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
