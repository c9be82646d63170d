# Shared set-up for the SLURM job scripts (sourced, not run). Chooses GPUs or CPU per node,
# the first node as main process, and a port derived from the job id.
set -euo pipefail

REPO_DIR=${MNIST_DIST_DIR:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$REPO_DIR"
# Use the project's virtualenv when there is one (make install creates it).
if [ -z "${VIRTUAL_ENV:-}" ] && [ -x .venv/bin/accelerate ]; then
    export PATH="$REPO_DIR/.venv/bin:$PATH"
fi

NNODES=${SLURM_NNODES:-1}
# The first node of the allocation; MAIN_ADDR overrides it (e.g. its name on a faster network).
if [ -z "${MAIN_ADDR:-}" ]; then
    MAIN_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n 1 || true)
fi
MAIN_ADDR=${MAIN_ADDR:-localhost}

# A port per job, so two jobs sharing a node do not collide (consecutive job ids get
# different ports), and below the kernel's ephemeral range, where outgoing connections
# take their local ports and could hold it already. MAIN_PORT overrides it.
main_port() {
    local low=32768 high=60999 base=10000 job=${SLURM_JOB_ID:-0}
    if [ -r /proc/sys/net/ipv4/ip_local_port_range ]; then
        read -r low high < /proc/sys/net/ipv4/ip_local_port_range
    fi
    if [ "$low" -gt $((base + 1000)) ]; then
        echo $((base + job % (low - base)))
    elif [ $((65535 - high)) -ge 1000 ]; then
        echo $((high + 1 + job % (65535 - high)))
    else
        echo "mnist-dist: the ephemeral port range ($low-$high) leaves no port of its own; set MAIN_PORT" >&2
        echo $((base + job % 20000))
    fi
}
MAIN_PORT=${MAIN_PORT:-$(main_port)}
# Start-up bound, in seconds: the nodes meet first (mnist-dist rendezvous), and the
# launcher's own rendezvous gives up after as long (torch's default is 10 minutes, then a retry).
RENDEZVOUS_TIMEOUT=${RENDEZVOUS_TIMEOUT:-120}

# GPUs on this node: SLURM's count if it allocated some, else CUDA_VISIBLE_DEVICES, else
# nvidia-smi. An nvidia-smi that fails or finds no device means none, and says so.
gpus_on_node() {
    if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then echo "$SLURM_GPUS_ON_NODE"; return; fi
    if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
        case "$CUDA_VISIBLE_DEVICES" in
            "" | -1 | NoDevFiles) echo 0 ;;
            *) echo "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c . || true ;;
        esac
        return
    fi
    if ! command -v nvidia-smi >/dev/null 2>&1; then echo 0; return; fi
    local listing count
    if ! listing=$(nvidia-smi -L 2>&1); then
        echo "mnist-dist: nvidia-smi failed (${listing%%$'\n'*}); no GPU on $(hostname), using CPU processes" >&2
        echo 0
        return
    fi
    count=$(printf '%s\n' "$listing" | grep -c '^GPU [0-9]' || true)
    if [ "$count" -eq 0 ]; then
        echo "mnist-dist: nvidia-smi lists no GPU (${listing%%$'\n'*}); using CPU processes" >&2
    fi
    echo "$count"
}
# Arrays that may be empty (DEVICE_ARGS, JOB_STEP) are expanded as ${A[@]+"${A[@]}"}: bash
# before 4.4 (older cluster OSes) calls an empty "${A[@]}" unbound under set -u.
GPUS=$(gpus_on_node)
if [ "$GPUS" -gt 0 ]; then
    PROCS_PER_NODE=${PROCS_PER_NODE:-$GPUS}
    LAUNCH_CONFIG=${LAUNCH_CONFIG:-configs/accelerate/multi_gpu.yaml}
    DEVICE_ARGS=()
else
    # No GPU: CPU processes over gloo, one per node unless PROCS_PER_NODE says otherwise.
    PROCS_PER_NODE=${PROCS_PER_NODE:-1}
    LAUNCH_CONFIG=${LAUNCH_CONFIG:-configs/accelerate/cpu.yaml}
    DEVICE_ARGS=(--cpu)
fi
# Threads per process: the CPUs of this task (one task per node) shared by the node's processes.
cpus_of_task() {
    if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then echo "$SLURM_CPUS_PER_TASK"
    elif [ -n "${SLURM_CPUS_ON_NODE:-}" ]; then echo "$SLURM_CPUS_ON_NODE"
    else nproc 2>/dev/null || echo 1
    fi
}
THREADS=$(( $(cpus_of_task) / PROCS_PER_NODE ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( THREADS > 0 ? THREADS : 1 ))}

# Preemption. SLURM sends SIGUSR1 (#SBATCH --signal) before the time limit; depending on how
# the cluster tracks processes it reaches every process of the job step or only the
# launcher. The launcher must pass it on to the training processes and outlive them while
# they save a checkpoint. `accelerate launch` runs torch's elastic agent, which reads its
# options from PET_* variables: SIGUSR1 joins the signals it forwards to the workers, and
# it waits up to PET_SHUTDOWN_TIMEOUT seconds for them to exit (less than the 120 s notice).
# (TORCHELASTIC_SIGNALS_TO_HANDLE would not do: the agent overwrites it with this option.)
export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
export PET_SHUTDOWN_TIMEOUT=${PET_SHUTDOWN_TIMEOUT:-100}
# Outside a SLURM job (running a script with bash to try it) there is no job step to start.
if [ -n "${SLURM_JOB_ID:-}" ]; then JOB_STEP=(srun --ntasks=1); else JOB_STEP=(); fi
RESTART_NOTE=""
if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then
    RESTART_NOTE=" (restart $SLURM_RESTART_COUNT: resuming from the newest checkpoint)"
fi
# In-job restarts: after a lost or stalled rank the launcher restarts the workers up to
# MAX_RESTARTS times, and they resume from the newest checkpoint (an error that would recur,
# such as a bad config, ends the job at once instead). 0: the job ends, SLURM may requeue it.
MAX_RESTARTS=${MAX_RESTARTS:-0}
export NNODES MAIN_ADDR MAIN_PORT PROCS_PER_NODE LAUNCH_CONFIG RENDEZVOUS_TIMEOUT MAX_RESTARTS
