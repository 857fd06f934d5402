"""Logging: Envoy-style levels, runtime-adjustable loggers, and plugin log lines."""

from __future__ import annotations

import logging
import sys

from wasmgate.abi.constants import LogLevel

TRACE = 5
logging.addLevelName(TRACE, "TRACE")

# proxy-wasm level -> Python logging level
PY_LEVEL = {
    LogLevel.TRACE: TRACE,
    LogLevel.DEBUG: logging.DEBUG,
    LogLevel.INFO: logging.INFO,
    LogLevel.WARN: logging.WARNING,
    LogLevel.ERROR: logging.ERROR,
    LogLevel.CRITICAL: logging.CRITICAL,
}

# Loggers an operator can address through /logging, named as Envoy's components.
COMPONENTS = {"wasm": "wasmgate.wasm", "http": "wasmgate.http", "upstream": "wasmgate.upstream",
              "admin": "wasmgate.admin", "config": "wasmgate.config", "main": "wasmgate"}

wasm_log = logging.getLogger("wasmgate.wasm")


def wasm_level() -> LogLevel:
    """The wasm component level as a proxy-wasm level (what proxy_get_log_level reports)."""
    eff = wasm_log.getEffectiveLevel()
    for lvl in LogLevel:
        if PY_LEVEL[lvl] >= eff:
            return lvl
    return LogLevel.CRITICAL


def set_level(component: str, name: str) -> None:
    if component not in COMPONENTS:
        raise ValueError(f"unknown logger {component!r}; known: {', '.join(sorted(COMPONENTS))}")
    logging.getLogger(COMPONENTS[component]).setLevel(PY_LEVEL[LogLevel.parse(name)])


def levels() -> dict[str, str]:
    out = {}
    for comp, name in sorted(COMPONENTS.items()):
        lvl = logging.getLogger(name).getEffectiveLevel()
        out[comp] = logging.getLevelName(lvl).lower().replace("warning", "warn")
    return out


def setup(level: str = "info", component_levels: dict[str, str] | None = None, prefix: str = "") -> None:
    """Log to stderr; ``prefix`` (a worker's name) starts every line."""
    handler = logging.StreamHandler(sys.stderr)
    tag = f"[{prefix}]" if prefix else ""
    handler.setFormatter(logging.Formatter(f"[%(asctime)s]{tag}[%(levelname)s][%(name)s] %(message)s"))
    root = logging.getLogger("wasmgate")
    root.handlers[:] = [handler]
    root.propagate = False
    root.setLevel(PY_LEVEL[LogLevel.parse(level)])
    for comp, lvl in (component_levels or {}).items():
        set_level(comp, lvl)


def setup_with_flags(flags: list[str], level: str = "info", component_levels: dict[str, str] | None = None) -> None:
    """``setup`` after ``--log-level`` flags (``LEVEL`` or ``COMPONENT=LEVEL``) override the config's levels."""
    components = dict(component_levels or {})
    for item in flags:
        comp, sep, lvl = item.partition("=")
        if sep:
            components[comp] = lvl
        else:
            level = item
    setup(level, components)
