#!/usr/bin/env bash
# One lease's run on one GPU, most wanted part first, each under its own time limit (seconds) so
# that the logs of the parts that finished come back:
#
#   bench/gpu_session.sh OUT_DIR [PART[:SECONDS] ...]      (default: features rest other)
#
#   features       tests/gpu/test_fa4_ring.py: the 2-D mesh, sinks, softcap, window and W = 72 cases
#   sinks          tests/gpu/test_fa4_ring.py: the sinks cases
#   rest           the other cases of tests/gpu/test_fa4_ring.py
#   other          the other tests/gpu files
#   ring_all       the whole of tests/gpu/test_fa4_ring.py (with `other`, the whole of tests/gpu: about
#                  400 s and 310 s on an H100 with 14 workers in session 16; in session 22 `other` reached
#                  62% in 290 s, `features` 98% in 230 s and `rest` took 205 s: give `other` a call of its own)
#   compile_block  bench/compile_block.py (JSON)
#   mesh_replay    bench/mesh_replay.py (JSON)
#   feature_errors bench/feature_errors.py with FA4, bf16, W = 2, 8, 72 (JSON)
#   step_overhead  bench/step_overhead.py on the GPU, and on BASELINE_TREE (an older checkout) if set (JSON)
#   kernels        bench/kernels.py --quick (JSON), GPU time (each call queued behind a sleep kernel); with
#                  BASELINE_TREE its 8K rows on that tree's fa4_cp too (in OUT_DIR/kernels_baseline; OUT_DIR absolute)
#   kernels_breakdown  bench/kernels.py --breakdown at 8K, d 128 and 256: each contender's kernels, GPU us by name (JSON)
#   kernels_host_paced  bench/kernels.py --quick --seqs 8192 --host-paced: the 8K rows timed from an idle GPU, as before (JSON)
#   backend        tests/gpu/test_fa4_backend.py, bf16 (the backward kernel per mask, GQA and not)
#   deterministic  tests/gpu/test_fa4_deterministic.py
#   chunks         tests/gpu/test_fa4_ring.py: the 2-D mesh cases, head chunks (ulysses_chunks) and not, ring
#                  ranks whose rows pad to a multiple of u, and the backward reading dout in the receive region
#   shared_kv      tests/gpu/test_fa4_backend.py: varlen entries over shared KV rows in one launch
#   ring_core      tests/gpu/test_fa4_ring.py at W = 2 and 8 (no W = 72, no mesh)
#   pieces         tests/gpu/test_copy_engine_pieces.py: the driver's 2-D copy, and a mesh sending head groups where they lie
#   gpu_work       bench/gpu_work.py (JSON), its cases GPU_WORK_CASES (default all but the head-chunked ones; the 8 x 8
#                  ones need an H200), and
#                  on BASELINE_TREE if set (BASELINE_CASES)
#   ring_overhead  bench/ring_overhead.py (JSON), and on BASELINE_TREE's fa4_cp if set
#   gpu_work_deterministic  bench/gpu_work.py --deterministic (JSON), dense_w8 and pretrain_w8
#   error_growth   bench/ring_error_growth.py with FA4: the same tokens at W = 1, 2, 8, 72 (JSON)
#   host_profile   bench/host_profile.py: the ring's host path at W = 1, its own functions timed (JSON), cProfile (text), a CPU trace
#   new_dims       tests/gpu/test_fa4_backend.py at head dims 192, 256 and MLA's 192/128: backward and forward
#   ring_new_dims  tests/gpu/test_fa4_ring.py at head dims 256 and 192/128: W = 2, 8, 72 and a 2 x 4 mesh, bf16 and fp16
#   kernels_new_dims  bench/kernels.py --quick at head dims NEW_DIMS (default 256 and 192/128; JSON, in OUT_DIR/new_dims), and on
#                  BASELINE_TREE's fa4_cp if set (this bench copied into it; OUT_DIR absolute)
#   placement_replay  bench/placement_replay.py: every placement the balanced layout chooses from, replayed (JSON)
#   magi_replay    bench/magi_replay.py: MagiAttention's metric on both mixes, the split plan_mesh picks, balance (JSON);
#                  with BASELINE_TREE, on that tree's fa4_cp too (OUT_DIR absolute); MAGI_ARGS: more of its arguments
#                  (--mixes, --also-ulysses, --head-chunks)
#   staged_forward the forward's options against fp64, each way: q heads packed or not (PACK_GQA; alone and
#                  through the ring) and the kept documents written finished or merged (ROUNDED_VARLEN; the ring)
#   magi_replay_unstaged  bench/magi_replay.py --no-pack-gqa --no-rounded-varlen: the forward as before 2026-12-06 (JSON)
#   gpu_work_unstaged     bench/gpu_work.py --no-pack-gqa --no-rounded-varlen (JSON), the cases of UNSTAGED_CASES
#   staged_kernels the forward merging into an unset out, the stand-alone merge, the dq read-back, the dK/dV finish,
#                  (with indexed chains), the sole block's 16-bit out and dK/dV, and no host sync in a steady-state call
#
# Set FA4_CP_GIT_COMMIT where the tree has no .git (a device machine's copy of it).
set -uo pipefail
out=$1
shift
parts=("$@")
[[ $# -eq 0 ]] && parts=(features rest other)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
workers=${GPU_TEST_WORKERS:-14}
features="ulysses or sinks or softcap or window or 72"
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
for package in torch flash-attn-4 nvidia-cutlass-dsl quack-kernels; do
  python3 -c "import sys, importlib.metadata as m; print(sys.argv[1], m.version(sys.argv[1]))" "$package" 2>&1 | tail -1
done | tee -a "$out/device.txt"
run() {  # run LOG SECONDS command...: its output in OUT_DIR/LOG, its exit and time in device.txt
  local log=$1 seconds=$2; shift 2
  timeout "$seconds" "$@" > "$out/$log" 2>&1
  echo "exit $? after ${SECONDS}s: $log" | tee -a "$out/device.txt"
  tail -30 "$out/$log"
}
replay_minutes() {  # a replay part of SECONDS starts no configuration in its last 50 s
  awk "BEGIN { print ($1 - 50) / 60 }"
}
on_baseline() {  # on_baseline LOG SECONDS COMMAND: COMMAND (a bench of this checkout, OUT_DIR absolute) run in
  # BASELINE_TREE, if set, with this bench copied into it, so that it imports that tree's fa4_cp
  [[ -n ${BASELINE_TREE:-} ]] || return 0
  local log=$1 seconds=$2; shift 2
  mkdir -p "$BASELINE_TREE/bench" && cp -r bench/. "$BASELINE_TREE/bench/"
  run "$log" "$seconds" bash -c "cd '$BASELINE_TREE' && $*"
}
kernels_on_baseline() {  # kernels_on_baseline LOG SECONDS DIR HEAD_DIM...: bench/kernels.py's 8K rows on BASELINE_TREE's
  # fa4_cp, if set, its JSON in OUT_DIR/DIR
  local log=$1 seconds=$2 dir=$3; shift 3
  on_baseline "$log" "$seconds" mkdir -p "'$out/$dir'" "&&" python3 bench/kernels.py --quick --seqs 8192 --no-first-call --out "'$out/$dir'" \
    --head-dims "$*"
}
tests() {  # tests LOG SECONDS pytest-args...
  local log=$1 seconds=$2; shift 2
  run "$log" "$seconds" python3 -m pytest -v -rs -p no:warnings -n "$workers" --durations=10 "$@"
}
for part in "${parts[@]}"; do
  name=${part%%:*}
  seconds=${part#*:}
  [[ $seconds == "$part" ]] && seconds=200
  case $name in
    features) tests tests_gpu_features.log "$seconds" tests/gpu/test_fa4_ring.py -k "$features" ;;
    sinks) tests tests_gpu_sinks.log "$seconds" tests/gpu/test_fa4_ring.py -k sinks ;;
    rest) tests tests_gpu_ring_rest.log "$seconds" tests/gpu/test_fa4_ring.py -k "not ($features)" ;;
    other) tests tests_gpu_other.log "$seconds" tests/gpu --ignore=tests/gpu/test_fa4_ring.py ;;
    ring_all) tests tests_gpu_ring_all.log "$seconds" tests/gpu/test_fa4_ring.py ;;
    compile_block) run compile_block.log "$seconds" python3 bench/compile_block.py --out "$out/compile_block.json" ;;
    mesh_replay) run mesh_replay.log "$seconds" python3 bench/mesh_replay.py --world-sizes 8 16 32 72 --out "$out/mesh_replay.json" ;;
    feature_errors)
      run feature_errors_fa4.log "$seconds" python3 bench/feature_errors.py --device cuda --backend fa4 --dtypes bf16 \
        --world-sizes 2 8 72 --out "$out/feature_errors_fa4.json" ;;
    step_overhead)
      run step_overhead.log "$seconds" python3 bench/step_overhead.py --device cuda --out "$out/step_overhead_cuda.json"
      if [[ -n ${BASELINE_TREE:-} ]]; then
        run step_overhead_baseline.log "$seconds" python3 bench/step_overhead.py --device cuda --tree "$BASELINE_TREE" \
          --out "$out/step_overhead_cuda_baseline.json"
      fi ;;
    kernels)
      run kernels_quick.log "$seconds" python3 bench/kernels.py --quick --out "$out" --head-dims ${KERNEL_HEAD_DIMS:-64 128}
      kernels_on_baseline kernels_quick_baseline.log "$seconds" kernels_baseline ${KERNEL_HEAD_DIMS:-64 128} ;;
    kernels_breakdown)  # each contender's kernels at 8K, d 128 and 256, by name: where the merging step and the backward lose
      mkdir -p "$out/breakdown"
      run kernels_breakdown.log "$seconds" python3 bench/kernels.py --quick --seqs 8192 --no-first-call --breakdown --out "$out/breakdown" \
        --head-dims ${KERNEL_HEAD_DIMS:-128 256} ;;
    kernels_host_paced)
      run kernels_host_paced.log "$seconds" python3 bench/kernels.py --quick --seqs 8192 --no-first-call --host-paced --out "$out" \
        --head-dims ${KERNEL_HEAD_DIMS:-64 128} ;;
    backend) tests tests_gpu_backend.log "$seconds" tests/gpu/test_fa4_backend.py -k "not torch.float16" ;;
    deterministic) tests tests_gpu_deterministic.log "$seconds" -rA tests/gpu/test_fa4_deterministic.py -k "${DETERMINISTIC_CASES:-w}" ;;
    chunks) tests tests_gpu_chunks.log "$seconds" tests/gpu/test_fa4_ring.py -k "head_chunks or ulysses_by_ring or kept_documents_written or dout_where_it_lands" ;;
    shared_kv) tests tests_gpu_shared_kv.log "$seconds" tests/gpu/test_fa4_backend.py -k shared_kv ;;
    ring_core) tests tests_gpu_ring_core.log "$seconds" tests/gpu/test_fa4_ring.py -k "not (72 or ulysses or fp16)" ;;
    pieces) tests tests_gpu_pieces.log "$seconds" tests/gpu/test_copy_engine_pieces.py ;;
    gpu_work)
      run gpu_work.log "$seconds" python3 bench/gpu_work.py --out "$out/gpu_work.json" ${GPU_WORK_CASES:+--cases $GPU_WORK_CASES}
      if [[ -n ${BASELINE_TREE:-} ]]; then
        run gpu_work_baseline.log "$seconds" python3 bench/gpu_work.py --tree "$BASELINE_TREE" --out "$out/gpu_work_baseline.json" \
          --cases ${BASELINE_CASES:-dense_w8 pretrain_w8 finetune_w8}
      fi ;;
    ring_overhead)
      run ring_overhead.log "$seconds" python3 bench/ring_overhead.py --out "$out/ring_overhead.json"
      if [[ -n ${BASELINE_TREE:-} ]]; then  # the same machine's figure for another commit: runs differ by machine
        run ring_overhead_baseline.log "$seconds" python3 bench/ring_overhead.py --tree "$BASELINE_TREE" --out "$out/ring_overhead_baseline.json"
      fi ;;
    gpu_work_deterministic)
      run gpu_work_deterministic.log "$seconds" python3 bench/gpu_work.py --deterministic --out "$out/gpu_work_deterministic.json" \
        --cases ${DETERMINISTIC_BENCH_CASES:-dense_w8 pretrain_w8} ;;
    error_growth) run ring_error_growth.log "$seconds" python3 bench/ring_error_growth.py --backend fa4 --out "$out/ring_error_growth_fa4.json" ;;
    host_profile) run host_profile.log "$seconds" python3 bench/host_profile.py --out "$out/host_profile.json" ;;
    new_dims) tests tests_gpu_new_dims.log "$seconds" tests/gpu/test_fa4_backend.py -k "192 or 256 or mla" ;;
    ring_new_dims) tests tests_gpu_ring_new_dims.log "$seconds" tests/gpu/test_fa4_ring.py -k "new_head_dims or mla" ;;
    kernels_new_dims)  # a folder of its own: bench/kernels.py names its JSON by device and date, as the kernels part's
      mkdir -p "$out/new_dims"
      run kernels_new_dims.log "$seconds" python3 bench/kernels.py --quick --seqs 8192 --no-first-call --out "$out/new_dims" --head-dims ${NEW_DIMS:-256 192/128}
      kernels_on_baseline kernels_new_dims_baseline.log "$seconds" new_dims_baseline ${NEW_DIMS:-256 192/128} ;;
    placement_replay) run placement_replay.log "$seconds" python3 bench/placement_replay.py --out "$out/placement_replay.json" ;;
    magi_replay)
      run magi_replay.log "$seconds" python3 bench/magi_replay.py --max-minutes "$(replay_minutes "$seconds")" \
        --world-sizes ${MAGI_WORLD_SIZES:-8 16 32 64} ${MAGI_ARGS:-} --out "$out/magi_replay.json"
      on_baseline magi_replay_baseline.log "$seconds" python3 bench/magi_replay.py --max-minutes "$(replay_minutes "$seconds")" \
        --world-sizes ${MAGI_WORLD_SIZES:-8 16 32 64} ${MAGI_ARGS:-} --out "'$out/magi_replay_baseline.json'" ;;
    staged_forward) tests tests_gpu_staged_forward.log "$seconds" tests/gpu/test_fa4_forward_partials.py tests/gpu/test_fa4_ring.py \
        -k "packed_q_heads or kept_documents" ;;
    magi_replay_unstaged) run magi_replay_unstaged.log "$seconds" python3 bench/magi_replay.py --no-pack-gqa --no-rounded-varlen \
        --max-minutes "$(replay_minutes "$seconds")" --world-sizes ${MAGI_WORLD_SIZES:-8 16 32 64} \
        --out "$out/magi_replay_unstaged.json" ;;
    gpu_work_unstaged)
      run gpu_work_unstaged.log "$seconds" python3 bench/gpu_work.py --no-pack-gqa --no-rounded-varlen --out "$out/gpu_work_unstaged.json" \
        --cases ${UNSTAGED_CASES:-dense_w8 pretrain_w8 finetune_w8 finetune_w16} ;;
    staged_kernels)
      tests tests_gpu_staged_kernels.log "$seconds" tests/gpu/test_fa4_forward_partials.py tests/gpu/test_fa4_backend.py \
        tests/gpu/test_no_host_sync.py -k "merge or split or no_key or varlen_rows or read_back or finish or sole_block or waits" ;;
    *) echo "unknown part: $name" >&2; exit 2 ;;
  esac
done
