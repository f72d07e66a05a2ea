#!/usr/bin/env bash
# The two CPU experiments, side by side (one core each). Rerunning continues where they stopped.
set -u
cd "$(dirname "$0")/.."
mkdir -p runs
OMP_NUM_THREADS=1 nohup python experiments/selffusion/run.py --scale cpu > runs/exp_selffusion_cpu.log 2>&1 &
OMP_NUM_THREADS=1 nohup python experiments/dopsd/run.py --scale cpu --task sudoku > runs/exp_dopsd_sudoku_cpu.log 2>&1 &
wait
