#!/usr/bin/env bash
# Builds the Go Proxy-Wasm plugins:
#   examples/allow-header          -> examples/allow-header/plugin.wasm
#   tests/plugins/<name>/main.go   -> tests/plugins/build/<name>.wasm
#
# A plugin is rebuilt only when one of its sources (or this script) is newer
# than its output. Set FORCE=1 to rebuild everything.
#
# Requires Go >= 1.24 (go:wasmexport); TinyGo is not needed.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
script="$root/scripts/build-plugins.sh"

export GOOS=wasip1 GOARCH=wasm CGO_ENABLED=0

# up_to_date OUTPUT SOURCE_DIR... : true if OUTPUT exists and nothing that
# goes into it (Go files, go.mod/go.sum, this script) is newer.
up_to_date() {
    local out="$1"
    shift
    [[ "${FORCE:-0}" != 1 && -f "$out" ]] || return 1
    [[ "$script" -nt "$out" ]] && return 1
    local newer
    newer="$(find "$@" -type f \( -name '*.go' -o -name go.mod -o -name go.sum \) \
        -newer "$out" -print -quit)"
    [[ -z "$newer" ]]
}

# build MODULE_DIR PACKAGE OUTPUT SOURCE_DIR...
build() {
    local moddir="$1" pkg="$2" out="$3"
    shift 3
    local rel="${out#"$root"/}"
    if up_to_date "$out" "$@"; then
        echo "up to date: $rel"
        return
    fi
    echo "building:   $rel"
    mkdir -p "$(dirname "$out")"
    (cd "$moddir" && go build -trimpath -buildmode=c-shared -o "$out" "$pkg")
}

ex="$root/examples/allow-header"
build "$ex" . "$ex/plugin.wasm" "$ex"

tp="$root/tests/plugins"
for main in "$tp"/*/main.go; do
    dir="$(dirname "$main")"
    name="$(basename "$dir")"
    # A plugin depends on its own package, the shared internal packages and
    # the module's go.mod/go.sum.
    build "$tp" "./$name" "$tp/build/$name.wasm" \
        "$dir" "$tp/internal" "$tp/go.mod"
done
