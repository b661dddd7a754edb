#!/usr/bin/env bash
# GPU report on a fresh offline CUDA machine (no package index): compile the kernels from sdists
# carried in SDISTS (default .whl/, as `pip download` leaves them), meanwhile run the CUDA tests
# that need no kernels, then benchmarks/gpu.py with the time that is left.
#   OUT=dir TOTAL=560 bash benchmarks/gpu_offline.sh
# WAIT_FOR=mamba stops the build once mamba-ssm's scan kernel imports (causal-conv1d, compiled
# second, then runs as PyTorch's conv1d), leaving more of TOTAL to the benchmark; GPU_ARGS go to gpu.py.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-reports}; TOTAL=${TOTAL:-560}; SDISTS=${SDISTS:-.whl}
mkdir -p "$OUT"
start=$(date +%s)
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-14}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
setsid python3 scripts/setup_cuda.py --sdist-dir "$SDISTS" --force-build --no-runtime-deps --archs "${ARCHS:-9.0}" \
  > "$OUT/build.log" 2>&1 &
build=$!
mamba_ready() { python3 -c "import torch, selective_scan_cuda" 2>/dev/null; }
stopped=0
# Kernel-free checks while the kernels compile: CUDA-side correctness only, no timings.
timeout 200 python3 -m pytest -q -p no:cacheprovider --noconftest tests/test_cuda.py 2>&1 | tail -15 | tee "$OUT/pre_build_tests.txt"
limit=$((TOTAL - 150))
while kill -0 $build 2>/dev/null && [ $(( $(date +%s) - start )) -lt $limit ]; do
  if [ "${WAIT_FOR:-all}" = mamba ] && mamba_ready; then
    kill -- -$build 2>/dev/null; wait $build 2>/dev/null; stopped=1
    echo "mamba-ssm built after $(( $(date +%s) - start )) s; the rest of the build stopped (WAIT_FOR=mamba)" | tee -a "$OUT/gpu.txt"
    break
  fi
  sleep 5
done
if [ $stopped = 1 ]; then :
elif kill -0 $build 2>/dev/null; then echo "build still running at $(( $(date +%s) - start )) s: benchmarking without it" | tee -a "$OUT/gpu.txt"
else wait $build; echo "build exit $? after $(( $(date +%s) - start )) s" | tee -a "$OUT/gpu.txt"; fi
tail -5 "$OUT/build.log"
left=$(( TOTAL - ($(date +%s) - start) - 25 ))
python3 benchmarks/gpu.py --out "$OUT" --time-budget $left ${GPU_ARGS:-} 2>&1 | tail -80
echo "total $(( $(date +%s) - start )) s"
