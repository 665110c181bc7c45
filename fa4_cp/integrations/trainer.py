"""The Hugging Face Trainer with fa4_cp ring attention.

The stock Trainer refuses any attention but SDPA when ParallelismConfig has cp_size > 1, and runs
accelerate's own context parallelism. `RingAttentionTrainer` shards each batch for the ring
instead (zigzag, packed documents included; see batches.py) on accelerate's "cp" mesh dim, or,
with `cp_size=` on CPU where accelerate refuses ParallelismConfig, on a mesh of its own; then
it also gives every rank of a cp group the same batches.

    register_ring_attention()                       # before the model is built
    model = AutoModelForCausalLM.from_config(config, attn_implementation="fa4_cp_ring")
    trainer = RingAttentionTrainer(model=model, args=args, train_dataset=dataset)

`ulysses=` as the plugin's: a count, or "auto" for the split chosen per batch (the model's config
gives its heads). The trainer binds the model to a ring on its own cp mesh: when that ring is not the one the model
was built with, it registers it under a name of its own and switches the model to it.

Gradient accumulation is supported; each micro-batch's loss is its share of that micro-batch's
mean (scaled for the cp average), divided by the accumulation steps.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils.data import DataLoader, DistributedSampler
from transformers import Trainer

from .accelerate import RingAttentionPlugin
from .transformers import is_ring_attention


class RingAttentionTrainer(Trainer):
    def __init__(
        self, *args, cp_size: int | None = None, ulysses: int | str = 1, ring_backend: str | None = None,
        ring_transport: str | None = None, ring_deterministic: bool | None = None, **kwargs,
    ):
        super().__init__(*args, **kwargs)
        # TrainingArguments(full_determinism=True) asks for reproducible gradients: the ring's too
        deterministic = self.args.full_determinism if ring_deterministic is None else ring_deterministic
        self.ring = RingAttentionPlugin(
            self.accelerator, cp_size=cp_size, ulysses=ulysses, model_config=self.model.config, backend=ring_backend,
            transport=ring_transport, deterministic=deterministic,
        )
        built_with = self.model.config._attn_implementation
        if not is_ring_attention(built_with):
            raise ValueError(
                f"model: built with attn_implementation={built_with!r}; RingAttentionTrainer trains with fa4_cp ring "
                "attention: call register_ring_attention() and build the model with attn_implementation='fa4_cp_ring'"
            )
        if built_with != self.ring.attn_implementation:
            self.model.set_attn_implementation(self.ring.attn_implementation)

    def _prepare_context_parallel_inputs(self, model: torch.nn.Module, inputs: dict) -> tuple:
        return contextlib.nullcontext, self.ring.shard(inputs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # The sharded inputs carry their own token count; the Trainer's (the whole batch over
        # every process) would count each cp rank's copy of the batch again.
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=None)
        if num_items_in_batch is None:
            return result  # the Trainer divides by the accumulation steps itself
        loss, *outputs = result if return_outputs else (result,)
        loss = loss / self.current_gradient_accumulation_steps
        return (loss, *outputs) if return_outputs else loss

    def get_train_dataloader(self) -> DataLoader:
        if not self.ring.owns_mesh:
            return super().get_train_dataloader()  # accelerate knows the cp dim and shares batches
        dp_size = self.accelerator.num_processes // self.ring.cp_size
        sampler = DistributedSampler(
            self.train_dataset, num_replicas=dp_size, rank=self.accelerator.process_index // self.ring.cp_size,
            shuffle=True, seed=self.args.seed, drop_last=self.args.dataloader_drop_last,
        )
        return DataLoader(
            self.train_dataset, batch_size=self._train_batch_size, sampler=sampler, collate_fn=self.data_collator,
            drop_last=self.args.dataloader_drop_last, num_workers=self.args.dataloader_num_workers,
        )
