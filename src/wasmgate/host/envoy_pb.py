"""The few Envoy protobuf messages that attributes expose as messages.

``xds.node``, ``metadata`` and the ``xds.*_metadata`` attributes are messages in Envoy:
read whole they are serialized protobuf, and CEL selects their fields by name. Only the
fields wasmgate can fill are declared (same names and numbers as Envoy's
``envoy.config.core.v3`` types), so serializations are wire compatible. protobuf is
imported on first use: plain attributes never need it.
"""

from __future__ import annotations

from functools import cache
from typing import Any

PACKAGE = "envoy.config.core.v3"


@cache
def _classes() -> dict[str, Any]:
    try:  # Envoy's own types, when xds-protos is installed (wasmgate envoy): defining them again would clash
        from envoy.config.core.v3 import base_pb2

        return {name: getattr(base_pb2, name) for name in ("Metadata", "Locality", "Node")}
    except ImportError:
        pass
    from google.protobuf import (  # type: ignore[import-untyped]
        descriptor_pb2,
        descriptor_pool,
        message_factory,
        struct_pb2,
    )

    f = descriptor_pb2.FieldDescriptorProto
    fd = descriptor_pb2.FileDescriptorProto(name="wasmgate/envoy_core_subset.proto", package=PACKAGE,
                                            syntax="proto3", dependency=["google/protobuf/struct.proto"])

    def field(msg: Any, name: str, number: int, kind: int, type_name: str = "", repeated: bool = False) -> None:
        fd = msg.field.add(name=name, number=number, type=kind,
                           label=f.LABEL_REPEATED if repeated else f.LABEL_OPTIONAL)
        if type_name:
            fd.type_name = type_name

    struct = ".google.protobuf.Struct"
    metadata = fd.message_type.add(name="Metadata")
    entry = metadata.nested_type.add(name="FilterMetadataEntry")
    entry.options.map_entry = True
    field(entry, "key", 1, f.TYPE_STRING)
    field(entry, "value", 2, f.TYPE_MESSAGE, struct)
    field(metadata, "filter_metadata", 1, f.TYPE_MESSAGE, f".{PACKAGE}.Metadata.FilterMetadataEntry", True)

    locality = fd.message_type.add(name="Locality")
    for i, name in enumerate(("region", "zone", "sub_zone"), 1):
        field(locality, name, i, f.TYPE_STRING)

    node = fd.message_type.add(name="Node")
    field(node, "id", 1, f.TYPE_STRING)
    field(node, "cluster", 2, f.TYPE_STRING)
    field(node, "metadata", 3, f.TYPE_MESSAGE, struct)
    field(node, "locality", 4, f.TYPE_MESSAGE, f".{PACKAGE}.Locality")
    field(node, "user_agent_name", 6, f.TYPE_STRING)
    field(node, "user_agent_version", 7, f.TYPE_STRING)

    pool = descriptor_pool.Default()
    assert struct_pb2.Struct.DESCRIPTOR.full_name == "google.protobuf.Struct"  # loads struct.proto into the pool
    try:
        pool.FindFileByName(fd.name)
    except KeyError:
        pool.Add(fd)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))
            for name in ("Metadata", "Locality", "Node")}


def metadata(value: dict[str, Any] | None) -> Any:
    """An ``envoy.config.core.v3.Metadata`` from its JSON form (``{filter_metadata: {ns: {...}}}``)."""
    msg = _classes()["Metadata"]()
    for ns, fields in ((value or {}).get("filter_metadata") or {}).items():
        msg.filter_metadata[str(ns)].update(fields or {})
    return msg


def node(value: dict[str, Any], version: str) -> Any:
    """The proxy's ``envoy.config.core.v3.Node`` from the config file's ``node:`` section."""
    msg = _classes()["Node"]()
    msg.id = str(value.get("id") or "")
    msg.cluster = str(value.get("cluster") or "")
    meta = value.get("metadata")
    if isinstance(meta, dict) and meta:
        msg.metadata.update(meta)
    loc = value.get("locality")
    if isinstance(loc, dict):
        for key in ("region", "zone", "sub_zone"):
            setattr(msg.locality, key, str(loc.get(key) or ""))
    msg.user_agent_name = "wasmgate"
    msg.user_agent_version = version
    return msg


def locality() -> Any:
    return _classes()["Locality"]()
