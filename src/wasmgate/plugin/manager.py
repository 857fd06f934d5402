"""Plugins over time: loading, Istio ordering, VM sharing, live swap, fail-reload and recycling.

A ``PluginHandle`` is one WasmPlugin resource. Its VM generations are ``Plugin``s:
a stream takes the current one when it starts and gives it back when it ends, so
a swap never touches in-flight requests; a replaced VM is torn down once its last
stream is done. The ``Chain`` (ordered handles) is replaced as a whole.

Plugins with the same VM key (Envoy's: vm_id, VM configuration and module) share one
module instance per process (``VmPool``), each with its own root context, as Envoy
shares one VM per worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import wasmtime

from wasmgate.engine.wasm import WasmError, compile_module, new_engine
from wasmgate.host.attributes import XdsInfo
from wasmgate.oci.auth import Keychain
from wasmgate.oci.errors import OciError
from wasmgate.oci.fetch import ModuleCache, fetch_module
from wasmgate.plugin.spec import FailStrategy, PluginSpec
from wasmgate.plugin.vm import Plugin, PluginError, PluginStats, PluginVM, SharedVM
from wasmgate.proxy.callout import Callouts

_log = logging.getLogger("wasmgate.wasm")

_engine: wasmtime.Engine | None = None

# FAIL_RELOAD: backoff doubles from limits.reload_backoff up to RELOAD_BACKOFF_MAX;
# after CRASH_LOOP_MAX failures within CRASH_LOOP_WINDOW the plugin stops being
# reloaded until its resource or module changes (the spec asks hosts to bound restarts).
RELOAD_BACKOFF_MAX = 30.0
CRASH_LOOP_MAX = 5
CRASH_LOOP_WINDOW = 60.0


def engine() -> wasmtime.Engine:
    global _engine
    if _engine is None:
        _engine = new_engine()
    return _engine


def cache_dir() -> Path | None:
    """Compiled-module cache: $WASMGATE_CACHE_DIR, else ~/.cache/wasmgate; "off" disables it."""
    env = os.environ.get("WASMGATE_CACHE_DIR")
    if env == "off":
        return None
    return Path(env) if env else Path.home() / ".cache" / "wasmgate" / "compiled"


# Istio's order (docs/configuration.md, spec.priority): it lists a namespace's plugins by
# creation time, then name, and stable-sorts them by priority, an unset one as the lowest
# int32. The namespaces come in the workload's, then the root's; wasmgate has neither, so
# in name order. Since 1.30 the names compared are those of the TrafficExtensions it
# translates WasmPlugins into: the name and this suffix.
_UNSET_PRIORITY = -(1 << 31)
_NO_TIME = datetime.min.replace(tzinfo=UTC)  # Go's zero time: no creationTimestamp sorts first
_TRANSLATED_SUFFIX = "~istio-translated-wasmplugin"


def chain_order(specs: list[PluginSpec]) -> list[PluginSpec]:
    """Istio's order: by phase, priority (higher first), namespace, creation time, name."""
    return sorted(specs, key=lambda s: (s.phase.rank, -(_UNSET_PRIORITY if s.priority is None else s.priority),
                                        s.namespace, s.created or _NO_TIME, s.name + _TRANSLATED_SUFFIX))


@dataclass(frozen=True)
class Module:
    """A compiled module and the identity it was compiled from."""

    path: Path
    sha256: str
    compiled: wasmtime.Module


class FetchFailed(PluginError):
    """A remote module could not be fetched (the plugin may have no version at all)."""


_module_cache: ModuleCache | None = None


def module_cache() -> ModuleCache:
    global _module_cache
    if _module_cache is None:
        _module_cache = ModuleCache()
    return _module_cache


def _read_module(spec: PluginSpec, where: str) -> tuple[Path, bytes]:
    """The module's bytes: a local file, or fetched (oci://, http(s)://) into the cache."""
    if spec.module_path is not None:
        try:
            return spec.module_path, spec.module_path.read_bytes()
        except OSError as e:
            raise PluginError(f"{where}: plugin {spec.name}: cannot read module {spec.module_path}: "
                              f"{e.strerror or e}") from None
    auth = Keychain.from_dockerconfigjson(spec.pull_secret, f"imagePullSecret of {spec.name}") \
        if spec.pull_secret else None
    try:
        fetched = fetch_module(spec.url, sha256=spec.sha256, pull_policy=spec.pull_policy, auth=auth,
                               cache=module_cache())
        return fetched.path, fetched.path.read_bytes()
    except (OciError, OSError) as e:
        raise FetchFailed(f"{where}: plugin {spec.name}: {e}") from None


def compile_spec(spec: PluginSpec) -> Module:
    """Fetch if remote, read and compile a plugin's module (blocking: run it off the loop)."""
    where = spec.source or spec.url or str(spec.module_path)
    path, wasm = _read_module(spec, where)
    sha = hashlib.sha256(wasm).hexdigest()
    try:
        return Module(path, sha, compile_module(engine(), wasm, str(path), cache_dir(), sha))
    except WasmError as e:
        raise PluginError(f"{where}: plugin {spec.name}: {e}") from None


def start_vm(spec: PluginSpec, module: Module, stats: PluginStats, shared: SharedVM | None = None) -> PluginVM:
    """Start the plugin (context_create, vm_start, configure) on a new instance, or on
    ``shared``, another plugin's (then on that instance's thread: the event loop's).
    On a new instance this is also the canary check before a swap."""
    where = spec.source or spec.url or str(spec.module_path)
    try:
        vm = PluginVM(spec, engine(), module.compiled, stats, shared=shared)
    except WasmError as e:
        raise PluginError(f"{where}: plugin {spec.name}: {e}") from None
    try:
        vm.start()
    except PluginError as e:
        raise PluginError(f"{where}: {e}") from None
    return vm


def vm_key(spec: PluginSpec, sha256: str) -> str:
    """Envoy's VM key (vm_id, VM configuration, code), plus the sandbox limits that belong
    to an instance: plugins with other limits cannot share one."""
    lim = spec.limits
    parts = (spec.vm_id.encode(), spec.vm_config, sha256.encode(),
             repr((lim.max_memory_bytes, lim.callback_deadline, lim.start_deadline, lim.max_random_bytes,
                   lim.memory_recycle_bytes)).encode())
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "little") + part)
    return h.hexdigest()


class VmPool:
    """One process's live instances by VM key: a plugin whose key matches joins one
    (Envoy's per-worker VM cache). A failed or retiring instance is never joined."""

    def __init__(self) -> None:
        self._vms: dict[str, SharedVM] = {}

    def find(self, key: str) -> SharedVM | None:
        sv = self._vms.get(key)
        if sv is not None and (sv.failed is not None or sv.retiring or not sv.plugins):
            del self._vms[key]
            return None
        return sv

    def keys(self) -> list[str]:
        """The VM keys of the instances new plugins can join (no __len__: an empty pool is still a pool)."""
        return list(self._vms)

    def retain(self, live: Iterable[SharedVM]) -> None:
        """Forget the instances the serving chain no longer runs on (streams still on one keep it alive)."""
        keep = {id(sv) for sv in live}
        for key in [k for k, sv in self._vms.items() if id(sv) not in keep]:
            del self._vms[key]

    def add(self, key: str, vm: PluginVM) -> None:
        """``vm`` started on a new instance: plugins with its key join that from now on."""
        vm.shared.key = key
        if self.find(key) is None:
            self._vms[key] = vm.shared

    def place(self, spec: PluginSpec, module: Module, stats: PluginStats) -> PluginVM:
        """Start the plugin on the live instance for its key, or on a new one."""
        key = vm_key(spec, module.sha256)
        vm = start_vm(spec, module, stats, self.find(key))
        self.add(key, vm)
        return vm


class PluginHandle:
    """One WasmPlugin resource: its current VM, its state, its counters."""

    def __init__(self, spec: PluginSpec, module: Module | None, vm: PluginVM | None, *, error: str | None = None,
                 stats: PluginStats | None = None):
        self.spec = spec
        self.module = module
        self.stats = stats or (vm.stats if vm else PluginStats())
        self.current: Plugin | None = None
        self.error = error  # last load/reload/swap error, shown on /plugins
        self.failures: deque[float] = deque(maxlen=CRASH_LOOP_MAX)
        self.reloading = False
        self.crash_looping = False
        self.reloads = 0
        self.recycles = 0
        self._spawn: Callable[[PluginHandle], None] | None = None
        if module is not None and spec.remote:
            module_cache().pin(module.path)  # never expired from the cache while in use
        if vm is not None:
            self._install(vm)

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def sha256(self) -> str:
        return self.module.sha256 if self.module else ""

    @property
    def vm(self) -> PluginVM | None:
        return self.current.vm if self.current else None

    @property
    def state(self) -> str:
        if self.module is None:
            return "unavailable"  # never fetched or compiled: no version at all
        if self.crash_looping:
            return "crash-looping"
        if self.reloading:
            return "reloading"
        vm = self.vm
        return "running" if vm is not None and vm.failed is None else "failed"

    # ---- streams -------------------------------------------------------------------

    def checkout(self) -> Plugin | None:
        """The VM for a new stream, or None when there is no healthy one."""
        cur = self.current
        return cur if cur is not None and cur.checkout() else None

    def checkin(self, plugin: Plugin) -> None:
        if plugin.checkin():
            self.released(plugin)

    def released(self, plugin: Plugin) -> None:
        """A stream checked ``plugin`` in and it asked for this (Plugin.checkin): tear down
        a retired generation, or recycle an instance over its memory limit."""
        if plugin.retired:
            _teardown(plugin.vm)
        elif not self.reloading:
            _log.warning("plugin %s: linear memory %d bytes is over %d; recycling its VM",
                         self.name, plugin.vm.memory_bytes(), plugin.recycle_limit)
            self._recycle_vm(plugin.vm)

    # ---- VM generations ------------------------------------------------------------

    @staticmethod
    def _recycle_vm(vm: PluginVM) -> None:
        """Replace the instance for every plugin on it (they share its memory)."""
        vm.shared.retiring = True  # new and reloading plugins start a fresh one
        for p in list(vm.shared.plugins):
            if p.on_recycle is not None:
                p.on_recycle(p)

    def _recycled(self, vm: PluginVM) -> None:
        cur = self.current
        if self.reloading or cur is None or cur.vm is not vm or vm.failed is not None:
            return  # not this handle's current version (a retired one still finishing streams)
        self.recycles += 1
        self._respawn()

    def _install(self, vm: PluginVM) -> None:
        old = self.current
        self.current = Plugin(self, vm)
        vm.on_failed = self._vm_failed
        vm.on_recycle = self._recycled
        vm.activate()
        if old is not None:
            old.retired = True
            if old.active == 0:
                _teardown(old.vm)

    def _vm_failed(self, vm: PluginVM | None = None) -> None:
        if vm is not None and (self.current is None or self.current.vm is not vm):
            return  # a retired version failed (with the instance it shares): the current one is fine
        self.failures.append(time.monotonic())
        if self.spec.fail_strategy != FailStrategy.FAIL_RELOAD:
            return
        recent = [t for t in self.failures if time.monotonic() - t < CRASH_LOOP_WINDOW]
        if len(recent) >= CRASH_LOOP_MAX:
            self.crash_looping = True
            _log.error("plugin %s: %d failures within %.0fs; not reloading it again until it changes",
                       self.name, len(recent), CRASH_LOOP_WINDOW)
            return
        self._respawn(delay=min(self.spec.limits.reload_backoff * 2 ** (len(recent) - 1), RELOAD_BACKOFF_MAX))

    def _respawn(self, delay: float = 0.0) -> None:
        if self.reloading or self.module is None or self._spawn is None:
            return
        self.reloading = True
        spawn = self._spawn
        try:
            asyncio.get_running_loop().call_later(delay, spawn, self)
        except RuntimeError:
            self.reloading = False  # no event loop: nothing can reload it

    def replaced(self) -> None:
        """This handle left the chain: retire its VM once its streams are done."""
        cur, self.current = self.current, None
        self._spawn = None
        if self.module is not None and self.spec.remote:
            module_cache().unpin(self.module.path)
        if cur is not None:
            cur.retired = True
            if cur.active == 0:
                _teardown(cur.vm)

    def describe(self) -> dict[str, object]:
        vm = self.vm
        shared = vm.shared if vm else None
        return {
            "name": self.name,
            "namespace": self.spec.namespace,
            "root_id": self.spec.root_id,
            "vm_id": self.spec.vm_id,
            "source": self.spec.source,
            "url": self.spec.url or str(self.spec.module_path),
            "module": str(self.module.path) if self.module else None,
            "target_refs": list(self.spec.target_refs),
            "sha256": self.sha256,
            "abi_version": vm.abi.label if vm else None,
            "state": self.state,
            "phase": self.spec.phase.value,
            "priority": self.spec.priority,
            "fail_strategy": self.spec.fail_strategy.value,
            "memory_bytes": vm.memory_bytes() if vm else 0,
            "last_error": (vm.failed if vm and vm.failed else self.error),
            "calls": self.stats.calls,
            "errors": self.stats.errors,
            "failed_streams": self.stats.failed_streams,
            "reloads": self.reloads,
            "recycles": self.recycles,
            # The instance: its key (shared by every plugin on it), its other plugins, this
            # plugin's root context there.
            "vm_key": shared.key[:16] if shared else None,
            "vm_instance": shared.serial if shared else None,
            "vm_shared_with": [n for n in shared.names() if n != self.name] if shared else [],
            "root_context_id": vm.root.id if vm else None,
        }


def _teardown(vm: PluginVM) -> None:
    with contextlib.suppress(Exception):  # a VM on its way out must not hurt anyone
        vm.shutdown()


class Chain:
    """The active plugin chain; replaced as a whole so a stream sees one version."""

    def __init__(self, plugins: list[PluginHandle], pool: VmPool | None = None):
        self.plugins = plugins  # every plugin, HTTP and network
        self.pool = pool or VmPool()  # the instances its plugins run on
        self.http = [h for h in plugins if not h.spec.network]
        self.network = [h for h in plugins if h.spec.network]  # for the TCP proxy listeners


def load_handle(spec: PluginSpec, pool: VmPool | None = None) -> PluginHandle:
    """Compile and start one plugin now (startup), on the instance of ``pool`` for its VM
    key if there is one. Raises PluginError naming it, except when a remote module cannot
    be fetched: that gives a handle with no version, which serves its fail strategy until
    a later reload fetches it (as Istio does)."""
    try:
        module = compile_spec(spec)
    except FetchFailed as e:
        _log.error("%s; serving its fail strategy until it can be fetched", e)
        return PluginHandle(spec, None, None, error=str(e))
    vm = (pool or VmPool()).place(spec, module, PluginStats())
    _log.info("plugin %s loaded: abi %s, sha256 %s%s", spec.name, vm.abi.label, module.sha256[:12], _sharing(vm))
    return PluginHandle(spec, module, vm)


def _sharing(vm: PluginVM) -> str:
    others = [n for n in vm.shared.names() if n != vm.name]
    return f", sharing its VM with {', '.join(others)}" if others else ""


def _kept_module(old: PluginHandle | None, spec: PluginSpec) -> Module | None:
    """The module a remote plugin keeps with no fetch at all, as istio-agent does: its spec
    is unchanged (whatever its pull policy), so another plugin's update asks no registry.
    A ``file://`` module is read again: the update may be that file's own edit."""
    return old.module if old is not None and spec.remote and old.spec == spec else None


class PluginManager:
    """Owns the chain; applies new resource sets with compile and canary off the loop."""

    def __init__(self, chain: Chain | None = None, callouts: Callouts | None = None,
                 xds: XdsInfo | None = None):
        self.chain = chain or Chain([])
        self.pool = self.chain.pool
        self.callouts = callouts
        self.xds = xds or XdsInfo()  # node, listener, route, cluster: the xds.* attributes
        for h in self.chain.plugins:
            h._spawn = self._spawn
            if h.vm is not None:
                self._attach(h.vm)
        self._lock = asyncio.Lock()
        # Modules the retry loop fetched (fetch_unavailable), by plugin, with the unavailable
        # handle they were fetched for: the next apply uses one only while that very handle is
        # still the plugin's, with the spec wanted (not for a newer spec, nor a plugin removed
        # and added again meanwhile: that one was fetched anew).
        self._fetched: dict[tuple[str, str], tuple[PluginHandle, Module]] = {}
        self.swaps = 0
        # Told of each new chain (the proxy keeps its HTTP plugins at hand, not one lookup
        # on this object per request).
        self.on_swap: list[Callable[[Chain], None]] = []
        self.resource_errors: dict[str, str] = {}  # resource file -> why it is not applied

    async def apply(self, specs: list[PluginSpec], keep: set[str] | None = None) -> dict[str, str]:
        """Make the chain match ``specs``. Returns errors by plugin name.

        A plugin whose new version fails to load keeps serving its old version; so
        does every plugin defined in a file listed in ``keep`` (a file that could not
        be read this time).
        """
        async with self._lock:
            loop = asyncio.get_running_loop()
            current = {(h.spec.namespace, h.name): h for h in self.chain.plugins}
            errors: dict[str, str] = {}
            handles: list[PluginHandle] = []
            for h in self.chain.plugins:
                if keep and h.spec.source in keep:
                    handles.append(h)
            for spec in specs:
                old = current.get((spec.namespace, spec.name))
                pre = self._fetched.pop((spec.namespace, spec.name), None)
                retried = pre[1] if pre is not None and old is not None and pre[0] is old and old.spec == spec \
                    else None
                if retried is None and old is not None and old.module is None and old.spec == spec and spec.remote:
                    handles.append(old)  # its fetch failed: the retry loop fetches it, outside this lock
                    continue
                try:
                    module = retried or _kept_module(old, spec)
                    if module is None:
                        module = await loop.run_in_executor(None, compile_spec, spec)
                    if old is not None and old.spec == spec and old.sha256 == module.sha256 and \
                            not old.crash_looping:
                        handles.append(old)  # unchanged
                        continue
                    # The canary: a new instance, off the loop. Joining a live instance
                    # runs the plugin's start there, on the loop (its thread).
                    vm = await loop.run_in_executor(None, start_vm, spec, module, PluginStats())
                    vm = self._share(spec, module, vm)
                    self._attach(vm)
                except PluginError as e:
                    errors[spec.name] = str(e)
                    _log.error("%s; %s", e, "the previous version keeps serving" if old and old.module else
                               "not loaded")
                    if old is not None and (old.module is not None or old.spec == spec):
                        old.error = str(e)
                        handles.append(old)
                    elif isinstance(e, FetchFailed):  # no version at all: its fail strategy answers
                        handles.append(PluginHandle(spec, None, None, error=str(e)))
                    continue
                h = PluginHandle(spec, module, vm)
                h._spawn = self._spawn
                handles.append(h)
                _log.info("plugin %s %s: abi %s, sha256 %s%s", spec.name, "swapped" if old else "loaded",
                          vm.abi.label, module.sha256[:12], _sharing(vm))
            new = Chain(chain_order_handles(handles), self.pool)
            kept = {id(h) for h in new.plugins}
            old_chain, self.chain = self.chain, new  # the swap: new streams use the new chain
            for notify in self.on_swap:
                notify(new)
            self.pool.retain(h.current.vm.shared for h in new.plugins if h.current is not None)
            self.swaps += 1
            self._fetched.clear()  # fetched for plugins no longer wanted
            for h in old_chain.plugins:
                if id(h) not in kept:
                    h.replaced()
            return errors

    async def fetch_unavailable(self) -> int:
        """Fetch the modules of remote plugins that have none (their fetch failed), concurrently
        and outside apply's lock, so a slow or unreachable registry holds up no other update;
        the next apply swaps in those whose handle is still the plugin's. Returns how many came."""
        loop = asyncio.get_running_loop()
        todo = [h for h in self.chain.plugins if h.module is None and h.spec.remote]
        got = await asyncio.gather(*(loop.run_in_executor(None, compile_spec, h.spec) for h in todo),
                                   return_exceptions=True)
        fetched = {}
        for h, r in zip(todo, got, strict=True):
            if isinstance(r, Module):
                fetched[(h.spec.namespace, h.name)] = (h, r)
            elif isinstance(r, Exception):  # PluginError, or a bad pull secret: never stop retrying
                _log.error("%s; not loaded, fetching it again later", r)
                h.error = str(r)
            else:
                raise r
        async with self._lock:  # not while an apply runs: its end drops what it did not use
            self._fetched.update(fetched)
        return len(fetched)

    def _share(self, spec: PluginSpec, module: Module, fresh: PluginVM) -> PluginVM:
        """``fresh`` started on a new instance: join the live instance for its key instead
        (dropping ``fresh`` unheard, as Envoy drops its canary), or make it that instance."""
        key = vm_key(spec, module.sha256)
        shared = self.pool.find(key)
        if shared is None:
            self.pool.add(key, fresh)
            return fresh
        fresh.discard()
        return start_vm(spec, module, fresh.stats, shared)

    def _attach(self, vm: PluginVM) -> None:
        """What a VM reaches through host calls beyond its own plugin."""
        vm.callouts = self.callouts
        vm.xds = self.xds

    def _spawn(self, handle: PluginHandle) -> None:
        asyncio.get_running_loop().create_task(self._reload(handle))

    async def _reload(self, handle: PluginHandle) -> None:
        """A fresh VM from the same module (FAIL_RELOAD, memory recycling)."""
        module = handle.module
        assert module is not None  # _respawn checked
        try:
            # Another plugin on the failed or recycled instance may have a fresh one already.
            shared = self.pool.find(vm_key(handle.spec, module.sha256))
            if shared is not None:
                vm = start_vm(handle.spec, module, handle.stats, shared)
            else:
                vm = await asyncio.get_running_loop().run_in_executor(None, start_vm, handle.spec, module,
                                                                      handle.stats)
                vm = self._share(handle.spec, module, vm)
        except PluginError as e:
            handle.reloading = False
            handle.error = str(e)
            _log.error("plugin %s: reload failed: %s", handle.name, e)
            if handle._spawn is not None:
                handle._vm_failed()  # counts towards backoff and crash-loop protection
            return
        handle.reloading = False
        if handle._spawn is None:  # left the chain meanwhile
            _teardown(vm)
            return
        self._attach(vm)
        handle.reloads += 1
        handle._install(vm)
        _log.info("plugin %s: new VM running%s", handle.name, _sharing(vm))


def chain_order_handles(handles: list[PluginHandle]) -> list[PluginHandle]:
    by_spec = {id(h.spec): h for h in handles}
    return [by_spec[id(s)] for s in chain_order([h.spec for h in handles])]
