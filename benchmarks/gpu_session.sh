#!/usr/bin/env bash
# Every GPU check of Ember in one command, sized for one short GPU session: the step limits below add up to
# 545 s (plus the wheel install), so the whole script ends inside a 10-minute call on one H100/H200.
#
# On the development machine, first (downloads the wheels the device image lacks, prepares a small data run):
#     make gpu-prep
# Then on the GPU machine, from the repository root:
#     bash benchmarks/gpu_session.sh            # results under $RESULTS (default: benchmarks/results/gpu_session)
# Through a tool that returns only a few files, pack them: RESULTS=/tmp/gpu bash benchmarks/gpu_session.sh;
# tar czf <folder returned>/gpu_session.tar.gz -C /tmp gpu   (carry .whl and outputs/gpu_data to the machine).
#
# Steps (each under its own time limit, so one slow step cannot eat the others' time):
#   tests       pytest -m gpu: bf16 sdpa vs eager, fused flash/cuDNN sdpa kernels, activation-checkpointing
#               memory, QLoRA 4-bit on CUDA, flash-attention packed documents (when flash-attn is installed)
#   tput_125m   benchmarks/train_throughput.py, 125m at seq 1024: Ember vs stock Llama, torch.compile off/on,
#               and stock Llama with Liger kernels
#   tput_1b     the same for 1b (TinyLlama shape) at seq 2048
#   stability   recipes/pretrain.py, 125m, bf16, 300 steps on real shards: loss curve, skipped steps, run report
# A CUDA image with transformers 5.17 (one below Ember's floor) runs all of this: what 5.18 fixed is the resume of a
# multi-process CPU run, which this script does not do.
# SMOKE=1 shrinks every step to seconds on a CPU (what tests/test_benchmarks.py runs, with WHEELS= to install nothing).
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${RESULTS:-benchmarks/results/gpu_session}
DATA=${DATA:-outputs/gpu_data}
SMOKE=${SMOKE:-0}
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS-.whl}  # empty: install nothing
mkdir -p "$RESULTS"
RESULTS=$(realpath "$RESULTS") DATA=$(realpath -m "$DATA")
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [ -n "$WHEELS" ] && compgen -G "$WHEELS/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ember_site \
        "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=/tmp/ember_site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

{
    date -u
    nvidia-smi 2>&1 || echo "no nvidia-smi"
    "$PYTHON" - <<'PY'
import importlib.metadata as md
import platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
for name in ("transformers", "accelerate", "peft", "datasets", "bitsandbytes", "liger-kernel", "flash-attn", "triton"):
    try:
        print(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name} not installed")
PY
} > "$RESULTS/machine.txt" 2>&1
cat "$RESULTS/machine.txt"

failed=()
step() {  # step NAME SECONDS COMMAND...: output to $RESULTS/NAME.log and the terminal
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout --signal=INT --kill-after=15 "$limit" "$@" 2>&1 | tee "$RESULTS/$name.log"
    local code=${PIPESTATUS[0]}
    echo "=== $name: exit $code after $((SECONDS - start))s"
    [ "$code" -eq 0 ] || failed+=("$name")
}

if [ "$SMOKE" = 1 ]; then
    tput_125m=(--preset nano --seq_len 64 --batch_sizes 2 --steps 2 --warmup_steps 1 --matmul_size 0)
    tput_1b=(--preset nano --seq_len 64 --batch_sizes 1,2 --steps 2 --warmup_steps 1 --matmul_size 0)
    stability=(--max_steps=4 --per_device_train_batch_size=2 --bf16=false --tf32=false --use_cpu=true
               --dataloader_num_workers=0 "--model_overrides={hidden_size: 64, intermediate_size: 128,
               num_hidden_layers: 2, num_attention_heads: 4, num_key_value_heads: 2}")
    compile_values=off liger_models=()
else
    tput_125m=(--preset 125m --seq_len 1024 --batch_sizes 32 --steps 15)
    tput_1b=(--preset 1b --seq_len 2048 --batch_sizes 8 --steps 10)
    stability=(--max_steps=300 --per_device_train_batch_size=32)
    compile_values=off,on liger_models=(llama)
fi

step tests 90 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
step tput_125m 120 "$PYTHON" benchmarks/train_throughput.py "${tput_125m[@]}" --compile "$compile_values" \
    --output "$RESULTS/tput_125m.json"
if [ ${#liger_models[@]} -gt 0 ]; then
    step tput_125m_liger 45 "$PYTHON" benchmarks/train_throughput.py "${tput_125m[@]}" --models llama --liger on \
        --matmul_size 0 --output "$RESULTS/tput_125m_liger.json"
fi
step tput_1b 200 "$PYTHON" benchmarks/train_throughput.py "${tput_1b[@]}" --compile "$compile_values" \
    --output "$RESULTS/tput_1b.json"
step stability 90 "$PYTHON" recipes/pretrain.py --config recipes/configs/pretrain_125m_1gpu.yaml \
    --data_dir="$DATA" --output_dir="$RESULTS/stability" --max_tokens=0 --warmup_steps=30 \
    --logging_steps=10 --eval_strategy=no --save_strategy=no --report_to=none "${stability[@]}"
# Keep the run's log history and report, not its 125m weights.
if [ -d "$RESULTS/stability" ]; then
    cp "$RESULTS/stability/trainer_state.json" "$RESULTS/stability_trainer_state.json" 2>/dev/null
    cp "$RESULTS/stability/run_report/report.md" "$RESULTS/stability_report.md" 2>/dev/null
    cp "$RESULTS/stability/run_report/loss.png" "$RESULTS/stability_loss.png" 2>/dev/null
    rm -rf "$RESULTS/stability"
fi

echo "=== done; failed steps: ${failed[*]:-none}"
[ ${#failed[@]} -eq 0 ]
