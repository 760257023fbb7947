#!/usr/bin/env bash
# The checks that need a GPU, as one prepared run of under 8 minutes on one accelerator:
# the engine's decoding, batching and fault tests (models load on `device: auto`, so on CUDA),
# then `fusion-llm bench --device cuda`. Results land in $OUT (or ./gpu-check).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check}"
mkdir -p "$out"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" | tee "$out/device.txt"
timeout 300 python -m pytest -q -p no:cacheprovider \
    tests/integration/test_engine.py \
    tests/integration/test_continuous_batching.py \
    tests/integration/test_fault_isolation.py \
    tests/integration/test_reliability.py 2>&1 | tee "$out/tests.txt"
timeout 240 fusion-llm bench --device cuda --shapes realistic --batch-sizes 1,8,32 --repeats 3 \
    --out "$out/bench" 2>&1 | tee "$out/bench.txt"
