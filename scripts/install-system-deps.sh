#!/usr/bin/env bash
# Installs the Debian packages voicerelay drives for real: redis-server, chromium, firefox-esr,
# nftables and node with npm (tests: browsers and werift on other hosts, blocked UDP),
# espeak-ng (the reference agent's voice), clang and libbpf-dev (the relay's kernel fast path,
# `--kernel-fast-path`) and ethtool (its tests turn checksum offload off on their veth links).
# With package names as arguments, only those.
# Idempotent: installs only what is missing (a node already on the machine is kept).
set -euo pipefail
want=("$@")
[ ${#want[@]} -eq 0 ] && want=(redis-server chromium espeak-ng firefox-esr nftables nodejs npm clang libbpf-dev ethtool)
need=()
for pkg in "${want[@]}"; do
  case "$pkg" in
    chromium) [ -x /usr/bin/chromium ] || need+=(chromium) ;;
    nftables) command -v nft >/dev/null 2>&1 || need+=(nftables) ;;
    nodejs) command -v node >/dev/null 2>&1 || need+=(nodejs) ;;
    libbpf-dev) [ -e /usr/include/bpf/bpf_helpers.h ] || need+=(libbpf-dev) ;;
    *) command -v "$pkg" >/dev/null 2>&1 || need+=("$pkg") ;;
  esac
done
[ ${#need[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
