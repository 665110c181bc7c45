"""FlashAttention-4 (CuTe-DSL) kernels with LSE partials: the "fa4" backend.

Needs CUDA and the pinned GPU stack (`pip install -e ".[fa4]"`); nothing imports this package on
a CPU-only machine. Hopper (sm90): forward with the merge in its epilogue (forward_sm90.py),
backward with dq accumulated across steps in FA4's layout (backward.py), a stand-alone merge
kernel (merge_kernel.py). Blackwell (sm100): blackwell.py, untested on this project's machines.
"""
