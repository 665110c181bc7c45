"""FlashAttention-4 (CuTe-DSL) kernels with LSE partials, for Hopper (sm90).

Needs CUDA and the pinned GPU stack (`pip install -e ".[fa4]"`); nothing imports this package on
a CPU-only machine. Status: the forward with the merge in its epilogue (forward.py) is done and
measured; the backward, the stand-alone merge kernel and Blackwell dispatch are not written yet,
so the ring does not select this backend.
"""
