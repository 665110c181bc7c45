"""bench/train_profile.py sorts kernels by name into the groups its JSON reports."""

import importlib.util
from pathlib import Path

import pytest

# Loaded by path: putting bench/ on sys.path would let its kernels.py shadow the PyPI `kernels`
# package that transformers imports.
_spec = importlib.util.spec_from_file_location("train_profile", Path(__file__).resolve().parents[1] / "bench" / "train_profile.py")
train_profile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_profile)
kernel_group = train_profile.kernel_group


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
