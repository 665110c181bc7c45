"""FlashAttention-4 (CuTe-DSL) kernels with LSE partials: the "fa4" backend.

Needs CUDA and the pinned GPU stack (`pip install -e ".[fa4]"`); nothing imports this package on
a CPU-only machine. Hopper (sm90): the passes (forward_pass_sm90.py, backward_pass_sm90.py) around
the kernels: the forward with the merge in its epilogue (forward_sm90.py), the backward adding
dK/dV into the ring's buffers (backward_sm90.py), the varlen dq read-back (dq_readback.py), the
dK/dV finish (dkv_finish.py). The stand-alone merge kernel (merge_kernel.py) serves both
architectures. Blackwell (sm100): passes_sm100.py, untested on this project's machines.
"""
