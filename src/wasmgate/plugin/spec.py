"""What a plugin is, independent of where its definition came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path


class FailStrategy(StrEnum):
    FAIL_CLOSE = "FAIL_CLOSE"  # 503 for requests that need the failed VM
    FAIL_OPEN = "FAIL_OPEN"  # skip the plugin
    FAIL_RELOAD = "FAIL_RELOAD"  # 503 meanwhile; a fresh VM, with backoff


@dataclass(frozen=True)
class PluginLimits:
    """Sandbox limits of one plugin; see docs/configuration.md."""

    max_memory_bytes: int = 256 << 20  # linear memory; growing past it fails memory.grow
    callback_deadline: float = 0.5  # CPU seconds for one callback (Envoy has no limit)
    start_deadline: float = 10.0  # for _initialize, on_vm_start, on_configure
    max_random_bytes: int = 1 << 20  # per random_get call
    memory_recycle_bytes: int = 0  # 0: off; else replace a VM whose memory grew past this
    reload_backoff: float = 0.5  # FAIL_RELOAD: first delay; doubles per failure up to 30 s
    max_buffered_body: int = 0  # body bytes held while this plugin is stopped; 0: the proxy's limit


class Phase(StrEnum):
    """Istio's WasmPlugin phases. UNSPECIFIED_PHASE goes last, right before the router."""

    AUTHN = "AUTHN"
    AUTHZ = "AUTHZ"
    UNSPECIFIED_PHASE = "UNSPECIFIED_PHASE"
    STATS = "STATS"

    @property
    def rank(self) -> int:
        return {"AUTHN": 0, "AUTHZ": 1, "STATS": 2, "UNSPECIFIED_PHASE": 3}[self.value]


@dataclass(frozen=True)
class PluginSpec:
    name: str  # resource name, e.g. "allow-header"
    module_path: Path | None  # the local module; None until a remote url is fetched
    root_id: str = ""  # pluginName
    vm_id: str = ""
    plugin_config: bytes = b""
    vm_config: bytes = b""
    env: dict[str, str] = field(default_factory=dict)
    fail_strategy: FailStrategy = FailStrategy.FAIL_CLOSE
    phase: Phase = Phase.UNSPECIFIED_PHASE
    priority: int | None = None  # unset: as Istio, the lowest 32-bit priority
    namespace: str = ""
    created: datetime | None = None  # metadata.creationTimestamp, aware; None: absent
    source: str = ""  # the file it was defined in, for error messages
    limits: PluginLimits = field(default_factory=PluginLimits)
    url: str = ""  # as written in the resource (oci://, http(s)://, file://)
    sha256: str = ""  # Istio's meaning: manifest digest for oci, module hash for http
    pull_policy: str = ""  # imagePullPolicy
    pull_secret: bytes = b""  # .dockerconfigjson of the imagePullSecret, if any
    target_refs: tuple[str, ...] = ()  # reported only: a standalone proxy is its own target
    network: bool = False  # type: NETWORK: runs on the TCP proxy listeners, not on HTTP
    ports: tuple[int, ...] = ()  # network plugins: the TCP listener ports it applies to (empty: all)

    @property
    def remote(self) -> bool:
        return self.module_path is None

    def applies_to_port(self, port: int) -> bool:
        """Whether a network plugin runs on the TCP listener configured with ``port`` (0: any)."""
        return not self.ports or not port or port in self.ports
