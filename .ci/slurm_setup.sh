#!/usr/bin/env bash
# Install what the Slurm tests (tests/slurm/) need: Debian's slurm-wlm and munge, plus the tools the
# test cluster uses (ip, nsenter/unshare). Run as root. Idempotent: a no-op when already installed.
set -euo pipefail

need=()
command -v slurmctld >/dev/null || need+=(slurm-wlm)
command -v munged >/dev/null || need+=(munge)
command -v ip >/dev/null || need+=(iproute2)
{ command -v nsenter && command -v unshare; } >/dev/null || need+=(util-linux)
[ ${#need[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
  echo "slurm_setup: need root to install ${need[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# The packages' postinst scripts try to start services; there is no init system in CI, which is fine:
# the test harness starts its own daemons with its own config.
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
echo "slurm_setup: installed ${need[*]}"
