"""A state-of-the-world ADS server (gRPC, ``StreamAggregatedResources``) for one Envoy.

The server holds a :class:`Snapshot` (listeners, clusters, ECDS extension configs) and pushes
it to every connected Envoy: listeners and clusters whole whenever their version changes;
ECDS resources one by one, only those Envoy subscribed to and whose content changed since
they were last sent on that stream (so one rejected plugin never holds back the others, and
a NACK names the resources it is about). ACKs and NACKs are recorded in :class:`XdsStatus`
(how a request answers pushes: :class:`_Stream`); a NACK is logged with the resource names
and Envoy's message. What Envoy holds outlives a stream: a reconnecting Envoy answers the
pushes of its broken stream in its first request, and acknowledges without applying an ECDS
config it rejected (:meth:`_Stream._judge`); a new Envoy process (another
``ENVOY_INSTANCE_HEADER``) holds nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import any_pb2  # type: ignore[import-untyped]
from google.protobuf.message import Message  # type: ignore[import-untyped]

from wasmgate.xds.resources import CLUSTER_TYPE, ECDS_TYPE, LISTENER_TYPE

_log = logging.getLogger("wasmgate.config")

# Push order: clusters before the listeners that route to them; a listener before the
# ECDS resources its filters name (Envoy asks for those only once it has the listener).
TYPES = (CLUSTER_TYPE, LISTENER_TYPE, ECDS_TYPE)
_SHORT = {CLUSTER_TYPE: "CDS", LISTENER_TYPE: "LDS", ECDS_TYPE: "ECDS"}
# gRPC metadata of Envoy's ADS stream (bootstrap's initial_metadata): one value per Envoy process,
# telling a reconnecting Envoy, which keeps its config, from a new one
ENVOY_INSTANCE_HEADER = "x-wasmgate-envoy-instance"


def _pack(msg: Message) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def _digest(a: any_pb2.Any) -> str:
    return hashlib.sha256(a.SerializeToString(deterministic=True)).hexdigest()[:16]


@dataclass(frozen=True)
class Snapshot:
    """What Envoy should have: resources by type URL, then by name."""

    resources: Mapping[str, Mapping[str, any_pb2.Any]]

    @classmethod
    def of(cls, listeners: list[Message], clusters: list[Message], extensions: list[Message]) -> Snapshot:
        by_type: dict[str, dict[str, any_pb2.Any]] = {}
        for type_url, msgs in ((LISTENER_TYPE, listeners), (CLUSTER_TYPE, clusters), (ECDS_TYPE, extensions)):
            by_type[type_url] = {m.name: _pack(m) for m in msgs}
        return cls(by_type)

    def of_type(self, type_url: str) -> Mapping[str, any_pb2.Any]:
        return self.resources.get(type_url, {})


@dataclass
class ResourceStatus:
    """One resource as Envoy last saw it."""

    current: str = ""  # digest of what the snapshot holds now
    sent: str = ""  # digest last sent to Envoy
    acked: str = ""  # digest Envoy last accepted
    nack: str | None = None  # Envoy's message when it rejected ``sent``
    nacked: str = ""  # the digest it rejected
    requested: bool = False  # Envoy subscribed to it (ECDS)
    # ECDS: the config Envoy's subscription holds, applied or not (it records a config before it
    # builds the filter) and skips when sent it again; "" when not known
    held: str = ""

    @property
    def state(self) -> str:
        if self.nack is not None and self.nacked == self.current:
            return "rejected"
        if self.current and self.acked == self.current:
            return "accepted"
        if self.current and self.sent == self.current:
            return "sent"
        return "waiting" if self.current else "removed"


@dataclass
class XdsStatus:
    """ACK/NACK state for the status API and tests."""

    connected: int = 0  # open ADS streams
    versions: dict[str, str] = field(default_factory=dict)  # type -> version Envoy accepted last
    resources: dict[str, dict[str, ResourceStatus]] = field(default_factory=dict)
    nacks: list[dict[str, Any]] = field(default_factory=list)  # every NACK, newest last (bounded)
    streams: set[_Stream] = field(default_factory=set)  # open ADS streams, for ``pending``
    orphans: dict[str, list[_Push]] = field(default_factory=dict)  # type -> unanswered pushes of broken streams
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def pending(self) -> dict[str, int]:
        """Per type served, the pushes Envoy has not answered yet (over every open stream, and those
        of broken streams, which Envoy answers when it connects again)."""
        out = {t: len(self.orphans.get(t, ())) for t in TYPES}
        for stream in self.streams:
            for type_url, pushes in stream.pending.items():
                out[type_url] += len(pushes)
        return out

    def resource(self, type_url: str, name: str) -> ResourceStatus:
        return self.resources.setdefault(type_url, {}).setdefault(name, ResourceStatus())

    def _bump(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    def forget_envoy(self) -> None:
        """Another Envoy process: it has been sent nothing and holds nothing (NACKs stay listed)."""
        self.versions.clear()
        self.orphans.clear()
        for rs in self.resources.values():
            for r in rs.values():
                r.sent = r.acked = r.nacked = r.held = ""
                r.nack = None

    def describe(self) -> dict[str, Any]:
        return {"connected": self.connected,
                "versions": {_SHORT[t]: v for t, v in self.versions.items()},
                "resources": {_SHORT[t]: {n: {"state": r.state, "error": r.nack if r.state == "rejected" else None}
                                          for n, r in sorted(rs.items()) if r.current}
                              for t, rs in self.resources.items()},
                "nacks": self.nacks[-20:],
                "pending": {_SHORT[t]: n for t, n in self.pending.items()}}


@dataclass
class _Push:
    """One response sent and not yet answered."""

    version: str
    digests: dict[str, str]  # name -> digest


def _names(message: str, name: str) -> bool:
    """Whether ``message`` names ``name`` whole: not as a part of a longer name (``default.a`` in
    ``default.ab`` or ``default.a.b``). Kubernetes names are made of letters, digits, "-" and ".";
    a "." not followed by one of those ends a sentence, not the name."""
    return re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w-]|\.[\w-])", message) is not None


def _lost_message(type_url: str, push: _Push, newer: str) -> str:
    """The error shown for a push Envoy rejected without its message reaching wasmgate."""
    which = "" if len(push.digests) == 1 else f" (this resource or another of the {len(push.digests)} in it)"
    return (f"Envoy rejected {_SHORT[type_url]} version {push.version}{which}; its message was not sent: Envoy sends "
            f"only its last rejection's in a request (version {newer}'s). See Envoy's log")


def _blamed(digests: Mapping[str, str], message: str) -> set[str]:
    """The resources Envoy's message names: by PluginConfig.name ("Unable to create Wasm plugin
    default.ab"), which is the resource name's last part, or by the resource name itself."""
    return {n for n in digests if _names(message, n.rsplit("/", 1)[-1])}


@dataclass
class _Verdict:
    """What one request tells of the pushes it answers (indexes into them, oldest first)."""

    accepted: set[int]
    owner: int | None = None  # the push error_detail is about, when the request tells which
    blamed: set[str] = field(default_factory=set)  # the resources its message is about
    lost: list[int] = field(default_factory=list)  # rejected too, their messages not sent


def _processed(done: list[_Push], last_ok: int, error: str | None) -> int:
    """Of the pushes of a broken stream (oldest first), how many Envoy processed, from the first
    request of its next stream: it processes them in order, up to the last it accepted (version_info)
    or the last it rejected (error_detail, when that message names it). Envoy does not tell whether
    it processed the ones after those."""
    named = max((i for i, p in enumerate(done) if error is not None and _blamed(p.digests, error)), default=-1)
    return max(last_ok, named) + 1


def _verdict(done: list[_Push], last_ok: int, error: str | None) -> _Verdict:
    """Envoy's GrpcMuxImpl sets version_info when it accepts a push and error_detail when it
    rejects one (replacing the previous message), and clears error_detail once a request is out.
    So with no error every push up to the last accepted was accepted. With one: the message is
    the newest push's if that was rejected (those between it and the last accepted were rejected
    too, their messages lost), else an older push's, the one whose resources it names (or the
    only one), and the pushes after it were accepted. Of the others the request tells nothing."""
    newest = len(done) - 1
    if error is None:
        return _Verdict(set(range(last_ok + 1)))
    owner = newest
    if last_ok == newest:
        named = [i for i in range(newest) if _blamed(done[i].digests, error)]
        if len(named) != 1 and newest != 1:  # 1: the only older push
            return _Verdict({last_ok}, blamed=set().union(*(_blamed(done[i].digests, error) for i in named)))
        owner = named[0] if named else 0
    blamed = _blamed(done[owner].digests, error) or set(done[owner].digests)  # naming none: the whole push
    return _Verdict({last_ok, *range(owner + 1, newest + 1)} - {-1}, owner, blamed, list(range(last_ok + 1, owner)))


class _Stream:
    """One Envoy's ADS stream: what it subscribed to and what it was sent.

    SotW ACK/NACK (envoy api/xds_protocol.rst; Envoy's GrpcMuxImpl): a request's
    response_nonce names the newest response of its type Envoy has processed; Envoy may
    process several before it sends one request, so a request answers every push of that type
    up to its nonce. Its version_info is the version Envoy last accepted; error_detail is the
    message of the last push it rejected since its previous request (kept even if a later push
    was accepted). A request whose nonce is not the newest sent is stale: it is not answered
    and its resource names are not taken (Envoy sends them again with the newer nonce).
    """

    MAX_PENDING = 32  # pushes of one type awaiting an answer; beyond, the oldest are folded

    def __init__(self, server: XdsServer, peer: str):
        self.server = server
        self.peer = peer
        self.subscribed: dict[str, set[str] | None] = {}  # type -> names (None: wildcard)
        self.sent_version: dict[str, str] = {}  # LDS/CDS: snapshot version last sent
        self.sent: dict[str, dict[str, str]] = {}  # ECDS: name -> digest last sent
        self.pending: dict[str, dict[str, _Push]] = {}  # type -> nonce -> push, oldest first
        self.last_nonce: dict[str, str] = {}  # type -> nonce of the newest response sent
        server.status.streams.add(self)

    def on_request(self, req: discovery_pb2.DiscoveryRequest) -> None:
        type_url = req.type_url
        if type_url not in TYPES:
            _log.warning("xds: %s asked for %s, which wasmgate does not serve", self.peer, type_url)
            return
        status = self.server.status
        nonce = req.response_nonce
        if nonce and nonce in self.pending.get(type_url, {}):
            self._answered(type_url, nonce, req)
            status._bump()
        elif not nonce and self.server.status.orphans.get(type_url):
            self._resumed(type_url, req)
            status._bump()
        if type_url in self.last_nonce and nonce != self.last_nonce[type_url]:
            _log.debug("xds: %s: %s request with stale nonce %r (newest %s): not answered", self.peer,
                       _SHORT[type_url], nonce, self.last_nonce[type_url])
            return
        names = set(req.resource_names) if type_url == ECDS_TYPE else None
        if type_url == ECDS_TYPE and names is not None:
            for gone in set(self.sent.get(type_url, {})) - names:  # unsubscribed: resend if asked again
                self.sent[type_url].pop(gone, None)
            for name, r in status.resources.get(type_url, {}).items():
                r.requested = name in names
                if not r.requested:  # Envoy dropped its subscription, and with it the config held
                    r.held = ""
        self.subscribed[type_url] = names

    def _answered(self, type_url: str, nonce: str, req: discovery_pb2.DiscoveryRequest) -> None:
        """Resolve every push of ``type_url`` up to ``nonce`` from Envoy's request."""
        pending = self.pending[type_url]
        done: list[_Push] = []
        for n in list(pending):
            done.append(pending.pop(n))
            if n == nonce:
                break
        if len(done) > 1:
            _log.debug("xds: %s: one %s request answered %d pushes", self.peer, _SHORT[type_url], len(done))
        self._judge(type_url, done, req)

    def _resumed(self, type_url: str, req: discovery_pb2.DiscoveryRequest) -> None:
        """The first request of ``type_url`` on a new stream from the Envoy of a broken one: its
        version_info and error_detail are still those of the pushes it processed there unanswered."""
        orphans = self.server.status.orphans.pop(type_url)
        error = req.error_detail.message if req.HasField("error_detail") else None
        last_ok = max((i for i, p in enumerate(orphans) if p.version == req.version_info), default=-1)
        done = orphans[:_processed(orphans, last_ok, error)]
        _log.debug("xds: %s: first %s request of the stream answers %d of the %d pushes of the last one",
                   self.peer, _SHORT[type_url], len(done), len(orphans))
        if done:
            self._judge(type_url, done, req)
        elif error is not None:
            self._nack(type_url, error, None, [], [], orphans)

    def _judge(self, type_url: str, done: list[_Push], req: discovery_pb2.DiscoveryRequest) -> None:
        """Record what ``req`` tells of the pushes ``done`` (oldest first, the newest it answers last)."""
        error = req.error_detail.message if req.HasField("error_detail") else None
        # Versions are unique per push on a stream: version_info names the last push accepted.
        last_ok = max((i for i, p in enumerate(done) if p.version == req.version_info), default=-1)
        v = _verdict(done, last_ok, error)
        status = self.server.status
        ecds = type_url == ECDS_TYPE
        sent = self.sent.get(type_url, {})
        applied: set[str] = set()
        for i, push in enumerate(done):
            for name, d in push.digests.items():
                r = status.resource(type_url, name)
                if i == v.owner and name in v.blamed:
                    r.nack, r.nacked, r.held = error, d, d
                elif i in v.lost:
                    r.nack, r.nacked, r.held = _lost_message(type_url, push, done[-1].version), d, d
                elif ecds and i in v.accepted and r.nack is not None and r.nacked == r.held == d:
                    # Envoy skips a config equal to the one it holds, here one it failed to build
                    # (sent again on a new stream): it keeps serving the previous one
                    _log.info("xds: Envoy acknowledged %s again without applying it: it rejected that config "
                              "before (%s)", name, r.nack)
                elif i in v.accepted or (i == v.owner and not ecds):
                    # LDS/CDS apply the resources of a rejected update that are valid
                    r.acked = r.held = d
                    applied.add(name)
                    if r.nacked == d:
                        r.nack = None
                elif i == v.owner and sent.get(name) == d:
                    # Envoy applies an ECDS update watch by watch, up to the one that fails: the
                    # others are sent again alone. Pushes the request tells nothing of are not:
                    # Envoy records an ECDS config before it builds the filter, so one it rejected
                    # is acknowledged, not applied, when sent again.
                    del sent[name]
        if last_ok >= 0:
            status.versions[type_url] = done[last_ok].version
            _log.debug("xds: %s accepted %s version %s", self.peer, _SHORT[type_url], done[last_ok].version)
        if error is not None:
            self._nack(type_url, error, done[v.owner].version if v.owner is not None else None, sorted(v.blamed),
                       [done[i].version for i in v.lost], done[:-1])
        if ecds and applied:
            self._unblock_listeners(applied)

    def _unblock_listeners(self, applied: set[str]) -> None:
        """Envoy builds a new listener's ECDS filters from the configs their subscriptions hold, so
        while it holds a config it rejected, it rejects every update of a listener with that filter
        (naming the plugin). Once it has applied another config of a plugin a listener was rejected
        for, that listener is sent again (Envoy does not ask again for a version it rejected)."""
        for name, r in self.server.status.resources.get(LISTENER_TYPE, {}).items():
            if r.state == "rejected" and r.nack is not None and _blamed(dict.fromkeys(applied, ""), r.nack):
                _log.info("xds: sending LDS again: Envoy rejected listener %s for a plugin config it has since "
                          "replaced", name)
                self.sent_version.pop(LISTENER_TYPE, None)

    def _nack(self, type_url: str, error: str, version: str | None, names: list[str], also: list[str],
              candidates: list[_Push]) -> None:
        """List and log a NACK (``version`` None: Envoy does not say which of ``candidates`` it is about)."""
        status = self.server.status
        status.nacks.append({"type": _SHORT[type_url], "version": version, "resources": names,
                             "message": error, "also_rejected": also, "time": time.time()})
        del status.nacks[:-100]
        if version is None:
            _log.error("xds: Envoy rejected one of %s versions %s (it does not say which): %s",
                       _SHORT[type_url], ", ".join(p.version for p in candidates), error)
        else:
            _log.error("xds: Envoy rejected %s version %s (%s): %s%s", _SHORT[type_url], version,
                       ", ".join(names) or "no resources", error,
                       f" (also rejected: version {', '.join(also)}, whose message Envoy did not send)"
                       if also else "")

    def responses(self, snap: Snapshot, versions: Mapping[str, str]) -> list[discovery_pb2.DiscoveryResponse]:
        """What this stream has not been sent yet, in push order."""
        out = []
        for type_url in TYPES:
            if type_url not in self.subscribed:
                continue
            have = snap.of_type(type_url)
            version = versions.get(type_url, "0")
            if type_url == ECDS_TYPE:
                names = self.subscribed[type_url] or set()
                sent = self.sent.setdefault(type_url, {})
                changed = {n: _digest(have[n]) for n in sorted(names) if n in have}
                changed = {n: d for n, d in changed.items() if sent.get(n) != d}
                if not changed:
                    continue
                resources = [have[n] for n in changed]
                sent.update(changed)
                digests = changed
            else:
                if self.sent_version.get(type_url) == version:
                    continue
                self.sent_version[type_url] = version
                resources = list(have.values())
                digests = {n: _digest(a) for n, a in have.items()}
            nonce = self.server.next_nonce()
            if type_url == ECDS_TYPE:
                version = self.server.ecds_version(version, nonce)
            self._track(type_url, nonce, _Push(version, digests))
            for name, d in digests.items():
                self.server.status.resource(type_url, name).sent = d
            out.append(discovery_pb2.DiscoveryResponse(version_info=version, resources=resources,
                                                       type_url=type_url, nonce=nonce))
        return out

    def _track(self, type_url: str, nonce: str, push: _Push) -> None:
        pending = self.pending.setdefault(type_url, {})
        pending[nonce] = push
        self.last_nonce[type_url] = nonce
        _fold(pending, self.MAX_PENDING)

    def close(self) -> None:
        """The stream broke: its unanswered pushes wait for the first request of the next one."""
        for type_url, pending in self.pending.items():
            if pending:
                orphans = {str(i): p for i, p in enumerate([*self.server.status.orphans.get(type_url, []),
                                                             *pending.values()])}
                _fold(orphans, self.MAX_PENDING)
                self.server.status.orphans[type_url] = list(orphans.values())
        self.pending.clear()
        self.server.status.streams.discard(self)


def _fold(pushes: dict[str, _Push], most: int) -> None:
    """Envoy is not answering: fold the oldest pushes into the next, keeping at most ``most``."""
    while len(pushes) > most:
        oldest = pushes.pop(next(iter(pushes)))
        nxt = pushes[next(iter(pushes))]
        nxt.digests = {**oldest.digests, **nxt.digests}


class XdsServer(ads_pb2_grpc.AggregatedDiscoveryServiceServicer):  # type: ignore[misc]
    """Serves ADS on 127.0.0.1 (an ephemeral port by default) to the Envoy it configures."""

    def __init__(self) -> None:
        self.snapshot = Snapshot({})
        self.versions: dict[str, str] = {}
        self.status = XdsStatus()
        self._digests: dict[str, dict[str, str]] = {}
        self._counter = itertools.count(1)
        self._nonces = itertools.count(1)
        self._ecds_base = ""  # snapshot version of the last ECDS push
        self._update = asyncio.Event()
        self._server: grpc.aio.Server | None = None
        self.port = 0
        self.envoy_instance = ""  # ENVOY_INSTANCE_HEADER of the last stream

    def next_nonce(self) -> str:
        return str(next(self._nonces))

    def ecds_version(self, version: str, nonce: str) -> str:
        """The version_info of an ECDS push: unique, so that the version_info of Envoy's request
        tells which push it accepted last (ECDS pushes of new subscriptions share a snapshot version)."""
        if self._ecds_base == version:
            return f"{version}.{nonce}"
        self._ecds_base = version
        return version

    def set_snapshot(self, snap: Snapshot) -> None:
        """Make ``snap`` current; each type whose resources changed gets a new version."""
        for type_url in TYPES:
            digests = {n: _digest(a) for n, a in snap.of_type(type_url).items()}
            if digests != self._digests.get(type_url) or type_url not in self.versions:
                self._digests[type_url] = digests
                self.versions[type_url] = str(next(self._counter))
            current = self.status.resources.setdefault(type_url, {})
            for name, r in current.items():
                r.current = digests.get(name, "")
            for name, d in digests.items():
                self.status.resource(type_url, name).current = d
        self.snapshot = snap
        self._update.set()
        self._update = asyncio.Event()
        self.status._bump()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self._server = grpc.aio.server()
        ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port(f"{host}:{port}")
        if not self.port:
            raise OSError(f"xds: cannot listen on {host}:{port}")
        await self._server.start()
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=0.5)

    def _connected(self, instance: str) -> None:
        """A stream from Envoy ``instance`` ("": not told, taken for the same Envoy as before)."""
        if instance and self.envoy_instance and instance != self.envoy_instance:
            _log.info("xds: a new Envoy process connected: it holds none of the configs sent before")
            self.status.forget_envoy()
        self.envoy_instance = instance or self.envoy_instance

    async def StreamAggregatedResources(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        metadata = dict(context.invocation_metadata() or ())
        self._connected(str(metadata.get(ENVOY_INSTANCE_HEADER, "")))
        stream = _Stream(self, context.peer())
        requests: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue()

        async def read() -> None:
            try:
                async for req in request_iterator:
                    await requests.put(req)
            finally:
                await requests.put(None)

        reader = asyncio.get_running_loop().create_task(read())
        self.status.connected += 1
        _log.info("xds: Envoy connected (%s)", stream.peer)
        try:
            while True:
                update = self._update
                for resp in stream.responses(self.snapshot, self.versions):
                    await context.write(resp)
                got = asyncio.ensure_future(requests.get())
                changed = asyncio.ensure_future(update.wait())
                try:
                    await asyncio.wait({got, changed}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    changed.cancel()
                    if not got.done():
                        got.cancel()  # a cancelled Queue.get leaves its item in the queue
                if got.cancelled() or not got.done():
                    continue
                req = got.result()
                if req is None:
                    return
                stream.on_request(req)
                while not requests.empty():  # take everything Envoy sent before answering
                    req = requests.get_nowait()
                    if req is None:
                        return
                    stream.on_request(req)
        finally:
            reader.cancel()
            stream.close()
            self.status.connected -= 1
            self.status._bump()
            _log.info("xds: Envoy disconnected (%s)", stream.peer)
