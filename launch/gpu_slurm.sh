#!/usr/bin/env bash
# Multi-node GPU training of jaxpref under SLURM. Writes a batch script that uses srun to start
# one `python -m jaxpref.train` per node (or per GPU), each given the coordinator address, the
# process count and its own process id, then submits it with sbatch (or, with --in-allocation,
# runs it inside the current salloc allocation). --dry-run prints the batch script and the
# commands and runs nothing. See `launch/gpu_slurm.sh --help` and docs/launch.md.
set -euo pipefail

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
source "$LAUNCH_DIR/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/gpu_slurm.sh --config PATH --workdir DIR [options]
                           [--config.KEY=VALUE ...] [-- train flags]

Writes a batch script that starts one jaxpref.train process per node (or per GPU) with srun,
and submits it with sbatch. Every process gets
  --coordinator_address=FIRST_NODE:PORT --num_processes=$SLURM_NTASKS --process_id=$SLURM_PROCID

Training
  --config PATH          config file, relative to --chdir, e.g. configs/my_config.py
  --workdir DIR          checkpoints and metrics; must be shared by all nodes (NFS,
                         Lustre, or gs://...)
  --config.KEY=VALUE     config overrides, passed (quoted) to jaxpref.train
  -- ARGS                everything after -- is passed to jaxpref.train as is
  --python PATH          Python with jaxpref[cuda] installed (default: python), e.g.
                         .venv/bin/python
  --env KEY=VALUE        export this in the batch script; repeatable
  --setup LINE           a shell line run before srun, e.g. 'module load cuda/12.4'
                         or 'source .venv/bin/activate'; repeatable

Resources
  --nodes N              nodes (default 1)
  --gpus-per-node N      GPUs per node (default 8)
  --process-per UNIT     node: one process per node that drives all its GPUs (default)
                         gpu: one process per GPU (CUDA_VISIBLE_DEVICES=$SLURM_LOCALID)
  --port N|auto          coordinator port on the first node (default auto:
                         20000 + SLURM_JOB_ID % 20000, so jobs sharing a node differ)
  --job-name NAME        (default: jaxpref-CONFIG_NAME)
  --partition P, --account A, --time T
                         the sbatch options of the same name (sbatch also reads
                         SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_TIMELIMIT)
  --sbatch-arg ARG       any other sbatch option, e.g. --sbatch-arg=--exclusive;
                         repeatable

Where things go
  --chdir DIR            the job's working directory, your jaxpref checkout
                         (default: the current directory)
  --log-dir DIR          batch script and SLURM output %x-%j.out (default slurm_logs,
                         relative to --chdir)
  --script PATH          write the batch script here instead (default
                         LOG_DIR/JOB_NAME.sbatch)

Mode
  --in-allocation        run the script with bash inside the current allocation
                         (salloc) instead of submitting it with sbatch
  --dry-run              print the batch script and every command, prefixed with
                         "[dry-run] ", and run nothing
  -h, --help             show this help

Example
  launch/gpu_slurm.sh --nodes 2 --gpus-per-node 8 --partition gpu --time 12:00:00 \
      --python .venv/bin/python --config configs/my_config.py \
      --workdir /shared/runs/rm1 --config.seed=1
EOF
}

# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------

CONFIG=''
WORKDIR=''
PYTHON=python
NODES=1
GPUS_PER_NODE=8
PROCESS_PER=node
PORT=auto
JOB_NAME=''
PARTITION=''
ACCOUNT=''
TIME_LIMIT=''
CHDIR=$PWD
LOG_DIR=slurm_logs
SCRIPT=''
IN_ALLOCATION=0
SBATCH_ARGS=()
ENV_ASSIGNMENTS=()
SETUP_LINES=()
TRAIN_ARGS=()

while (($#)); do
  SHIFT_BY=1
  case $1 in
    -h | --help)
      usage
      exit 0
      ;;
    --dry-run) DRY_RUN=1 ;;
    --config | --config=*) take_value "$@" && CONFIG=$VALUE ;;
    --workdir | --workdir=*) take_value "$@" && WORKDIR=$VALUE ;;
    --python | --python=*) take_value "$@" && PYTHON=$VALUE ;;
    --env | --env=*)
      take_value "$@"
      check_env_assignment "$VALUE" --env
      ENV_ASSIGNMENTS+=("$VALUE")
      ;;
    --setup | --setup=*) take_value "$@" && SETUP_LINES+=("$VALUE") ;;
    --nodes | --nodes=*) take_value "$@" && NODES=$VALUE ;;
    --gpus-per-node | --gpus-per-node=*) take_value "$@" && GPUS_PER_NODE=$VALUE ;;
    --process-per | --process-per=*) take_value "$@" && PROCESS_PER=$VALUE ;;
    --port | --port=*) take_value "$@" && PORT=$VALUE ;;
    --job-name | --job-name=*) take_value "$@" && JOB_NAME=$VALUE ;;
    --partition | --partition=*) take_value "$@" && PARTITION=$VALUE ;;
    --account | --account=*) take_value "$@" && ACCOUNT=$VALUE ;;
    --time | --time=*) take_value "$@" && TIME_LIMIT=$VALUE ;;
    --sbatch-arg=*) SBATCH_ARGS+=("${1#*=}") ;;
    --sbatch-arg)
      # Its value is itself an option (--exclusive), which take_value would refuse.
      (($# >= 2)) || die "option --sbatch-arg needs a value (see --help)"
      SBATCH_ARGS+=("$2")
      SHIFT_BY=2
      ;;
    --chdir | --chdir=*) take_value "$@" && CHDIR=$VALUE ;;
    --log-dir | --log-dir=*) take_value "$@" && LOG_DIR=$VALUE ;;
    --script | --script=*) take_value "$@" && SCRIPT=$VALUE ;;
    --in-allocation) IN_ALLOCATION=1 ;;
    --config.*)
      check_override "$1"
      TRAIN_ARGS+=("$1")
      ;;
    --)
      shift
      TRAIN_ARGS+=("$@")
      break
      ;;
    -*) die "unknown option ${1%%=*} (see --help)" ;;
    *) die "unexpected argument '$1' (see --help)" ;;
  esac
  shift "$SHIFT_BY"
done

require_value "$CONFIG" --config
require_value "$WORKDIR" --workdir
require_positive_int "$NODES" --nodes
require_positive_int "$GPUS_PER_NODE" --gpus-per-node
case $PROCESS_PER in
  node) TASKS_PER_NODE=1 ;;
  gpu) TASKS_PER_NODE=$GPUS_PER_NODE ;;
  *) die "--process-per must be node or gpu, got '$PROCESS_PER'" ;;
esac
if [[ $PORT != auto ]]; then
  require_positive_int "$PORT" --port
  ((PORT < 65536)) || die "--port must be below 65536, got $PORT"
fi
[[ -n $JOB_NAME ]] || JOB_NAME=jaxpref-$(config_stem "$CONFIG")
name_re='^[A-Za-z0-9_.-]+$'
if [[ ! $JOB_NAME =~ $name_re ]]; then
  die "--job-name '$JOB_NAME' may only contain letters, digits, '_', '.', '-'"
fi
for line in ${SETUP_LINES[@]+"${SETUP_LINES[@]}"}; do
  [[ $line != *$'\n'* ]] || die "--setup takes one line; repeat --setup for more"
done

[[ $CHDIR == /* ]] || CHDIR=$PWD/$CHDIR
[[ $LOG_DIR == /* ]] || LOG_DIR=$CHDIR/$LOG_DIR
[[ -n $SCRIPT ]] || SCRIPT=$LOG_DIR/$JOB_NAME.sbatch

config_path=$(config_file "$CONFIG")
[[ $config_path == /* ]] || config_path=$CHDIR/$config_path
if [[ ! -f $config_path ]]; then
  # A dry run may be prepared away from the cluster's checkout, so there it only warns.
  if ((DRY_RUN)); then
    warn "config file $config_path not found"
  else
    die "config file $config_path not found (--config is relative to --chdir $CHDIR)"
  fi
fi

# ---------------------------------------------------------------------------------------------
# The batch script
# ---------------------------------------------------------------------------------------------

batch_script() {
  local arg line
  echo '#!/usr/bin/env bash'
  echo "#SBATCH --job-name=$JOB_NAME"
  echo "#SBATCH --nodes=$NODES"
  echo "#SBATCH --ntasks-per-node=$TASKS_PER_NODE"
  echo "#SBATCH --gpus-per-node=$GPUS_PER_NODE"
  echo "#SBATCH --chdir=$CHDIR"
  echo "#SBATCH --output=$LOG_DIR/%x-%j.out"
  if [[ -n $PARTITION ]]; then echo "#SBATCH --partition=$PARTITION"; fi
  if [[ -n $ACCOUNT ]]; then echo "#SBATCH --account=$ACCOUNT"; fi
  if [[ -n $TIME_LIMIT ]]; then echo "#SBATCH --time=$TIME_LIMIT"; fi
  for arg in ${SBATCH_ARGS[@]+"${SBATCH_ARGS[@]}"}; do
    echo "#SBATCH $arg"
  done
  echo "# Written by launch/gpu_slurm.sh: $NODES node(s), one jaxpref.train per $PROCESS_PER,"
  echo '# joined by jax.distributed through a coordinator on the first node.'
  echo 'set -euo pipefail'
  echo "cd $(quote_arg "$CHDIR")"
  echo
  echo 'export PYTHONUNBUFFERED=1'
  for arg in ${ENV_ASSIGNMENTS[@]+"${ENV_ASSIGNMENTS[@]}"}; do
    echo "export $(quote_arg "$arg")"
  done
  for line in ${SETUP_LINES[@]+"${SETUP_LINES[@]}"}; do
    echo "$line"
  done
  echo
  echo '# The first node of the allocation hosts the coordinator; every process connects to it.'
  # shellcheck disable=SC2016
  echo 'coordinator_host=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)'
  if [[ $PORT == auto ]]; then
    echo '# A port per job, so that two jobs whose first node is the same do not collide.'
    # shellcheck disable=SC2016
    echo 'coordinator_port=$((20000 + SLURM_JOB_ID % 20000))'
  else
    echo "coordinator_port=$PORT"
  fi
  echo
  echo 'train_cmd=('
  echo "  $(shell_join "$PYTHON" -m jaxpref.train)"
  for arg in "--config=$CONFIG" "--workdir=$WORKDIR" ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}; do
    echo "  $(quote_arg "$arg")"
  done
  # shellcheck disable=SC2016
  echo '  --coordinator_address="$coordinator_host:$coordinator_port"'
  echo ')'
  echo
  # The task script is in single quotes: SLURM_NTASKS, SLURM_PROCID and SLURM_LOCALID differ per
  # task, so each task's own shell must expand them; "$@" hands on train_cmd word for word.
  # shellcheck disable=SC2016
  local task_script='exec "$@" --num_processes="$SLURM_NTASKS" --process_id="$SLURM_PROCID"'
  if [[ $PROCESS_PER == gpu ]]; then
    echo '# One process per GPU: each task sees only GPU number SLURM_LOCALID of its node.'
    # shellcheck disable=SC2016
    task_script='export CUDA_VISIBLE_DEVICES="$SLURM_LOCALID"; '$task_script
  fi
  echo '# Each task adds its own process id; --kill-on-bad-exit stops all if one fails.'
  echo "# shellcheck disable=SC2016  # each task's own shell expands the single-quoted variables"
  echo "srun --nodes=$NODES --ntasks-per-node=$TASKS_PER_NODE --kill-on-bad-exit=1 --label \\"
  # shellcheck disable=SC2016
  echo "  bash -c '$task_script' jaxpref-task \"\${train_cmd[@]}\""
}

# ---------------------------------------------------------------------------------------------
# Write, then submit or run
# ---------------------------------------------------------------------------------------------

if ((IN_ALLOCATION)); then
  if ((DRY_RUN == 0)) && [[ -z ${SLURM_JOB_ID:-} ]]; then
    die "--in-allocation needs a SLURM allocation (SLURM_JOB_ID is unset; start one with salloc)"
  fi
  require_cmd srun "run this inside a SLURM allocation"
else
  require_cmd sbatch "run this on a SLURM login node"
fi

script_text=$(batch_script)
heredoc_end=END_OF_BATCH_SCRIPT
[[ $script_text != *"$heredoc_end"* ]] || die "a --setup line contains $heredoc_end"

run_cmd mkdir -p "$LOG_DIR"
if ((DRY_RUN)); then
  printf "%scat > %s <<'%s'\n%s\n%s\n" "$DRY_RUN_PREFIX" "$(quote_arg "$SCRIPT")" "$heredoc_end" \
    "$script_text" "$heredoc_end"
else
  printf '%s\n' "$script_text" >"$SCRIPT"
  printf '+ wrote %s\n' "$SCRIPT" >&2
fi

if ((IN_ALLOCATION)); then
  run_cmd bash "$SCRIPT"
else
  run_cmd sbatch "$SCRIPT"
fi
