"""WASI preview1, as far as Go, TinyGo and Rust plugins import it.

No filesystem and no sockets: stdout/stderr go to the proxy log (info/error, as
Envoy does), environ comes from ``vmConfig.env``, args are empty, clocks and
random work, ``proc_exit`` fails the VM. Anything else returns ENOSYS.
"""

from __future__ import annotations

import os
import struct
import time
from typing import TYPE_CHECKING

from wasmgate.abi.constants import LogLevel
from wasmgate.engine.wasm import ProcExit
from wasmgate.host.general import MAX_LOG_LINE
from wasmgate.host.registry import WASI, hostcall

if TYPE_CHECKING:
    from wasmgate.plugin.vm import PluginVM

ESUCCESS = 0
EBADF = 8
EFAULT = 21
EINVAL = 28
ESPIPE = 70

_FILETYPE_CHARACTER_DEVICE = 2


@hostcall("iiii", module=WASI)
def fd_write(vm: PluginVM, fd: int, iovs: int, iovs_len: int, nwritten_ptr: int) -> int:
    if fd not in (1, 2):
        return EBADF
    raw = vm.read(iovs, 8 * (iovs_len & 0xFFFFFFFF))
    if raw is None:
        return EFAULT
    chunks = []
    for i in range(len(raw) // 8):
        ptr, size = struct.unpack_from("<II", raw, 8 * i)
        data = vm.read(ptr, size)
        if data is None:
            return EFAULT
        chunks.append(data)
    out = b"".join(chunks)
    if out:  # as Envoy: one line per non-empty write, its one trailing newline dropped ("\n" logs "")
        line = out[:-1] if out.endswith(b"\n") else out
        text = line[:MAX_LOG_LINE].decode("utf-8", "replace")
        if len(line) > MAX_LOG_LINE:
            text += f"... [{len(line) - MAX_LOG_LINE} more bytes]"
        vm.log(LogLevel.INFO if fd == 1 else LogLevel.ERROR, text)
    return ESUCCESS if vm.instance.write_u32(nwritten_ptr, len(out)) else EFAULT


@hostcall("iiii", module=WASI)
def fd_read(vm: PluginVM, fd: int, iovs: int, iovs_len: int, nread_ptr: int) -> int:
    if fd != 0:
        return EBADF
    return ESUCCESS if vm.instance.write_u32(nread_ptr, 0) else EFAULT  # stdin is empty


@hostcall("ii", module=WASI)
def fd_fdstat_get(vm: PluginVM, fd: int, ptr: int) -> int:
    if fd not in (0, 1, 2):
        return EBADF
    stat = struct.pack("<BxHxxxxQQ", _FILETYPE_CHARACTER_DEVICE, 0, 0, 0)
    return ESUCCESS if vm.instance.write(ptr, stat) else EFAULT


@hostcall("ii", module=WASI)
def fd_fdstat_set_flags(vm: PluginVM, fd: int, flags: int) -> int:
    return ESUCCESS if fd in (0, 1, 2) else EBADF


@hostcall("i", module=WASI)
def fd_close(vm: PluginVM, fd: int) -> int:
    return ESUCCESS if fd in (0, 1, 2) else EBADF


@hostcall("iIii", module=WASI)
def fd_seek(vm: PluginVM, fd: int, offset: int, whence: int, ptr: int) -> int:
    return ESPIPE if fd in (0, 1, 2) else EBADF


@hostcall("ii", module=WASI)
def fd_prestat_get(vm: PluginVM, fd: int, ptr: int) -> int:
    return EBADF  # no preopened directories: no filesystem


@hostcall("iii", module=WASI)
def fd_prestat_dir_name(vm: PluginVM, fd: int, ptr: int, size: int) -> int:
    return EBADF


def _sizes(vm: PluginVM, items: list[bytes], count_ptr: int, size_ptr: int) -> int:
    ok = vm.instance.write_u32(count_ptr, len(items)) and vm.instance.write_u32(
        size_ptr, sum(len(x) + 1 for x in items))
    return ESUCCESS if ok else EFAULT


def _strings(vm: PluginVM, items: list[bytes], ptrs: int, buf: int) -> int:
    offset = buf
    for i, item in enumerate(items):
        if not (vm.instance.write_u32(ptrs + 4 * i, offset) and vm.instance.write(offset, item + b"\0")):
            return EFAULT
        offset += len(item) + 1
    return ESUCCESS


@hostcall("ii", module=WASI)
def environ_sizes_get(vm: PluginVM, count_ptr: int, size_ptr: int) -> int:
    return _sizes(vm, vm.wasi_env, count_ptr, size_ptr)


@hostcall("ii", module=WASI)
def environ_get(vm: PluginVM, ptrs: int, buf: int) -> int:
    return _strings(vm, vm.wasi_env, ptrs, buf)


@hostcall("ii", module=WASI)
def args_sizes_get(vm: PluginVM, count_ptr: int, size_ptr: int) -> int:
    return _sizes(vm, [], count_ptr, size_ptr)


@hostcall("ii", module=WASI)
def args_get(vm: PluginVM, ptrs: int, buf: int) -> int:
    return ESUCCESS


def _clock_ns(clock_id: int) -> int | None:
    if clock_id == 0:
        return time.time_ns()
    if clock_id == 1:
        return time.monotonic_ns()
    if clock_id in (2, 3):
        return time.process_time_ns()
    return None


@hostcall("iIi", module=WASI)
def clock_time_get(vm: PluginVM, clock_id: int, precision: int, ptr: int) -> int:
    now = _clock_ns(clock_id)
    if now is None:
        return EINVAL
    return ESUCCESS if vm.instance.write_u64(ptr, now) else EFAULT


@hostcall("ii", module=WASI)
def clock_res_get(vm: PluginVM, clock_id: int, ptr: int) -> int:
    if _clock_ns(clock_id) is None:
        return EINVAL
    return ESUCCESS if vm.instance.write_u64(ptr, 1000) else EFAULT


@hostcall("ii", module=WASI)
def random_get(vm: PluginVM, ptr: int, size: int) -> int:
    size &= 0xFFFFFFFF
    if size > vm.spec.limits.max_random_bytes:
        return EINVAL
    return ESUCCESS if vm.instance.write(ptr, os.urandom(size)) else EFAULT


@hostcall("", module=WASI)
def sched_yield(vm: PluginVM) -> int:
    return ESUCCESS


@hostcall("iiii", module=WASI)
def poll_oneoff(vm: PluginVM, in_ptr: int, out_ptr: int, nsubs: int, nevents_ptr: int) -> int:
    """Report every subscription as ready at once: a plugin must never block the proxy."""
    if nsubs <= 0:
        return EINVAL
    subs = vm.read(in_ptr, 48 * (nsubs & 0xFFFFFFFF))
    if subs is None:
        return EFAULT
    events = b"".join(
        struct.pack("<QHB", struct.unpack_from("<Q", subs, 48 * i)[0], ESUCCESS, subs[48 * i + 8]).ljust(32, b"\0")
        for i in range(nsubs))
    if not vm.instance.write(out_ptr, events):
        return EFAULT
    return ESUCCESS if vm.instance.write_u32(nevents_ptr, nsubs) else EFAULT


@hostcall("i", "", module=WASI)
def proc_exit(vm: PluginVM, code: int) -> None:
    raise ProcExit(code)
