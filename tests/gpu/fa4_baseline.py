"""Upstream FA4 on the full sequence on one device: the baseline error of FlashAttention's rule."""

import torch


def upstream_results(case, world_size, inputs, dtype):
    """Upstream FA4 on the full sequence, one device, with autograd (its softcap and learnable
    sinks, with their gradient, where the case has them)."""
    from flash_attn.cute import flash_attn_func, flash_attn_varlen_func

    q, k, v = (t.detach().cuda().to(dtype).requires_grad_() for t in (inputs.q, inputs.k, inputs.v))
    sinks = None if inputs.sinks is None else inputs.sinks.detach().cuda().to(dtype).requires_grad_()
    window = tuple(None if w < 0 else w for w in case.window(world_size))
    options = dict(causal=case.causal, window_size=window, softcap=case.softcap or 0.0, learnable_sink=sinks, return_lse=True)
    if case.documents:
        cu = inputs.cu_seqlens.cuda()
        longest = int((cu[1:] - cu[:-1]).max())
        out, lse = flash_attn_varlen_func(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest, max_seqlen_k=longest, **options)
    else:
        out, lse = flash_attn_func(q, k, v, **options)
    finite = torch.isfinite(lse)
    loss = (out.float() * inputs.dout.cuda().float()).sum() + (lse.where(finite, 0) * inputs.dlse.cuda().to(lse.dtype)).sum()
    loss.backward()
    results = {"out": out, "lse": lse, "dq": q.grad, "dk": k.grad, "dv": v.grad}
    if sinks is not None:
        results["ds"] = sinks.grad
    return {name: t.detach().cpu() for name, t in results.items()}
