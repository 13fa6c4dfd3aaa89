#!/usr/bin/env bash
# Stands in for PYTHON in slurm/agpo.sbatch to test its requeue logic without the trainer:
# `-m agpo_megatron.cli check ...` succeeds; `train` appends a line to $FAKE_LOG, then exits 75
# (what a preempted trainer exits with) on the job's first run and 0 once the job was requeued.
set -euo pipefail
if [ "${3:-}" = check ]; then exit 0; fi
echo "train rank=$SLURM_PROCID restart=${SLURM_RESTART_COUNT:-0}" >>"$FAKE_LOG"
if [ "${SLURM_RESTART_COUNT:-0}" -ge 1 ]; then exit 0; fi
exit 75
