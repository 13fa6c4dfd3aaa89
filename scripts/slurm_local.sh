#!/usr/bin/env bash
# A real single-node Slurm cluster (munged + slurmctld + slurmd) running from one state directory,
# for CI and for trying the sbatch scripts on a laptop. Nothing is written to /etc or /run.
#
#   scripts/slurm_local.sh start ROOT   # installs slurm-wlm + munge (apt-get) if missing, starts the daemons
#   export SLURM_CONF=ROOT/etc/slurm.conf AGPO_SLURM_CONF=ROOT/etc/slurm.conf
#   sbatch --wait ...; sinfo; squeue
#   scripts/slurm_local.sh stop ROOT    # TERM, then KILL after 10 s, by pid file
#
# The recipe (Debian 12, Slurm 22.05) is in the issue notes: no cgroups here, hence
# proctrack/linuxproc + task/none; no slurmdbd, hence no accounting (see scripts/sacct).
# Needs root (SlurmUser=root), as CI containers are.
set -euo pipefail

usage() { echo "usage: $0 start|stop|status ROOT" >&2; exit 2; }
[ $# -eq 2 ] || usage
cmd=$1
ROOT=$(mkdir -p "$2" && cd "$2" && pwd)
CONF=$ROOT/etc/slurm.conf

install_if_missing() {
  if command -v slurmctld >/dev/null && command -v munged >/dev/null; then return; fi
  echo "installing slurm-wlm and munge from Debian" >&2
  # The packages' postinst tries to start the services; where policy blocks that it is harmless.
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

write_conf() {
  local host cpus
  host=$(hostname -s)
  cpus=$(nproc)
  mkdir -p "$ROOT"/{etc,munge,state,spool,log,run}
  chmod 0755 "$ROOT/munge"
  cat >"$CONF" <<EOF
ClusterName=agpo-local
SlurmctldHost=$host
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job waits this long before it may start again (Slurm's default 120 s).
# Starting it sooner (scontrol update StartTime=now) races the revoked credential of its previous
# run: "Killing non-startable batch JobId=N: Job credential revoked", exit 1 (seen in CI).
AuthInfo=socket=$ROOT/munge/munge.socket.2,cred_expire=15
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool
SlurmctldPidFile=$ROOT/run/slurmctld.pid
SlurmdPidFile=$ROOT/run/slurmd.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
# Finished jobs stay visible to scontrol for 10 min (the sacct stand-in reads them there).
MinJobAge=600
NodeName=$host CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
  install_if_missing
  stop quiet
  write_conf
  [ -f "$ROOT/munge/munge.key" ] || { mungekey --create --keyfile="$ROOT/munge/munge.key"; chmod 0400 "$ROOT/munge/munge.key"; }
  munged --force --key-file="$ROOT/munge/munge.key" --socket="$ROOT/munge/munge.socket.2" \
    --pid-file="$ROOT/run/munged.pid" --log-file="$ROOT/log/munged.log" --seed-file="$ROOT/munge/munge.seed"
  export SLURM_CONF=$CONF
  slurmctld -f "$CONF"
  slurmd -f "$CONF"
  local state=""
  for _ in $(seq 1 100); do
    state=$(sinfo -h -o %T 2>/dev/null || true)
    [ "$state" = idle ] && { echo "slurm up: SLURM_CONF=$CONF"; return 0; }
    sleep 0.2
  done
  echo "slurm did not come up (node state: '${state}'); logs in $ROOT/log" >&2
  tail -n 20 "$ROOT"/log/*.log >&2 || true
  return 1
}

stop() {
  local pids=() name pid
  for name in slurmd slurmctld munged; do
    pid=$(cat "$ROOT/run/$name.pid" 2>/dev/null || true)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill -TERM "$pid"; pids+=("$pid"); fi
  done
  for _ in $(seq 1 50); do
    local alive=()
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
    pids=("${alive[@]}")
    [ ${#pids[@]} -eq 0 ] && break
    sleep 0.2
  done
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  rm -f "$ROOT"/run/*.pid
  [ "${1:-}" = quiet ] || echo "slurm stopped ($ROOT)"
}

case $cmd in
  start) start ;;
  stop) stop ;;
  status) SLURM_CONF=$CONF sinfo ;;
  *) usage ;;
esac
