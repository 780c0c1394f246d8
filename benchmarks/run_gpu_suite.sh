#!/usr/bin/env bash
# Everything that needs a GPU, in stages: bash benchmarks/run_gpu_suite.sh STAGE...
# Stages: overhead tests coor block arblock profile memory host local cross variants train ddp. Logs go to $OUT (or ./gpu-logs).
# Needs the carried wheels in .whl (local-attention and its deps) on a machine without network.
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/gpu_setup.sh
# A plain colt5/ folder on sys.path can shadow the editable mapping of colt5.kernels.
[ -e colt5/kernels ] || ln -s ../kernels colt5/kernels
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
LOGS=${OUT:-gpu-logs}; mkdir -p "$LOGS"
STEPS=${TRAIN_STEPS:-300}
run() { local name=$1; shift; echo "=== $name: $*"; local t0=$SECONDS; "$@" 2>&1 | tee "$LOGS/$name.log" | tail -n "${TAIL:-40}"; echo "=== $name took $((SECONDS - t0)) s"; }
for stage in "$@"; do
  case $stage in
    overhead) run overhead python3 benchmarks/coor_descent_overhead.py ;;
    tests) COLT5_GPU_TESTS=1 TAIL=15 run tests python3 -m pytest -q tests/test_coor_descent_gpu.py tests/test_local_attention.py ;;
    coor) run coor python3 benchmarks/coor_descent.py ;;
    block) run block python3 benchmarks/block.py --sizes ${BLOCK_SIZES:-8192 16384 32768 65536 131072} --ar-sizes ${AR_SIZES:-8192 32768} --modes ${BLOCK_MODES:-eager graphs captured} ;;
    variants) run variants python3 benchmarks/variants_gpu.py ;;
    arblock) run arblock python3 benchmarks/block.py --sizes --ar-sizes 8192 32768 --modes eager graphs captured ;;
    profile) TAIL=60 run profile python3 benchmarks/block.py --profile 32768 --profile-modes eager compiled ;;
    host) TAIL=120 run host python3 benchmarks/block.py --host-profile ${HOST_SIZES:-8192} ;;
    memory) run memory python3 benchmarks/block_memory.py ;;
    local) run local python3 benchmarks/local_attention.py ;;
    cross) run cross python3 benchmarks/cross_attention.py ;;
    train)
      for model in routed dense; do
        flag=$([ $model = dense ] && echo --dense); TAIL=6 run "train-$model" python3 examples/train_enwik8.py --device cuda --seq-len 4096 \
          --steps "$STEPS" --eval-every 100 --eval-batches 8 --generate-every 0 --no-progress --out "/tmp/run-$model" $flag
      done ;;
    ddp) TAIL=8 run ddp torchrun --standalone --nproc_per_node=2 examples/train_enwik8.py --device cuda --seq-len 4096 \
          --steps "${DDP_STEPS:-100}" --eval-every 100 --eval-batches 8 --generate-every 0 --no-progress --out /tmp/run-ddp ;;
    *) echo "unknown stage $stage" ;;
  esac
done
