"""What a plugin is, independent of where its definition came from."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path


class FailStrategy(StrEnum):
    FAIL_CLOSE = "FAIL_CLOSE"
    FAIL_OPEN = "FAIL_OPEN"


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
    module_path: Path
    root_id: str = ""  # pluginName
    vm_id: str = ""
    plugin_config: bytes = b""
    vm_config: bytes = b""
    env: dict[str, str] = field(default_factory=dict)
    fail_strategy: FailStrategy = FailStrategy.FAIL_CLOSE
    phase: Phase = Phase.UNSPECIFIED_PHASE
    priority: int = 0
    namespace: str = ""
    source: str = ""  # the file it was defined in, for error messages
