"""``wasmgate export --istio``: the manifests go to stdout or ``-o FILE``; notes and errors to stderr."""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from pathlib import Path
from typing import Any

from wasmgate.export.istio import ExportError, ExportOptions, export_istio
from wasmgate.oci import commands as oci_commands
from wasmgate.oci.errors import OciError
from wasmgate.oci.ops import push
from wasmgate.oci.reference import parse_reference
from wasmgate.oci.registry import RegistryClient
from wasmgate.resources.config import load_config
from wasmgate.resources.wasmplugin import ConfigError

COMMANDS = ("export",)


def register(sub: Any) -> None:
    e = sub.add_parser("export", help="write Istio manifests for wasmgate's resources", description=(
        "Write the WasmPlugin and Secret manifests that Istio accepts for the plugins in the given "
        "resources (all of them: Istio does the selecting), as one multi-document YAML. wasmgate "
        "extensions are translated or refused with the file and field (docs/istio.md)."))
    e.add_argument("--istio", action="store_true", required=True, help="the target (the only one so far)")
    e.add_argument("--resources", type=Path, nargs="+", metavar="FILE_OR_DIR",
                   help="WasmPlugin/Secret YAML files or directories (default: the config's plugins, else the "
                        "allow-header example)")
    e.add_argument("-c", "--config", type=Path, help="take the resources from this wasmgate config's plugins:")
    e.add_argument("-o", "--output", default="-", metavar="FILE|-", help="where to write (default: stdout)")
    e.add_argument("--push-to", default="", metavar="REGISTRY[/PREFIX]",
                   help="push file:// modules to REGISTRY/PREFIX/NAME:sha256-HEX and point url and sha256 there")
    e.add_argument("--keep-file-urls", action="store_true",
                   help="keep absolute file:// urls (you mount the modules into every Istio proxy yourself)")
    oci_commands.creds_opts(e)


def _resources(args: argparse.Namespace) -> list[Path]:
    if args.resources:
        return list(args.resources)
    if args.config:
        cfg = load_config(args.config)
        if cfg.plugins:
            return list(cfg.plugins)
    from wasmgate.app import DEFAULT_PLUGIN

    return [DEFAULT_PLUGIN]


def run(args: argparse.Namespace) -> int:
    if args.verbose:
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr, format="%(name)s: %(message)s")
    try:
        with contextlib.ExitStack() as stack:
            clients: dict[str, RegistryClient] = {}

            def push_module(ref_text: str, wasm: bytes) -> str:
                ref = parse_reference(ref_text)
                if ref.registry not in clients:
                    clients[ref.registry] = stack.enter_context(oci_commands.client_for(args, ref.registry))
                return push(clients[ref.registry], ref, wasm).digest

            opts = ExportOptions(push_to=args.push_to, push=push_module if args.push_to else None,
                                 keep_file_urls=args.keep_file_urls)
            exported = export_istio(_resources(args), opts)
    except ExportError as e:
        for line in e.problems:
            print(f"wasmgate export: error: {line}", file=sys.stderr)
        return 2
    except (ConfigError, OciError) as e:
        print(f"wasmgate export: error: {e}", file=sys.stderr)
        return 2
    for note in exported.notes:
        print(f"wasmgate export: note: {note}", file=sys.stderr)
    text = exported.yaml()
    if args.output == "-":
        sys.stdout.write(text)
    else:
        out = Path(args.output)
        tmp = out.with_name(f".{out.name}.tmp")
        try:
            tmp.write_text(text)
            tmp.replace(out)
        except OSError as e:
            print(f"wasmgate export: error: -o: {out}: {e.strerror or e}", file=sys.stderr)
            return 2
        print(f"wasmgate export: wrote {len(exported.documents)} manifests to {out}", file=sys.stderr)
    return 0
