"""The LSE merge of two attention partials, in the CuTe DSL: one function shared by the forward's
fused epilogue and the stand-alone merge kernel, as FA4 shares its softmax helpers.

The PyTorch merge (kernels/merge.py) is the reference for both.
"""

from __future__ import annotations

import cutlass.cute as cute
from cutlass import Float32, Float64
from cutlass.cutlass_dsl import max as dsl_max
from cutlass.cutlass_dsl import min as dsl_min


@cute.jit
def merged_lse_and_weights(lse_prior: Float64, lse_part: Float64):
    """(lse_new, weight_prior, weight_part) with out_new = weight_prior * out_prior +
    weight_part * out_part. The LSE merges in fp64 as max + log1p(exp(min - max)); when both
    sides saw no key (both -inf) the result is -inf with both weights 0, never NaN."""
    high = dsl_max(lse_prior, lse_part)
    lse_new = high
    weight_prior = Float32(0.0)
    weight_part = Float32(0.0)
    if high != -Float64.inf:
        low = dsl_min(lse_prior, lse_part)
        lse_new = high + cute.math.log1p(cute.math.exp(low - high))
        weight_prior = Float32(cute.math.exp(lse_prior - lse_new))
        weight_part = Float32(cute.math.exp(lse_part - lse_new))
    return lse_new, weight_prior, weight_part
