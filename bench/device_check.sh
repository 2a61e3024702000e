#!/usr/bin/env bash
# Every GPU check of the project in one run of a few minutes, for a lent GPU machine:
#   1. install the package there (builds the CUDA int4 extension with nvcc) and record the environment;
#   2. the CUDA-relevant tests (Triton kernels compiled for real, CUDA int4 GEMV/GEMM, graph decode, the model on
#      the Triton path);
#   3. GPU bench rows: Triton kernels vs torch (bench/bench_kernels.py), int4 GEMV vs fp16 (bench/bench_int4.py),
#      bf16 Llama-2-7B-shape decode vs its bandwidth roofline, full and half attention dropped
#      (bench/gpu_decode_roofline.py, synthetic weights).
# Results (logs, JSON) go to $OUT when set (the device tool brings that folder back), else bench/results/device/;
# commit what is worth keeping under bench/results/ with the machine and this command.
#
#   bench/device_check.sh             # on the GPU machine
#   bench/device_check.sh --dry-run   # anywhere: the same steps on the CPU with small shapes, to test the script
# Wheels placed in .whl/ are installed first: the GPU image lacks gguf (tests/quant/test_cpu_linear.py needs it), e.g.
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl gguf
set -uo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
PYTHON="${PYTHON:-python3}"
RESULTS="${OUT:-bench/results/device}"
mkdir -p "$RESULTS"
STATUS=0
step() { echo "== $(date +%H:%M:%S) $*"; }
run() {  # run a step, keep its log, remember a failure but go on with the other checks
    local name="$1"; shift
    step "$name: $*"
    if ! "$@" > "$RESULTS/$name.log" 2>&1; then
        echo "   FAILED (see $RESULTS/$name.log)"; tail -5 "$RESULTS/$name.log"; STATUS=1
    else
        tail -3 "$RESULTS/$name.log"
    fi
}

if [[ $DRY_RUN == 0 ]]; then
    if compgen -G ".whl/*.whl" > /dev/null; then
        run install-wheels "$PYTHON" -m pip install -q --no-index --no-deps --no-cache-dir .whl/*.whl
    fi
    run install "$PYTHON" -m pip install -q --no-build-isolation --no-deps -e .
    DEVICE=cuda
    SHAPE=llama-2-7b
    DTYPE=bfloat16
else
    DEVICE=cpu
    SHAPE=smollm2-135m
    DTYPE=float32
fi
{
    "$PYTHON" -c "import torch, triton, sys; print('python', sys.version.split()[0]); print('torch', torch.__version__,
'cuda', torch.version.cuda); print('triton', triton.__version__); print('device', torch.cuda.get_device_name(0)
if torch.cuda.is_available() else 'cpu')"
    "$PYTHON" -c "import llmdrop_rt.quant.linear as q; print('int4 backends', q.available_backends())"
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
} > "$RESULTS/environment.txt" 2>&1
cat "$RESULTS/environment.txt"

TESTS=(tests/kernels tests/model/test_model_triton_path.py tests/model/test_flash_backend.py
       tests/engine/test_generation.py tests/quant/test_quant.py tests/quant/test_cpu_linear.py)
[[ $DRY_RUN == 1 ]] && TESTS=(tests/kernels/test_kernels_rms_norm.py tests/engine/test_generation.py)
run tests "$PYTHON" -m pytest -q -x -p no:cacheprovider "${TESTS[@]}" --junitxml="$RESULTS/tests.xml"

if [[ $DRY_RUN == 0 ]]; then
    run bench-kernels "$PYTHON" bench/bench_kernels.py --out "$RESULTS/kernels.json"
    run bench-int4 "$PYTHON" bench/bench_int4.py --device cuda --out "$RESULTS/int4.json"
fi
run decode-roofline "$PYTHON" bench/gpu_decode_roofline.py --shape "$SHAPE" --dtype "$DTYPE" --device "$DEVICE" \
    --new-tokens 64 --out "$RESULTS/decode_roofline.json"
step "done (status $STATUS); results in $RESULTS"
exit $STATUS
