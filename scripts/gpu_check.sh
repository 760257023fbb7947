#!/usr/bin/env bash
# The checks that need a GPU, as one prepared run of under 8 minutes on one accelerator:
# the engine's decoding, batching and fault tests (models load on `device: auto`, so on CUDA),
# then `fusion-llm bench --device cuda`, and where vLLM is installed (`pip install -e ".[vllm]"`)
# the vLLM tests and `fusion-llm bench --backend vllm --device cuda`. Results land in $OUT (or ./gpu-check).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-gpu-check}"
mkdir -p "$out"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" | tee "$out/device.txt"
timeout 240 python -m pytest -q -p no:cacheprovider \
    tests/integration/test_engine.py \
    tests/integration/test_continuous_batching.py \
    tests/integration/test_fault_isolation.py \
    tests/integration/test_reliability.py 2>&1 | tee "$out/tests.txt"
timeout 200 fusion-llm bench --device cuda --shapes realistic --batch-sizes 1,8,32 --repeats 3 \
    --out "$out/bench" 2>&1 | tee "$out/bench.txt"
if python -c "import vllm" 2>/dev/null; then
    timeout 150 python -m pytest -q -p no:cacheprovider tests/integration/test_vllm.py 2>&1 \
        | tee "$out/vllm-tests.txt"
    timeout 120 fusion-llm bench --backend vllm --device cuda --shapes realistic --repeats 3 \
        --out "$out/bench-vllm" 2>&1 | tee "$out/bench-vllm.txt"
fi
