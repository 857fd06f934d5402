"""The ``wasmgate`` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from wasmgate import log
from wasmgate.app import RunOptions, StartupError, run_forever
from wasmgate.devtools import commands as dev_commands
from wasmgate.export import commands as export_commands
from wasmgate.oci import commands as oci_commands
from wasmgate.proxy.server import Limits
from wasmgate.resources.config import add_kube_flags, key_values, kube_flags, load_config, tcp_proxy_flags
from wasmgate.resources.wasmplugin import ConfigError
from wasmgate.supervisor import Supervisor, default_workers
from wasmgate.xds import commands as xds_commands


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wasmgate", description="An HTTP proxy extended by Proxy-Wasm plugins.")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the proxy", description=(
        "Run the proxy. With no arguments it serves the embedded default: the allow-header "
        "example plugin in front of a built-in demo upstream, on 127.0.0.1:8080 (admin :9901)."))
    run.add_argument("-c", "--config", type=Path, help="wasmgate config file (YAML)")
    run.add_argument("--listen", help="HOST:PORT for traffic (default 127.0.0.1:8080)")
    run.add_argument("--admin", help="HOST:PORT for the admin API (default 127.0.0.1:9901)")
    run.add_argument("--upstream", help="upstream URL, e.g. http://127.0.0.1:8000 (default: demo upstream)")
    run.add_argument("--plugins", type=Path, nargs="+", metavar="FILE_OR_DIR",
                     help="WasmPlugin YAML files or directories (default: the allow-header example)")
    add_kube_flags(run)
    run.add_argument("--workers", type=int, default=None,
                     help="worker processes sharing the listener (default: the number of cores)")
    run.add_argument("--labels", action="append", default=[], metavar="K=V[,K=V]",
                     help="this proxy's labels, matched by WasmPlugin spec.selector.matchLabels")
    run.add_argument("--cluster", action="append", default=[], metavar="NAME=URL",
                     help="an upstream cluster plugins may call with proxy_http_call (repeatable)")
    run.add_argument("--tcp-proxy", action="append", default=[], metavar="LISTEN=CLUSTER",
                     help="a TCP proxy listener to a --cluster, for network plugins (repeatable)")
    run.add_argument("--tls-cert", metavar="PATH", help="serve HTTPS with this certificate chain (PEM)")
    run.add_argument("--tls-key", metavar="PATH", help="the private key for --tls-cert (PEM)")
    run.add_argument("--no-watch", action="store_true", help="do not re-apply plugin files when they change")
    run.add_argument("--log-level", action="append", default=[], metavar="LEVEL|COMPONENT=LEVEL",
                     help="e.g. debug, or wasm=debug; repeatable")
    oci_commands.register(sub)
    dev_commands.register(sub)
    export_commands.register(sub)
    xds_commands.register(sub)
    return p


def _run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config) if args.config else None
    level = cfg.log_level if cfg else "info"
    components = dict(cfg.component_log_levels) if cfg else {}
    try:
        log.setup_with_flags(args.log_level, level, components)
    except ValueError as e:
        raise StartupError(f"--log-level: {e}") from None
    workers = args.workers or (cfg.workers if cfg and "workers" in cfg.model_fields_set else default_workers())
    if workers < 1:
        raise StartupError("--workers: must be at least 1")
    opts = RunOptions()
    if cfg:
        opts.listen, opts.admin, opts.upstream = cfg.listen, cfg.admin, cfg.upstream
        opts.plugins = cfg.plugins if "plugins" in cfg.model_fields_set else None
        opts.limits = Limits(**cfg.limits.model_dump())
        opts.plugin_limits = cfg.plugin_limits.to_limits()
        opts.clusters = dict(cfg.clusters)
        opts.node = dict(cfg.node)
        opts.xds = cfg.xds.info()
        opts.labels = dict(cfg.labels)
        opts.watch = cfg.watch
        if cfg.tls is not None:
            opts.tls_cert, opts.tls_key = str(cfg.tls.cert), str(cfg.tls.key)
            opts.tls_sni = [{"server_names": e.server_names, "cert": str(e.cert), "key": str(e.key)}
                            for e in cfg.tls.sni]
            opts.tls_client_ca = str(cfg.tls.client_ca) if cfg.tls.client_ca is not None else None
            opts.tls_require_client_certificate = cfg.tls.require_client_certificate
        opts.upstream_ca = str(cfg.upstream_tls.ca) if cfg.upstream_tls.ca is not None else None
        opts.upstream_insecure_skip_verify = cfg.upstream_tls.insecure_skip_verify
        opts.upstream_cert = str(cfg.upstream_tls.cert) if cfg.upstream_tls.cert is not None else None
        opts.upstream_key = str(cfg.upstream_tls.key) if cfg.upstream_tls.key is not None else None
        opts.tcp_proxies = [t.to_options() for t in cfg.tcp_proxies]
    opts.listen = args.listen or opts.listen
    opts.admin = args.admin or opts.admin
    opts.upstream = args.upstream or opts.upstream
    if args.plugins is not None:
        opts.plugins = args.plugins
    opts.labels.update(key_values(args.labels, "--labels"))
    opts.clusters.update(key_values(args.cluster, "--cluster"))
    opts.tcp_proxies += tcp_proxy_flags(args.tcp_proxy)
    opts.tls_cert = args.tls_cert or opts.tls_cert
    opts.tls_key = args.tls_key or opts.tls_key
    kube = kube_flags(args, "--plugins", args.plugins is not None)
    if kube is not None:
        opts.kube, opts.plugins = True, None
        opts.kube_namespace, opts.kube_selector, opts.kubeconfig = kube.namespace, kube.selector, kube.kubeconfig
    if args.no_watch:
        opts.watch = False
    import uvloop

    if workers == 1:
        uvloop.run(run_forever(opts))
    else:
        uvloop.run(Supervisor(opts, workers, {"": level, **components}).run())
    return 0


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["_worker"]:
        from wasmgate.worker import main as worker_main  # started by the supervisor

        return worker_main()
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command in oci_commands.COMMANDS:
            return oci_commands.run(args)
        if args.command in dev_commands.COMMANDS:
            return dev_commands.run(args)
        if args.command in export_commands.COMMANDS:
            return export_commands.run(args)
        if args.command in xds_commands.COMMANDS:
            return xds_commands.run(args)
    except (StartupError, ConfigError) as e:
        print(f"wasmgate: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
