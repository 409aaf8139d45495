#!/bin/bash
# OpenAI-ES, Decision Transformer on Atari ALE/Hero-v5 (Lorenc & Neruda 2025: 40,000 pairs,
# 60 iterations).
#
# From the repository root:
#   sbatch slurm/atari_hero.sh                   # 10 seeds, 100 ranks each, 3 side by side on 300 cores
#   sbatch slurm/atari_hero.sh es.sigma=0.01     # arguments: extra section.key=value overrides
#   python -m es_mpi.scale_model jobs/atari_hero.yaml --ntasks 60   # sizes for 60 ranks
#   sbatch --ntasks=60 --time=T --signal=B:USR1@S --mem-per-cpu=M slurm/atari_hero.sh  # with them
#   sbatch slurm/atari_hero.sh                   # again: every seed continues its own run
# Array index i trains seed ES_SEED_BASE+i (default i) in ES_RUN_ROOT/seed<i> (default
# results/atari_hero/seed<i>) and logs to slurm/logs/atari_hero_<i>.log, appended across
# requeues and resubmissions. Any --ntasks gives bitwise the same theta for a seed.
# Sizes: --time, --signal and --mem-per-cpu are what `python -m es_mpi.scale_model
# jobs/atari_hero.yaml --ntasks 100` prints (the scale model with a 1.5x safety factor; README,
# "Sizing"); tests/test_slurm_sizing.py keeps them equal. Resize all four together.
# Knobs (ES_LAUNCHER, ES_SRUN_MPI, ES_PYTHON, ES_JOB, ES_OVERRIDES, ...): slurm/es_job.sh.
# Site MPI and mpi4py: README, "Running on a SLURM cluster".
#
#SBATCH --job-name=atari_hero
#SBATCH --ntasks=100                # MPI ranks of one seed (not 30 as the Humanoid templates: a late
                                    # Hero iteration would take 7.5 h, and an iteration is what a
                                    # preemption can lose); 3 seeds side by side on 300 cores
#SBATCH --cpus-per-task=1           # one thread per rank
#SBATCH --hint=nomultithread        # on a core of its own, not a hyperthread
#SBATCH --time=24:00:00             # per run of the job; longer runs checkpoint and requeue
#SBATCH --array=0-9                 # the paper's 10 seeds, each its own MPI world
#SBATCH --signal=B:USR1@12360       # > the longest iteration + a checkpoint, x1.5, + 2 min
#SBATCH --requeue
#SBATCH --open-mode=append          # requeued and resubmitted tasks append to their log
#SBATCH --output=slurm/logs/%x_%a.log
##SBATCH --partition=...            # site-specific: uncomment and fill in
##SBATCH --account=...
#SBATCH --mem-per-cpu=1792M         # a rank's own memory x1.25 + the 1 GB noise table

# Site set-up (see README), e.g.:
# module load mpich                 # Open MPI: module load openmpi; export ES_SRUN_MPI=pmix
# source ~/venvs/es/bin/activate    # or: export ES_PYTHON=~/venvs/es/bin/python

ES_JOB=${ES_JOB:-jobs/atari_hero.yaml}
source "${ES_HOME:-$SLURM_SUBMIT_DIR}/slurm/es_job.sh" || exit 1
es_setup  # -> SEED, RUN_DIR, ES_PYTHON, LAUNCH (srun --mpi=pmi2, or mpiexec -n $SLURM_NTASKS)

# ONE MPI world over all tasks; USR1/TERM are forwarded to it, exit 3 requeues this task
es_run "${LAUNCH[@]}" "$ES_PYTHON" -m es_mpi.run "$ES_JOB" \
    run.seed="$SEED" run.dir="$RUN_DIR" "${ES_OVERRIDE_ARGS[@]}" "$@"
# The same with Open MPI's / Intel MPI's launcher (what ES_LAUNCHER=mpirun does):
# es_run mpirun -n "$SLURM_NTASKS" "$ES_PYTHON" -m es_mpi.run "$ES_JOB" \
#     run.seed="$SEED" run.dir="$RUN_DIR" "${ES_OVERRIDE_ARGS[@]}" "$@"
