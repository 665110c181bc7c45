"""torchrun worker: one SGD step of a tiny Llama through RingAttentionTrainer on 2 CPU processes
(cp = 2) over a dataset of two batches, with argv[4] gradient-accumulation steps (1 or 2); rank 0
writes the updated parameters, the logged loss and the index of the first batch trained on to
argv[1]."""

import os
import sys
from pathlib import Path

import numpy as np
import torch.distributed as dist
from transformers import TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fa4_cp.integrations.trainer import RingAttentionTrainer  # noqa: E402
from fa4_cp.integrations.transformers import ATTENTION_NAME, register_ring_attention  # noqa: E402
from hf_models import flipped, full_batch, tiny_model  # noqa: E402

packed = sys.argv[2] == "packed"
register_ring_attention()
model = tiny_model("llama", ATTENTION_NAME)
dataset = [{key: value[0] for key, value in batch.items()} for batch in (full_batch(packed), flipped(full_batch(packed)))]
args = TrainingArguments(
    output_dir=sys.argv[3], per_device_train_batch_size=1, max_steps=1, learning_rate=0.1, lr_scheduler_type="constant",
    optim="sgd", weight_decay=0.0, max_grad_norm=0.0, use_cpu=True, report_to=[], save_strategy="no", logging_steps=1,
    gradient_accumulation_steps=int(sys.argv[4]),
)
# Two samples, one cp group: both ranks must train on the same one.
trainer = RingAttentionTrainer(  # packed documents: the Ulysses x ring split chosen per batch
    model=model, args=args, train_dataset=dataset, cp_size=2, ulysses="auto" if packed else 1, ring_backend="reference",
)
trainer.train()
if trainer.accelerator.is_main_process:
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    first = next(iter(trainer.get_train_dataloader().sampler))
    np.savez(sys.argv[1], loss=np.array(losses), first=np.array(first), **{name: p.detach().numpy() for name, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()})
# An undestroyed gloo group can abort the process at interpreter exit; so can destroying it on a
# rank whose peer is still at work (rank 0 saving): both finish first.
dist.barrier()
dist.destroy_process_group()
# The results are written; a C++ thread that some library leaves joinable can still abort the
# interpreter's teardown ("terminate called without an active exception", rank 1, in about one CI
# run in three): leave without the teardown.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
