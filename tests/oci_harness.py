"""Real OCI registries for tests: Debian's docker-registry (distribution 2.8) on 127.0.0.1.

- ``basic``: htpasswd (bcrypt) auth, the registry answers ``WWW-Authenticate: Basic``.
- ``token``: token auth: the registry answers ``WWW-Authenticate: Bearer realm=...`` and trusts
  JWTs (RS256, x5c) from a small token service run here, which checks Basic credentials or an
  OAuth2 refresh token and grants what the scope asks.
- ``open``: no auth.

scripts/test-deps.sh installs docker-registry (and crane, for the interop tests).

Any test module gets the same registries, started once per test run, with a session fixture
like ``def reg(tmp_path_factory): return shared_registry("basic", tmp_path_factory.getbasetemp())``.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import bcrypt
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

REPO = Path(__file__).resolve().parents[1]
USER, PASSWORD = "alice", "pw-Zq8s1-not-in-logs"
REFRESH_TOKEN = "refresh-Yk2-not-in-logs"
SERVICE = "wasmgate-test-registry"
ISSUER = "wasmgate-test-issuer"


def need_tool(name: str, *extra: Path) -> str:
    """A tool the tests need; missing means the machine was not set up: fail, never skip."""
    found = shutil.which(name)
    for p in extra:
        if not found and p.is_file():
            found = str(p)
    if not found:
        pytest.fail(f"{name} is not installed: run `bash scripts/test-deps.sh` (make test does)")
    return found


def crane_path() -> str:
    return need_tool("crane", REPO / ".tools" / "bin" / "crane")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenService:
    key: rsa.RSAPrivateKey
    cert_der: bytes
    server: ThreadingHTTPServer | None = None
    issued: int = 0
    refused: int = 0

    @property
    def realm(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/token"

    def token(self, subject: str, scopes: list[str]) -> str:
        access = []
        for scope in scopes:
            parts = scope.split(":")
            if len(parts) >= 3 and parts[0] == "repository":
                access.append({"type": "repository", "name": ":".join(parts[1:-1]),
                               "actions": [a for a in parts[-1].split(",") if a] if subject else []})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(self.cert_der).decode()]}
        claims = {"iss": ISSUER, "sub": subject, "aud": SERVICE, "exp": now + 300, "nbf": now - 10,
                  "iat": now, "jti": uuid.uuid4().hex, "access": access}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        sig = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        self.issued += 1
        return f"{signing_input}.{_b64url(sig)}"


def _token_handler(svc: TokenService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: Any) -> None:
            pass

        def _answer(self, subject: str | None, scopes: list[str]) -> None:
            if subject is None:
                svc.refused += 1
                self.send_response(401)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = json.dumps({"token": svc.token(subject, scopes), "expires_in": 300}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            q = parse_qs(urlsplit(self.path).query)
            scopes = q.get("scope", [])
            auth = self.headers.get("Authorization", "")
            if not auth:
                self._answer("", scopes)  # anonymous: a token granting nothing
                return
            user, _, pw = base64.b64decode(auth.removeprefix("Basic ")).decode().partition(":")
            self._answer(user if (user, pw) == (USER, PASSWORD) else None, scopes)

        def do_POST(self) -> None:
            n = int(self.headers.get("Content-Length") or 0)
            form = parse_qs(self.rfile.read(n).decode())
            ok = form.get("grant_type") == ["refresh_token"] and form.get("refresh_token") == [REFRESH_TOKEN]
            self._answer(USER if ok else None, form.get("scope", []))

    return Handler


@dataclass
class Registry:
    name: str
    host: str  # 127.0.0.1:PORT
    proc: subprocess.Popen[bytes]
    workdir: Path
    token: TokenService | None = None
    logs: list[Path] = field(default_factory=list)

    def ref(self, repo: str) -> str:
        return f"{self.host}/{repo}"

    def docker_config(self, path: Path, user: str = USER, password: str = PASSWORD) -> Path:
        """Write a Docker config.json with credentials for this registry; returns its directory."""
        path.mkdir(parents=True, exist_ok=True)
        auth = base64.b64encode(f"{user}:{password}".encode()).decode()
        (path / "config.json").write_text(json.dumps({"auths": {self.host: {"auth": auth}}}))
        return path


def _self_signed() -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ISSUER)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


@contextlib.contextmanager
def run_registry(workdir: Path, kind: str) -> Iterator[Registry]:
    exe = need_tool("docker-registry")
    workdir.mkdir(parents=True, exist_ok=True)
    token: TokenService | None = None
    auth = ""
    if kind == "basic":
        hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=5)).decode()
        (workdir / "htpasswd").write_text(f"{USER}:{hashed}\n")
        auth = f"auth:\n  htpasswd:\n    realm: wasmgate-test\n    path: {workdir / 'htpasswd'}\n"
    elif kind == "token":
        key, cert = _self_signed()
        (workdir / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        token = TokenService(key, cert.public_bytes(serialization.Encoding.DER))
        token.server = ThreadingHTTPServer(("127.0.0.1", 0), _token_handler(token))
        threading.Thread(target=token.server.serve_forever, daemon=True).start()
        auth = (f"auth:\n  token:\n    realm: {token.realm}\n    service: {SERVICE}\n    issuer: {ISSUER}\n"
                f"    rootcertbundle: {workdir / 'cert.pem'}\n")
    for _ in range(3):
        port = free_port()
        host = f"127.0.0.1:{port}"
        (workdir / "config.yml").write_text(
            "version: 0.1\n"
            "log:\n  level: error\n  accesslog:\n    disabled: true\n"
            f"storage:\n  filesystem:\n    rootdirectory: {workdir / 'data'}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: {host}\n" + auth)
        log = workdir / "registry.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([exe, "serve", str(workdir / "config.yml")], stdout=out, stderr=out,
                                    env={**os.environ, "OTEL_TRACES_EXPORTER": "none"})
        if _wait_ready(host, proc):
            break
        proc.kill()
        proc.wait()
    else:
        pytest.fail(f"docker-registry did not start; log:\n{log.read_text()[-2000:]}")
    reg = Registry(kind, host, proc, workdir, token, [log])
    try:
        yield reg
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if token and token.server:
            token.server.shutdown()
            token.server.server_close()


_SHARED: dict[str, Registry] = {}
_STACK = contextlib.ExitStack()
atexit.register(_STACK.close)


def shared_registry(kind: str, base: Path) -> Registry:
    """The registry of this kind ("basic", "token", "open"), started on first use, stopped at exit."""
    if kind not in _SHARED:
        _SHARED[kind] = _STACK.enter_context(run_registry(base / f"registry-{kind}", kind))
    return _SHARED[kind]


def _wait_ready(host: str, proc: subprocess.Popen[bytes]) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            r = httpx.get(f"http://{host}/v2/", timeout=1)
            if r.status_code in (200, 401):
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    return False


class RegistryProxy:
    """A plain-HTTP reverse proxy in front of a registry that records what reaches it: every
    connection (a TLS attempt included) and every request as (method, path). ``hold(repo)``
    keeps that repository's requests waiting until ``release(repo)`` (``hold(f"{repo}/blobs/{digest}")``
    only the requests for that blob); ``refuse(repo)`` answers them 503. Used to see which
    fetches contact the registry at all."""

    def __init__(self, upstream: str):
        self.upstream = upstream  # host:port
        self.connections = 0
        self.requests: list[tuple[str, str]] = []
        self._gates: dict[str, threading.Event] = {}
        self._refused: set[str] = set()
        self._cond = threading.Condition()
        proxy = self

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def verify_request(self, request: Any, client_address: Any) -> bool:
                with proxy._cond:
                    proxy.connections += 1
                return True

        self.server = Server(("127.0.0.1", 0), self._handler())
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def ref(self, repo: str) -> str:
        return f"{self.host}/{repo}"

    def reset(self) -> None:
        with self._cond:
            self.connections = 0
            self.requests.clear()

    def paths(self, repo: str) -> list[str]:
        """Requests for ``repo`` (a repository name), as "METHOD /v2/...". """
        with self._cond:
            return [f"{m} {p}" for m, p in self.requests if p.startswith(f"/v2/{repo}/")]

    def wait_for(self, repo: str, timeout: float = 30.0) -> bool:
        """Whether a request for ``repo`` arrived within ``timeout``."""
        with self._cond:
            return self._cond.wait_for(lambda: bool(self.paths(repo)), timeout)

    def hold(self, repo: str) -> None:
        self._gates[repo] = threading.Event()

    def release(self, repo: str) -> None:
        gate = self._gates.pop(repo, None)
        if gate is not None:
            gate.set()

    def refuse(self, repo: str, on: bool = True) -> None:
        (self._refused.add if on else self._refused.discard)(repo)

    def close(self) -> None:
        for repo in list(self._gates):
            self.release(repo)
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: Any) -> None:
                pass

            def _forward(self) -> None:
                with proxy._cond:
                    proxy.requests.append((self.command, self.path))
                    proxy._cond.notify_all()
                repo = self.path.removeprefix("/v2/").split("/manifests/")[0].split("/blobs/")[0]
                gate = proxy._gates.get(repo) or proxy._gates.get(self.path.removeprefix("/v2/"))
                if gate is not None:
                    gate.wait(60)
                if repo in proxy._refused:
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                r = httpx.request(self.command, f"http://{proxy.upstream}{self.path}", headers=headers, timeout=30)
                self.send_response(r.status_code)
                for k, v in r.headers.items():
                    if k.lower() not in ("connection", "transfer-encoding", "content-length", "content-encoding"):
                        self.send_header(k, v)
                body = b"" if self.command == "HEAD" else r.content
                self.send_header("Content-Length", r.headers.get("content-length", "0") if self.command == "HEAD"
                                 else str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_HEAD = _forward

        return Handler
