"""Watch a few directories (not recursively) for changed files, on the event loop itself.

``watch_dirs`` yields sets of changed paths, debounced. On Linux it reads inotify through the
event loop (asyncinotify for the watches and event decoding; the fd is our own reader), so no
thread competes with the data plane for the GIL. Where inotify cannot be used (another OS, or
the per-user inotify limits are reached) it falls back to comparing ``stat`` snapshots every
``poll_interval`` seconds, also on the event loop.

A watched directory that is deleted or moved away is reported as changed itself; the caller
re-evaluates what it watches (see resources/watch.py and resources/feed.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import sys
from collections.abc import AsyncGenerator, Callable, Iterable
from pathlib import Path

if sys.platform == "linux":
    from asyncinotify import Event, Inotify, Mask, Watch

    # Kernel events after which a file in the directory may read differently.
    _MASK = (Mask.CLOSE_WRITE | Mask.MOVED_TO | Mask.MOVED_FROM | Mask.CREATE | Mask.DELETE | Mask.ATTRIB
             | Mask.DELETE_SELF | Mask.MOVE_SELF | Mask.ONLYDIR)

_log = logging.getLogger("wasmgate.config")


async def watch_dirs(roots: Iterable[Path], stop: asyncio.Event | None = None, *, debounce: float = 0.01,
                     cap: float = 0.05, existing: bool = False, poll: bool = False,
                     poll_interval: float = 1.0) -> AsyncGenerator[set[Path], None]:
    """Changed paths under ``roots``, until ``stop`` is set.

    After a first change, changes are collected until ``debounce`` seconds pass without one
    (at most ``cap`` seconds, so a constant stream still yields). ``existing``: the first batch
    is every root and what it holds, once watched, so nothing written just before is missed.
    ``poll`` forces the stat poller (the fallback, also for tests).
    """
    stop = stop or asyncio.Event()
    dirs = sorted(set(roots))
    batches = None if poll else _InotifyBatches.open(dirs, stop, debounce, cap)
    if batches is None:
        async for polled in _poll_batches(dirs, stop, poll_interval, existing):
            yield polled
        return
    try:
        if existing:
            yield _listing(batches.watches)
        while (changed := await batches.next()) is not None:
            yield changed
    finally:
        batches.close()


async def relevant_changes(watched: Callable[[], set[Path]], stop: asyncio.Event, *, poll: bool = False,
                           poll_interval: float = 1.0) -> AsyncGenerator[None, None]:
    """Yields after each batch of changes that may change what reading ``watched()`` gives
    (files, and directories of ``*.yaml``/``*.yml`` files), until ``stop`` is set.

    A change counts when it is to one of those files, a YAML file in one of those directories,
    a symlink on the way to one or where it ends (Kubernetes updates a ConfigMap or Secret
    volume by renaming its ``..data`` symlink: the ``key -> ..data/key`` links read stay as
    they are), or when a watched directory goes away. Watches the directories that takes and
    watches again when they change (then the first batch is everything there, so a change
    made between two watches is not lost); with none, looks again every second."""
    rewatch = False
    while not stop.is_set():
        through, dirs = _lookups(watched())
        if not dirs:  # nothing to watch yet (paths that do not exist)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await stop.wait()
            rewatch = True
            continue
        async with contextlib.aclosing(watch_dirs(dirs, stop, existing=rewatch, poll=poll,
                                                  poll_interval=poll_interval)) as batches:
            async for changed in batches:
                before = through
                through, now = _lookups(watched())
                if now and now != dirs:
                    break  # watch what is there now first: its first batch (everything) then yields, once
                if not changed.isdisjoint(dirs | before | through):  # the ways before the change, or now
                    yield
                    through, now = _lookups(watched())  # the caller may use other modules now
                if now != dirs:
                    break  # modules moved, or a directory went away or came back: watch what is there now
        rewatch = True


def lookup(path: Path) -> list[Path]:
    """``path``, each symlink that reading it follows and, last, what it resolves to: the
    paths whose change may change what ``path`` reads, each named in its real directory."""
    path = path.absolute()
    head = Path(path.anchor)
    rest = list(path.parts[1:])
    links: list[Path] = []
    while rest:
        name = rest.pop(0)
        if name == "..":
            head = head.parent
            continue
        if name in ("", "."):
            continue
        target = _readlink(head / name) if len(links) < 40 else None  # 40: Linux's limit (a loop)
        if target is None:
            head = head / name
            continue
        links.append(head / name)
        if target.is_absolute():
            head = Path(target.anchor)
        rest[:0] = target.parts[1:] if target.is_absolute() else target.parts
    return [*links, head]


def _readlink(path: Path) -> Path | None:
    try:
        return Path(os.readlink(path))
    except OSError:  # not a symlink, or nothing there
        return None


def _lookups(watched: set[Path]) -> tuple[set[Path], set[Path]]:
    """What reading ``watched`` goes through (``lookup`` of each file, and of each YAML file in
    each directory), and the directories to watch for that: where those are, and the
    directories read."""
    through: set[Path] = set()
    dirs: set[Path] = set()
    for path in watched:
        *chain, end = lookup(path)
        if end.is_dir():
            dirs.add(end)
            with contextlib.suppress(OSError):
                chain += [q for f in end.iterdir() if f.suffix in (".yaml", ".yml") for q in lookup(f)]
        else:
            chain.append(end)
        through.update(chain)
        dirs.update(q.parent for q in chain)
    return through, {d for d in dirs if d.is_dir()}


class _InotifyBatches:
    def __init__(self, inotify: Inotify, stop: asyncio.Event, debounce: float, cap: float):
        self.inotify = inotify
        self.stop = stop
        self.debounce = debounce
        self.cap = cap
        self.loop = asyncio.get_running_loop()
        self.watches: dict[Path, Watch] = {}
        self.lost: set[Path] = set()  # watched roots that went away: re-added if they come back
        self.pending: set[Path] = set()
        self.last = 0.0  # loop time of the latest event
        self.wake = asyncio.Event()  # an event arrived, or stop was set
        self.failure: OSError | None = None
        self._stopper = self.loop.create_task(stop.wait())
        self._stopper.add_done_callback(lambda _: self.wake.set())
        # Nonblocking, so a read can never stall the event loop.
        os.set_blocking(inotify.fd, False)
        self.loop.add_reader(inotify.fd, self._on_readable)

    @classmethod
    def open(cls, dirs: list[Path], stop: asyncio.Event, debounce: float, cap: float) -> _InotifyBatches | None:
        """Watches on ``dirs``, or None (logged) when inotify is not available here."""
        if sys.platform != "linux":
            _log.info("no inotify on %s: polling %s for changes", sys.platform, ", ".join(map(str, dirs)))
            return None
        try:
            inotify = Inotify(sync_timeout=0)  # sync_get() then never blocks: it returns None when drained
        except (OSError, RuntimeError) as e:
            _log.warning("inotify unavailable (%s): polling %s for changes", e, ", ".join(map(str, dirs)))
            return None
        batches = cls(inotify, stop, debounce, cap)
        for d in dirs:
            try:
                batches._add(d)
            except OSError as e:
                batches.close()
                _log.warning("cannot watch %s (%s): polling for changes", d, e)
                return None
        return batches

    def _add(self, d: Path) -> None:
        try:
            self.watches[d] = self.inotify.add_watch(d, _MASK)
        except OSError as e:
            if e.errno not in (errno.ENOENT, errno.ENOTDIR):
                raise
            self._lose(d, "is gone")

    def _lose(self, d: Path, why: str) -> None:
        _log.info("watched directory %s %s: not watched until it is back", d, why)
        self.watches.pop(d, None)
        self.lost.add(d)
        self._changed(d)

    def _changed(self, path: Path) -> None:
        self.pending.add(path)
        self.last = self.loop.time()
        self.wake.set()

    def _on_readable(self) -> None:
        try:
            while (event := self.inotify.sync_get()) is not None:
                self._handle(event)
        except BlockingIOError:
            pass
        except OSError as e:  # raised by next(), in the watching task
            self.failure = e
            self.loop.remove_reader(self.inotify.fd)
            self.wake.set()

    def _handle(self, event: Event) -> None:
        if Mask.Q_OVERFLOW in event.mask:  # events were dropped: everything may have changed
            for path in _listing(self.watches):
                self._changed(path)
            return
        watch = event.watch
        if watch is None:
            return
        root = watch.path
        if event.name is not None:
            self._changed(root / event.name)
        elif Mask.IGNORED in event.mask or Mask.DELETE_SELF in event.mask:
            if self.watches.get(root) is watch:
                self._lose(root, "was deleted")
        elif Mask.MOVE_SELF in event.mask and self.watches.get(root) is watch:
            # The watch follows the moved directory: drop it, the path now names something else.
            with contextlib.suppress(OSError):
                self.inotify.rm_watch(watch)
            self._lose(root, "was moved away")

    async def next(self) -> set[Path] | None:
        """The next debounced batch, or None once stop is set."""
        # Roots deleted and created again since the last batch: watch them again, and report
        # them (and what they hold) since files may have been written before the watch.
        for d in sorted(self.lost):
            if d.is_dir():
                self.lost.discard(d)
                self._add(d)
                if d in self.watches:
                    _log.info("watching %s again", d)
                    for path in _listing([d]):
                        self._changed(path)
        while True:
            await self.wake.wait()
            first = self.loop.time()
            while not self.stop.is_set() and self.failure is None:
                left = min(self.last + self.debounce, first + self.cap) - self.loop.time()
                if left <= 0:
                    break
                self.wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(left):
                        await self.wake.wait()
            if self.failure is not None:
                raise self.failure
            if self.stop.is_set():
                return None
            self.wake.clear()
            if self.pending:
                changed, self.pending = self.pending, set()
                return changed

    def close(self) -> None:
        self._stopper.cancel()
        # Unregister before closing, so the loop never holds a number the OS may reuse.
        if self.failure is None:
            self.loop.remove_reader(self.inotify.fd)
        self.inotify.close()


def _listing(dirs: Iterable[Path]) -> set[Path]:
    """The directories and what they hold."""
    found = set(dirs)
    for d in list(found):
        with contextlib.suppress(OSError), os.scandir(d) as entries:
            found |= {d / entry.name for entry in entries}
    return found


def _snapshot(d: Path) -> dict[str, tuple[int, int, int, int]] | None:
    """What a poll compares: name -> (mtime, ctime, size, inode); None if ``d`` is no directory."""
    try:
        with os.scandir(d) as entries:
            return {entry.name: _stat(entry) for entry in entries}
    except OSError:
        return None


def _stat(entry: os.DirEntry[str]) -> tuple[int, int, int, int]:
    for follow in (True, False):  # a dangling symlink: the link itself
        try:
            st = entry.stat(follow_symlinks=follow)
            return st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino
        except OSError:
            pass
    return 0, 0, 0, 0  # gone since the listing: the next poll drops it


async def _poll_batches(dirs: list[Path], stop: asyncio.Event, interval: float,
                        existing: bool) -> AsyncGenerator[set[Path], None]:
    # Directories of a few files each: listing them on the event loop costs microseconds.
    seen = {d: _snapshot(d) for d in dirs}
    if existing:
        yield {*dirs, *(d / name for d, names in seen.items() for name in names or ())}
    elif gone := {d for d, names in seen.items() if names is None}:
        yield gone  # as inotify reports a root it cannot watch
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(interval):
                await stop.wait()
        if stop.is_set():
            return
        changed: set[Path] = set()
        for d in dirs:
            now = _snapshot(d)
            before = seen[d]
            if (now is None) != (before is None):
                changed.add(d)  # the directory itself went away or came back
            old, new = before or {}, now or {}
            changed |= {d / name for name in old.keys() | new.keys() if old.get(name) != new.get(name)}
            seen[d] = now
        if changed:
            yield changed
