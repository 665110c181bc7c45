"""torchrun worker: a tiny Llama through Accelerator (gloo CPU processes) with the ring plugin, on
a ring of 2, on a 2 x 1 Ulysses x ring mesh, and with ulysses="auto" (the split chosen per batch);
writes rank 0's losses, averaged gradients and meshes to the path in argv[1]."""

import os
import sys

import numpy as np
import torch.distributed as dist
import transformers
from accelerate import Accelerator

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from fa4_cp.integrations.accelerate import RingAttentionPlugin  # noqa: E402
from hf_models import COMMON, full_batch, tiny_model  # noqa: E402

accelerator = Accelerator(cpu=True)
results = {}
for ulysses in (1, 2, "auto"):  # the ring over cp, cp as a 2 x 1 Ulysses x ring mesh, the split per batch
    config = transformers.LlamaConfig(**COMMON) if ulysses == "auto" else None
    ring = RingAttentionPlugin(accelerator, cp_size=2, ulysses=ulysses, model_config=config, backend="reference")
    model = accelerator.prepare(tiny_model("llama", ring.attn_implementation))
    results[f"u{ulysses}:mesh_dims"] = np.array(ring.ring_group.ndim)
    for packed in (False, True):
        model.zero_grad()
        (batch,) = ring.shard_batches([full_batch(packed)])
        results[f"u{ulysses}:{packed}:ring_dims"] = np.array(ring.ring_group.ndim)
        loss = model(**batch).loss
        accelerator.backward(loss)
        mean_loss = accelerator.reduce(loss.detach(), reduction="mean")
        results[f"u{ulysses}:loss_{packed}"] = mean_loss.numpy()
        for name, p in accelerator.unwrap_model(model).named_parameters():
            results[f"u{ulysses}:{packed}:{name}"] = p.grad.numpy().copy()
if accelerator.is_main_process:
    np.savez(sys.argv[1], **results)
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
