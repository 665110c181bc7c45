"""Upstream FA4 on the full sequence on one device: the baseline error of FlashAttention's rule."""

from oracle import lse_loss


def upstream_kv(q, k, v):
    """k and v (leaves) as upstream FA4 takes them, and the map from their gradients to k's and
    v's. Upstream's GQA backward asserts v's head_dim equals k's on sm90: with MLA's narrower v
    the KV heads are repeated and their gradients summed in fp32 (one rounding per head, so a
    slightly looser baseline than a GQA kernel's)."""
    repeat = q.shape[-2] // k.shape[-2] if v.shape[-1] != k.shape[-1] else 1
    if repeat == 1:
        return k, v, lambda grad: grad
    k_in, v_in = (t.detach().repeat_interleave(repeat, dim=-2).requires_grad_() for t in (k, v))
    return k_in, v_in, lambda grad: grad.float().unflatten(-2, (-1, repeat)).sum(-2)


def upstream_results(case, world_size, inputs, dtype):
    """Upstream FA4 on the full sequence, one device, with autograd (its softcap and learnable
    sinks, with their gradient, where the case has them)."""
    from flash_attn.cute import flash_attn_func, flash_attn_varlen_func

    q, k, v = (t.detach().cuda().to(dtype).requires_grad_() for t in (inputs.q, inputs.k, inputs.v))
    k_in, v_in, kv_grad = upstream_kv(q, k, v)
    sinks = None if inputs.sinks is None else inputs.sinks.detach().cuda().to(dtype).requires_grad_()
    window = tuple(None if w < 0 else w for w in case.window(world_size))
    options = dict(causal=case.causal, window_size=window, softcap=case.softcap or 0.0, learnable_sink=sinks, return_lse=True)
    if case.documents:
        cu = inputs.cu_seqlens.cuda()
        longest = int((cu[1:] - cu[:-1]).max())
        out, lse = flash_attn_varlen_func(q, k_in, v_in, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest, max_seqlen_k=longest, **options)
    else:
        out, lse = flash_attn_func(q, k_in, v_in, **options)
    loss = (out.float() * inputs.dout.cuda().float()).sum() + lse_loss(lse, None if inputs.dlse is None else inputs.dlse.cuda())
    loss.backward()
    results = {"out": out, "lse": lse, "dq": q.grad, "dk": kv_grad(k_in.grad), "dv": kv_grad(v_in.grad)}
    if sinks is not None:
        results["ds"] = sinks.grad
    return {name: t.detach().cpu() for name, t in results.items()}
