#!/usr/bin/env bash
# Installs what the OCI tests need, each only when missing (safe to run again):
#   docker-registry  Debian's package of the CNCF distribution registry (2.8): the real registry
#                    the tests start on 127.0.0.1 with htpasswd and token auth
#   crane            go-containerregistry's CLI, from the Go module proxy, into .tools/bin:
#                    the independent client of the interop tests
#   kube-apiserver, kine  built from the Go module proxy by scripts/kube-deps.sh (cached):
#                    the real Kubernetes API server of the Kubernetes tests
# Python test dependencies (bcrypt, cryptography) come with `pip install -e '.[dev]'`.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CRANE_VERSION=v0.22.1

if ! command -v docker-registry >/dev/null 2>&1; then
    sudo=""
    [[ "$(id -u)" -eq 0 ]] || sudo="sudo"
    # The package would start a registry service on :5000; keep it from starting.
    policy=""
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        policy=/usr/sbin/policy-rc.d
        printf '#!/bin/sh\nexit 101\n' | $sudo tee "$policy" >/dev/null
        $sudo chmod +x "$policy"
        trap '$sudo rm -f "$policy"' EXIT
    fi
    echo "test-deps: installing docker-registry (apt)"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends docker-registry >/dev/null
fi

crane="$root/.tools/bin/crane"
if [[ ! -x "$crane" ]] || [[ "$("$crane" version 2>/dev/null)" != "$CRANE_VERSION" ]]; then
    command -v go >/dev/null || { echo "test-deps: Go is needed to install crane (https://go.dev/dl)"; exit 1; }
    echo "test-deps: installing crane $CRANE_VERSION (go install)"
    GOBIN="$root/.tools/bin" go install "github.com/google/go-containerregistry/cmd/crane@$CRANE_VERSION"
fi

bash "$root/scripts/kube-deps.sh"
