#!/usr/bin/env bash
# mmkd_jax on a Cloud TPU VM slice (one host or a multi-host pod), driven from your machine with gcloud.
#
#   launch/tpu_pod.sh COMMAND [--config.a.b=value ...]
#
# Commands:
#   create  create the TPU VM slice
#   setup   on every worker: copy or clone the repository, make a venv, pip install -e . 'jax[tpu]'
#   run     on every worker: the same training command, extra arguments appended (nohup, in the
#           background, log in ~/mmkd_jax-run.log on each worker; FOREGROUND=1 stays attached)
#   logs    the last LOG_LINES lines of each worker's log (FOLLOW=1: follow worker 0's)
#   stop    SIGTERM the background run on every worker: it writes a checkpoint, then exits
#   delete  delete the TPU VM slice
#
# Environment (defaults in brackets):
#   TPU_NAME          name of the slice (required)
#   ZONE              zone, e.g. us-central2-b (required)
#   PROJECT           project [gcloud's configured project]
#   ACCELERATOR_TYPE  create: slice type [v4-32]
#   RUNTIME_VERSION   create: TPU software version [tpu-ubuntu2204-base]
#   SPOT=1            create: a Spot slice (cheaper, can be preempted)
#   REPO              setup: git URL to clone, or local directory to copy [this checkout]
#   GIT_REF           setup: branch, tag or commit to check out from a git URL [the remote's default]
#   REMOTE_DIR        checkout on each worker, relative to the home directory or absolute [mmkd_jax]
#   PYTHON            setup: Python >= 3.11 for the venv, apt-installed if missing [python3.11]
#   CONFIG            run: config file, relative to the repository [configs/distill.py]
#   WORKDIR           run: directory every worker sees, see docs/launch.md (required)
#   FOREGROUND=1      run: stream every worker's output until the job ends
#   LOG_LINES         logs: lines per worker [40]
#   DRY_RUN=1         print the commands, run nothing
set -euo pipefail

# The usage text is the comment block at the top of this file.
usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
}

die() {
  echo "error: $*" >&2
  exit 2
}

# Quotes each argument for a shell, in single quotes where needed, joined by spaces.
quote() {
  local arg out=()
  for arg in "$@"; do
    if [[ -n "$arg" && "$arg" != *[!A-Za-z0-9_./:=,@+-]* ]]; then
      out+=("$arg")
    else
      out+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  echo "${out[*]}"
}

# Prints a command, then runs it unless DRY_RUN=1.
execute() {
  echo "+ $(quote "$@")"
  if [[ "${DRY_RUN:-0}" != 1 ]]; then
    "$@"
  fi
}

COMMAND="${1:-}"
if [[ -z "$COMMAND" || "$COMMAND" == -h || "$COMMAND" == --help ]]; then
  usage
  exit 0
fi
shift
if [[ "$COMMAND" != run && $# -gt 0 ]]; then
  die "only 'run' takes extra arguments (config overrides); got: $*"
fi

: "${TPU_NAME:?set TPU_NAME (see launch/tpu_pod.sh --help)}"
: "${ZONE:?set ZONE (see launch/tpu_pod.sh --help)}"
PROJECT="${PROJECT:-}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
REPO="${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
GIT_REF="${GIT_REF:-}"
REMOTE_DIR="${REMOTE_DIR:-mmkd_jax}"
PYTHON="${PYTHON:-python3.11}"
CONFIG="${CONFIG:-configs/distill.py}"
LOG_LINES="${LOG_LINES:-40}"
# Per-worker files in each worker's home directory (the tilde is expanded there).
# shellcheck disable=SC2088
LOG_FILE='~/mmkd_jax-run.log'
# shellcheck disable=SC2088
PID_FILE='~/mmkd_jax-run.pid'

tpu=(gcloud compute tpus tpu-vm)
location=(--zone="$ZONE")
if [[ -n "$PROJECT" ]]; then
  location+=(--project="$PROJECT")
fi

# Runs a shell command on the given workers ("all" or an index).
on_workers() {
  local workers="$1" command="$2"
  execute "${tpu[@]}" ssh "$TPU_NAME" "${location[@]}" --worker="$workers" --command="$command"
}

create() {
  local flags=(--accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
  if [[ "${SPOT:-0}" == 1 ]]; then
    flags+=(--spot)
  fi
  execute "${tpu[@]}" create "$TPU_NAME" "${location[@]}" "${flags[@]}"
}

setup() {
  local dir fetch
  dir="$(quote "$REMOTE_DIR")"
  if [[ "$REPO" == *://* || "$REPO" == git@* ]]; then
    # Clone once, then fetch on later setups; GIT_REF (or the remote's default branch) is checked out.
    fetch="if [ -d $dir/.git ]; then git -C $dir fetch --quiet origin; else git clone --quiet $(quote "$REPO") $dir; fi"
    fetch+=" && git -C $dir checkout --quiet --force $(quote "${GIT_REF:-origin/HEAD}")"
  else
    [[ -f "$REPO/mmkd_jax/main.py" ]] || die "REPO=$REPO is neither a git URL nor an mmkd_jax checkout"
    # Ship the working tree (uncommitted edits included, no venvs or caches) as one archive.
    local archive="${TMPDIR:-/tmp}/mmkd_jax-$TPU_NAME.tgz"
    execute tar -czf "$archive" --exclude-vcs --exclude='.venv*' --exclude=__pycache__ --exclude='*.egg-info' \
      --exclude=.pytest_cache -C "$REPO" .
    execute "${tpu[@]}" scp "$archive" "$TPU_NAME:mmkd_jax-src.tgz" "${location[@]}" --worker=all
    # Replace the old sources but keep the venv, so that a re-setup only reinstalls the package.
    fetch="mkdir -p $dir && find $dir -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +"
    fetch+=" && tar -xzf ~/mmkd_jax-src.tgz -C $dir && rm ~/mmkd_jax-src.tgz"
  fi
  # TPU VM images ship Python 3.10; the package needs >= 3.11 (Ubuntu's python3.11 packages).
  local python install
  python="$(quote "$PYTHON")"
  install="if ! command -v $python > /dev/null; then"
  install+=" sudo apt-get update -q && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q"
  install+=" -o DPkg::Lock::Timeout=600 $python $python-venv; fi"
  install+=" && cd $dir && $python -m venv .venv && . .venv/bin/activate"
  install+=" && pip install -q --upgrade pip && pip install -q -e . 'jax[tpu]'"
  # Every worker must see the whole slice: a v4-32 reports 4 local and 16 global devices.
  install+=" && python -c 'import jax; jax.distributed.initialize();"
  install+=" print(f\"process {jax.process_index()}: {jax.local_device_count()} local,"
  install+=" {jax.device_count()} global devices\")'"
  on_workers all "$fetch && $install"
}

run_job() {
  : "${WORKDIR:?set WORKDIR to a directory every worker sees (see docs/launch.md)}"
  local job
  # The slice's workers are found through the TPU metadata server, which jax.distributed reads when
  # asked to start ('always'); 'auto' only looks at environment variables that gcloud does not set.
  job="$(quote python -m mmkd_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
    --config.distributed.initialize=always "$@")"
  local enter
  enter="cd $(quote "$REMOTE_DIR") && . .venv/bin/activate"
  if [[ "${FOREGROUND:-0}" == 1 ]]; then
    on_workers all "set -o pipefail; $enter && $job 2>&1 | tee -a $LOG_FILE"
  else
    # A worker still running an earlier job refuses to start a second one.
    local remote="if [ -f $PID_FILE ] && kill -0 \$(cat $PID_FILE) 2> /dev/null; then"
    remote+=" echo \"\$(hostname): a run is still going; use stop first\" >&2; exit 1; fi"
    remote+="; $enter || exit 1; nohup $job >> $LOG_FILE 2>&1 < /dev/null &"
    remote+=" echo \$! > $PID_FILE; echo \"\$(hostname): started pid \$!, log in $LOG_FILE\""
    on_workers all "$remote"
  fi
}

logs() {
  if [[ "${FOLLOW:-0}" == 1 ]]; then
    on_workers 0 "tail -n $LOG_LINES -F $LOG_FILE"
  else
    on_workers all "echo \"== \$(hostname) ==\"; tail -n $LOG_LINES $LOG_FILE"
  fi
}

stop() {
  local remote="if [ -f $PID_FILE ] && kill -TERM \$(cat $PID_FILE) 2> /dev/null"
  remote+="; then echo \"\$(hostname): SIGTERM sent\"; else echo \"\$(hostname): nothing running\"; fi"
  on_workers all "$remote"
}

case "$COMMAND" in
  create) create ;;
  setup) setup ;;
  run) run_job "$@" ;;
  logs) logs ;;
  stop) stop ;;
  delete) execute "${tpu[@]}" delete "$TPU_NAME" "${location[@]}" ;;
  *) usage >&2; die "unknown command '$COMMAND'" ;;
esac
