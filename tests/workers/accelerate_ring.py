"""torchrun worker: a tiny Llama through Accelerator (gloo CPU processes) with the ring plugin, on
a ring of 2 and on a 2 x 1 Ulysses x ring mesh; writes rank 0's losses and averaged gradients to
the path in argv[1]."""

import sys

import numpy as np
import torch.distributed as dist
from accelerate import Accelerator

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
from fa4_cp.integrations.accelerate import RingAttentionPlugin  # noqa: E402
from hf_models import full_batch, tiny_model  # noqa: E402

accelerator = Accelerator(cpu=True)
results = {}
for ulysses in (1, 2):  # the ring over cp, then cp as a 2 x 1 Ulysses x ring mesh
    ring = RingAttentionPlugin(accelerator, cp_size=2, ulysses=ulysses, backend="reference")
    model = accelerator.prepare(tiny_model("llama", ring.attn_implementation))
    results[f"u{ulysses}:mesh_dims"] = np.array(ring.ring_group.ndim)
    for packed in (False, True):
        model.zero_grad()
        (batch,) = ring.shard_batches([full_batch(packed)])
        loss = model(**batch).loss
        accelerator.backward(loss)
        mean_loss = accelerator.reduce(loss.detach(), reduction="mean")
        results[f"u{ulysses}:loss_{packed}"] = mean_loss.numpy()
        for name, p in accelerator.unwrap_model(model).named_parameters():
            results[f"u{ulysses}:{packed}:{name}"] = p.grad.numpy().copy()
if accelerator.is_main_process:
    np.savez(sys.argv[1], **results)
# An undestroyed gloo group can abort the process at interpreter exit.
dist.destroy_process_group()
