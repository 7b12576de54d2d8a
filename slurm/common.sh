# shellcheck shell=bash
# Sourced by train.sbatch, sweep.sbatch and eval.sbatch (after they have found the repository and
# set GENSCALE_ROOT): one `srun` step that runs slurm/launch_node.sh once per node, and the
# preemption protocol around it.
#
# The warning: `#SBATCH --signal=B:USR1@120` sends USR1 to this batch shell shortly before the
# time limit. The shell passes USR1 on to every process of the step on every node (`scancel
# --signal=USR1`, job steps only), waits until every rank has saved a checkpoint and exited, and
# requeues the job (`scontrol requeue`); the requeued job runs the same command and resumes from
# that checkpoint.
#   Why USR1 and not TERM: SLURM signals every process of the step, and torch's DataLoader
# workers die of a SIGTERM that does not come from their parent, which crashes the trainer before
# it can save. launch_node.sh makes the launcher (torchrun) ignore USR1, which would kill it; the
# trainers catch it. Signalling `srun` itself is no option either: it turns TERM into SIGKILL.
#
# SIGTERM from SLURM reaches the step directly and this shell only waits for it to end. At the
# time limit (Reason=TimeLimit) the shell requeues the job as after a warning; after scancel,
# a preemption or an outside `scontrol requeue`, SLURM decides whether the job runs again.
#
# A command that completed is never requeued, even when the warning or the time limit came after
# its last step (or while the warning was being passed on): the shell exports GENSCALE_STATUS_FILE
# (on the shared file system, unique to the job; removed before the step starts and after it has
# been read) and the launch's main process writes "finished" to it (genscale/run_status.py) once
# the run has completed. Without that word the shell requeues as described above.
#
# GENSCALE_RESUMABLE=0 (eval.sbatch): the command keeps no checkpoint, so neither the warning nor the
# time limit requeues the job: it would only start again from zero (an evaluation that outlasts
# --time, forever) or repeat one that had just finished. --time must cover the whole command.

_genscale_log() { echo "genscale $(date +%H:%M:%S): $*"; }

genscale_main_address() {
    # The first node's address. NodeAddr, not the node name: the name can be a label only
    # (emulated nodes, some clouds).
    local head addr
    head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    addr=$(scontrol show node -o "$head" 2>/dev/null | sed -n 's/.* NodeAddr=\([^ ]*\).*/\1/p')
    echo "${addr:-$head}"
}

_genscale_job_field() {
    scontrol show job -o "$GENSCALE_JOB" 2>/dev/null | sed -n "s/.* $1=\\([^ ]*\\).*/\\1/p" | head -n 1
}

_genscale_on_usr1() {
    if [[ ${GENSCALE_RESUMABLE:-1} == 0 ]]; then
        _genscale_log "warning signal (USR1) before the time limit: this command cannot resume, so it runs on"
        return
    fi
    _genscale_stopping=1
    _genscale_requeue=1
    _genscale_log "warning signal (USR1) before the time limit: asking every rank to save and stop"
    _genscale_forward
}

_genscale_on_term() {
    _genscale_stopping=1
    local reason
    reason=$(_genscale_job_field Reason)
    if [[ $reason == TimeLimit && ${GENSCALE_RESUMABLE:-1} != 0 ]]; then
        _genscale_requeue=1
        _genscale_log "SIGTERM at the time limit: the step got it too; the job requeues once it has ended"
    else
        _genscale_requeue=0   # a cancel wins over an earlier warning
        _genscale_log "SIGTERM from SLURM (reason: ${reason:-unknown}): the step got it too; SLURM decides what follows"
    fi
}

_genscale_forward() {
    # Job steps only (no --batch/--full): this shell and its srun client are not signalled.
    _genscale_last_forward=$SECONDS
    scancel --signal=USR1 "$GENSCALE_JOB" || _genscale_log "scancel --signal=USR1 failed"
}

_genscale_status_prepare() {
    # The submission directory: shared by every node (the job's log is written there too). An array
    # task or a requeued job gets the same path back, so a word left by an earlier attempt is removed.
    GENSCALE_STATUS_FILE="${SLURM_SUBMIT_DIR:-$PWD}/.genscale/status-${GENSCALE_JOB}"
    if mkdir -p "${GENSCALE_STATUS_FILE%/*}" 2>/dev/null && rm -f "$GENSCALE_STATUS_FILE" 2>/dev/null \
            && [[ ! -e $GENSCALE_STATUS_FILE ]]; then
        export GENSCALE_STATUS_FILE
    else
        _genscale_log "cannot prepare ${GENSCALE_STATUS_FILE}:" \
            "a command that completes after the warning is requeued anyway"
        unset GENSCALE_STATUS_FILE
    fi
}

_genscale_status_finished() {
    # Whether the step's main process reported the command as completed; removes the file either way.
    local word=""
    [[ -n ${GENSCALE_STATUS_FILE:-} ]] || return 1
    if [[ -f $GENSCALE_STATUS_FILE ]]; then read -r word < "$GENSCALE_STATUS_FILE"; fi
    rm -f "$GENSCALE_STATUS_FILE"
    [[ $word == finished ]]
}

# genscale_run SCRIPT [ARGS...]: run SCRIPT under `accelerate launch` on every node of the job;
# exits with the step's status, or requeues the job when the warning (or the time limit) stopped it.
genscale_run() {
    # This job for scancel/scontrol: in an array, SLURM_JOB_ID of one task can equal the array's
    # id, which names every task; ARRAYID_TASKID names this one only.
    GENSCALE_JOB=$SLURM_JOB_ID
    if [[ -n ${SLURM_ARRAY_JOB_ID:-} ]]; then GENSCALE_JOB=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}; fi
    export GENSCALE_MAIN_ADDR=${GENSCALE_MAIN_ADDR:-$(genscale_main_address)}
    # Ports 20000-29999, a pure function of the job id: every node derives the same one, a requeued
    # job gets its old one back, and it stays clear of the kernel's ephemeral range (32768+).
    export GENSCALE_MAIN_PORT=${GENSCALE_MAIN_PORT:-$(( 20000 + SLURM_JOB_ID % 10000 ))}
    # Recent torch reads this: how long torchrun, once sent SIGTERM, lets its workers finish
    # before SIGKILL (default 30 s); SLURM's KillWait bounds it anyway.
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-100}
    # The requeue count, for the trainer (it may record it) and for this log.
    export SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}
    _genscale_log "job ${GENSCALE_JOB} SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT}" \
        "nodes ${SLURM_JOB_NODELIST} (${SLURM_NNODES:-1}), main process ${GENSCALE_MAIN_ADDR}:${GENSCALE_MAIN_PORT}"
    _genscale_log "$*"

    _genscale_stopping=0
    _genscale_requeue=0
    _genscale_last_forward=0
    _genscale_status_prepare
    trap _genscale_on_usr1 USR1
    trap _genscale_on_term TERM
    local cpus=()
    # srun does not inherit --cpus-per-task from sbatch (SLURM >= 22.05): pass it on, or the
    # step would be confined to one CPU per node where tasks are bound.
    if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then cpus=(--cpus-per-task "$SLURM_CPUS_PER_TASK"); fi
    srun --nodes "${SLURM_NNODES:-1}" --ntasks-per-node 1 "${cpus[@]}" --kill-on-bad-exit=1 \
        bash "$GENSCALE_ROOT/slurm/launch_node.sh" "$@" &
    local step=$! rc=0
    while kill -0 "$step" 2>/dev/null; do
        if (( _genscale_stopping )); then
            # A warning that reached a trainer before it installed its handler is lost: repeat it.
            if (( _genscale_requeue && SECONDS - _genscale_last_forward >= 15 )); then _genscale_forward; fi
            sleep 1 &
            wait $! 2>/dev/null
        else
            wait "$step"   # returns early when a trap runs
            rc=$?
        fi
    done
    wait "$step" 2>/dev/null
    local last=$?
    (( last != 127 )) && rc=$last
    if _genscale_status_finished && (( _genscale_requeue )); then
        # The warning (or the time limit) came after the last step: requeued, the job would only
        # wait in the queue, start, and find nothing to do.
        _genscale_log "the command finished (the step ended with exit code $rc), so no requeue"
        _genscale_requeue=0
    fi
    if (( _genscale_requeue )); then
        _genscale_log "the step stopped (exit $rc); requeueing job ${GENSCALE_JOB} to resume from its checkpoint"
        trap '' TERM   # the requeue terminates this shell; nothing is left to do
        if ! scontrol requeue "$GENSCALE_JOB"; then
            # e.g. a job submitted with --no-requeue: exit 0 would mark an unfinished run COMPLETED
            # (and start the jobs that wait on it with --dependency=afterok)
            _genscale_log "error: job ${GENSCALE_JOB} could not be requeued; submit the same command again to resume from its checkpoint"
            exit 1
        fi
        exit 0
    fi
    _genscale_log "the step ended with exit code $rc"
    exit "$rc"
}
