"""Documents over 0MQ: the safe encoding and the receiver that drops what it cannot read."""

import logging
import pickle
import threading
import time

import msgpack
import numpy as np
import pytest
from event_model import compose_run

from bcdi_bluesky.remote import (
    NDARRAY_EXT,
    RemoteDispatcher,
    deserializer,
    parse_address,
    serializer,
)


class _Marker:
    """Unpickling this would create ``path``: the proof that code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_documents_round_trip_with_arrays():
    bundle = compose_run(metadata={"scan_id": 3, "bcdi": {"hkl": (1, 1, 1)}})
    desc = bundle.compose_descriptor(
        name="primary",
        data_keys={
            "theta": {"source": "sim", "dtype": "number", "shape": []},
            "det_image": {"source": "sim", "dtype": "array", "shape": [3, 4]},
        },
    )
    frame = np.arange(12, dtype=">f4").reshape(3, 4)  # big-endian, as caproto gives them
    event = desc.compose_event(
        data={"theta": np.float32(20.5), "det_image": frame},
        timestamps={"theta": 0.0, "det_image": 0.0},
    )
    back = deserializer(serializer(event))
    np.testing.assert_array_equal(back["data"]["det_image"], frame)
    assert back["data"]["det_image"].dtype == frame.dtype
    assert back["data"]["theta"] == pytest.approx(20.5)
    assert deserializer(serializer(bundle.start_doc))["bcdi"]["hkl"] == [1, 1, 1]
    text = np.array(["ab", "c"])
    np.testing.assert_array_equal(deserializer(serializer({"t": text}))["t"], text)


def test_nothing_unsafe_decodes(tmp_path):
    marker = tmp_path / "ran"
    payloads = [
        pickle.dumps({"uid": _Marker(marker)}),
        b"\x00garbage",
        serializer([1, 2]),  # not a map
        msgpack.packb({"a": msgpack.ExtType(NDARRAY_EXT, msgpack.packb(["|O", [1], b"x" * 8]))}),
        msgpack.packb({"a": msgpack.ExtType(NDARRAY_EXT, msgpack.packb(["<f4", [4], b"x"]))}),
        msgpack.packb({"a": msgpack.ExtType(7, b"")}),
    ]
    for payload in payloads:
        with pytest.raises(ValueError):
            deserializer(payload)
    assert not marker.exists()
    with pytest.raises(TypeError, match="dtype object"):
        serializer({"a": np.array([None])})


def test_receiver_drops_and_counts_bad_messages(caplog, tmp_path):
    marker = tmp_path / "ran"
    dispatcher = RemoteDispatcher("127.0.0.1:5578")
    received = []
    dispatcher.subscribe(lambda name, doc: received.append(name))
    dispatcher.subscribe(lambda name, doc: 1 / 0)  # a broken subscriber stops nothing
    good = serializer(compose_run().start_doc)
    with caplog.at_level(logging.WARNING, logger="bcdi_bluesky.remote"):
        for message in (
            b"no spaces",
            b" nonsense " + good,
            b" \xff\xfe " + good,
            b" start " + pickle.dumps({"uid": _Marker(marker)}),
            b" start " + serializer([1]),
            b" start " + good,
        ):
            dispatcher.handle(message)
    assert received == ["start"]
    assert dispatcher.received == 6 and dispatcher.dropped == 5
    assert not marker.exists()
    dropped = [r for r in caplog.records if "dropped 0MQ message" in r.getMessage()]
    assert len(dropped) == 5 and all("\n" not in r.getMessage() for r in dropped)
    assert "unknown document name 'nonsense'" in caplog.text


@pytest.mark.parametrize(
    "address, words",
    [
        ("127.0.0.1:99999", "out of range"),
        ("no-such-host.invalid:5578", "cannot resolve"),
        ("5578", "HOST:PORT"),
        ("127.0.0.1:", "HOST:PORT"),
    ],
)
def test_bad_addresses_are_one_line(address, words):
    with pytest.raises(ValueError, match=words) as info:
        parse_address(address)
    assert "\n" not in str(info.value)
    assert parse_address("127.0.0.1:5578") == ("127.0.0.1", 5578)


def test_allow_pickle_reads_bluesky_default_messages():
    # What `serve --allow-pickle` does: bluesky's default Publisher pickles; trusted senders.
    dispatcher = RemoteDispatcher("127.0.0.1:5578", deserializer=pickle.loads)
    received = []
    dispatcher.subscribe(lambda name, doc: received.append((name, doc)))
    start = compose_run(metadata={"scan_id": 5}).start_doc
    dispatcher.handle(b" ".join([b"", b"start", pickle.dumps(start)]))
    assert received == [("start", start)] and dispatcher.dropped == 0


@pytest.mark.timeout(60)
def test_a_message_over_the_limit_costs_the_connection_not_the_service(caplog):
    """0MQ closes the connection on a message over ``max_message_bytes`` and, for that
    protocol error, never makes it again: the receiver connects anew and the next documents
    arrive. A publisher on loopback stands for the proxy."""
    import zmq

    context = zmq.Context()
    pub = context.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    dispatcher = RemoteDispatcher(f"127.0.0.1:{port}", max_message_bytes=4096, poll_interval=0.05)
    received = []
    dispatcher.subscribe(lambda name, doc: received.append(doc["sample"]))
    worker = threading.Thread(target=dispatcher.start, daemon=True)

    def send_until_received(uid: str) -> None:
        message = b" start " + serializer(compose_run(metadata={"sample": uid}).start_doc)
        end = time.monotonic() + 20
        while uid not in received:  # the subscription takes a moment to reach the publisher
            assert time.monotonic() < end, f"{uid} never arrived"
            pub.send(message)
            time.sleep(0.05)

    try:
        with caplog.at_level(logging.WARNING, logger="bcdi_bluesky.remote"):
            worker.start()
            send_until_received("before")
            pub.send(b" start " + b"x" * 100_000)  # over the limit
            send_until_received("after")
    finally:
        dispatcher.stop()
        worker.join(timeout=10)
        pub.close(linger=0)
        context.term()
    assert not worker.is_alive()
    assert dispatcher.reconnects == 1
    assert "connection to the 0MQ proxy" in caplog.text
