#!/usr/bin/env bash
# The checks that need a GPU, as one prepared run of under 8 minutes on one accelerator:
# the engine's decoding, batching and fault tests (models load on `device: auto`, so on CUDA),
# then `fusion-llm bench --device cuda`, and where vLLM is installed (`pip install -e ".[vllm]"`)
# the vLLM tests and `fusion-llm bench --backend vllm --device cuda`: on CUDA these run vLLM's
# Model Runner V2 with fusion-llm's V2 processor (`launch.logits_processor`); the servers' logs
# must show that runner. Without vLLM that part cannot run: it is skipped, said so, rc 0.
# Results land in $OUT (or ./gpu-check).
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
    timeout 200 python -m pytest -q -p no:cacheprovider --basetemp "$out/vllm-tmp" \
        tests/integration/test_vllm.py tests/integration/test_vllm_prompt_logprobs.py \
        tests/integration/test_mrv2_processor.py 2>&1 | tee "$out/vllm-tests.txt"
    # the servers ran Model Runner V2 (vLLM logs it when its worker starts)
    grep -l "Using V2 Model Runner" "$out"/vllm-tmp/serve*/serve.log | tee "$out/vllm-runner.txt"
    timeout 120 fusion-llm bench --backend vllm --device cuda --shapes realistic --repeats 3 \
        --out "$out/bench-vllm" 2>&1 | tee "$out/bench-vllm.txt"
else
    echo "vLLM is not installed here: the Model Runner V2 path (fusion_llm/backends/vllm/processor_v2.py)" \
        "cannot be checked on this machine; skipped (pip install -e '.[vllm]' to run it)" \
        | tee "$out/vllm-skipped.txt"
fi
