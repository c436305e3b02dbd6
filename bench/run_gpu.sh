#!/usr/bin/env bash
# On a machine with a CUDA GPU and its own torch + triton (the lent device): install recscore,
# run the Triton tests on the GPU, then time the GPU comparison groups by the protocol.
#   bash bench/run_gpu.sh [step ...]     steps: tests, a comparison group (gpu_embedding, gpu_topk,
#                                        gpu_qmatmul), gpu_config_sweep, or install (install only);
#                                        default: tests and the three groups
# Logs, results/*.json and RESULTS.md go to $OUT (default /tmp/recscore-gpu).
set -uo pipefail
OUT=${OUT:-/tmp/recscore-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
steps=("$@"); [ ${#steps[@]} -eq 0 ] && steps=(tests gpu_embedding gpu_topk gpu_qmatmul)

{ nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.total --format=csv
  python3 -c "import torch, triton, numba, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'numba', numba.__version__, 'numpy', numpy.__version__)"
  lscpu | grep -E "Model name|Flags" | cut -c1-200; } 2>&1 | tee "$OUT/env.txt"
if [ -d .whl ]; then   # packages the device image lacks (gguf), carried as wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
start=$SECONDS
python3 -m pip install -q --no-deps --no-build-isolation --no-index . 2>&1 | tail -n 5
echo "install: $((SECONDS - start)) s" | tee -a "$OUT/env.txt"

for step in "${steps[@]}"; do
  if [ "$step" = tests ]; then
    python3 -m pytest tests -q -n 4 -p no:cacheprovider -k "(triton or gpu or cuda or bad_input) and not sm90" 2>&1 | tee "$OUT/tests_triton.log" | tail -n 25
  elif [ -f "bench/compare_$step.py" ]; then
    python3 -m bench.compare "$step" 2>&1 | tee -a "$OUT/bench.log"
    cp "bench/results/$step.json" "$OUT/"
  elif [ "$step" != install ]; then
    python3 -m "bench.$step" 2>&1 | tee "$OUT/$step.txt"
  fi
done
cp bench/RESULTS.md "$OUT/"
