"""protocol: the node core's requests and replies, bad input, clock skew, handoff and ping-before-evict."""

from __future__ import annotations

import random
from typing import Any

import msgpack
import pytest

from coordinator_free_dht.errors import ClockSkewError, DHTProtocolError, RemoteError
from coordinator_free_dht.ids import ID_BITS, id_to_bytes, key_id, pack_key
from coordinator_free_dht.protocol import (
    DHTProtocol,
    HandoffPrepared,
    PeerRefused,
    PingRequested,
    ProtocolConfig,
    RecordsRejected,
)
from coordinator_free_dht.routing import RoutingConfig
from coordinator_free_dht.storage import ValueRecord
from coordinator_free_dht.validation import DHTRecord

NOW = 1_700_000_000.0


def _wire(message: dict[str, Any]) -> Any:
    return msgpack.unpackb(msgpack.packb(message, use_bin_type=True), raw=False)


def _node(node_id: int, address: str | None = "addr", **config: Any) -> DHTProtocol:
    return DHTProtocol(node_id, address, NOW, rng=random.Random(node_id), config=ProtocolConfig(**config))


def _record(key: object, value: object, ttl: float = 60.0, subkey: object = None) -> DHTRecord:
    return DHTRecord(pack_key(key), None if subkey is None else pack_key(subkey), msgpack.packb(value), NOW + ttl)


def test_store_many_keys_then_find_them_over_the_wire() -> None:
    server, client = _node(1, "server"), _node(2, "client")
    records = [_record(k, v) for k, v in [(0, 0), ("", ""), (b"", None), ("k", {"x": [1, 2]})]]
    records.append(_record("d", 1, subkey="a"))
    request = _wire(client.make_store(records, NOW))
    reply = _wire(server.handle_request(client.node_id, request, NOW))
    assert client.on_store_reply(server.node_id, "server", reply, len(records), NOW, NOW) == [True] * 5
    keys = [0, "", b"", "k", "d", "missing"]
    find = _wire(client.make_find([key_id(k) for k in keys], True, NOW))
    reply = _wire(server.handle_request(client.node_id, find, NOW))
    results = client.on_find_reply(server.node_id, "server", reply, [pack_key(k) for k in keys], NOW, NOW)
    values = []
    for result in results[:4]:
        assert result.entry is not None
        assert result.entry.value is not None
        values.append(msgpack.unpackb(result.entry.value.value))
    assert values == [0, "", None, {"x": [1, 2]}]
    assert results[4].entry is not None
    assert results[4].entry.subkeys is not None
    assert results[5].entry is None
    # The server learned the client as a contact (it sent requests), and vice versa.
    assert client.node_id in server.table
    assert server.node_id in client.table


@pytest.mark.parametrize(
    "request_",
    [
        None,
        [],
        {"type": "find"},
        {"type": "find", "t": "now", "addr": "a", "keys": [b"\x00" * 32], "value": True},
        {"type": "find", "t": NOW, "addr": 5, "keys": [b"\x00" * 32], "value": True},
        {"type": "find", "t": NOW, "addr": "a", "keys": [b"\x00" * 31], "value": True},
        {"type": "find", "t": NOW, "addr": "a", "keys": [b"\x00" * 32] * 65, "value": True},
        {"type": "find", "t": NOW, "addr": "a", "keys": [b"\x00" * 32], "value": 1},
        {"type": "store", "t": NOW, "addr": "a", "records": [[b"\xa1k", None, b"\x01", 5, b""]]},
        {"type": "store", "t": NOW, "addr": "a", "records": [[b"\xa1k", b"", b"\x01", NOW + 5, b""]]},
        {"type": "store", "t": NOW, "addr": "a", "records": []},
        {"type": "store", "t": NOW, "addr": "a", "records": [[b"\xa1k", None, b"\x01"]]},
        {"type": "nope", "t": NOW, "addr": "a"},
        {"type": "ping", "t": NOW, "addr": "x" * 1000},
    ],
)
def test_malformed_requests_get_an_error_reply_and_the_node_keeps_serving(request_: object) -> None:
    server = _node(1)
    assert server.store_local(_record("kept", 1), NOW)
    reply = server.handle_request(2, request_, NOW)
    assert set(reply) == {"t", "error", "code"}
    assert reply["code"] == "DHTProtocolError"
    assert 2 not in server.table
    assert server.get_local(key_id("kept"), NOW) is not None
    good = server.handle_request(3, _node(3).make_ping(NOW), NOW)
    assert "error" not in good
    with pytest.raises(RemoteError, match="DHTProtocolError"):
        _node(2).on_ping_reply(1, "addr", reply, NOW, NOW)


def test_oversized_values_and_forged_records_are_rejected_individually() -> None:
    server = _node(1, max_value_bytes=100)
    client = _node(2)
    records = [_record("big", "x" * 200), _record("ok", 1), _record(f"o[owner:{'a' * 52}]", 1)]
    reply = server.handle_request(2, client.make_store(records, NOW), NOW)
    assert reply["stored"] == [False, True, False]
    assert "value of" in reply["reasons"][0]
    event = server.next_event()
    assert isinstance(event, RecordsRejected)
    assert len(event.reasons) == 2


def test_store_flood_from_one_peer_is_rate_limited() -> None:
    server = _node(1, store_rate=1.0, store_burst=10.0)
    flood = _node(2)
    accepted = 0
    for i in range(20):
        reply = server.handle_request(2, flood.make_store([_record(f"k{i}", i)], NOW), NOW)
        accepted += reply.get("stored") == [True]
        if "error" in reply:
            assert reply["code"] == "RateLimitedError"
    assert accepted == 10
    other = server.handle_request(3, _node(3).make_store([_record("x", 1)], NOW), NOW)
    assert other["stored"] == [True]
    assert len(server.storage) == 11


def test_clock_skew_is_refused_with_a_clear_error() -> None:
    server, client = _node(1, max_clock_offset=30.0), _node(2)
    reply = server.handle_request(2, client.make_ping(NOW + 3600), NOW)
    assert reply["code"] == "ClockSkewError"
    assert "clock" in reply["error"]
    assert 2 not in server.table
    assert isinstance(server.next_event(), PeerRefused)
    ok = server.handle_request(2, client.make_ping(NOW + 5), NOW)
    assert server.clock_offsets[2] == pytest.approx(5.0)
    # The requester measures the offset from the reply too, and refuses a far-off peer.
    assert client.on_ping_reply(1, "addr", ok, NOW + 4.9, NOW + 5.1) == pytest.approx(-5.0)
    late = {"t": NOW + 1000.0}
    with pytest.raises(ClockSkewError):
        client.on_ping_reply(1, "addr", late, NOW, NOW)


def test_client_mode_peers_are_served_but_never_routed_to() -> None:
    server, client = _node(1), _node(2, address=None)
    assert client.client_mode
    reply = server.handle_request(2, client.make_find([5], False, NOW), NOW)
    assert "results" in reply
    assert 2 not in server.table
    assert len(server.table) == 0


def test_bad_find_replies_raise_protocol_errors() -> None:
    client = _node(2)
    for reply in [
        {"t": NOW, "results": [[b"\x00" * 31, ["a"], None]]},
        {"t": NOW, "results": [[b"\x00" * 32, [5], None]]},
        {"t": NOW, "results": []},
        {"t": NOW, "results": [[b"", [], [0, b"v", 5, b""]]]},
        {"results": []},
    ]:
        with pytest.raises(DHTProtocolError):
            client.on_find_reply(1, "a", reply, [None], NOW, NOW)


def test_found_values_are_validated_and_expired_ones_dropped() -> None:
    client = _node(2)
    owned = pack_key(f"o[owner:{'a' * 52}]")
    reply = {"t": NOW, "results": [[b"", [], [0, b"\x01", NOW + 60, b""]], [b"", [], [0, b"\x01", NOW - 1, b""]]]}
    results = client.on_find_reply(1, "a", reply, [owned, pack_key("plain")], NOW, NOW)
    assert results[0].entry is None  # unsigned value under an owner-protected key
    assert results[1].entry is None  # expired


def test_full_bucket_asks_to_ping_the_least_recently_seen() -> None:
    node = _node(0, routing=RoutingConfig(k=2))
    far = 1 << (ID_BITS - 1)
    for i in (1, 2, 3):
        node.handle_request(far + i, _node(far + i).make_ping(NOW), NOW)
    event = node.next_event()
    assert event == PingRequested(far + 1, "addr")
    node.on_request_failed(far + 1, NOW)
    assert far + 3 in node.table
    assert node.table.is_blacklisted(far + 1, NOW)


def test_keys_are_handed_to_a_newly_joined_nearer_node() -> None:
    rng = random.Random(5)
    node = _node(rng.getrandbits(ID_BITS), num_replicas=2)
    others = [rng.getrandbits(ID_BITS) for _ in range(30)]
    for other in others:
        node.saw(other, f"a{other}", NOW)
    while node.next_event() is not None:
        pass
    target = key_id("handed")
    # Make this node the nearest holder, then a node nearer than anything known joins.
    node.storage.store(target, pack_key("handed"), None, ValueRecord(msgpack.packb("v"), NOW + 60), NOW)
    newcomer = target ^ 1
    for other, _ in node.table.nearest(target, 40):
        if other ^ target < node.node_id ^ target:
            node.table.remove(other)
    node.saw(newcomer, "new", NOW)
    events = []
    while (event := node.next_event()) is not None:
        events.append(event)
    handoffs = [e for e in events if isinstance(e, HandoffPrepared)]
    assert [h.node_id for h in handoffs] == [newcomer]
    records = handoffs[0].request["records"]
    assert records[0][0] == pack_key("handed")
    # A node far from the key gets nothing.
    node.saw(target ^ (1 << 255), "far", NOW)
    assert not any(isinstance(e, HandoffPrepared) for e in iter(node.next_event, None))


def test_republish_and_refresh_targets() -> None:
    node = _node(7, republish_interval=100.0, refresh_interval=50.0)
    record = node.prepare(_record("mine", 1, ttl=1000))
    node.publish(record, NOW)
    assert node.due_republish(NOW + 10) == []
    assert node.due_republish(NOW + 100) == [record]
    assert node.due_republish(NOW + 150) == []
    assert node.due_republish(NOW + 2000) == []  # expired records are forgotten
    targets = node.refresh_targets(NOW + 60)
    assert len(targets) == len(node.table.buckets)
    assert node.refresh_targets(NOW + 61) == []


def test_find_request_lists_ids_as_bytes() -> None:
    request = _node(1).make_find([3], False, NOW)
    assert request["keys"] == [id_to_bytes(3)]


def test_find_with_records_stores_them_and_answers_the_find() -> None:
    server, client = _node(1, "server", store_rate=1.0, store_burst=3.0), _node(2, "client")
    records = [_record("a", 1), _record("b", 2), _record("a", 0, ttl=30.0)]  # the last is older than the first
    find = _wire(client.make_find([key_id("a"), key_id("b")], False, NOW, records))
    reply = _wire(server.handle_request(client.node_id, find, NOW))
    results = client.on_find_reply(server.node_id, "server", reply, [None, None], NOW, NOW)
    assert len(results) == 2
    assert client.find_reply_stored(reply, len(records)) == [True, True, False]
    assert server.get_local(key_id("b"), NOW) is not None
    # Over the store rate limit the FIND is still answered; the records are reported as not stored.
    find = _wire(client.make_find([key_id("c")], False, NOW, [_record("c", 3)]))
    reply = _wire(server.handle_request(client.node_id, find, NOW))
    assert "error" not in reply
    assert client.find_reply_stored(reply, 1) == [False]
    assert "RateLimitedError" in reply["reasons"][0]
    assert server.get_local(key_id("c"), NOW) is None
    # A plain FIND says nothing about records; a reply with a wrong count is a protocol error.
    plain = _wire(server.handle_request(client.node_id, _wire(client.make_find([key_id("a")], False, NOW)), NOW))
    assert "records" not in client.make_find([key_id("a")], False, NOW)
    assert client.find_reply_stored(plain, 1) is None
    with pytest.raises(DHTProtocolError):
        client.find_reply_stored({**plain, "stored": [True, True]}, 1)
    # Malformed records fail the request like a bad STORE does.
    bad = {**_wire(client.make_find([key_id("a")], False, NOW)), "records": "nope"}
    assert "error" in server.handle_request(client.node_id, bad, NOW)


def test_find_with_records_is_declined_by_a_node_that_knows_nearer_replicas() -> None:
    target = key_id("far-key")
    # The server is far from the key and knows num_replicas nodes nearer to it than itself.
    server = _node(target ^ (1 << 255), "server", num_replicas=2)
    client = _node(target ^ (1 << 255) ^ 1, "client")  # farther from the key than the server
    for offset in (1, 2):
        server.saw(target ^ offset, f"near{offset}", NOW)
    assert not server.is_replica(target)
    find = _wire(client.make_find([target], False, NOW, [_record("far-key", 1)]))
    reply = _wire(server.handle_request(client.node_id, find, NOW))
    assert client.find_reply_stored(reply, 1) == [None]
    assert "declined" in reply["reasons"][0]
    assert server.get_local(target, NOW) is None
    # Once it is among the num_replicas nearest it knows of, it stores what a FIND carries.
    server.table.remove(target ^ 2)
    assert server.is_replica(target)
    reply = _wire(server.handle_request(client.node_id, find, NOW))
    assert client.find_reply_stored(reply, 1) == [True]
    assert server.get_local(target, NOW) is not None
