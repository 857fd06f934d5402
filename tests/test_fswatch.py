"""resources/fswatch.py on real files: inotify and the stat poller, on asyncio's loop and uvloop."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path

import pytest
import uvloop

from servers import wasmplugin_yaml
from wasmgate.resources.feed import DirectoryFeed, SpecSet
from wasmgate.resources.fswatch import lookup, relevant_changes, watch_dirs

LOOPS = ["asyncio", "uvloop"]
BACKENDS = ["inotify", "poll"]
DEADLINE = 20.0  # seconds before a change not seen fails a test (never reached when it works)


def run(loop: str, main: Callable[[], Awaitable[None]]) -> None:
    async def guarded() -> None:
        async with asyncio.timeout(60):
            await main()

    if loop == "uvloop":
        uvloop.run(guarded())
    else:
        asyncio.run(guarded())


class Watching:
    """``watch_dirs`` consumed by a task; ``ready()`` returns once the watches are set."""

    def __init__(self, roots: list[Path], backend: str, *, debounce: float = 0.05, cap: float = 1.0):
        self.stop = asyncio.Event()
        self.gen = watch_dirs(roots, self.stop, debounce=debounce, cap=cap, existing=True, poll=backend == "poll",
                              poll_interval=0.05)
        self.batches: asyncio.Queue[set[Path]] = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._consume())

    async def _consume(self) -> None:
        async for batch in self.gen:
            await self.batches.put(batch)

    async def ready(self) -> set[Path]:
        return await self.batches.get()  # the ``existing`` batch: watching from here on

    async def until(self, path: Path) -> set[Path]:
        """Every change reported up to the batch that names ``path``."""
        seen: set[Path] = set()
        async with asyncio.timeout(DEADLINE):
            while path not in seen:
                seen |= await self.batches.get()
        return seen

    async def close(self) -> None:
        self.stop.set()
        async with asyncio.timeout(DEADLINE):
            await self.task


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_file_changes_are_reported(tmp_path: Path, backend: str, loop: str) -> None:
    f = tmp_path / "plugin.yaml"
    f.write_text("old")

    async def main() -> None:
        w = Watching([tmp_path], backend)
        assert await w.ready() == {tmp_path, f}
        new = tmp_path / "new.yaml"
        new.write_text("created")
        await w.until(new)
        f.write_text("modified, longer")
        await w.until(f)
        tmp = tmp_path / ".plugin.yaml.tmp"
        tmp.write_text("renamed over")
        os.replace(tmp, f)  # an atomic replacement, as editors and kubectl cp do
        await w.until(f)
        new.chmod(0o600)
        await w.until(new)
        new.unlink()
        await w.until(new)
        await w.close()

    run(loop, main)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_burst_is_one_batch(tmp_path: Path, backend: str) -> None:
    async def main() -> None:
        w = Watching([tmp_path], backend)
        await w.ready()
        files = {tmp_path / f"{i}.yaml" for i in range(20)}
        for f in files:  # no await in between: all before the watcher runs again
            f.write_text("x")
        assert await w.batches.get() == files
        await w.close()

    run("uvloop", main)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_constant_stream_still_yields(tmp_path: Path, loop: str) -> None:
    """Debounced for a minute, capped at 0.2 s: writes every 20 ms must not hold a batch back."""
    async def main() -> None:
        w = Watching([tmp_path], "inotify", debounce=60.0, cap=0.2)
        await w.ready()
        written = 0
        async with asyncio.timeout(DEADLINE):  # far less than the debounce
            while w.batches.empty():
                (tmp_path / f"{written}.yaml").write_text("x")
                written += 1
                await asyncio.sleep(0.02)
        assert tmp_path / "0.yaml" in w.batches.get_nowait()
        await w.close()

    run(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_watched_directory_removed_or_moved(tmp_path: Path, backend: str, loop: str) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d in (a, b, c):
        d.mkdir()
    (a / "module.wasm").write_bytes(b"\0asm")

    async def main() -> None:
        w = Watching([a, b, c], backend)
        await w.ready()
        shutil.rmtree(a)
        assert a in await w.until(a)  # the directory itself is reported: the caller rescans
        b.rename(tmp_path / "b-moved")
        await w.until(b)
        (c / "still.yaml").write_text("watched")  # the other roots are still watched
        await w.until(c / "still.yaml")
        await w.close()

    run(loop, main)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_directory_back_is_watched_again(tmp_path: Path, backend: str) -> None:
    a = tmp_path / "a"
    a.mkdir()

    async def main() -> None:
        stop = asyncio.Event()
        gen = watch_dirs([a], stop, existing=True, poll=backend == "poll", poll_interval=0.05)
        async with asyncio.timeout(DEADLINE):
            await anext(gen)
            a.rmdir()
            assert a in await anext(gen)
            # Back before the watcher resumes, with a file already in it.
            a.mkdir()
            (a / "plugin.yaml").write_text("x")
            seen = await anext(gen)
            while a / "plugin.yaml" not in seen:
                seen = await anext(gen)
            (a / "later.yaml").write_text("x")
            while a / "later.yaml" not in seen:
                seen = await anext(gen)
        stop.set()
        await gen.aclose()

    run("uvloop", main)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_missing_root_is_reported(tmp_path: Path, backend: str) -> None:
    missing = tmp_path / "missing"

    async def main() -> None:
        stop = asyncio.Event()
        gen = watch_dirs([missing, tmp_path], stop, poll=backend == "poll", poll_interval=0.05)
        async with asyncio.timeout(DEADLINE):
            assert missing in await anext(gen)
        stop.set()
        await gen.aclose()

    run("asyncio", main)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_stop_ends_the_watch(tmp_path: Path, backend: str, loop: str) -> None:
    async def main() -> None:
        w = Watching([tmp_path], backend, debounce=60.0, cap=60.0)
        await w.ready()
        (tmp_path / "pending.yaml").write_text("x")  # stop while debouncing this change
        await asyncio.sleep(0.1)
        await w.close()
        assert w.task.result() is None
        idle = Watching([tmp_path], backend)
        await idle.ready()
        await idle.close()  # and while idle

    run(loop, main)


class ConfigMapVolume:
    """A directory kept as the kubelet's atomic writer keeps a mounted ConfigMap, Secret or
    projected volume: the files in a timestamped directory, ``..data`` linking to it, and for
    each key a link ``key -> ..data/key``."""

    def __init__(self, path: Path):
        path.mkdir()
        self.path = path

    def write(self, files: dict[str, bytes]) -> None:
        """One update, in the kubelet's order: a new timestamped directory with every file,
        ``..data_tmp`` linking to it renamed over ``..data``, the key links (those of keys
        gone removed), then the old directory removed."""
        data = self.path / "..data"
        old = os.readlink(data) if data.is_symlink() else None
        ts = Path(tempfile.mkdtemp(prefix=time.strftime("..%Y_%m_%d_%H_%M_%S.", time.gmtime()), dir=self.path))
        for name, content in files.items():
            (ts / name).write_bytes(content)
        os.symlink(ts.name, self.path / "..data_tmp")
        os.rename(self.path / "..data_tmp", data)
        for name in files:
            if not (self.path / name).is_symlink():
                os.symlink(f"..data/{name}", self.path / name)
        for link in self.path.iterdir():
            if not link.name.startswith("..") and link.name not in files:
                link.unlink()
        if old is not None:
            shutil.rmtree(self.path / old)


def test_lookup_follows_every_link(tmp_path: Path) -> None:
    volume = ConfigMapVolume(tmp_path / "config")
    volume.write({"plugin.yaml": b"v1"})
    ts = volume.path / os.readlink(volume.path / "..data")
    assert lookup(volume.path / "plugin.yaml") == [volume.path / "plugin.yaml", volume.path / "..data",
                                                   ts / "plugin.yaml"]
    (tmp_path / "etc").symlink_to(volume.path)  # absolute, through a link to a directory
    assert lookup(tmp_path / "etc" / "plugin.yaml") == [tmp_path / "etc", *lookup(volume.path / "plugin.yaml")]
    plain = tmp_path / "plain.yaml"
    assert lookup(plain) == [plain]
    (tmp_path / "loop").symlink_to("loop")
    assert lookup(tmp_path / "loop")[-1] == tmp_path / "loop"  # a loop ends, read as it is


class Reloads:
    """``relevant_changes`` consumed as a reload does: ``read`` is read after each yield."""

    def __init__(self, watched: set[Path], read: Path, backend: str):
        self.read = read
        self.seen: list[bytes] = []
        self.stop = asyncio.Event()
        gen = relevant_changes(lambda: watched, self.stop, poll=backend == "poll", poll_interval=0.05)
        self.task = asyncio.get_running_loop().create_task(self._consume(gen))

    async def _consume(self, gen: AsyncGenerator[None, None]) -> None:
        async for _ in gen:
            self.seen.append(self.read.read_bytes())

    async def ready(self) -> None:
        for _ in range(3):  # the watches are set in the task's first step
            await asyncio.sleep(0)

    async def until(self, content: bytes) -> None:
        async with asyncio.timeout(DEADLINE):
            while content not in self.seen:
                await asyncio.sleep(0.02)

    async def close(self) -> None:
        self.stop.set()
        async with asyncio.timeout(DEADLINE):
            await self.task


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("watch", ["file", "directory", "module"])
def test_configmap_volume_updates_are_relevant(tmp_path: Path, backend: str, watch: str) -> None:
    """A file in a ConfigMap volume (the resource file, a directory of them, or a module a
    resource names), updated by the kubelet: only ``..data`` and the timestamped directories
    change, never the path read. Unrelated files beside it change nothing."""
    volume = ConfigMapVolume(tmp_path / "config")
    key = "plugin.wasm" if watch == "module" else "plugin.yaml"
    volume.write({key: b"v1", "notes.txt": b"n1"})
    resource = tmp_path / "resources" / "plugin.yaml"  # naming the module
    resource.parent.mkdir()
    resource.write_text("v1")
    watched = {"file": {volume.path / key}, "directory": {volume.path},
               "module": {resource.parent, volume.path / key}}[watch]

    async def main() -> None:
        r = Reloads(watched, volume.path / key, backend)
        await r.ready()
        (volume.path / "unrelated.txt").write_text("x")  # in the volume's directory, not read
        (resource.parent / "notes.txt").write_text("x")
        await asyncio.sleep(0.5)  # a batch (or a poll) of its own
        for version in (b"v2", b"v3"):  # the second after the first's directory is gone
            volume.write({key: version, "notes.txt": b"n1"})
            await r.until(version)
        assert b"v1" not in r.seen  # nothing reloaded for the unrelated files
        await r.close()

    run("uvloop", main)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_key_added_to_a_volume_directory(tmp_path: Path, backend: str) -> None:
    volume = ConfigMapVolume(tmp_path / "config")
    volume.write({"a.yaml": b"a"})

    async def main() -> None:
        r = Reloads({volume.path}, volume.path / "b.yaml", backend)
        await r.ready()
        volume.write({"a.yaml": b"a", "b.yaml": b"b"})
        await r.until(b"b")
        await r.close()

    run("asyncio", main)


def test_directory_feed_follows_a_configmap_volume(tmp_path: Path) -> None:
    """What ``wasmgate envoy`` reads: each update's resource, under the name given."""
    volume = ConfigMapVolume(tmp_path / "config")
    staged = tmp_path / "staged"
    staged.mkdir()

    def resource(tag: str) -> dict[str, bytes]:
        return {"tag.yaml": wasmplugin_yaml(staged, "tag", staged / "tag.wasm", config={"tag": tag}).read_bytes()}

    volume.write(resource("v1"))

    async def main() -> None:
        feed = DirectoryFeed([volume.path / "tag.yaml"])
        sets: asyncio.Queue[SpecSet] = asyncio.Queue()

        async def consume() -> None:
            async for s in feed:
                await sets.put(s)

        task = asyncio.get_running_loop().create_task(consume())
        async with asyncio.timeout(DEADLINE):
            first = await sets.get()
            assert first.specs[0].source == str(volume.path / "tag.yaml")
            for tag in ("v2", "v3"):
                volume.write(resource(tag))
                got = await sets.get()
                while got.specs[0].plugin_config != json.dumps({"tag": tag}, separators=(",", ":")).encode():
                    got = await sets.get()
                assert got.errors == {} and got.specs[0].source == first.specs[0].source
        task.cancel()

    run("uvloop", main)


# A watcher started, then the main thread kept busy for a second, as a loaded data plane is.
# Run in a fresh process so no other test's threads are counted.
BUSY = """
import asyncio, json, os, sys, time
from pathlib import Path
from wasmgate.resources.fswatch import watch_dirs

def switches():
    voluntary = involuntary = 0
    for task in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{task}/status") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches"):
                    voluntary += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches"):
                    involuntary += int(line.split()[1])
    return voluntary, involuntary

async def main():
    d = Path(sys.argv[2])
    stop = asyncio.Event()
    gen = watch_dirs([d], stop, existing=True)
    await anext(gen)
    v0, i0 = switches()
    end = time.monotonic() + 1.0
    n = 0
    while time.monotonic() < end:
        for i in range(2000):
            n += i
        await asyncio.sleep(0)
    v1, i1 = switches()
    threads = len(os.listdir("/proc/self/task"))
    (d / "after.yaml").write_text("x")  # the watcher was live all along
    seen = await anext(gen)
    stop.set()
    await gen.aclose()
    print(json.dumps({"voluntary": v1 - v0, "involuntary": i1 - i0, "threads": threads,
                      "seen": d / "after.yaml" in seen}))

if sys.argv[1] == "uvloop":
    import uvloop
    uvloop.run(main())
else:
    asyncio.run(main())
"""


@pytest.mark.skipif(sys.platform != "linux", reason="inotify and /proc are Linux's")
@pytest.mark.parametrize("loop", LOOPS)
def test_watching_adds_no_thread_and_no_context_switches(tmp_path: Path, loop: str) -> None:
    """The watcher reads inotify on the event loop. A watcher thread (watchfiles) wakes every
    few ms and takes the GIL from the loop: hundreds to ~14,000 switches a second here. Only
    the process's own (voluntary) switches are bounded; preemption depends on the machine's load."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(BUSY), loop, str(tmp_path)],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    result = json.loads(out)
    assert result["seen"]
    assert result["threads"] == 1
    assert result["voluntary"] < 50, result
    assert result["voluntary"] + result["involuntary"] < 5000, result
