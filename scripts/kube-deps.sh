#!/usr/bin/env bash
# Builds the real Kubernetes API server the Kubernetes tests run against, into .tools/bin:
#   kube-apiserver  from k8s.io/kubernetes (tools/kube/apiserver/go.mod pins it and, with
#                   `replace`, every k8s.io/* staging module to the matching v0.x release)
#   kine            github.com/k3s-io/kine (tools/kube/kine/go.mod): the etcd API on SQLite,
#                   the API server's store
# Both come from the Go module proxy. Idempotent and cached: nothing is built when .tools/bin
# already has the pinned versions; a fresh clone copies them from ~/.cache/wasmgate/kube-tools
# (keyed by the go.mod/go.sum content), and Go's own build cache makes a rebuild take seconds.
# A cold build takes about 15 minutes on 2 cores; a warm one about 20 seconds.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bin="$root/.tools/bin"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/wasmgate/kube-tools"
mkdir -p "$bin" "$cache"

# name, module dir, main package, version of the main module, -X flags that stamp the version
build() {
    local name="$1" dir="$2" pkg="$3" version="$4" ldflags="$5"
    local key
    key="$(cat "$dir/go.mod" "$dir/go.sum" | sha256sum | cut -c1-16)"
    local cached="$cache/$name-$version-$key"
    if [[ -x "$bin/$name" ]] && cmp -s "$bin/$name" "$cached" 2>/dev/null; then
        return
    fi
    if [[ ! -x "$cached" ]]; then
        command -v go >/dev/null || { echo "kube-deps: Go is needed to build $name (https://go.dev/dl)"; exit 1; }
        echo "kube-deps: building $name $version (go build; cold: several minutes)"
        local start=$SECONDS
        (cd "$dir" && nice go build -trimpath -buildvcs=false -ldflags "-s -w $ldflags" -o "$cached.tmp" "$pkg")
        mv "$cached.tmp" "$cached"
        echo "kube-deps: built $name in $((SECONDS - start))s"
    fi
    cp "$cached" "$bin/$name.tmp" && mv "$bin/$name.tmp" "$bin/$name"
}

version_of() {  # the version go.mod requires of a module
    (cd "$1" && go list -m -f '{{.Version}}' "$2")
}

api="$root/tools/kube/apiserver"
kine="$root/tools/kube/kine"
if [[ -x "$bin/kube-apiserver" && -x "$bin/kine" ]] && ! command -v go >/dev/null; then
    exit 0  # built before; without Go nothing can be checked or rebuilt
fi
kv="$(version_of "$api" k8s.io/kubernetes)"
minor="$(echo "$kv" | cut -d. -f2)"
build kube-apiserver "$api" k8s.io/kubernetes/cmd/kube-apiserver "$kv" \
    "-X k8s.io/component-base/version.gitVersion=$kv -X k8s.io/component-base/version.gitMajor=1 \
     -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean"
kinev="$(version_of "$kine" github.com/k3s-io/kine)"
build kine "$kine" github.com/k3s-io/kine "$kinev" "-X github.com/k3s-io/kine/pkg/version.Version=$kinev"
