"""The ADS server's ACK/NACK bookkeeping, driven over gRPC by a client that answers as Envoy does.

:class:`EnvoyLikeClient` keeps the per-type request state of Envoy's GrpcMuxImpl: processing
a response sets response_nonce to its nonce; accepting it sets version_info to its version;
rejecting it sets error_detail (kept until the next request is sent, even if a later response
is accepted). Envoy sends one request after it has processed any number of queued responses
of a type, so one request may answer several pushes; the tests choose when it sends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from envoy.config.core.v3 import extension_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.protobuf import wrappers_pb2  # type: ignore[import-untyped]

from wasmgate.xds.resources import ECDS_TYPE
from wasmgate.xds.server import ENVOY_INSTANCE_HEADER, Snapshot, XdsServer, _blamed, _Stream

PREFIX = "extensions.istio.io/wasmplugin/default."


def ext(name: str, value: str) -> extension_pb2.TypedExtensionConfig:
    msg = extension_pb2.TypedExtensionConfig(name=PREFIX + name)
    msg.typed_config.Pack(wrappers_pb2.StringValue(value=value))
    return msg


def snapshot(**values: str) -> Snapshot:
    return Snapshot.of([], [], [ext(n, v) for n, v in values.items()])


class EnvoyLikeClient:
    """One ADS stream, with Envoy's request state for the ECDS type."""

    def __init__(self, port: int, instance: str = "envoy-1"):
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel).StreamAggregatedResources(
            metadata=((ENVOY_INSTANCE_HEADER, instance),) if instance else None)
        self.request = discovery_pb2.DiscoveryRequest(type_url=ECDS_TYPE)
        self.request.node.id = "test"
        self.values: dict[str, str] = {}  # the snapshot's resources (name -> value)

    async def subscribe(self, *names: str) -> None:
        del self.request.resource_names[:]
        self.request.resource_names.extend(PREFIX + n for n in names)
        await self.send()

    async def send(self) -> None:
        req = discovery_pb2.DiscoveryRequest()
        req.CopyFrom(self.request)
        await self.call.write(req)
        self.request.ClearField("error_detail")  # as Envoy clears it once a request is out

    async def receive(self) -> discovery_pb2.DiscoveryResponse:
        resp = await asyncio.wait_for(self.call.read(), 30)
        assert isinstance(resp, discovery_pb2.DiscoveryResponse), resp
        return resp

    def process(self, resp: discovery_pb2.DiscoveryResponse, reject: str | None = None) -> None:
        if reject is None:
            self.request.version_info = resp.version_info
        else:
            self.request.error_detail.code = 13
            self.request.error_detail.message = reject
        self.request.response_nonce = resp.nonce

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close()

    async def reconnect(self, port: int, instance: str = "envoy-1") -> EnvoyLikeClient:
        """The same Envoy on a new stream (another process with another ``instance``): Envoy keeps
        its request state, without the nonce, and sends it first on the new stream."""
        await self.close()
        new = EnvoyLikeClient(port, instance)
        new.values = self.values
        new.request.CopyFrom(self.request)
        new.request.response_nonce = ""
        if instance != "envoy-1":
            new.request.version_info = ""
            new.request.ClearField("error_detail")
        await new.send()
        return new


def names(resp: discovery_pb2.DiscoveryResponse) -> list[str]:
    out = []
    for a in resp.resources:
        msg = extension_pb2.TypedExtensionConfig()
        a.Unpack(msg)
        out.append(msg.name.removeprefix(PREFIX))
    return out


async def until(check: Callable[[], bool], server: XdsServer, what: str) -> None:
    async def wait() -> None:
        while not check():
            await server.status.changed.wait()
    try:
        await asyncio.wait_for(wait(), 30)
    except TimeoutError:
        raise AssertionError(f"{what} not reached; status: {server.status.describe()}") from None


def states(server: XdsServer) -> dict[str, Any]:
    return dict(server.status.describe()["resources"].get("ECDS", {}))


def run(test: Callable[[XdsServer, EnvoyLikeClient], Awaitable[None]]) -> None:
    async def main() -> None:
        server = XdsServer()
        await server.start()
        client = EnvoyLikeClient(server.port)
        client.values = {"a": "a1", "b": "b1", "c": "c1"}
        server.set_snapshot(snapshot(**client.values))
        try:
            await client.subscribe("a", "b", "c")
            first = await client.receive()
            assert sorted(names(first)) == ["a", "b", "c"]
            client.process(first)
            await client.send()
            await until(lambda: {r["state"] for r in states(server).values()} == {"accepted"}, server,
                        "the first push accepted")
            await test(server, client)
        finally:
            await client.close()
            await server.stop()
    asyncio.run(main())


async def push(server: XdsServer, client: EnvoyLikeClient, **values: str) -> discovery_pb2.DiscoveryResponse:
    """Change the snapshot and read the response it makes (Envoy has not processed it yet)."""
    client.values.update(values)
    server.set_snapshot(snapshot(**client.values))
    return await client.receive()


def test_one_request_answers_every_push_up_to_its_nonce() -> None:
    """Envoy processed three queued pushes and ACKed only the newest nonce: all three are accepted."""
    async def test(server: XdsServer, client: EnvoyLikeClient) -> None:
        got = [await push(server, client, a="a2"), await push(server, client, b="b2"),
               await push(server, client, c="c2")]
        assert [names(r) for r in got] == [["a"], ["b"], ["c"]]
        assert len({r.version_info for r in got}) == 3 and len({r.nonce for r in got}) == 3
        assert server.status.describe()["pending"]["ECDS"] == 3
        for r in got:
            client.process(r)
        await client.send()  # one request, the newest nonce
        await until(lambda: server.status.describe()["pending"]["ECDS"] == 0, server, "no push pending")
        assert {n: r["state"] for n, r in states(server).items()} == {
            PREFIX + "a": "accepted", PREFIX + "b": "accepted", PREFIX + "c": "accepted"}
        assert server.status.describe()["versions"]["ECDS"] == got[-1].version_info
    run(test)


def test_nack_of_the_newest_push_accepts_the_older_one_its_version_names() -> None:
    async def test(server: XdsServer, client: EnvoyLikeClient) -> None:
        one, two = await push(server, client, a="a2"), await push(server, client, b="b2")
        client.process(one)
        client.process(two, reject=f"Unable to create Wasm HTTP filter default.b ({two.version_info})")
        await client.send()  # version_info: one's, error_detail: two's, nonce: two's
        await until(lambda: server.status.describe()["pending"]["ECDS"] == 0, server, "no push pending")
        s = states(server)
        assert s[PREFIX + "a"] == {"state": "accepted", "error": None}
        assert s[PREFIX + "b"]["state"] == "rejected" and "default.b" in s[PREFIX + "b"]["error"]
        assert s[PREFIX + "c"]["state"] == "accepted"
        nack = server.status.nacks[-1]
        assert nack["resources"] == [PREFIX + "b"] and nack["version"] == two.version_info
        assert server.status.versions[ECDS_TYPE] == one.version_info
    run(test)


def test_error_kept_from_an_older_push_is_not_blamed_on_the_accepted_newest() -> None:
    """Envoy keeps error_detail until its next request: rejected one, accepted two, then one request."""
    async def test(server: XdsServer, client: EnvoyLikeClient) -> None:
        one, two = await push(server, client, a="bad"), await push(server, client, b="b2")
        client.process(one, reject="Unable to create Wasm HTTP filter default.a")
        client.process(two)
        await client.send()  # nonce and version_info: two's; error_detail: one's
        await until(lambda: server.status.describe()["pending"]["ECDS"] == 0, server, "no push pending")
        s = states(server)
        assert s[PREFIX + "a"]["state"] == "rejected" and "default.a" in s[PREFIX + "a"]["error"]
        assert s[PREFIX + "b"] == {"state": "accepted", "error": None}
        assert server.status.nacks[-1]["resources"] == [PREFIX + "a"]
        # a later good version of a clears the rejection
        three = await push(server, client, a="a3")
        client.process(three)
        await client.send()
        await until(lambda: states(server)[PREFIX + "a"]["state"] == "accepted", server, "a accepted")
    run(test)


def test_each_push_answered_on_its_own_including_stale_nonces() -> None:
    """Envoy answering every push in turn: the first answer carries a nonce already stale."""
    async def test(server: XdsServer, client: EnvoyLikeClient) -> None:
        one, two = await push(server, client, a="a2"), await push(server, client, a="a3", b="b2")
        client.process(one)
        await client.send()
        client.process(two)
        await client.send()
        await until(lambda: server.status.describe()["pending"]["ECDS"] == 0, server, "no push pending")
        assert {r["state"] for r in states(server).values()} == {"accepted"}
    run(test)


def test_partly_rejected_push_sends_the_others_again_alone() -> None:
    """Envoy applies an ECDS update watch by watch: of a rejected push, the resources its message
    does not name get a push of their own, so each gets a verdict."""
    async def test(server: XdsServer, client: EnvoyLikeClient) -> None:
        both = await push(server, client, a="bad", b="b2")
        assert sorted(names(both)) == ["a", "b"]
        client.process(both, reject="Unable to create Wasm HTTP filter default.a")
        await client.send()
        again = await client.receive()
        assert names(again) == ["b"] and again.version_info != both.version_info
        client.process(again)
        await client.send()
        await until(lambda: server.status.describe()["pending"]["ECDS"] == 0, server, "no push pending")
        s = states(server)
        assert s[PREFIX + "a"]["state"] == "rejected" and s[PREFIX + "b"]["state"] == "accepted"
    run(test)


def test_two_rejections_in_one_request_do_not_share_a_message() -> None:
    """Envoy keeps one error_detail, its last rejection's: a request answering two rejected pushes
    carries the newest's message only. The older push's plugin is rejected, and says its message
    was not sent, instead of showing the other plugin's."""
    async def test(server: XdsServer, client: EnvoyLikeClient) -> None:
        one, two = await push(server, client, a="bad"), await push(server, client, b="bad")
        client.process(one, reject="Unable to create Wasm plugin default.a")
        client.process(two, reject="Unable to create Wasm plugin default.b")
        await client.send()  # version_info: the first push's; error_detail: b's
        await until(lambda: server.status.describe()["pending"]["ECDS"] == 0, server, "no push pending")
        s = states(server)
        assert s[PREFIX + "b"] == {"state": "rejected", "error": "Unable to create Wasm plugin default.b"}
        assert s[PREFIX + "a"]["state"] == "rejected"
        assert s[PREFIX + "a"]["error"].startswith(f"Envoy rejected ECDS version {one.version_info}; its message "
                                                   "was not sent")
        nack = server.status.nacks[-1]
        assert nack["resources"] == [PREFIX + "b"] and nack["version"] == two.version_info
        assert nack["also_rejected"] == [one.version_info]
        three = await push(server, client, a="a3")  # a fix clears it
        client.process(three)
        await client.send()
        await until(lambda: states(server)[PREFIX + "a"] == {"state": "accepted", "error": None}, server,
                    "a accepted")
    run(test)


def test_rejection_hidden_behind_a_later_one_is_not_taken_for_an_accept() -> None:
    """Rejected one, accepted two, rejected three, then one request: version_info is two's and the
    message three's, so the request does not tell whether one was accepted: it stays "sent"."""
    async def test(server: XdsServer, client: EnvoyLikeClient) -> None:
        one, two, three = (await push(server, client, a="bad"), await push(server, client, b="b2"),
                           await push(server, client, c="bad"))
        client.process(one, reject="Unable to create Wasm plugin default.a")
        client.process(two)
        client.process(three, reject="Unable to create Wasm plugin default.c")
        await client.send()
        await until(lambda: server.status.describe()["pending"]["ECDS"] == 0, server, "no push pending")
        s = states(server)
        assert s[PREFIX + "a"]["state"] == "sent" and s[PREFIX + "b"]["state"] == "accepted"
        assert s[PREFIX + "c"] == {"state": "rejected", "error": "Unable to create Wasm plugin default.c"}
        assert server.status.nacks[-1]["also_rejected"] == []  # one may have been accepted
        assert server.status.versions[ECDS_TYPE] == two.version_info
    run(test)


def test_message_naming_none_of_several_older_pushes_blames_none_of_them() -> None:
    """Newest accepted, and a message naming no resource: it is one of the older pushes', and the
    request does not tell which; both stay "sent", the NACK is listed with no version."""
    async def test(server: XdsServer, client: EnvoyLikeClient) -> None:
        one, two, three = (await push(server, client, a="bad"), await push(server, client, b="b2"),
                           await push(server, client, c="c2"))
        client.process(one, reject="Error: filter config has type URL x but expect y.")
        client.process(two)
        client.process(three)
        await client.send()
        await until(lambda: server.status.describe()["pending"]["ECDS"] == 0, server, "no push pending")
        assert {n: r["state"] for n, r in states(server).items()} == {
            PREFIX + "a": "sent", PREFIX + "b": "sent", PREFIX + "c": "accepted"}
        nack = server.status.nacks[-1]
        assert nack["resources"] == [] and nack["version"] is None and nack["message"].startswith("Error: filter")
    run(test)


def test_pushes_unanswered_when_the_stream_ends_wait_for_the_next() -> None:
    async def test(server: XdsServer, client: EnvoyLikeClient) -> None:
        await push(server, client, a="a2")
        assert server.status.describe()["pending"]["ECDS"] == 1
        await client.close()
        await until(lambda: server.status.connected == 0, server, "the stream closed")
        assert server.status.describe()["pending"]["ECDS"] == 1
        assert states(server)[PREFIX + "a"]["state"] == "sent"
        client = await client.reconnect(server.port)  # Envoy did not process it: nothing to tell
        await until(lambda: server.status.describe()["pending"]["ECDS"] == 1 and server.status.connected == 1
                    and not server.status.orphans, server, "the old push dropped, everything sent again")
        again = await client.receive()
        assert sorted(names(again)) == ["a", "b", "c"]
        client.process(again)
        await client.send()
        await until(lambda: {r["state"] for r in states(server).values()} == {"accepted"}, server, "all accepted")
        await client.close()
    run(test)


async def reject_a_then_reconnect(server: XdsServer, client: EnvoyLikeClient, instance: str = "envoy-1"
                                  ) -> EnvoyLikeClient:
    """a rejected (Envoy holds that config: it records a config before it builds the filter), then a
    new stream that sends every resource again, acknowledged."""
    bad = await push(server, client, a="bad")
    client.process(bad, reject="Unable to create Wasm plugin default.a")
    await client.send()
    await until(lambda: states(server)[PREFIX + "a"]["state"] == "rejected", server, "a rejected")
    client = await client.reconnect(server.port, instance)
    again = await client.receive()
    assert sorted(names(again)) == ["a", "b", "c"]
    client.process(again)
    await client.send()
    await until(lambda: server.status.describe()["pending"]["ECDS"] == 0 and server.status.connected == 1, server,
                "the new stream's push answered")
    return client


def test_config_rejected_and_acknowledged_on_a_new_stream_stays_rejected() -> None:
    """Envoy skips a config equal to the one it holds: sent again after a reconnect, the config it
    rejected is acknowledged, not applied. It stays rejected, with Envoy's message, until it changes."""
    async def test(server: XdsServer, client: EnvoyLikeClient) -> None:
        client = await reject_a_then_reconnect(server, client)
        s = states(server)
        assert s[PREFIX + "a"] == {"state": "rejected", "error": "Unable to create Wasm plugin default.a"}
        assert s[PREFIX + "b"]["state"] == "accepted"
        fixed = await push(server, client, a="a3")
        client.process(fixed)
        await client.send()
        await until(lambda: states(server)[PREFIX + "a"] == {"state": "accepted", "error": None}, server,
                    "a accepted")
        await client.close()
    run(test)


def test_config_rejected_by_an_envoy_process_is_judged_again_by_a_new_one() -> None:
    """Another Envoy process (another instance in the stream's metadata) holds nothing: its ACK of
    the config the previous one rejected is an ACK."""
    async def test(server: XdsServer, client: EnvoyLikeClient) -> None:
        client = await reject_a_then_reconnect(server, client, instance="envoy-2")
        assert {r["state"] for r in states(server).values()} == {"accepted"}
        assert server.status.nacks[-1]["resources"] == [PREFIX + "a"]  # the old NACK stays listed
        await client.close()
    run(test)


def test_rejection_not_sent_before_the_stream_broke_is_read_from_the_next_streams_first_request() -> None:
    """Envoy processed two pushes (accepted the first, rejected the second) and its stream broke
    before it sent a request: its first request on the next stream carries the first's version and the
    second's message."""
    async def test(server: XdsServer, client: EnvoyLikeClient) -> None:
        one, two = await push(server, client, b="b2"), await push(server, client, a="bad")
        await push(server, client, c="c2")  # not processed
        client.process(one)
        client.process(two, reject="Unable to create Wasm plugin default.a")
        client = await client.reconnect(server.port)
        await until(lambda: not server.status.orphans and server.status.connected == 1, server,
                    "the old pushes answered")
        s = states(server)
        assert s[PREFIX + "a"] == {"state": "rejected", "error": "Unable to create Wasm plugin default.a"}
        assert s[PREFIX + "b"]["state"] == "accepted" and s[PREFIX + "c"]["state"] == "sent"
        assert server.status.nacks[-1]["version"] == two.version_info
        again = await client.receive()
        client.process(again)
        await client.send()
        await until(lambda: server.status.describe()["pending"]["ECDS"] == 0, server, "sent again, answered")
        assert states(server)[PREFIX + "a"]["state"] == "rejected"  # acknowledged, not applied
        assert states(server)[PREFIX + "c"]["state"] == "accepted"
        await client.close()
    run(test)


def stream_with_push() -> tuple[XdsServer, _Stream, discovery_pb2.DiscoveryResponse]:
    server = XdsServer()
    server.set_snapshot(snapshot(a="a1", d="d1"))
    stream = _Stream(server, "test")
    stream.on_request(discovery_pb2.DiscoveryRequest(type_url=ECDS_TYPE, resource_names=[PREFIX + "a"]))
    (first,) = stream.responses(server.snapshot, server.versions)
    return server, stream, first


def test_request_with_a_stale_nonce_is_not_answered() -> None:
    """xds_protocol: no response for a request whose nonce is not the newest sent; its resource
    names come again with the newer nonce."""
    server, stream, first = stream_with_push()
    server.set_snapshot(snapshot(a="a2", d="d1"))
    (second,) = stream.responses(server.snapshot, server.versions)
    stale = discovery_pb2.DiscoveryRequest(type_url=ECDS_TYPE, resource_names=[PREFIX + "a", PREFIX + "d"],
                                           version_info=first.version_info, response_nonce=first.nonce)
    stream.on_request(stale)
    assert stream.responses(server.snapshot, server.versions) == []
    assert server.status.resources[ECDS_TYPE][PREFIX + "a"].acked  # its ACK still counts
    stale.version_info, stale.response_nonce = second.version_info, second.nonce
    stream.on_request(stale)
    (third,) = stream.responses(server.snapshot, server.versions)
    assert names(third) == ["d"]


def test_pending_is_bounded_per_type() -> None:
    server, stream, first = stream_with_push()
    last = first
    for i in range(2, 3 * _Stream.MAX_PENDING):
        server.set_snapshot(snapshot(a=f"a{i}", d="d1"))
        (last,) = stream.responses(server.snapshot, server.versions)
    assert len(stream.pending[ECDS_TYPE]) == _Stream.MAX_PENDING
    assert server.status.pending[ECDS_TYPE] == _Stream.MAX_PENDING
    stream.on_request(discovery_pb2.DiscoveryRequest(type_url=ECDS_TYPE, resource_names=[PREFIX + "a"],
                                                     version_info=last.version_info, response_nonce=last.nonce))
    assert stream.pending[ECDS_TYPE] == {} and server.status.pending[ECDS_TYPE] == 0
    assert server.status.describe()["resources"]["ECDS"][PREFIX + "a"]["state"] == "accepted"


def test_a_message_blames_a_plugin_only_by_its_whole_name() -> None:
    """Envoy names a rejected plugin by PluginConfig.name or its resource name; a name that is a
    prefix of the one named (default.a of default.ab, default.a.b) is not blamed."""
    other = "extensions.istio.io/wasmplugin/x-default.a"
    pushed = dict.fromkeys([PREFIX + "a", PREFIX + "ab", PREFIX + "a.b", other], "digest")
    assert _blamed(pushed, "Unable to create Wasm plugin default.ab") == {PREFIX + "ab"}
    assert _blamed(pushed, "Unable to create Wasm HTTP filter default.a.b") == {PREFIX + "a.b"}
    assert _blamed(pushed, f"Unexpected resource name in ExtensionConfigDS response: {PREFIX}ab") == {PREFIX + "ab"}
    assert _blamed(pushed, "Unable to create Wasm plugin default.a") == {PREFIX + "a"}
    assert _blamed(pushed, "Unable to create Wasm plugin x-default.a") == {other}
    both = "plugin default.a. Unable to create Wasm plugin default.ab (3)"
    assert _blamed(pushed, both) == {PREFIX + "a", PREFIX + "ab"}
    assert _blamed(pushed, "Error: filter config has type URL x but expect y.") == set()
