#!/bin/bash
# Submit Stage 0..4 of a recipe set as a chain of dependent Slurm jobs (each starts after the last
# one succeeded, from its checkpoint via the recipe's checkpoint.init_from).
#   tools/slurm/run_all_stages.sh recipes/nano_v2_vl 32
set -euo pipefail
RECIPES=${1:?usage: run_all_stages.sh RECIPE_DIR NODES}
NODES=${2:?usage: run_all_stages.sh RECIPE_DIR NODES}
dep=""
for stage in stage0 stage1 stage2 stage3 stage4; do
  job=$(sbatch --parsable --nodes="$NODES" ${dep:+--dependency=afterok:$dep} \
        "$(dirname "$0")/train_stage.sbatch" "$RECIPES/$stage.yaml")
  echo "$stage -> job $job"
  dep=$job
done
