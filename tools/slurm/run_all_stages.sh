#!/bin/bash
# Submit the stages of a recipe set as a chain of Slurm jobs: each starts only after the previous
# one has finished (afterok), from its checkpoint via the recipe's checkpoint.init_from. A stage
# stopped by its time limit or by preemption requeues itself (train_stage.sbatch), so the chain
# continues without anyone resubmitting.
#   tools/slurm/run_all_stages.sh recipes/nano_v2_vl 32            # Stage 0..4
#   STAGES="stage2 stage3" tools/slurm/run_all_stages.sh recipes/nano_v2_vl 32
#   AFTER=<job id> ...: the first stage waits for that job too
set -euo pipefail
RECIPES=${1:?usage: run_all_stages.sh RECIPE_DIR NODES [sbatch options...]}
NODES=${2:?usage: run_all_stages.sh RECIPE_DIR NODES [sbatch options...]}
shift 2
STAGES=${STAGES:-stage0 stage1 stage2 stage3 stage4}
dep=${AFTER:-}
for stage in $STAGES; do
  # afterok: start only when the previous job completed with exit 0. A requeued job is pending
  # again, not failed, so its dependents keep waiting through any number of requeues.
  job=$(sbatch --parsable --nodes="$NODES" --job-name="vlm-$stage" \
        ${dep:+--dependency=afterok:$dep} --kill-on-invalid-dep=yes "$@" \
        "$(dirname "$0")/train_stage.sbatch" "$RECIPES/$stage.yaml")
  job=${job%%;*}   # --parsable prints "id[;cluster]"
  echo "$stage -> job $job"
  dep=$job
done
