#!/usr/bin/env bash
# Cloud TPU VM lifecycle for jaxpref: create a slice, set up every worker, start a config on all
# workers at once, follow logs, stop, delete. Each command is echoed before it runs; --dry-run
# prints the commands and runs nothing. See `launch/tpu_vm.sh --help` and docs/launch.md.
set -euo pipefail

LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=common.sh
source "$LAUNCH_DIR/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh COMMAND [options] [--config.KEY=VALUE ...] [-- train flags]

Commands
  create   create the TPU VM (with --queued: a queued resource that provisions it)
  setup    on every worker: fetch jaxpref, install it with TPU jax, copy data from GCS
  run      start `python -m jaxpref.train` on every worker at once, in the background
  logs     show (follow) the training log of one worker
  stop     stop the training processes that `run` started, on every worker
  status   describe the TPU VM (with --queued: the queued resource)
  delete   delete the TPU VM (with --queued: the queued resource and its VM)

Options of every command (a flag wins over the environment variable in brackets)
  --name NAME         TPU VM name                                      [TPU_NAME]
  --zone ZONE         e.g. us-central2-b                               [TPU_ZONE]
  --project PROJECT   GCP project (default: gcloud's configured one)   [TPU_PROJECT]
  --queued            the VM belongs to a queued resource of the same name
  --dry-run           print every command, prefixed with "[dry-run] ", and run nothing
  -h, --help          show this help

create
  --type TYPE         accelerator type, e.g. v4-8, v4-32, v5litepod-16, v5p-8, v6e-8
                                                                       [TPU_TYPE]
  --runtime VERSION   TPU software version; default from --type:       [TPU_RUNTIME]
                      v2/v3/v4 tpu-ubuntu2204-base, v5litepod v2-alpha-tpuv5-lite,
                      v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
  --spot              Spot capacity (cheaper; can be preempted at any time)
  --best-effort       best-effort queued resource (with --queued; uses `gcloud alpha`)

setup   (every step runs on --worker=all)
  --repo URL          git URL of jaxpref to fetch on every worker      [JAXPREF_REPO]
  --ref REF           branch, tag or commit of --repo (default: its HEAD)
  --local DIR         instead of --repo: copy this local checkout (no .venv, .git)
  --python-version V  Python of the workers' venv, fetched by uv (default 3.12; TPU
                      images ship Python 3.10 and jaxpref needs >= 3.11)
  --data GS_PATH      copy a GCS folder or file (data, base checkpoints) into
                      --data-dir on every worker; repeatable
  --no-check          skip the final check that every worker sees the TPU chips

run     (every worker starts the same command with --distributed: on a TPU VM,
         jax.distributed.initialize() reads the coordinator, process count and
         process id from the VM's metadata)
  --config PATH       config file, relative to the checkout, e.g. configs/my_config.py
  --workdir DIR       checkpoints and metrics; use gs://... so all workers share it
  --run-name NAME     names the log and pid files (default: the config's file name)
  --env KEY=VALUE     extra environment for the training processes; repeatable
                      (always set: PYTHONUNBUFFERED=1 JAX_PLATFORMS=tpu)
  --config.KEY=VALUE  config overrides, passed to jaxpref.train (quoted for the
                      worker's shell, so values may contain spaces; a value starting
                      with ~/ is in the worker's home; relative paths are relative to
                      the checkout)
  -- ARGS             everything after -- is passed to jaxpref.train as is

logs
  --worker N          which worker, or all (default 0)
  --run-name NAME     which run (default: the newest log on that worker)
  --lines N           lines of history to show (default 100)
  --no-follow         print the lines and exit instead of following the log

stop
  --run-name NAME     which run (default: every run that `run` started)

delete
  --yes               do not ask for confirmation

Worker layout (change with --remote-dir, --data-dir, --log-dir):
  ~/jaxpref            checkout, with its venv in ~/jaxpref/.venv
  ~/jaxpref_data       what --data copied
  ~/jaxpref_logs       RUN.HOSTNAME.log and RUN.HOSTNAME.pid of every run

Example
  export TPU_NAME=rm-v4 TPU_ZONE=us-central2-b TPU_TYPE=v4-32
  launch/tpu_vm.sh create
  launch/tpu_vm.sh setup --repo https://github.com/ORG/jaxpref --data gs://BUCKET/preferences
  launch/tpu_vm.sh run --config configs/my_config.py --workdir gs://BUCKET/runs/rm1 \
      --config.seed=1
  launch/tpu_vm.sh logs --worker 0
  launch/tpu_vm.sh delete
EOF
}

# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------

COMMAND=''
NAME=${TPU_NAME:-}
ZONE=${TPU_ZONE:-}
PROJECT=${TPU_PROJECT:-}
ACCELERATOR_TYPE=${TPU_TYPE:-}
RUNTIME=${TPU_RUNTIME:-}
QUEUED=0
SPOT=0
BEST_EFFORT=0
REPO=${JAXPREF_REPO:-}
REF=HEAD
LOCAL_DIR=''
PYTHON_VERSION=3.12
CHECK=1
CONFIG=''
WORKDIR=''
RUN_NAME=''
WORKER=0
LINES=100
FOLLOW=1
ASSUME_YES=0
# Worker paths keep their ~ so that the worker's shell expands it to the worker's home.
# shellcheck disable=SC2088
REMOTE_DIR='~/jaxpref'
# shellcheck disable=SC2088
DATA_DIR='~/jaxpref_data'
# shellcheck disable=SC2088
LOG_DIR='~/jaxpref_logs'
DATA_SOURCES=()
ENV_ASSIGNMENTS=()
TRAIN_ARGS=()
USED_OPTIONS=' '

while (($#)); do
  SHIFT_BY=1
  option=${1%%=*}
  case $1 in
    -h | --help)
      usage
      exit 0
      ;;
    --dry-run) DRY_RUN=1 ;;
    --name | --name=*) take_value "$@" && NAME=$VALUE ;;
    --zone | --zone=*) take_value "$@" && ZONE=$VALUE ;;
    --project | --project=*) take_value "$@" && PROJECT=$VALUE ;;
    --queued) QUEUED=1 ;;
    --type | --type=*) take_value "$@" && ACCELERATOR_TYPE=$VALUE ;;
    --runtime | --runtime=*) take_value "$@" && RUNTIME=$VALUE ;;
    --spot) SPOT=1 ;;
    --best-effort) BEST_EFFORT=1 ;;
    --repo | --repo=*) take_value "$@" && REPO=$VALUE ;;
    --ref | --ref=*) take_value "$@" && REF=$VALUE ;;
    --local | --local=*) take_value "$@" && LOCAL_DIR=$VALUE ;;
    --python-version | --python-version=*) take_value "$@" && PYTHON_VERSION=$VALUE ;;
    --data | --data=*) take_value "$@" && DATA_SOURCES+=("$VALUE") ;;
    --no-check) CHECK=0 ;;
    --remote-dir | --remote-dir=*) take_value "$@" && REMOTE_DIR=$VALUE ;;
    --data-dir | --data-dir=*) take_value "$@" && DATA_DIR=$VALUE ;;
    --log-dir | --log-dir=*) take_value "$@" && LOG_DIR=$VALUE ;;
    --config | --config=*) take_value "$@" && CONFIG=$VALUE ;;
    --workdir | --workdir=*) take_value "$@" && WORKDIR=$VALUE ;;
    --run-name | --run-name=*) take_value "$@" && RUN_NAME=$VALUE ;;
    --env | --env=*)
      take_value "$@"
      check_env_assignment "$VALUE" --env
      ENV_ASSIGNMENTS+=("$VALUE")
      ;;
    --worker | --worker=*) take_value "$@" && WORKER=$VALUE ;;
    --lines | --lines=*) take_value "$@" && LINES=$VALUE ;;
    --no-follow) FOLLOW=0 ;;
    --yes) ASSUME_YES=1 ;;
    --config.*)
      check_override "$1"
      option=--config.KEY
      TRAIN_ARGS+=("$1")
      ;;
    --)
      shift
      USED_OPTIONS+='-- '
      TRAIN_ARGS+=("$@")
      break
      ;;
    -*) die "unknown option $option (see --help)" ;;
    *)
      [[ -z $COMMAND ]] || die "unexpected argument '$1' (see --help)"
      COMMAND=$1
      option=''
      ;;
  esac
  [[ -z $option ]] || USED_OPTIONS+="$option "
  shift "$SHIFT_BY"
done

allow_options() {
  # Rejects options that the command would silently ignore (usually a typo or a wrong command).
  local allowed=" --name --zone --project --queued --dry-run $* " used
  for used in $USED_OPTIONS; do
    [[ $allowed == *" $used "* ]] || die "$used does not apply to '$COMMAND' (see --help)"
  done
}

require_slice() {
  require_value "$NAME" --name TPU_NAME
  require_value "$ZONE" --zone TPU_ZONE
  require_cmd gcloud "install the Google Cloud SDK, https://cloud.google.com/sdk/docs/install"
}

check_run_name() {
  local name_re='^[A-Za-z0-9_.-]+$'
  [[ $1 =~ $name_re ]] || die "--run-name '$1' may only contain letters, digits, '_', '.', '-'"
}

# ---------------------------------------------------------------------------------------------
# gcloud
# ---------------------------------------------------------------------------------------------

gcloud_run() {
  run_cmd gcloud "$@" ${PROJECT:+"--project=$PROJECT"}
}

on_workers() {
  # Usage: on_workers WORKER REMOTE_COMMAND. WORKER is a number or `all`; with `all` gcloud runs
  # the command on every worker in parallel, which is what starting a multi-host program needs.
  gcloud_run compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker="$1" --command="$2"
}

remote_word() {
  # Quotes one word of the training command for the worker's shell. A shell does not expand
  # `--flag=~/x` (not an assignment), so a value starting with ~/ becomes $HOME/x, which it does.
  local word=$1
  local home_re='^(-[-A-Za-z0-9_.]*=)~/(.*)$'
  if [[ $word =~ $home_re ]]; then
    # shellcheck disable=SC2016
    printf '%s$HOME/%s' "${BASH_REMATCH[1]}" "$(quote_word "${BASH_REMATCH[2]}")"
  else
    quote_arg "$word"
  fi
}

default_runtime() {
  case $1 in
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *)
      die "no default --runtime for --type $1; pass --runtime" \
        "(see: gcloud compute tpus tpu-vm versions list)"
      ;;
  esac
}

# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------

cmd_create() {
  allow_options --type --runtime --spot --best-effort
  require_value "$ACCELERATOR_TYPE" --type TPU_TYPE
  require_slice
  if ((SPOT && BEST_EFFORT)); then die "--spot and --best-effort exclude each other"; fi
  if ((BEST_EFFORT && !QUEUED)); then die "--best-effort needs --queued"; fi
  local runtime=$RUNTIME
  [[ -n $runtime ]] || runtime=$(default_runtime "$ACCELERATOR_TYPE")
  local capacity=()
  if ((SPOT)); then capacity=(--spot); fi
  if ((BEST_EFFORT)); then capacity=(--best-effort); fi
  if ((QUEUED)); then
    # --best-effort exists only in the alpha track of queued-resources.
    local track=()
    if ((BEST_EFFORT)); then track=(alpha); fi
    gcloud_run ${track[@]+"${track[@]}"} compute tpus queued-resources create "$NAME" \
      --node-id="$NAME" --zone="$ZONE" --accelerator-type="$ACCELERATOR_TYPE" \
      --runtime-version="$runtime" ${capacity[@]+"${capacity[@]}"}
  else
    gcloud_run compute tpus tpu-vm create "$NAME" --zone="$ZONE" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$runtime" ${capacity[@]+"${capacity[@]}"}
  fi
}

cmd_setup() {
  allow_options --repo --ref --local --python-version --data --data-dir --remote-dir --no-check
  require_slice
  if [[ -n $REPO && -n $LOCAL_DIR ]]; then die "--repo and --local exclude each other"; fi
  [[ -n $REPO || -n $LOCAL_DIR ]] || die "setup needs --repo URL (or JAXPREF_REPO) or --local DIR"
  if [[ -n $LOCAL_DIR && ! -f $LOCAL_DIR/pyproject.toml ]]; then
    die "--local $LOCAL_DIR is not a jaxpref checkout (no pyproject.toml)"
  fi
  local source
  for source in ${DATA_SOURCES[@]+"${DATA_SOURCES[@]}"}; do
    [[ $source == gs://* ]] || die "--data $source is not a gs:// path"
  done
  local dir
  dir=$(remote_path "$REMOTE_DIR")

  if [[ -n $REPO ]]; then
    # init + fetch of one ref works for branches, tags and commits alike, and a second setup
    # updates the checkout in place (its untracked .venv survives).
    on_workers all "$(join_by ' && ' \
      "git init --quiet $dir" \
      "git -C $dir fetch --quiet --depth=1 $(quote_arg "$REPO") $(quote_arg "$REF")" \
      "git -C $dir checkout --quiet --force FETCH_HEAD")"
  else
    local archive="${TMPDIR:-/tmp}/jaxpref-src-$NAME.tar.gz"
    run_cmd tar -czf "$archive" --exclude=.venv --exclude=.git --exclude=__pycache__ \
      --exclude='*.egg-info' --exclude=workdirs --exclude=runs -C "$LOCAL_DIR" .
    gcloud_run compute tpus tpu-vm scp "$archive" "$NAME:jaxpref-src.tar.gz" --zone="$ZONE" \
      --worker=all
    on_workers all "$(join_by ' && ' \
      "mkdir -p $dir" \
      "tar -xzf jaxpref-src.tar.gz -C $dir" \
      "rm jaxpref-src.tar.gz")"
  fi

  # TPU images ship Python 3.10; uv brings the requested Python and installs quickly.
  # shellcheck disable=SC2088  # the worker's shell expands these ~
  on_workers all "$(join_by ' && ' \
    "python3 -m pip install --user --quiet --upgrade uv" \
    "cd $dir" \
    "~/.local/bin/uv venv --quiet --allow-existing --python $(quote_arg "$PYTHON_VERSION") .venv" \
    '~/.local/bin/uv pip install --quiet --python .venv/bin/python -e ".[tpu]"')"

  local data_dir
  data_dir=$(remote_path "$DATA_DIR")
  for source in ${DATA_SOURCES[@]+"${DATA_SOURCES[@]}"}; do
    on_workers all "$(join_by ' && ' \
      "mkdir -p $data_dir" \
      "gcloud storage cp --recursive $(quote_arg "$source") $data_dir/")"
  done

  if ((CHECK)); then
    # All workers must run this at once: a multi-host TPU runtime waits for every host.
    local report='print(dict(host=socket.gethostname(), process=jax.process_index(),'
    report+=' local_devices=jax.local_device_count(), devices=jax.device_count()))'
    on_workers all "cd $dir && .venv/bin/python -c \"import jax, socket; $report\""
  fi
}

cmd_run() {
  allow_options --config --workdir --run-name --env --remote-dir --log-dir --config.KEY --
  require_value "$CONFIG" --config
  require_value "$WORKDIR" --workdir
  require_slice
  if [[ $WORKDIR != gs://* ]]; then
    warn "--workdir $WORKDIR is not on GCS; on a multi-host slice each worker then writes" \
      "only its own part of every checkpoint"
  fi
  local run_name=$RUN_NAME
  [[ -n $run_name ]] || run_name=$(config_stem "$CONFIG")
  check_run_name "$run_name"

  local dir log_dir train_cmd word
  dir=$(remote_path "$REMOTE_DIR")
  log_dir=$(remote_path "$LOG_DIR")
  train_cmd=$(shell_join env PYTHONUNBUFFERED=1 JAX_PLATFORMS=tpu \
    ${ENV_ASSIGNMENTS[@]+"${ENV_ASSIGNMENTS[@]}"} .venv/bin/python -m jaxpref.train)
  for word in "--config=$CONFIG" "--workdir=$WORKDIR" --distributed \
    ${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"}; do
    train_cmd+=" $(remote_word "$word")"
  done
  # --distributed: jaxpref.train's own detection looks for TPU_WORKER_HOSTNAMES, which GKE sets but
  # a TPU VM's ssh shell does not; jax.distributed.initialize() then reads the VM metadata.
  # $(hostname) and $! are expanded on each worker: one log and pid file per worker. nohup and the
  # redirections let the process outlive the ssh session that started it.
  # shellcheck disable=SC2016
  local log="$log_dir/$run_name."'$(hostname).log' pid="$log_dir/$run_name."'$(hostname).pid'
  # shellcheck disable=SC2016
  on_workers all "$(join_by ' && ' "mkdir -p $log_dir" "cd $dir" "{ $(join_by ' ' \
    "nohup $train_cmd > $log 2>&1 < /dev/null &" \
    "echo \$! > $pid;" \
    "echo \"\$(hostname): started jaxpref.train, pid \$!\"; }")")"
  printf '%s: follow worker 0 with: %s logs --name %s --zone %s --run-name %s\n' \
    "$PROG" "$0" "$(quote_arg "$NAME")" "$(quote_arg "$ZONE")" "$run_name" >&2
}

cmd_logs() {
  allow_options --worker --run-name --lines --no-follow --log-dir
  require_slice
  local worker_re='^([0-9]+|all)$'
  [[ $WORKER =~ $worker_re ]] || die "--worker must be a worker number or all, got '$WORKER'"
  require_positive_int "$LINES" --lines
  local log_dir tail_cmd="tail -n $LINES"
  log_dir=$(remote_path "$LOG_DIR")
  if ((FOLLOW)); then tail_cmd+=' -F'; fi
  if [[ -n $RUN_NAME ]]; then
    check_run_name "$RUN_NAME"
    # shellcheck disable=SC2016
    on_workers "$WORKER" "$tail_cmd $log_dir/$RUN_NAME."'$(hostname).log'
  else
    # shellcheck disable=SC2016
    on_workers "$WORKER" "$(join_by '; ' \
      'log=$(ls -t '"$log_dir"'/*.$(hostname).log 2>/dev/null | head -n 1)' \
      'if [ -z "$log" ]; then echo "no jaxpref logs on $(hostname)" >&2; exit 1; fi' \
      "$tail_cmd \"\$log\"")"
  fi
}

cmd_stop() {
  allow_options --run-name --log-dir
  require_slice
  local pattern='*' log_dir
  if [[ -n $RUN_NAME ]]; then
    check_run_name "$RUN_NAME"
    pattern=$RUN_NAME
  fi
  log_dir=$(remote_path "$LOG_DIR")
  # shellcheck disable=SC2016
  on_workers all "$(join_by '; ' \
    "for pid_file in $log_dir/$pattern."'$(hostname).pid' \
    'do [ -f "$pid_file" ] || continue' \
    'kill "$(cat "$pid_file")" 2>/dev/null && echo "$(hostname): stopped $pid_file"' \
    'rm -f "$pid_file"' \
    'done')"
}

cmd_status() {
  allow_options
  require_slice
  if ((QUEUED)); then
    gcloud_run compute tpus queued-resources describe "$NAME" --zone="$ZONE"
  else
    gcloud_run compute tpus tpu-vm describe "$NAME" --zone="$ZONE"
  fi
}

cmd_delete() {
  allow_options --yes
  require_slice
  local confirm=()
  if ((ASSUME_YES)); then confirm=(--quiet); fi
  if ((QUEUED)); then
    # --force deletes the queued resource's VM first; without it an ACTIVE one cannot be deleted.
    gcloud_run compute tpus queued-resources delete "$NAME" --zone="$ZONE" --force \
      ${confirm[@]+"${confirm[@]}"}
  else
    gcloud_run compute tpus tpu-vm delete "$NAME" --zone="$ZONE" ${confirm[@]+"${confirm[@]}"}
  fi
}

case $COMMAND in
  create | setup | run | logs | stop | status | delete) "cmd_$COMMAND" ;;
  '') die "missing COMMAND: one of create, setup, run, logs, stop, status, delete (see --help)" ;;
  *) die "unknown command '$COMMAND': use one of create, setup, run, logs, stop, status, delete" ;;
esac
