#!/usr/bin/env bash
# Starts Docker's daemon where none answers (as root): Debian's dockerd with no bridge and no iptables rules, for
# machines where containers use the host network only (README "Containers"); its log in /var/log/dockerd.log.
set -euo pipefail
docker info >/dev/null 2>&1 && exit 0
command -v dockerd >/dev/null || { echo "start-docker: dockerd is not installed (Debian: docker.io)" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || { echo "start-docker: no Docker daemon answers, and starting one needs root" >&2; exit 1; }
setsid -f dockerd --bridge=none --iptables=false >>/var/log/dockerd.log 2>&1 </dev/null
for _ in $(seq 120); do
  docker info >/dev/null 2>&1 && exit 0
  sleep 0.5
done
tail -20 /var/log/dockerd.log >&2
echo "start-docker: dockerd did not answer within 60 s" >&2
exit 1
