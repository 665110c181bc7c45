"""Upstream FA4 on the full sequence on one device: the baseline error of FlashAttention's rule."""

import torch


def upstream_results(case, world_size, inputs, dtype):
    """Upstream FA4 on the full sequence, one device, with autograd."""
    from flash_attn.cute import flash_attn_func, flash_attn_varlen_func

    q, k, v = (t.detach().cuda().to(dtype).requires_grad_() for t in (inputs.q, inputs.k, inputs.v))
    window = tuple(None if w < 0 else w for w in case.window(world_size))
    if case.documents:
        cu = inputs.cu_seqlens.cuda()
        longest = int((cu[1:] - cu[:-1]).max())
        out, lse = flash_attn_varlen_func(
            q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest, max_seqlen_k=longest,
            causal=case.causal, window_size=window, return_lse=True,
        )
    else:
        out, lse = flash_attn_func(q, k, v, causal=case.causal, window_size=window, return_lse=True)
    finite = torch.isfinite(lse)
    loss = (out.float() * inputs.dout.cuda().float()).sum() + (lse.where(finite, 0) * inputs.dlse.cuda().to(lse.dtype)).sum()
    loss.backward()
    return {name: t.detach().cpu() for name, t in {"out": out, "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad}.items()}
