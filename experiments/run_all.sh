#!/usr/bin/env bash
# The two CPU experiments, side by side (one core each). Rerunning continues where they stopped.
# SELFFUSION_RUNS picks the SelfFusion student runs and their order (default: the order below, which
# puts the three seeds of the headline rows, then the Table 3 ablations, ahead of the teachers and KD).
set -u
cd "$(dirname "$0")/.."
mkdir -p runs
SELFFUSION_RUNS=${SELFFUSION_RUNS:-"sft_seed3407 selffusion_seed3407 sft_seed1 selffusion_seed1 sft_seed2 selffusion_seed2
  selffusion_hard_to_easy_seed3407 selffusion_easy_to_hard_seed3407 selffusion_no_rmsnorm_seed3407
  kd_dlm_seed3407 kd_ar_seed3407 seqkd_dlm_seed3407 seqkd_ar_seed3407"}
# shellcheck disable=SC2086
OMP_NUM_THREADS=1 nohup python experiments/selffusion/run.py --scale cpu --runs $SELFFUSION_RUNS \
  >> runs/exp_selffusion_cpu.log 2>&1 &
# the Sudoku SelfFusion study starts from the d-OPSD experiment's base, so it runs after it on the same core
(OMP_NUM_THREADS=1 python experiments/dopsd/run.py --scale cpu --task sudoku >> runs/exp_dopsd_sudoku_cpu.log 2>&1 &&
 OMP_NUM_THREADS=1 python experiments/selffusion/sudoku.py --scale cpu --base runs/exp_dopsd_sudoku_cpu/base/final \
   >> runs/exp_selffusion_sudoku_cpu.log 2>&1) &
wait
