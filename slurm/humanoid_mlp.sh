#!/bin/bash
# OpenAI-ES, MLP on MuJoCo Humanoid-v4 (Lorenc & Neruda 2025: 5,000 pairs, 200 iterations).
#
#   sbatch slurm/humanoid_mlp.sh                      # from the repository root: 10 seeds, one per array task
#   sbatch slurm/humanoid_mlp.sh es.sigma=0.01        # arguments are extra section.key=value overrides
#   sbatch --ntasks=64 --time=2:00:00 slurm/humanoid_mlp.sh   # resize without editing (any rank count
#                                           # gives the same theta)
# Submitting it again continues every seed from its newest checkpoint (completed seeds exit at
# once). Seed i = ES_SEED_BASE + array index i, run dir ES_RUN_ROOT/seed<i>
# (default results/humanoid_mlp/seed<i>), log slurm/logs/humanoid_mlp_<i>.log (appended across requeues).
# Environment knobs (ES_JOB, ES_OVERRIDES, ES_LAUNCHER, ES_SRUN_MPI, ES_PYTHON, ...): see
# slurm/es_job.sh. Cluster set-up (site MPI, mpi4py): README, "Running on a SLURM cluster".
#
#SBATCH --job-name=humanoid_mlp
#SBATCH --ntasks=300                 # MPI ranks, one per core; edit to your share of the cluster
#SBATCH --cpus-per-task=1           # one thread per rank
#SBATCH --time=12:00:00               # per submission; a longer run checkpoints, requeues, resumes
#SBATCH --array=0-9                 # the paper's 10 seeds
#SBATCH --signal=B:USR1@600          # 10 min before the limit: > one iteration + checkpoint + 60 s
#SBATCH --requeue
#SBATCH --open-mode=append          # a requeued or resubmitted task appends to its log
#SBATCH --output=slurm/logs/%x_%a.log
##SBATCH --partition=...            # site-specific: uncomment and fill in
##SBATCH --account=...
##SBATCH --mem-per-cpu=2G           # the 1 GB noise table is shared per node, not per rank

# Site MPI (see README): e.g.  module load mpich  or  module load openmpi && ES_LAUNCHER/ES_SRUN_MPI
# module load mpich
# source ~/venvs/es/bin/activate      # or export ES_PYTHON=/path/to/python

ES_JOB=${ES_JOB:-jobs/humanoid_mlp.yaml}
source "${ES_HOME:-$SLURM_SUBMIT_DIR}/slurm/es_job.sh" || exit 1
es_setup

# ONE MPI world over all tasks: srun --mpi=$ES_SRUN_MPI (default), or mpiexec/mpirun -n $SLURM_NTASKS
es_run "${LAUNCH[@]}" "$ES_PYTHON" -m es_mpi.run "$ES_JOB" \
    run.seed="$SEED" run.dir="$RUN_DIR" "${ES_OVERRIDE_ARGS[@]}" "$@"
# The same with Open MPI / Intel MPI's launcher (what ES_LAUNCHER=mpirun does):
# es_run mpirun -n "$SLURM_NTASKS" "$ES_PYTHON" -m es_mpi.run "$ES_JOB" \
#     run.seed="$SEED" run.dir="$RUN_DIR" "${ES_OVERRIDE_ARGS[@]}" "$@"
