"""bench/train_profile.py sorts kernels by name into the groups its JSON reports."""

import pytest
from bench_modules import bench_module

kernel_group = bench_module("train_profile").kernel_group


@pytest.mark.parametrize(
    "name, group",
    [  # names as the profiler reported them on an H200
        ("kernel_cutlass_kernel_flash_attncuteflash_bwd_sm90FlashAttentionBackwardSm90_object_at__te", "attention"),
        ("kernel_cutlass_kernel_fa4_cpkernelsfa4forward_sm90PartialsForwardSm90_object_at__tensor000", "attention"),
        ("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_TNN", "matmul"),
        ("ncclDevKernel_ReduceScatter_Sum_f32_RING_LL", "communication"),
        ("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl<at::native::Binary", "other"),
    ],
)
def test_kernel_groups(name, group):
    assert kernel_group(name) == group
