"""The ``build``, ``push``, ``pull`` and ``inspect`` subcommands of ``wasmgate``.

Results go to stdout (push: the manifest digest; pull: what was written; inspect: the report).
Progress bars go to stderr, only when stderr is a terminal.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from wasmgate.build import TINYGO_GCS, BuildError, build
from wasmgate.oci.auth import Credentials, Keychain
from wasmgate.oci.errors import OciError
from wasmgate.oci.image import FORMATS, wasm_export_names
from wasmgate.oci.ops import DEFAULT_MAX_MODULE_SIZE, pull, push, resolve
from wasmgate.oci.reference import parse_reference
from wasmgate.oci.registry import ProgressFn, RegistryClient
from wasmgate.resources import kubeyaml

COMMANDS = ("build", "push", "pull", "inspect")


def creds_opts(p: argparse.ArgumentParser) -> None:
    """Registry access options; ``client_for`` reads them (also used by ``wasmgate export``)."""
    p.add_argument("--insecure", action="store_true",
                   help="allow plain HTTP and unverified TLS (loopback registries may use HTTP without it)")
    p.add_argument("--docker-config", type=Path, metavar="PATH",
                   help="Docker config.json (or its directory); default $DOCKER_CONFIG or ~/.docker")
    p.add_argument("--pull-secret", type=Path, metavar="SECRET.yaml",
                   help="a Kubernetes kubernetes.io/dockerconfigjson Secret to take credentials from")
    p.add_argument("-u", "--username", help="registry user (with --password-stdin)")
    p.add_argument("--password-stdin", action="store_true", help="read the registry password from stdin")
    p.add_argument("-v", "--verbose", action="store_true", help="log registry requests (never credentials)")


def register(sub: Any) -> None:
    """Add the subcommands to ``sub`` (an ``argparse`` subparsers action)."""
    b = sub.add_parser("build", help="compile a Go plugin to plugin.wasm", description=(
        "Compile the Go main package in DIR to a Proxy-Wasm module: with Go >= 1.24 "
        "(GOOS=wasip1 GOARCH=wasm go build -buildmode=c-shared), or with TinyGo (--tinygo)."))
    b.add_argument("dir", nargs="?", type=Path, default=Path("."), help="plugin directory (default: .)")
    b.add_argument("-o", "--output", type=Path, help="output file (default: DIR/plugin.wasm)")
    b.add_argument("--tinygo", action="store_true", help="build with TinyGo instead of Go")
    b.add_argument("--tinygo-gc", default="", choices=("", *TINYGO_GCS), metavar="GC",
                   help="TinyGo garbage collector; 'custom' = nottinygc flags (-gc=custom -tags=custommalloc ...)")
    b.add_argument("--tags", default="", help="extra build tags, comma- or space-separated")
    b.add_argument("-v", "--verbose", action="store_true", help="print the compiler command")

    p = sub.add_parser("push", help="push a plugin to an OCI registry", description=(
        "Package PLUGIN.wasm and push it to REF. Formats: image (Docker v2 schema 2 image whose "
        "layer is a gzip tar holding plugin.wasm; the default), oci-image (the same as an OCI "
        "image, Istio's 'compat' variant), artifact (two-layer Wasm artifact with "
        "application/vnd.module.wasm.* media types). Prints the manifest digest."))
    p.add_argument("plugin", type=Path, metavar="PLUGIN.wasm")
    p.add_argument("ref", metavar="REF", help="e.g. 127.0.0.1:5000/plugins/allow-header:v1")
    p.add_argument("--format", default="image", choices=FORMATS)
    creds_opts(p)

    q = sub.add_parser("pull", help="pull a plugin from an OCI registry", description=(
        "Pull REF and write its Wasm module. Reads every format push writes, plus wasm-to-oci "
        "(application/vnd.wasm.content.layer.v1+wasm) and CNCF application/wasm artifacts."))
    q.add_argument("ref", metavar="REF")
    q.add_argument("-o", "--output", type=Path, help="output file (default: plugin.wasm)")
    creds_opts(q)

    i = sub.add_parser("inspect", help="show a plugin image or module", description=(
        "Show the manifest, digest and layers of REF (or of nothing, for a local FILE), and the "
        "module's sha256, Proxy-Wasm ABI version, imports and exports."))
    i.add_argument("target", metavar="REF|FILE")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    creds_opts(i)


def run(args: argparse.Namespace) -> int:
    try:
        if args.command == "build":
            return _build(args)
        if getattr(args, "verbose", False):
            logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="%(name)s: %(message)s")
            logging.getLogger("httpx").setLevel(logging.WARNING)
            logging.getLogger("httpcore").setLevel(logging.WARNING)
        return {"push": _push, "pull": _pull, "inspect": _inspect}[args.command](args)
    except (OciError, BuildError) as e:
        print(f"wasmgate {args.command}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"wasmgate {args.command}: error: {e.filename or ''}: {e.strerror}", file=sys.stderr)
        return 1


def _build(args: argparse.Namespace) -> int:
    tags = tuple(t for t in args.tags.replace(",", " ").split() if t)
    with _spinner(f"building {args.dir}"):
        out = build(args.dir, args.output, tinygo=args.tinygo, tinygo_gc=args.tinygo_gc, tags=tags,
                    verbose=args.verbose)
    data = out.read_bytes()
    print(f"{out} ({len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()})")
    return 0


def _keychain(args: argparse.Namespace, registry: str) -> Keychain:
    if args.password_stdin:
        if not args.username:
            raise OciError("--password-stdin needs --username")
        password = sys.stdin.readline().rstrip("\r\n")
        return Keychain.single(registry, Credentials(args.username, password))
    if args.username:
        raise OciError("--username needs --password-stdin (passwords are not taken as arguments)")
    if args.pull_secret:
        try:
            docs = [d for d in kubeyaml.load_all(args.pull_secret.read_text()) if isinstance(d, dict)]
        except yaml.YAMLError as e:
            raise OciError(f"{args.pull_secret}: invalid YAML ({type(e).__name__})") from None
        secrets = [d for d in docs if d.get("kind") == "Secret"]
        if not secrets:
            raise OciError(f"{args.pull_secret}: no Secret in the file")
        return Keychain.from_k8s_secret(secrets[0])
    if args.docker_config:
        path = args.docker_config / "config.json" if args.docker_config.is_dir() else args.docker_config
        if not path.is_file():
            raise OciError(f"{path}: no such Docker config file")
        return Keychain.from_docker_config(path)
    return Keychain.from_docker_config()


def client_for(args: argparse.Namespace, registry: str) -> RegistryClient:
    return RegistryClient(_keychain(args, registry), insecure=args.insecure)


def _push(args: argparse.Namespace) -> int:
    ref = parse_reference(args.ref)
    wasm = args.plugin.read_bytes()
    abi = [n for n in wasm_export_names(wasm) if n.startswith("proxy_abi_version_")]
    with client_for(args, ref.registry) as client, _progress() as prog:
        pkg = push(client, ref, wasm, args.format, abi_versions=abi, progress=prog)
    if sys.stderr.isatty():
        print(f"pushed {ref} ({args.format})", file=sys.stderr)
    print(pkg.digest)
    return 0


def _pull(args: argparse.Namespace) -> int:
    ref = parse_reference(args.ref)
    out: Path = args.output or Path("plugin.wasm")
    with client_for(args, ref.registry) as client, _progress() as prog:
        pulled = pull(client, ref, progress=prog)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_bytes(pulled.wasm)
    tmp.replace(out)
    sha = hashlib.sha256(pulled.wasm).hexdigest()
    print(f"{out}: {len(pulled.wasm)} bytes, sha256 {sha}, from {ref.name}@{pulled.resolved.digest} "
          f"({pulled.located.format})")
    return 0


def module_info(wasm: bytes, name: str) -> dict[str, Any]:
    """sha256, size, ABI version, imports and exports of a module (compiled with wasmtime)."""
    from wasmgate.engine.wasm import WasmError, compile_module, exports_of, imports_of
    from wasmgate.plugin.manager import cache_dir, engine
    from wasmgate.plugin.vm import detect_abi

    sha = hashlib.sha256(wasm).hexdigest()
    info: dict[str, Any] = {"sha256": sha, "size": len(wasm)}
    try:  # the proxy's engine and compiled-code cache: a later `run` of this module starts fast
        module = compile_module(engine(), wasm, name, cache_dir(), sha)
    except WasmError as e:
        raise OciError(str(e)) from None
    try:
        info["abi_version"] = detect_abi(module).label
    except WasmError:
        info["abi_version"] = None
    info["imports"] = [{"module": m, "name": n, "type": t} for m, n, t in imports_of(module)]
    info["exports"] = exports_of(module)
    return info


def _inspect(args: argparse.Namespace) -> int:
    report: dict[str, Any] = {}
    local = Path(args.target)
    if local.is_file():
        if local.stat().st_size > DEFAULT_MAX_MODULE_SIZE:
            raise OciError(f"{local}: over the {DEFAULT_MAX_MODULE_SIZE}-byte module limit")
        wasm = local.read_bytes()
        report["file"] = str(local)
    else:
        ref = parse_reference(args.target)
        with client_for(args, ref.registry) as client, _progress() as prog:
            res = resolve(client, ref)
            pulled = pull(client, ref, progress=prog, resolved=res)
        wasm = pulled.wasm
        report.update({
            "reference": str(ref),
            "digest": res.digest,
            "media_type": res.manifest.media_type,
            "format": pulled.located.format,
            "istio_compatible": pulled.located.istio,
            "layers": res.doc.get("layers", []),
            "config": res.doc.get("config", {}),
            "manifest": json.loads(res.manifest.raw),
        })
        if res.index is not None:
            report["index_digest"] = res.index.digest
    report["module"] = module_info(wasm, args.target)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    _print_report(report)
    return 0


def _print_report(r: dict[str, Any]) -> None:
    out: list[str] = []
    if "reference" in r:
        out += [f"Reference:   {r['reference']}", f"Digest:      {r['digest']}"]
        if "index_digest" in r:
            out.append(f"Index:       {r['index_digest']}")
        out += [f"Media type:  {r['media_type']}",
                f"Format:      {r['format']} ({'Istio-compatible' if r['istio_compatible'] else 'not read by Istio'})",
                f"Config:      {r['config'].get('mediaType', '')} {r['config'].get('digest', '')}", "Layers:"]
        for layer in r["layers"]:
            out.append(f"  {layer.get('mediaType', '')}  {layer.get('digest', '')}  {layer.get('size', '?')} bytes")
        out += ["Manifest:", *("  " + line for line in json.dumps(r["manifest"], indent=2).splitlines())]
    else:
        out.append(f"File:        {r['file']}")
    m = r["module"]
    out += [f"Module:      sha256 {m['sha256']}, {m['size']} bytes",
            f"ABI version: {m['abi_version'] or 'none (no proxy_abi_version_* export: not a Proxy-Wasm module)'}",
            f"Imports ({len(m['imports'])}):"]
    out += [f"  {i['module']}.{i['name']} {i['type']}" for i in m["imports"]]
    out.append(f"Exports ({len(m['exports'])}):")
    out += [f"  {e}" for e in m["exports"]]
    print("\n".join(out))


# ---- progress --------------------------------------------------------------------------------


@contextlib.contextmanager
def _progress() -> Iterator[ProgressFn | None]:
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    tasks: dict[str, Any] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  console=Console(stderr=True), transient=False) as bar:
        def update(label: str, done: int, total: int) -> None:
            if label not in tasks:
                tasks[label] = bar.add_task(label, total=total or None)
            bar.update(tasks[label], completed=done, total=total or None)

        yield update


@contextlib.contextmanager
def _spinner(text: str) -> Iterator[None]:
    if not sys.stderr.isatty():
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(text):
        yield
