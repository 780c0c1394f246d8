#!/usr/bin/env bash
# Everything that needs a GPU, in stages: bash benchmarks/run_gpu_suite.sh STAGE...
# Stages: tests block lm profile coor local tiles cross variants train quality defaults ablation. Logs go to $OUT
# (or ./gpu-logs). quality trains 5 minutes per model and length: one model per device call
# (QUALITY_MODELS=colt5, then QUALITY_MODELS=dense on the same warm machine, whose /tmp keeps the
# first), the table and plot then by `python benchmarks/lm_quality.py --report --out /tmp/quality`.
# defaults keeps the variants already trained in /tmp/defaults (--reuse): a call cut short, run again, goes on;
# DEFAULTS_VARIANTS="default;router eps 0.3;..." (names separated by ';') trains only those (all: ~25 minutes).
# ablation: the heavy branches' worth in a trained run (ABLATION_RUN, default the defaults stage's default run).
# On a machine without network, carry the wheels of local-attention and its deps in .whl.
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
    tests) COLT5_GPU_TESTS=1 TAIL=25 run tests python3 -m pytest -q -m gpu -x tests/ ;;
    block) run block python3 benchmarks/block.py --no-lm --sizes ${BLOCK_SIZES:-8192 32768} --modes ${BLOCK_MODES:-eager compiled graphs} ;;
    lm) run lm python3 benchmarks/block.py --no-blocks --lm-seqs ${LM_SEQS:-4096 16384 65536} --lm-modes ${LM_MODES:-eager compiled} ;;
    profile) TAIL=70 run profile python3 benchmarks/block.py --profile ${PROFILE_N:-8192} ;;
    coor) run coor python3 benchmarks/coor_descent.py ;;
    local) run local python3 benchmarks/local_attention.py ;;
    tiles) run tiles python3 benchmarks/attention_tiles.py ;;
    cross) run cross python3 benchmarks/cross_attention.py ;;
    variants) run variants python3 benchmarks/variants_gpu.py ;;
    train)
      for model in routed dense; do
        flag=$([ $model = dense ] && echo --dense); TAIL=6 run "train-$model" python3 examples/train_enwik8.py --device cuda --seq-len 4096 \
          --steps "$STEPS" --eval-every 100 --eval-batches 8 --generate-every 0 --no-progress --out "/tmp/run-$model" $flag
      done ;;
    quality) run quality python3 benchmarks/lm_quality.py --seqs ${QUALITY_SEQS:-16384} --models ${QUALITY_MODELS:-colt5 dense} \
        --calibrate 20 --out /tmp/quality -- --eval-batches 8 ;;
    defaults)
      IFS=';' read -ra variants <<< "${DEFAULTS_VARIANTS:-}"
      run defaults python3 benchmarks/lm_defaults.py --reuse --out /tmp/defaults ${variants[@]:+--variants "${variants[@]}"} ;;
    ablation) run ablation python3 benchmarks/branch_ablation.py ${ABLATION_RUN:-/tmp/defaults/default} --batches 16 ;;
    *) echo "unknown stage $stage" ;;
  esac
done
