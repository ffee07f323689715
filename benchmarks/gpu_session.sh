#!/usr/bin/env bash
# Every GPU figure of docs/benchmarks.md, in parts that each fit one 10-minute device call:
#   bash benchmarks/gpu_session.sh kernels    # GPU tests, kernel sweep/table/>2^31/accuracy
#   bash benchmarks/gpu_session.sh models     # projection, SASS mix, training steps, step profile, FSDP2
#   bash benchmarks/gpu_session.sh launch     # GPU tests, CPU cost per call, the three training steps
#   bash benchmarks/gpu_session.sh compiled   # training steps and saved bytes under torch.compile
#   bash benchmarks/gpu_session.sh dropouts   # GPU tests, GPT-2 / BERT steps with and without PackedDropout
#   bash benchmarks/gpu_session.sh reliability  # GPU tests, CPU cost per call, GPT-2 / Llama-layer steps
#   bash benchmarks/gpu_session.sh norms      # GPU tests, projection, norm kernels, steps of patch_model's defaults
#   bash benchmarks/gpu_session.sh norm_steps # the same steps with dropouts as bits
#   bash benchmarks/gpu_session.sh stack      # GPU tests; whole steps of Llama-3.2-1B and GPT-2 medium (with
#                                             # liger_kernel installed); the gated kernels
#   bash benchmarks/gpu_session.sh stack2     # the gated kernels' GPU tests and speed; whole steps of the 8-layer
#                                             # Llama-3-8B; the Llama layer against Liger's; the SiLU alone
#                                             # decided for torch.compile
# Logs and JSON go to $OUT (default gpu-results/).  Each step has a time limit; its exit status is logged.
set -u
OUT=${OUT:-gpu-results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date -u +%H:%M:%S)): $*"
    timeout "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1
    echo "== $name rc=$? ($(date -u +%H:%M:%S))" | tee -a "$OUT/$name.log"
}

case ${1:-kernels} in
kernels)
    step pytest_gpu 170 python3 -m pytest tests -m gpu -q -rs -p no:cacheprovider
    step kernels 280 python3 benchmarks/kernels.py --sweep --large --accuracy --gated --json "$OUT/kernels.json"
    step stream_floor 60 python3 benchmarks/stream_floor.py
    ;;
models)
    step projection 90 python3 benchmarks/projection_gpu.py
    step sass 40 python3 benchmarks/kernel_sass.py --save "$OUT"
    step train_step 330 python3 benchmarks/train_step.py --json "$OUT/train_step.json"
    step profile_step 90 python3 benchmarks/profile_step.py --model bert-base
    step call_overhead 40 python3 benchmarks/call_overhead.py
    step fsdp2_before 70 python3 benchmarks/fsdp2_gpu.py --patch before --json "$OUT/fsdp2_before.json"
    step fsdp2_after 70 python3 benchmarks/fsdp2_gpu.py --patch after --json "$OUT/fsdp2_after.json"
    ;;
launch)
    step pytest_gpu 200 python3 -m pytest tests -m gpu -q -rs -p no:cacheprovider
    step call_overhead 60 python3 benchmarks/call_overhead.py
    step train_step 270 python3 benchmarks/train_step.py --models gpt2-medium bert-base llama3-8b-layer \
        --rounds 4 --json "$OUT/train_step.json"
    ;;
compiled)
    step compiled 560 python3 benchmarks/train_step.py --models gpt2-medium gpt2-medium-dropouts bert-base \
        llama3-8b-layer --compiled --json "$OUT/compiled.json"
    ;;
dropouts)
    step pytest_gpu 200 python3 -m pytest tests -m gpu -q -rs -p no:cacheprovider
    step train_step 330 python3 benchmarks/train_step.py --models gpt2-medium gpt2-medium-dropouts bert-base \
        bert-base-dropouts --rounds 4 --json "$OUT/train_step.json"
    ;;
reliability)
    step pytest_gpu 230 python3 -m pytest tests -m gpu -q -rs -p no:cacheprovider
    step call_overhead 60 python3 benchmarks/call_overhead.py
    step train_step 240 python3 benchmarks/train_step.py --models gpt2-medium llama3-8b-layer --rounds 3 \
        --json "$OUT/train_step.json"
    ;;
norms)
    step pytest_gpu 230 python3 -m pytest tests -m gpu -q -rs -p no:cacheprovider
    step projection 90 python3 benchmarks/projection_gpu.py
    step norm_output 60 python3 benchmarks/norm_output.py
    step train_step 200 python3 benchmarks/train_step.py --models llama3-8b-layer-actpatch --rounds 3 \
        --json "$OUT/train_step.json"
    ;;
norm_steps)
    step train_step 560 python3 benchmarks/train_step.py --models gpt2-medium-actpatch-dropouts \
        bert-base-actpatch-dropouts gpt2-medium-actpatch bert-base-actpatch --rounds 3 --json "$OUT/norm_steps.json"
    ;;
stack)
    step pytest_gpu 120 python3 -m pytest tests/test_casts.py tests/test_liger.py tests/test_triton_gated.py \
        tests/test_gated.py tests/test_compiled.py -m gpu -q -rs -p no:cacheprovider
    step whole_1b 300 python3 benchmarks/whole_step.py --models llama3.2-1b --repeats 2 --steps 4 \
        --json "$OUT/whole_step_llama1b.json"
    step whole_gpt2 80 python3 benchmarks/whole_step.py --models gpt2-medium --repeats 1 --steps 4 \
        --json "$OUT/whole_step_gpt2.json"
    step kernels 60 python3 benchmarks/kernels.py --gated --dtypes --json "$OUT/kernels_gated.json"
    ;;
stack2)
    step pytest_gated 60 python3 -m pytest tests/test_triton_gated.py -m gpu -q -rs -p no:cacheprovider
    step kernels 60 python3 benchmarks/kernels.py --gated --dtypes --json "$OUT/kernels_gated.json"
    step whole_8b 200 python3 benchmarks/whole_step.py --models llama3-8b-8l --repeats 1 --steps 3 \
        --json "$OUT/whole_step_8b.json"
    step layer_vs_liger 120 python3 benchmarks/train_step.py --models llama3-8b-layer-actpatch \
        llama3-8b-layer-liger-norm --rounds 3 --json "$OUT/layer_vs_liger.json"
    step compiled_decisions 220 python3 benchmarks/train_step.py --models llama3-8b-layer-silu-actpatch \
        llama3-8b-layer-silu-actpatch-compiled --compiled --json "$OUT/compiled_decisions.json"
    ;;
*)
    echo "usage: gpu_session.sh kernels|models|launch|compiled|dropouts|reliability|norms|norm_steps|stack|stack2" >&2
    exit 2
    ;;
esac
