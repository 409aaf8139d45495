# Shared body of the slurm/*.sh templates; they `source` it, it is not submitted by itself.
#
# What a template does with it:
#   es_setup                  seed, run dir, python, launcher (from the variables below)
#   es_run LAUNCHER... ARGS   start ONE MPI world in the background, forward USR1/TERM to it,
#                             and on exit code 3 (checkpointed after a signal) requeue the job
#
# Variables (export them before `sbatch`, or pass overrides as arguments to the script):
#   ES_JOB         job YAML, relative to ES_HOME                  (template's default)
#   ES_OVERRIDES   extra `section.key=value` words for the job    (none)
#   ES_RUN_ROOT    parent of the per-seed run dirs                (results/<job name>)
#   ES_SEED_BASE   seed of array task 0; task i gets base + i     (0)
#   ES_LAUNCHER    srun | mpiexec | mpirun                        (srun)
#   ES_SRUN_MPI    srun's --mpi plugin: pmi2 (MPICH, Intel MPI), pmix (Open MPI)  (pmi2)
#   ES_PYTHON      the python that has es_mpi's dependencies      (python on PATH)
#   ES_HOME        repository root                                (the submit directory)
#   ES_MAX_REQUEUE stop requeueing after this many restarts       (50)
#
# Exit codes of `python -m es_mpi.run`: 0 done (also when the run was already complete),
# 2 bad job/overrides, 3 preempted (checkpoint written; requeue), 4 launcher gave one-rank
# worlds (see ES_LAUNCHER / ES_SRUN_MPI), 5 diverged (theta not finite), 6 disk full; neither
# 5 nor 6 is requeued (a rerun would meet the same). Anything else is a crash.

EXIT_CONFIG_ERROR=2
EXIT_PREEMPTED=3
EXIT_LAUNCHER_ERROR=4
EXIT_DIVERGED=5
EXIT_DISK_FULL=6

es_log() { echo "[$(date -u '+%F %T')] es_job: $*"; }

es_setup() {
    ES_HOME=${ES_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
    cd "$ES_HOME" || { es_log "cannot cd to ES_HOME=$ES_HOME"; exit 1; }
    export PYTHONPATH="$ES_HOME${PYTHONPATH:+:$PYTHONPATH}"
    # one thread per rank (es_mpi sets these too, but only after python has started)
    export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
    ES_PYTHON=${ES_PYTHON:-python}
    ES_JOB_NAME=$(basename "$ES_JOB" .yaml)
    SEED=$(( ${ES_SEED_BASE:-0} + ${SLURM_ARRAY_TASK_ID:-0} ))
    # keyed by job and seed, not by the SLURM job id: a resubmission continues the same run
    RUN_DIR=${ES_RUN_ROOT:-results/$ES_JOB_NAME}/seed$SEED
    read -r -a ES_OVERRIDE_ARGS <<< "${ES_OVERRIDES:-}"  # split on blanks, no globbing
    case ${ES_LAUNCHER:-srun} in
        # --kill-on-bad-exit: a rank that dies without Python's abort (segfault, OOM kill)
        # must not leave the others waiting in a collective until the time limit
        srun) LAUNCH=(srun "--mpi=${ES_SRUN_MPI:-pmi2}" --kill-on-bad-exit=1) ;;
        mpiexec|mpirun) LAUNCH=("$ES_LAUNCHER" -n "${SLURM_NTASKS:?not in a SLURM job}") ;;
        *) es_log "ES_LAUNCHER=$ES_LAUNCHER: expected srun, mpiexec or mpirun"; exit 1 ;;
    esac
    es_log "job ${SLURM_JOB_ID:-?} (array ${SLURM_ARRAY_JOB_ID:-none} task" \
        "${SLURM_ARRAY_TASK_ID:-none}) restart ${SLURM_RESTART_COUNT:-0} on" \
        "${SLURM_NTASKS:-?} tasks: $ES_JOB seed $SEED in $RUN_DIR via ${LAUNCH[*]}"
}

es_run() {
    # run.seed and run.dir come from the array index (ES_SEED_BASE, ES_RUN_ROOT); a second one
    # in the overrides would silently win and send every array task to one run directory
    local word n_dir=0 n_seed=0
    for word in "$@"; do
        case $word in run.dir=*) n_dir=$((n_dir + 1)) ;; run.seed=*) n_seed=$((n_seed + 1)) ;; esac
    done
    if (( n_dir > 1 || n_seed > 1 )); then
        es_log "run.dir / run.seed are set per array task: use ES_RUN_ROOT and ES_SEED_BASE" \
            "instead of overriding them"
        exit "$EXIT_CONFIG_ERROR"
    fi
    ES_SIGNALS=0 ES_CHILD=
    # USR1 from `--signal=B:USR1@T` (or scancel --signal=USR1 --batch), TERM from preemption:
    # pass USR1 on to the launcher, which forwards it to every rank; they checkpoint and exit 3
    trap 'ES_SIGNALS=$((ES_SIGNALS + 1)); es_log "signal received, asking the ranks to checkpoint";
          [[ -n $ES_CHILD ]] && kill -USR1 "$ES_CHILD" 2>/dev/null' USR1 TERM
    ES_CKPT_BEFORE=$(es_newest_checkpoint)
    "$@" &
    ES_CHILD=$!
    (( ES_SIGNALS )) && kill -USR1 "$ES_CHILD" 2>/dev/null  # a signal came before $! was set
    local rc seen
    while true; do  # `wait` returns early when a trap runs; then wait again for the real status
        seen=$ES_SIGNALS
        wait "$ES_CHILD"; rc=$?
        (( ES_SIGNALS == seen )) && break
    done
    trap - USR1 TERM
    es_finish "$rc"
}

es_newest_checkpoint() {
    local newest=
    for f in "$RUN_DIR"/checkpoints/ckpt_*.h5; do [[ -e $f ]] && newest=$f; done  # sorted
    echo "$newest"
}

es_finish() {
    local rc=$1 restarts=${SLURM_RESTART_COUNT:-0}
    if [[ $rc == 0 ]]; then
        es_log "run complete: $RUN_DIR"
        exit 0
    fi
    if [[ $rc == "$EXIT_LAUNCHER_ERROR" ]]; then
        es_log "exit $rc: the ranks did not form one MPI world; set ES_LAUNCHER or ES_SRUN_MPI"
        exit "$rc"
    fi
    if [[ $rc == "$EXIT_CONFIG_ERROR" ]]; then
        es_log "exit $rc: bad job file or overrides, or a resume was refused (see above)"
        exit "$rc"
    fi
    if [[ $rc == "$EXIT_DIVERGED" ]]; then
        es_log "exit $rc: the run diverged (see above; lower es.lr or es.sigma): not requeueing"
        exit "$rc"
    fi
    if [[ $rc == "$EXIT_DISK_FULL" ]]; then
        es_log "exit $rc: disk full (see above): free space, then submit again to resume"
        exit "$rc"
    fi
    # 3 = checkpointed after a signal; after our own signal any death means "resume from the
    # newest checkpoint" (the ranks may have been killed before they could install handlers)
    if [[ $rc == "$EXIT_PREEMPTED" ]] || (( ES_SIGNALS )); then
        if [[ $(es_newest_checkpoint) == "$ES_CKPT_BEFORE" ]]; then
            # nothing to continue from: requeueing would only repeat this (e.g. a --time
            # shorter than the --signal lead time sends the signal at once, every time)
            es_log "exit $rc before any new checkpoint: not requeueing. Is the --signal lead" \
                "time longer than --time (or than one iteration)? Submit again to resume."
            exit "$rc"
        fi
        if (( restarts >= ${ES_MAX_REQUEUE:-50} )); then
            es_log "exit $rc after $restarts restarts (ES_MAX_REQUEUE): not requeueing"
            exit "$rc"
        fi
        # an array's last task has SLURM_JOB_ID == SLURM_ARRAY_JOB_ID, and requeueing that id
        # requeues every task of the array: name this task as <array id>_<index>
        local me=$SLURM_JOB_ID
        [[ -n ${SLURM_ARRAY_JOB_ID:-} ]] && me=${SLURM_ARRAY_JOB_ID}_$SLURM_ARRAY_TASK_ID
        es_log "exit $rc: requeueing job $me (restart $((restarts + 1)))"
        scontrol requeue "$me" && exit 0
        es_log "scontrol requeue failed; submit the script again to resume"
        exit "$rc"
    fi
    es_log "run failed with exit code $rc"
    exit "$rc"
}
