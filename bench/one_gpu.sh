#!/usr/bin/env bash
# The one-GPU checks of a change in one go, for a short lease: tests/gpu (parallel workers: the
# kernels' JIT compiles are CPU-bound), then the benchmarks, logs and JSON under OUT_DIR.
#
#   bench/one_gpu.sh OUT_DIR [tests|bench|all] [BASELINE_TREE]
#
# bench: bench/step_overhead.py on the GPU (and on BASELINE_TREE, an older checkout, if given)
# and bench/kernels.py --quick. Set FA4_CP_GIT_COMMIT where the tree has no .git.
set -uo pipefail
out=$1
what=${2:-all}
baseline=${3:-}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
mkdir -p "$out"
if [[ $what == tests || $what == all ]]; then
  python3 -m pytest tests/gpu -q -rs -p no:warnings -n "${GPU_TEST_WORKERS:-8}" 2>&1 | tee "$out/tests_gpu.log"
fi
if [[ $what == bench || $what == all ]]; then
  python3 bench/step_overhead.py --device cuda --out "$out/step_overhead_cuda.json"
  if [[ -n $baseline ]]; then
    python3 bench/step_overhead.py --device cuda --tree "$baseline" --out "$out/step_overhead_cuda_baseline.json"
  fi
  python3 bench/kernels.py --quick --out "$out" 2>&1 | tee "$out/kernels_quick.log"
fi
