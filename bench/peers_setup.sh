#!/usr/bin/env bash
# Installs the Debian peers the side-by-side benchmarks run against (bench/peer_*.py):
# coturn (its `turnserver`) and janus (the Janus WebRTC server: its `janus` binary, the HTTP
# transport and the EchoTest plugin come in the one package). With package names as
# arguments, only those.
# Idempotent: installs only what is missing. Never starts or enables a system service: each
# benchmark runs its peer itself, in the foreground, with a config of its own. A peer that
# cannot be installed (no package mirror, no root) is reported in one line and the script
# still succeeds: its benchmark then skips that peer, saying so.
set -euo pipefail
want=("$@")
[ ${#want[@]} -eq 0 ] && want=(coturn janus)
need=()
for pkg in "${want[@]}"; do
  case "$pkg" in
    coturn) command -v turnserver >/dev/null 2>&1 || need+=(coturn) ;;
    *) command -v "$pkg" >/dev/null 2>&1 || need+=("$pkg") ;;
  esac
done
[ ${#need[@]} -eq 0 ] && exit 0
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "bench peers: not root and no sudo: ${need[*]} not installed (their benchmarks skip them)"
    exit 0
  fi
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
# A policy-rc.d that exits 101 keeps the packages' maintainer scripts from starting daemons.
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
  $SUDO chmod +x "$policy"
  made_policy=1
fi
cleanup() { if [ "$made_policy" -eq 1 ]; then $SUDO rm -f "$policy"; fi; }
trap cleanup EXIT
if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"; }; then
  echo "bench peers: could not install ${need[*]} (apt-get failed): their benchmarks skip them"
fi
