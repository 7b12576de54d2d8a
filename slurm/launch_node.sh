#!/usr/bin/env bash
# One copy per node, started by `srun` from slurm/common.sh: launches this node's share of the
# job with `accelerate launch` (torchrun underneath) and becomes it (exec).
#
#   launch_node.sh SCRIPT [SCRIPT ARGUMENTS...]
#
# Processes per node = the GPUs SLURM gave this node, or one gloo CPU process when it gave none.
# Inputs from the batch script: GENSCALE_MAIN_ADDR, GENSCALE_MAIN_PORT; from SLURM: SLURM_NNODES,
# SLURM_NODEID, SLURM_GPUS_ON_NODE and friends. Optional: GENSCALE_ACCELERATE_CONFIG (a YAML from
# accelerate_configs/, e.g. multi_node.yaml; the allocation's sizes override its own),
# GENSCALE_PROCS_PER_NODE, GENSCALE_MIXED_PRECISION (default bf16 on GPUs, no on CPUs),
# GENSCALE_DRY_RUN=1 (print the command instead of running it).
set -euo pipefail

gpus_on_node() {
    # SLURM_GPUS_ON_NODE is set when GPUs were allocated (--gpus*, --gres=gpu:N); the others
    # cover older or differently configured sites. "a100:4" -> 4; "a100:2,v100:1" -> 3 (each
    # entry is [type:]count); "0,1,2" -> 3.
    local n=${SLURM_GPUS_ON_NODE:-}
    if [[ -z $n && -n ${SLURM_GPUS_PER_NODE:-} ]]; then
        local entries entry count
        IFS=, read -ra entries <<< "$SLURM_GPUS_PER_NODE"
        n=0
        for entry in "${entries[@]}"; do
            count=${entry##*:}
            if [[ $count =~ ^[0-9]+$ ]]; then n=$(( n + 10#$count )); else n=x; break; fi
        done
    fi
    if [[ -z $n && -n ${SLURM_JOB_GPUS:-} ]]; then
        local ids
        IFS=, read -ra ids <<< "$SLURM_JOB_GPUS"
        n=${#ids[@]}
    fi
    [[ $n =~ ^[0-9]+$ ]] || n=0
    echo "$n"
}

if (( $# < 1 )); then
    echo "usage: launch_node.sh SCRIPT [ARGS...]" >&2
    exit 2
fi
script=$1
shift

gpus=$(gpus_on_node)
per_node=${GENSCALE_PROCS_PER_NODE:-$(( gpus > 0 ? gpus : 1 ))}
if ! [[ $per_node =~ ^[1-9][0-9]*$ ]]; then
    echo "error: GENSCALE_PROCS_PER_NODE must be a positive whole number; got '$per_node'" >&2
    exit 2
fi
nodes=${SLURM_NNODES:-1}
rank=${SLURM_NODEID:-0}
world=$(( per_node * nodes ))
cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}}
threads=$(( cpus / per_node > 0 ? cpus / per_node : 1 ))
if (( gpus == 0 )); then
    # genscale sizes its CPU thread pool from GENSCALE_THREADS; default to this node's allocation,
    # not to every core of the machine.
    export GENSCALE_THREADS=${GENSCALE_THREADS:-$threads}
fi

launch=(accelerate launch --num_processes "$world" --num_machines "$nodes"
        --num_cpu_threads_per_process "$threads")
if [[ -n ${GENSCALE_ACCELERATE_CONFIG:-} ]]; then
    # The YAML picks the strategy (DDP; genscale refuses FSDP) and precision; the allocation decides the sizes.
    launch+=(--config_file "$GENSCALE_ACCELERATE_CONFIG")
else
    launch+=(--mixed_precision "${GENSCALE_MIXED_PRECISION:-$( (( gpus > 0 )) && echo bf16 || echo no )}"
             --dynamo_backend no)
    # Without a GPU, --multi_gpu still starts N processes: genscale's Accelerator(cpu=True) makes
    # them one gloo job. A single process needs no process group at all.
    if (( world > 1 )); then launch+=(--multi_gpu); fi
fi
if (( world > 1 )); then
    launch+=(--machine_rank "$rank" --main_process_ip "${GENSCALE_MAIN_ADDR:?}"
             --main_process_port "${GENSCALE_MAIN_PORT:?}" --rdzv_backend static --same_network)
fi

echo "genscale: node ${SLURMD_NODENAME:-$(hostname -s)} machine_rank $rank of $nodes: $per_node process(es)" \
     "($gpus GPU(s), $threads thread(s) each), world size $world"
if [[ ${GENSCALE_DRY_RUN:-0} == 1 ]]; then
    printf '%q ' "${launch[@]}" "$script" "$@"
    echo
    exit 0
fi
# The batch script stops the step with USR1, sent to every process of it: the launcher (torchrun
# or accelerate's single-process launcher) would die of it and orphan the trainers, so it ignores
# USR1; the trainers install their own handler (until then they inherit "ignored": the batch
# script repeats its request). The single-process launcher also dies of SIGTERM, so it ignores
# that too; torchrun handles SIGTERM itself and passes it on.
trap '' USR1
if (( world == 1 )); then trap '' TERM; fi
exec "${launch[@]}" "$script" "$@"
