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
MAIN_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null | head -n 1 || true)
MAIN_ADDR=${MAIN_ADDR:-localhost}
# A port per job, so two jobs sharing a node do not collide; override with MAIN_PORT.
MAIN_PORT=${MAIN_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
# Start-up bound, in seconds: the nodes meet first (python -m mnist_dist.rendezvous), and the
# launcher's own rendezvous gives up after as long (torch's default is 10 minutes, then a retry).
RENDEZVOUS_TIMEOUT=${RENDEZVOUS_TIMEOUT:-120}

# GPUs on this node: SLURM's count if it allocated some, else nvidia-smi, else none.
gpus_on_node() {
    if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then echo "$SLURM_GPUS_ON_NODE"; return; fi
    if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L 2>/dev/null | wc -l; return; fi
    echo 0
}
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
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

# Preemption. SLURM sends SIGUSR1 (#SBATCH --signal) to every process of the job step.
# The launcher must outlive the training processes while they save a checkpoint: a
# single-process `accelerate launch` ignores SIGUSR1 (the scripts' trap, kept across exec),
# and torchrun's agent, which takes over its own signal handling, is told to pass SIGUSR1
# on to the workers like SIGTERM and to wait for them. The training processes act on it.
export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
# Outside a SLURM job (running a script with bash to try it) there is no job step to start.
if [ -n "${SLURM_JOB_ID:-}" ]; then JOB_STEP=(srun --ntasks=1); else JOB_STEP=(); fi
RESTART_NOTE=""
if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then
    RESTART_NOTE=" (restart $SLURM_RESTART_COUNT: resuming from the newest checkpoint)"
fi
export NNODES MAIN_ADDR MAIN_PORT PROCS_PER_NODE LAUNCH_CONFIG RENDEZVOUS_TIMEOUT
