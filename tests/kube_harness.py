"""A real Kubernetes API server for tests: kube-apiserver on kine (SQLite), on 127.0.0.1.

scripts/kube-deps.sh builds both (``make test`` runs it through scripts/test-deps.sh); when they
are missing the tests fail saying so, they never skip. The server gets generated certificates
and service-account keys, and a static token file with two users:

- ``admin`` (group system:masters), for the tests' own client;
- ``system:serviceaccount:wasmgate:wasmgate``, the identity the deploy/kubernetes example RBAC
  grants rights to, so tests can check that those rights are enough.

``restart()`` stops and starts the API server (and, with ``store=True``, kine too) on the same
ports with the same data: clients' kubeconfigs stay valid and nothing stored is lost.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import ipaddress
import os
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from oci_harness import free_port

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / ".tools" / "bin"
ADMIN_TOKEN = "admin-Hq3x-not-in-logs"
SA_TOKEN = "wasmgate-sa-P9d2-not-in-logs"
SA_NAMESPACE, SA_NAME = "wasmgate", "wasmgate"


def _tool(name: str) -> Path:
    path = TOOLS / name
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: run `bash scripts/kube-deps.sh` (make test does, through "
                    "scripts/test-deps.sh)")
    return path


def _key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _certs(workdir: Path) -> None:
    """ca.crt, apiserver.crt/.key (127.0.0.1, localhost), sa.key/sa.pub."""
    now = dt.datetime.now(dt.UTC)
    ca_key = _key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "wasmgate-test-kube-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
          .not_valid_after(now + dt.timedelta(days=3))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False),
                         critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = _key()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=3))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    (workdir / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (workdir / "apiserver.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (workdir / "apiserver.key").write_bytes(_pem_key(key))
    sa = _key()
    (workdir / "sa.key").write_bytes(_pem_key(sa))
    (workdir / "sa.pub").write_bytes(sa.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    groups = f"system:serviceaccounts,system:serviceaccounts:{SA_NAMESPACE}"
    (workdir / "tokens.csv").write_text(
        f'{ADMIN_TOKEN},admin,admin-uid,"system:masters"\n'
        f'{SA_TOKEN},system:serviceaccount:{SA_NAMESPACE}:{SA_NAME},sa-uid,"{groups}"\n')


class KubeServer:
    """kine + kube-apiserver; see the module docstring."""

    def __init__(self, workdir: Path, apiserver_args: list[str] | None = None,
                 kine_args: list[str] | None = None):
        self.workdir = workdir
        self.extra_api = apiserver_args or []
        self.extra_kine = kine_args or []
        self.kine_port = free_port()
        self.port = free_port()
        self.kine: subprocess.Popen[bytes] | None = None
        self.api: subprocess.Popen[bytes] | None = None
        self.served: list[str] = []  # custom resource paths that must be served again after a restart
        workdir.mkdir(parents=True, exist_ok=True)
        _certs(workdir)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def kubeconfig(self, path: Path | None = None, token: str = ADMIN_TOKEN, namespace: str = "default",
                   server: str | None = None) -> Path:
        """A kubeconfig for this server (``server`` overrides the URL, e.g. through a relay)."""
        path = path or self.workdir / ("kubeconfig" if token == ADMIN_TOKEN else "kubeconfig-sa")
        conf = {
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": {"server": server or self.url,
                                                      "certificate-authority": str(self.workdir / "ca.crt")}}],
            "users": [{"name": "test", "user": {"token": token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test", "namespace": namespace}}],
        }
        path.write_text(yaml.safe_dump(conf))
        return path

    def client(self) -> httpx.Client:
        """An admin HTTP client for the tests' own requests (independent of wasmgate's client)."""
        return httpx.Client(base_url=self.url, verify=ssl.create_default_context(cafile=self.workdir / "ca.crt"),
                            timeout=30,
                            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})

    # ---- processes -----------------------------------------------------------------

    def _start_kine(self) -> None:
        log = (self.workdir / "kine.log").open("ab")
        self.kine = subprocess.Popen(
            [str(_tool("kine")), "--listen-address", f"127.0.0.1:{self.kine_port}",
             "--endpoint", f"sqlite://{self.workdir / 'state.db'}", "--metrics-bind-address", "0",
             *self.extra_kine], stdout=log, stderr=log, cwd=self.workdir)

    def _start_api(self) -> None:
        w = self.workdir
        log = (w / "apiserver.log").open("ab")
        self.api = subprocess.Popen(
            [str(_tool("kube-apiserver")),
             "--bind-address=127.0.0.1", f"--secure-port={self.port}", "--advertise-address=127.0.0.1",
             f"--etcd-servers=http://127.0.0.1:{self.kine_port}", "--etcd-prefix=/registry",
             f"--cert-dir={w / 'certs'}", f"--tls-cert-file={w / 'apiserver.crt'}",
             f"--tls-private-key-file={w / 'apiserver.key'}", f"--client-ca-file={w / 'ca.crt'}",
             f"--token-auth-file={w / 'tokens.csv'}", "--authorization-mode=RBAC",
             f"--service-account-key-file={w / 'sa.pub'}", f"--service-account-signing-key-file={w / 'sa.key'}",
             "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
             "--service-cluster-ip-range=10.96.0.0/16", "--endpoint-reconciler-type=none",
             "--enable-priority-and-fairness=false", "--profiling=false", "--v=1", *self.extra_api],
            stdout=log, stderr=log, cwd=w)

    def _wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        with self.client() as c:
            while time.monotonic() < deadline:
                for name, proc in (("kine", self.kine), ("kube-apiserver", self.api)):
                    if proc is not None and proc.poll() is not None:
                        pytest.fail(f"{name} exited with {proc.returncode}:\n{self.logs()}")
                with contextlib.suppress(httpx.HTTPError):
                    # Ready, and the CRDs served again (that lags /readyz after a restart).
                    if c.get("/readyz").status_code == 200 and all(c.get(p).status_code == 200 for p in self.served):
                        return
                time.sleep(0.2)
        pytest.fail(f"kube-apiserver not ready after {timeout:.0f}s:\n{self.logs()}")

    def logs(self) -> str:
        out = ""
        for name in ("kine.log", "apiserver.log"):
            p = self.workdir / name
            if p.exists():
                out += f"--- {name} (tail)\n" + p.read_text(errors="replace")[-3000:]
        return out

    def start(self) -> None:
        self._start_kine()
        self._start_api()
        self._wait_ready()

    def stop_api(self) -> None:
        _stop(self.api)
        self.api = None

    def restart(self, store: bool = False) -> None:
        self.stop_api()
        if store:
            _stop(self.kine)
            self._start_kine()
        self._start_api()
        self._wait_ready()

    def stop(self) -> None:
        _stop(self.api)
        _stop(self.kine)

    # ---- the tests' own client -------------------------------------------------------

    def apply(self, doc: dict[str, Any]) -> dict[str, Any]:
        """Create or replace one object (server-side apply, as kubectl apply --server-side)."""
        path = object_path(doc)
        with self.client() as c:
            r = c.patch(f"{path}?fieldManager=tests&force=true&fieldValidation=Strict",
                        content=yaml.safe_dump(doc).encode(),
                        headers={"Content-Type": "application/apply-patch+yaml"})
        assert r.status_code in (200, 201), f"apply {path}: {r.status_code} {r.text}"
        out: dict[str, Any] = r.json()
        return out

    def delete(self, doc: dict[str, Any]) -> None:
        with self.client() as c:
            r = c.delete(object_path(doc))
        assert r.status_code in (200, 202), f"delete {object_path(doc)}: {r.status_code} {r.text}"

    def wait_established(self, crd: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        with self.client() as c:
            while time.monotonic() < deadline:
                r = c.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd}")
                conds = {x["type"]: x["status"] for x in (r.json().get("status") or {}).get("conditions") or []}
                if conds.get("Established") == "True":
                    spec = r.json()["spec"]
                    self.served.append(f"/apis/{spec['group']}/{spec['versions'][0]['name']}/{spec['names']['plural']}")
                    return
                time.sleep(0.1)
        pytest.fail(f"CRD {crd} not established")


_PLURALS = {"Namespace": "namespaces", "Secret": "secrets", "ServiceAccount": "serviceaccounts",
            "Role": "roles", "RoleBinding": "rolebindings", "ClusterRole": "clusterroles",
            "ClusterRoleBinding": "clusterrolebindings", "WasmPlugin": "wasmplugins",
            "CustomResourceDefinition": "customresourcedefinitions", "Service": "services",
            "Deployment": "deployments", "ConfigMap": "configmaps"}
_CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}


def object_path(doc: dict[str, Any]) -> str:
    api = doc["apiVersion"]
    base = f"/api/{api}" if "/" not in api else f"/apis/{api}"
    kind = doc["kind"]
    name = doc["metadata"]["name"]
    plural = _PLURALS[kind]
    if kind in _CLUSTER_SCOPED:
        return f"{base}/{plural}/{name}"
    ns = doc["metadata"].get("namespace") or "default"
    return f"{base}/namespaces/{ns}/{plural}/{name}"


def _stop(proc: subprocess.Popen[bytes] | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def kube_server(workdir: Path, **kw: Any) -> Iterator[KubeServer]:
    server = KubeServer(workdir, **kw)
    try:
        server.start()
        yield server
    finally:
        server.stop()


class Relay:
    """A TCP relay to the API server that a test can cut: the client sees the connection drop
    and new ones refused (closed on accept) until ``resume()``; the server keeps running."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.paused = False
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.paused:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        self.paused = True
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def resume(self) -> None:
        self.paused = False

    def close(self) -> None:
        self.cut()
        self.listener.close()
