#!/usr/bin/env bash
# Multi-host rehearsal on one machine: N CPU processes of the same training command meet through
# jax.distributed at 127.0.0.1:PORT, as the hosts of a pod or a SLURM job would.
#
#   launch/local_multiprocess.sh [--config.a.b=value ...]
#
# Environment (defaults in brackets):
#   NUM_PROCESSES        processes to start [2]
#   DEVICES_PER_PROCESS  CPU devices each process sees (--xla_force_host_platform_device_count) [1]
#   CONFIG               config file [configs/distill.py]
#   WORKDIR              shared workdir; per-process logs go to $WORKDIR/logs [/tmp/mmkd_jax_multiprocess]
#   PORT                 coordinator port [a free port]
#   PYTHON               interpreter with mmkd_jax installed [python3]
#   DRY_RUN=1            print the commands, start nothing
set -euo pipefail

# The usage text is the comment block at the top of this file.
usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
}
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  usage
  exit 0
fi

NUM_PROCESSES="${NUM_PROCESSES:-2}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-1}"
CONFIG="${CONFIG:-configs/distill.py}"
WORKDIR="${WORKDIR:-/tmp/mmkd_jax_multiprocess}"
PYTHON="${PYTHON:-python3}"
DRY_RUN="${DRY_RUN:-0}"

# A relative WORKDIR is taken from the caller's directory, a relative CONFIG from the repository root.
if [[ "$WORKDIR" != /* ]]; then
  WORKDIR="$PWD/$WORKDIR"
fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ -z "${PORT:-}" ]]; then
  # Ask the kernel for a port nobody listens on (it stays free for the instant before process 0 binds it).
  PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
fi

LOG_DIR="$WORKDIR/logs"
pids=()

# Stops every process still running: SIGTERM first (the trainer checkpoints and exits), SIGKILL after 30 s.
stop_all() {
  local pid
  for pid in "${pids[@]}"; do
    kill -TERM "$pid" 2>/dev/null || true
  done
  local alive _
  for _ in $(seq 30); do
    alive=0
    for pid in "${pids[@]}"; do
      if kill -0 "$pid" 2>/dev/null; then alive=1; fi
    done
    if (( ! alive )); then return; fi
    sleep 1
  done
  for pid in "${pids[@]}"; do
    kill -KILL "$pid" 2>/dev/null || true
  done
}

[[ "$DRY_RUN" == 1 ]] || mkdir -p "$LOG_DIR"
for (( i = 0; i < NUM_PROCESSES; i++ )); do
  cmd=(env JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS"
       "$PYTHON" -m mmkd_jax.main "--config=$CONFIG" "--workdir=$WORKDIR"
       "--config.distributed.coordinator_address=127.0.0.1:$PORT"
       "--config.distributed.num_processes=$NUM_PROCESSES"
       "--config.distributed.process_id=$i"
       "$@")
  log="$LOG_DIR/process_$i.log"
  echo "+ $(printf '%q ' "${cmd[@]}")> $log 2>&1 &"
  if [[ "$DRY_RUN" != 1 ]]; then
    "${cmd[@]}" > "$log" 2>&1 &
    pids+=("$!")
  fi
done
[[ "$DRY_RUN" == 1 ]] && exit 0

# Ctrl-C or a SIGTERM to this script stops the whole group (each process checkpoints first).
# shellcheck disable=SC2317  # only reached through the traps below
on_signal() {
  echo "interrupted: stopping all processes" >&2
  stop_all
  exit "$1"
}
trap 'on_signal 130' INT
trap 'on_signal 143' TERM

# Poll until all have exited; the first failure stops the others (they would wait on it forever).
status=0
remaining=("${!pids[@]}")
while (( ${#remaining[@]} )); do
  still=()
  for i in "${remaining[@]}"; do
    if kill -0 "${pids[$i]}" 2>/dev/null; then
      still+=("$i")
      continue
    fi
    rc=0
    wait "${pids[$i]}" || rc=$?
    echo "process $i exited with status $rc (log: $LOG_DIR/process_$i.log)"
    if (( rc != 0 && status == 0 )); then
      status=$rc
      echo "process $i failed: stopping the others" >&2
      stop_all
    fi
  done
  remaining=("${still[@]+"${still[@]}"}")
  if (( ${#remaining[@]} )); then sleep 1; fi
done

if (( status != 0 )); then
  echo "FAILED: see the logs in $LOG_DIR" >&2
else
  echo "all $NUM_PROCESSES processes succeeded; logs in $LOG_DIR"
fi
exit "$status"
