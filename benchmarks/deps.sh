#!/usr/bin/env bash
# Installs what benchmarks/run.py needs from Debian's packages, only when missing:
#   nginx (the upstream; nginx-light is enough) and wrk (the load generator).
# Idempotent: prints "ok" and changes nothing when both are already there.
# Needs root (or sudo) and a Debian/Ubuntu apt.
set -euo pipefail

missing=()
command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || missing+=(nginx-light)
command -v wrk >/dev/null 2>&1 || missing+=(wrk)

if [[ ${#missing[@]} -eq 0 ]]; then
    echo "benchmarks/deps.sh: ok: nginx and wrk are installed"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "benchmarks/deps.sh: apt-get not found; install ${missing[*]} with your package manager" >&2
    exit 1
fi

sudo=()
if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || { echo "benchmarks/deps.sh: run as root (or install sudo)" >&2; exit 1; }
    sudo=(sudo)
fi

echo "benchmarks/deps.sh: installing ${missing[*]}"
"${sudo[@]}" apt-get update -qq
# nginx-light is the small build; fall back to nginx on releases that no longer ship it.
if ! DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"; then
    fallback=("${missing[@]/nginx-light/nginx}")
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${fallback[@]}"
fi
# The Debian package starts a system nginx on port 80; the benchmark runs its own.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet nginx 2>/dev/null; then
    "${sudo[@]}" systemctl stop nginx || true
fi
echo "benchmarks/deps.sh: done"
