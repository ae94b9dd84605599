#!/usr/bin/env bash
# The prepared device check: one script for a machine with one GPU, at most 8 minutes (its parts' limits
# add up to 440 s), run from the repository root with the package installed (pip install -e .), e.g. with
# the device tool: `pip install -e . -q && bash experiments/device_check.sh`. Each part has its own time limit and
# prints what it measured as it goes, so a run cut short still reports; a part that fails says why and
# the next one runs. Results go to experiments/results/*_gpu.md (and $OUT, when set, for the device tool):
#
#   1. bench_throughput_gpu.md    training step of the default model at 32/64/128 px: fp32, bf16,
#                                 bf16 + channels-last, bf16 + channels-last + torch.compile
#   2. bench_paper_scale_gpu.md   training step of the paper-scale CelebA-HQ and CUB presets' networks
#                                 (synthetic batches: the data need not be on the machine)
#   3. bench_samplers_gpu.md      torchsde vs the hand-written reverse SDE, sampler wall time
#   4. device_training_gpu.md     a short real run of diffmvae-train (the embedded shapes data, trainer=gpu):
#                                 its report and metrics under experiments/results/device_run_gpu/
#                                 (loss curves and sample figures to $OUT only: no images in the repository)
#
#   bash experiments/device_check.sh            # on the GPU machine
#   QUICK=1 bash experiments/device_check.sh    # a seconds-long plumbing check of the same commands (CPU)
set -uo pipefail
cd "$(dirname "$0")/.."
QUICK=${QUICK:-0}
RESULTS=${RESULTS:-experiments/results}
[ "$QUICK" = 1 ] && RESULTS=$(mktemp -d) && echo "quick check: results in $RESULTS (not in the repository)"
PY=${PYTHON:-python}
start=$(date +%s)
if [ "$QUICK" = 1 ]; then
    DEVICE=cpu; SIZES="16"; BATCH=4; STEPS=1; WARMUP=1; PAPER_SIZE=32; RUN_STEPS=4; SUFFIX=quick; VARIANTS="fp32 bf16"
    SAMPLER_ARGS="--small --steps 5 --ddim-target 5 --sde-target 10 --ode-target 10 --breakdown-steps 10 --wall-repeats 1"
else
    DEVICE=cuda; SIZES="32 64 128"; BATCH=64; STEPS=10; WARMUP=3; PAPER_SIZE=128; RUN_STEPS=1500; SUFFIX=gpu; VARIANTS="fp32 bf16 bf16+cl bf16+cl+compile"
    SAMPLER_ARGS="--repeats 3"
fi

part() {  # part <name> <seconds> <command...>: run with a time limit, say how it ended
    local name=$1 limit=$2; shift 2
    echo; echo "=== $name (limit ${limit}s, $(( $(date +%s) - start ))s into the check) ==="
    timeout --signal=TERM --kill-after=10 "$limit" "$@"
    local rc=$?
    case $rc in
        0) echo "=== $name: done ===" ;;
        124|137) echo "=== $name: stopped at its ${limit}s limit (what it printed above stands) ===" ;;
        *) echo "=== $name: failed with exit status $rc (see above) ===" ;;
    esac
}

echo "device check ($SUFFIX) on $(hostname), $(date -u +%FT%TZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
$PY -c "import torch; print('torch', torch.__version__, '| cuda', torch.version.cuda, '| available', torch.cuda.is_available())"

part "1. training throughput" 140 $PY experiments/benchmarks/bench_throughput.py --device $DEVICE \
    --image-sizes $SIZES --variants $VARIANTS --batch $BATCH --steps $STEPS \
    --warmup $(( WARMUP > 2 ? WARMUP : 2 )) --out $RESULTS/bench_throughput_$SUFFIX.md

paper_scale() {  # the paper-scale presets' networks at their image size, bf16 + channels-last (run by part through bash -c)
    for preset in celebamask_hq_diffmvae_star cub_diffmvae_star; do
        echo "--- experiment=$preset ---"
        $PY experiments/benchmarks/bench_throughput.py --device $DEVICE --image-sizes $PAPER_SIZE \
            --variants bf16+cl --batch $BATCH --steps $STEPS --warmup $WARMUP \
            --override experiment=$preset --out $RESULTS/bench_paper_scale_${preset}_$SUFFIX.md \
            || echo "$preset: not measured (the CUB vocabulary is built from the captions under dataset.root)"
    done
}
export -f paper_scale; export PY DEVICE PAPER_SIZE BATCH STEPS WARMUP RESULTS SUFFIX
part "2. paper-scale presets" 100 bash -c paper_scale

part "3. samplers" 60 $PY experiments/benchmarks/bench_samplers.py --device $DEVICE --batch $BATCH $SAMPLER_ARGS \
    --out $RESULTS/bench_samplers_$SUFFIX.md

RUN=$RESULTS/device_run_$SUFFIX
rm -rf "$RUN.tmp"
part "4. a short real training run" 140 $PY -c "import sys; from pyro_diffmvae.cli import train_main; sys.argv[0] = 'diffmvae-train'; train_main()" \
    trainer=gpu trainer.accelerator=$([ "$QUICK" = 1 ] && echo cpu || echo gpu) \
    trainer.precision=$([ "$QUICK" = 1 ] && echo 32-true || echo bf16-mixed) \
    trainer.max_steps=$RUN_STEPS trainer.progress_bar=false latent_prior.steps=$([ "$QUICK" = 1 ] && echo 5 || echo 1500) \
    $([ "$QUICK" = 1 ] && echo experiment=tiny) hydra.run.dir=$RUN.tmp
if [ -f "$RUN.tmp/report.md" ]; then  # the report and metrics (text) here; the figures only to $OUT
    rm -rf "$RUN"; mkdir -p "$RUN"
    cp "$RUN.tmp/report.md" "$RUN.tmp/metrics.json" "$RUN"/
    echo "report and metrics in $RUN"
    if [ -n "${OUT:-}" ]; then mkdir -p "$OUT/device_run"; cp -r "$RUN.tmp/loss_curves.png" "$RUN.tmp/figures" "$OUT/device_run"/; fi
fi
rm -rf "$RUN.tmp"

if [ -n "${OUT:-}" ]; then cp -r $RESULTS/*_$SUFFIX.md "$RUN" "$OUT"/ 2>/dev/null; fi
echo; echo "device check finished in $(( $(date +%s) - start ))s"
