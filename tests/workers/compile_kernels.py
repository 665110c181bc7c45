"""Compile every CuTe-DSL kernel the FA4 backend launches for one architecture, without a GPU.

    CUTE_DSL_ARCH=sm_90a python tests/workers/compile_kernels.py sm_90a [SHARD SHARDS]

sm_90a: fa4_cp's Hopper forward with LSE partials (merging and first-write, dense and varlen,
causal and windowed, softcapped, q heads packed or not; head dims 128, 256 and MLA's 192 / 128), its Hopper backward
accumulating dK/dV (GQA and not, varlen, first-write, deterministic; head dims 128, 192, 256, MLA's 192 / 128), the varlen dq read-back, the dK/dV finish and the stand-alone merge
kernel. sm_100a: the Blackwell path, upstream's sm100 forward and backward (as passes_sm100.py calls
them, under torch's FakeTensorMode; head dims 128, MLA's 192 / 128 and 256), the accumulating
Blackwell backward (backward_sm100.py: GQA and not, varlen, windowed, softcapped, deterministic; head
dims 64, 96, 128 and MLA's 192 / 128) and the merge kernel. Prints one JSON line: each kernel's name and error (None when it
compiled), the `.target` of the PTX kept, and the global reductions of the accumulating backwards.
Upstream's persistent schedulers ask the driver for the SM count while tracing; here a stand-in
answers with FLASH_ATTENTION_NUM_SMS (compile check only).
"""

from __future__ import annotations

import json
import os
import re
import sys
import traceback
from pathlib import Path

import cutlass.utils
import torch
from cutlass import BFloat16

SMS = int(os.environ.get("FLASH_ATTENTION_NUM_SMS", "132"))
# kernels (their classes, as the PTX file names spell them) that store rows as vectors: the
# forward's merging epilogue, the dK/dV finish and the stand-alone merge
VECTOR_STORES = ("PartialsForwardSm90", "FinishDkv", "MergePartials")
# kernels whose epilogue adds dK/dV into the caller's rows by global reductions
ACCUMULATING = ("AccumulatingBackwardSm90", "AccumulatingBackwardSm100")


class DriverlessHardwareInfo:
    """The SM count the target GPU would report, for tracing without a driver."""

    def __init__(self, *args, **kwargs):
        pass

    def get_device_multiprocessor_count(self) -> int:
        return SMS

    def get_max_active_clusters(self, cluster_size: int = 1) -> int:
        return SMS // cluster_size


def hopper_kernels() -> dict:
    from flash_attn.cute.interface import _tile_size_fwd_sm90

    from fa4_cp.kernels.fa4 import backward_pass_sm90, backward_sm90, dkv_finish, dq_readback, forward_pass_sm90, merge_kernel
    from fa4_cp.kernels.fa4.masks import Fa4Window

    causal, window = Fa4Window(True, False, None, None), Fa4Window(False, True, 200, 0)

    def forward_kernel(
        window_: Fa4Window, varlen: bool, accumulate: bool, qhead_per_kvhead: int, softcap: float | None = None, dims: tuple[int, int] = (128, 128),
        pack_gqa: bool = False,
    ):
        config = _tile_size_fwd_sm90(*dims, window_.causal, window_.local)
        return lambda: forward_pass_sm90._compile(
            BFloat16, dims[0], qhead_per_kvhead, window_, varlen, config, accumulate, softcap, dims[1], False, pack_gqa,
        )

    tiles = backward_sm90.BackwardTiles.for_head_dim(128)
    return {
        "forward causal merging": forward_kernel(causal, False, True, 4),
        "forward causal first write": forward_kernel(causal, False, False, 1),
        "forward sole block, upstream's epilogue writing 16-bit out, window softcap gqa": lambda: forward_pass_sm90._compile(
            BFloat16, 128, 4, window, False, _tile_size_fwd_sm90(128, 128, False, True), False, 30.0, 128, True,
        ),
        "forward varlen causal merging": forward_kernel(causal, True, True, 4),
        "forward varlen causal, upstream's epilogue writing 16-bit out (the kept documents' block)": lambda: forward_pass_sm90._compile(
            BFloat16, 128, 4, causal, True, _tile_size_fwd_sm90(128, 128, True, False), False, None, 128, True,
        ),
        "forward varlen window, upstream's epilogue writing 16-bit out, q heads packed": lambda: forward_pass_sm90._compile(
            BFloat16, 128, 8, window, True, _tile_size_fwd_sm90(128, 128, False, True), False, None, 128, True, True,
        ),
        "forward varlen causal merging, q heads packed (8 per KV head)": forward_kernel(causal, True, True, 8, pack_gqa=True),
        "forward causal first write, q heads packed (4 per KV head)": forward_kernel(causal, False, False, 4, pack_gqa=True),
        "forward varlen window softcap merging, q heads packed, head_dim 256": forward_kernel(window, True, True, 2, 30.0, (256, 256), True),
        "forward sliding window merging": forward_kernel(window, False, True, 1),
        "forward varlen window softcap merging": forward_kernel(window, True, True, 2, 30.0),
        "forward causal merging head_dim 192 / v 128 (MLA)": forward_kernel(causal, False, True, 1, dims=(192, 128)),
        "forward varlen causal merging head_dim 256": forward_kernel(causal, True, True, 2, dims=(256, 256)),
        "backward causal gqa": lambda: backward_sm90._compile(tiles, BFloat16, 4, causal, False, None),
        "backward causal": lambda: backward_sm90._compile(tiles, BFloat16, 1, causal, False, None),
        "backward causal first write": lambda: backward_sm90._compile(tiles, BFloat16, 1, causal, False, None, write_first=True),
        "backward sole block, upstream's epilogue writing 16-bit dK/dV, causal": lambda: backward_sm90._compile(
            tiles, BFloat16, 1, causal, False, None, write_rounded=True,
        ),
        "backward sole block, 16-bit dK/dV, window softcap deterministic head_dim 256": lambda: backward_sm90._compile(
            backward_sm90.BackwardTiles.for_head_dim(256), BFloat16, 1, window, False, 30.0, deterministic=True, write_rounded=True,
        ),
        "backward varlen full gqa": lambda: backward_sm90._compile(tiles, BFloat16, 4, Fa4Window(False, False, None, None), True, None),
        "backward varlen window softcap gqa": lambda: backward_sm90._compile(tiles, BFloat16, 2, window, True, 30.0),
        "backward deterministic causal gqa first write": lambda: backward_sm90._compile(
            tiles, BFloat16, 4, causal, False, None, write_first=True, deterministic=True,
        ),
        "backward deterministic varlen window": lambda: backward_sm90._compile(tiles, BFloat16, 1, window, True, None, deterministic=True),
        "backward varlen causal gqa, entries over shared KV rows (the grid by their total)": lambda: backward_sm90._compile(
            tiles, BFloat16, 4, causal, True, None, shared_kv=True,
        ),
        **{
            f"backward causal gqa head_dim {dim}": (lambda dim=dim: backward_sm90._compile(backward_sm90.BackwardTiles.for_head_dim(dim), BFloat16, 4, causal, False, None))
            for dim in (192, 256)
        },
        "backward causal gqa MLA 192 / 128": lambda: backward_sm90._compile(
            backward_sm90.BackwardTiles.for_head_dim(192, 128), BFloat16, 2, causal, False, None,
        ),
        "backward varlen causal MLA 192 / 128": lambda: backward_sm90._compile(
            backward_sm90.BackwardTiles.for_head_dim(192, 128), BFloat16, 1, causal, True, None,
        ),
        **{
            f"backward swapped dK/dV tiles, {name}": (
                lambda dims=dims, ratio=ratio, varlen=varlen, deterministic=deterministic: backward_sm90._compile(
                    backward_sm90.BackwardTiles.for_head_dim(*dims), BFloat16, ratio, causal, varlen, None,
                    write_first=deterministic, deterministic=deterministic,
                )
            )
            for name, dims, ratio, varlen, deterministic in (
                ("varlen causal 256", (256, 256), 1, True, False),
                ("deterministic causal gqa first write 256", (256, 256), 2, False, True),
                ("varlen causal gqa MLA 192 / 128", (192, 128), 2, True, False),
            )
        },
        "merge": lambda: merge_kernel._compile(BFloat16, 128),
        "varlen dq read-back, three sides": lambda: dq_readback._compile(BFloat16, backward_pass_sm90._dq_geometry(tiles), 3),
        **{
            f"varlen dq read-back, head_dim {dims[0]}": (
                lambda dims=dims: dq_readback._compile(BFloat16, backward_pass_sm90._dq_geometry(backward_sm90.BackwardTiles.for_head_dim(*dims)), 3)
            )
            for dims in ((192, 128), (256, 256))
        },
        "dK/dV finish, local and two chains": lambda: dkv_finish._compile(BFloat16, True, 2, 0),
        "dK/dV finish, one chain": lambda: dkv_finish._compile(BFloat16, False, 1, 0),
        "dK/dV finish, local and four indexed chains (two streams of some rows)": lambda: dkv_finish._compile(BFloat16, True, 0, 4),
        "dK/dV finish, one indexed chain, no local sums": lambda: dkv_finish._compile(BFloat16, False, 0, 1),
    }


def blackwell_kernels() -> dict:
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fa4_cp.kernels.fa4 import backward_sm100, merge_kernel
    from fa4_cp.kernels.fa4.masks import Fa4Window

    causal, full, window = Fa4Window(True, False, None, None), Fa4Window(False, False, None, None), Fa4Window(False, True, 200, 0)

    def upstream(causal: bool, backward: bool, dims: tuple[int, int] = (128, 128)):
        def compile_() -> None:
            from flash_attn.cute.interface import _flash_attn_bwd, _flash_attn_fwd

            with FakeTensorMode():
                q = torch.empty(1, 512, 8, dims[0], dtype=torch.bfloat16, device="cuda")
                k = torch.empty(1, 512, 2, dims[0], dtype=torch.bfloat16, device="cuda")
                v = torch.empty(1, 512, 2, dims[1], dtype=torch.bfloat16, device="cuda")
                out, lse, *_ = _flash_attn_fwd(q, k, v, causal=causal, return_lse=True)
                if backward:
                    grads = (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v))
                    _flash_attn_bwd(q, k, v, out, out, lse, causal=causal, dq=grads[0], dk=grads[1], dv=grads[2])

        return compile_

    return {
        "upstream sm100 forward causal": upstream(True, False),
        "upstream sm100 forward full": upstream(False, False),
        "upstream sm100 backward causal": upstream(True, True),
        "upstream sm100 forward and backward causal, MLA 192 / 128": upstream(True, True, (192, 128)),
        "upstream sm100 forward and backward causal, head_dim 256": upstream(True, True, (256, 256)),
        "merge": lambda: merge_kernel._compile(BFloat16, 128),
        **{
            f"accumulating backward {name}": (lambda case=case: backward_sm100._compile(BFloat16, *case))
            for name, case in {  # head_dim 128 and MLA's 192 / 128 on CTA pairs, 64 and 96 on one CTA
                "causal gqa": (128, 128, 4, causal, False, None),
                "causal": (128, 128, 1, causal, False, None),
                "varlen full gqa": (128, 128, 4, full, True, None),
                "varlen window softcap": (128, 128, 1, window, True, 30.0),
                "varlen causal gqa MLA 192 / 128": (192, 128, 2, causal, True, None),
                "causal gqa head_dim 64": (64, 64, 8, causal, False, None),
                "varlen causal head_dim 96": (96, 96, 2, causal, True, None),
                "deterministic causal gqa": (128, 128, 4, causal, False, None, True),
                "deterministic varlen window head_dim 64": (64, 64, 1, window, True, None, True),
            }.items()
        },
    }


def main() -> None:
    arch = sys.argv[1]
    shard, shards = (int(n) for n in sys.argv[2:4]) if len(sys.argv) > 3 else (0, 1)  # every shards-th kernel from shard
    if os.environ.get("CUTE_DSL_ARCH") != arch:
        sys.exit(f"set CUTE_DSL_ARCH={arch} before the DSL is imported")
    cutlass.utils.HardwareInfo = DriverlessHardwareInfo
    import flash_attn.cute.tile_scheduler as tile_scheduler

    tile_scheduler.HardwareInfo = DriverlessHardwareInfo
    kernels = hopper_kernels() if arch == "sm_90a" else blackwell_kernels()
    errors = {}
    for name, compile_ in list(kernels.items())[shard::shards]:
        try:
            compile_()
            errors[name] = None
        except Exception as error:  # noqa: BLE001 - reported per kernel
            errors[name] = f"{type(error).__name__}: {error}\n{traceback.format_exc(limit=-3)}"[:3000]
    kept = list(Path.cwd().glob("*.ptx"))  # kernels of one class share a file name: fewer files than kernels
    targets = sorted({line.split()[1] for ptx in kept for line in ptx.read_text().splitlines() if line.startswith(".target")})
    stores = {  # the global stores of the kernels whose fp32 rows move as vectors
        kernel: sorted({op for ptx in kept if kernel in ptx.name for op in re.findall(r"\bst\.global[.\w]*", ptx.read_text())})
        for kernel in VECTOR_STORES
    }
    reductions = {  # the global reductions of the accumulating backwards' epilogues
        kernel: sorted({op for ptx in kept if kernel in ptx.name for op in re.findall(r"\bred\.[.\w]*", ptx.read_text())})
        for kernel in ACCUMULATING
    }
    # the forward's merging epilogue asks L2 for the prior out it will read
    prefetches = sum(ptx.read_text().count("prefetch.global.L2") for ptx in kept if "PartialsForwardSm90" in ptx.name)
    print(json.dumps({"arch": arch, "errors": errors, "ptx_targets": targets, "ptx_files": len(kept), "stores": stores, "prefetches": prefetches, "reductions": reductions}))


if __name__ == "__main__":
    main()
