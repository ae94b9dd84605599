#!/usr/bin/env bash
# Issue 14, levers and fast sampling on the real CelebAMask-HQ faces (32 px, image + 18 attributes):
#  1. train Diff-MVAE*-v twice for the same number of steps: conditioning dropout p = 0.1 (a null latent) and p = 0
#     (a step budget, not wall-clock, so that other load on the machine cannot favour one of them; dropout does
#     not change the cost of a step);
#  2. evaluate the p = 0.1 model with DDIM-50, DPM-Solver++(2M) at 10 and 20 NFE, and guidance w = 0, 2, 3
#     at 10 NFE; the p = 0 model with DDIM-50 and DPM-Solver++ 10 NFE (the standard protocol: the 1,000 test
#     faces, both given subsets; FD in the attribute classifier's features; 1,000 unconditional samples).
# Usage: OUT=/tmp/guidance STEPS=3000 SEED=0 bash experiments/guidance_and_sampler_celebamask_hq.sh
# Then: python experiments/guidance_table.py $OUT > experiments/results/guidance_sampler_celebamask_hq_cpu.md
set -euo pipefail
OUT=${OUT:-/tmp/guidance}
STEPS=${STEPS:-3000}
SEED=${SEED:-0}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
EVAL="evaluation.num_examples=null evaluation.num_unconditional=1000 evaluation.coherence_all_targets=false"
mkdir -p "$OUT"
for p in 0.1 0.0; do
  run="$OUT/p${p}_s${SEED}"
  if [ ! -f "$run/model.pt" ]; then
    diffmvae-train experiment=celebamask_hq_diffmvae_star_v_cpu model.diffusion.cond_dropout=$p seed=$SEED \
      trainer.max_steps=$STEPS trainer.progress_bar=false evaluation.enabled=false \
      hydra.run.dir="$run"
  fi
done
evaluate() {  # run dir, label, overrides...
  local run=$1 label=$2; shift 2
  [ -f "$run/eval_$label/metrics.json" ] && return 0
  diffmvae-evaluate checkpoint="$run/model.pt" $EVAL "$@" hydra.run.dir="$run/eval_$label"
}
A="$OUT/p0.1_s${SEED}"; B="$OUT/p0.0_s${SEED}"
evaluate "$A" dpm10_w1 evaluation.sampler=dpmpp_2m evaluation.sampler_steps=9
evaluate "$B" dpm10_w1 evaluation.sampler=dpmpp_2m evaluation.sampler_steps=9
evaluate "$A" ddim50_w1 evaluation.sampler=ddim evaluation.sampler_steps=50 evaluation.loglik_examples=0
evaluate "$A" dpm20_w1 evaluation.sampler=dpmpp_2m evaluation.sampler_steps=19 evaluation.loglik_examples=0
for w in 2.0 0.0 3.0; do
  evaluate "$A" dpm10_w$w evaluation.sampler=dpmpp_2m evaluation.sampler_steps=9 evaluation.guidance=$w \
    evaluation.loglik_examples=0
done
evaluate "$B" ddim50_w1 evaluation.sampler=ddim evaluation.sampler_steps=50 evaluation.loglik_examples=0
