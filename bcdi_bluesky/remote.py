"""Bluesky documents over 0MQ without running code from the network.

Bluesky's 0MQ ``Publisher`` and ``RemoteDispatcher`` pickle every document by default, and
unpickling runs whatever the sender put in the message: any client of the proxy's input port
could run code in the analysis service. This module gives the two ends a safe encoding and a
receiver that never dies of a bad message.

Acquisition side (the beamline's RunEngine)::

    from bluesky.callbacks.zmq import Publisher
    from bcdi_bluesky.remote import serializer

    RE.subscribe(Publisher("127.0.0.1:5577", serializer=serializer))

Analysis side: ``bcdi-bluesky serve --zmq HOST:5578`` (it uses :func:`deserializer` and
:class:`RemoteDispatcher`).

The encoding is msgpack; numpy arrays travel as a msgpack extension (dtype, shape, raw bytes)
and only plain numeric, boolean and string dtypes are accepted back (object arrays, which
msgpack-numpy would unpickle, are refused). Decoded arrays are read-only views of the message.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

import msgpack
import numpy as np
from event_model import DocumentNames

log = logging.getLogger(__name__)

#: msgpack extension type code of a numpy array: ``[dtype.str, shape, raw bytes]``.
NDARRAY_EXT = 1
#: dtype kinds a received array may have: bool, integers, floats, complex, bytes, unicode.
SAFE_DTYPE_KINDS = frozenset("biufcSU")
#: Document names a receiver dispatches (event-model's, less the deprecated bulk forms).
DOCUMENT_NAMES = frozenset(n.name for n in DocumentNames) - {"bulk_events", "bulk_datum"}
#: Default bound on one message (bytes); 0MQ discards longer ones before they are read.
MAX_MESSAGE_BYTES = 1 << 30


def _encode(obj: Any) -> Any:
    """msgpack's hook for what it does not know: numpy arrays, numpy scalars, tuples."""
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in SAFE_DTYPE_KINDS:
            raise TypeError(f"cannot send a numpy array of dtype {obj.dtype}")
        array = np.ascontiguousarray(obj)
        return msgpack.ExtType(
            NDARRAY_EXT,
            msgpack.packb([array.dtype.str, list(array.shape), array.tobytes()], use_bin_type=True),
        )
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot serialize {type(obj).__name__}")


def _decode_ext(code: int, data: bytes) -> np.ndarray:
    if code != NDARRAY_EXT:
        raise ValueError(f"unknown msgpack extension type {code}")
    dtype_text, shape, raw = msgpack.unpackb(data, raw=False)
    dtype = np.dtype(str(dtype_text))
    if dtype.kind not in SAFE_DTYPE_KINDS or dtype.fields is not None:
        raise ValueError(f"refused array dtype {dtype_text!r}")
    shape = tuple(int(n) for n in shape)
    if any(n < 0 for n in shape) or len(raw) != dtype.itemsize * int(np.prod(shape)):
        raise ValueError(
            f"array of shape {shape} and dtype {dtype} does not match {len(raw)} bytes"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def serializer(doc: dict) -> bytes:
    """Encode a Bluesky document for ``bluesky.callbacks.zmq.Publisher(serializer=...)``.

    Parameters
    ----------
    doc : dict
        Any document; numpy arrays and scalars inside it are supported.

    Returns
    -------
    bytes
        msgpack bytes that :func:`deserializer` reads back.
    """
    return msgpack.packb(doc, default=_encode, use_bin_type=True)


def deserializer(data: bytes) -> dict:
    """Decode what :func:`serializer` wrote; never executes anything from the message.

    Raises
    ------
    ValueError
        The bytes are not a msgpack document of the supported kinds.
    """
    try:
        doc = msgpack.unpackb(data, ext_hook=_decode_ext, raw=False)
    except Exception as exc:  # msgpack and the array hook raise several kinds
        raise ValueError(f"undecodable message ({type(exc).__name__}: {exc})") from None
    if not isinstance(doc, dict):
        raise ValueError(f"a document is a map, got {type(doc).__name__}")
    return doc


def parse_address(text: str) -> tuple[str, int]:
    """``"HOST:PORT"`` -> ``(host, port)``, the host resolved once to check that it exists.

    Raises
    ------
    ValueError
        One line saying what is wrong (form, port range, unknown host).
    """
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"want HOST:PORT (for example 127.0.0.1:5578), got {text!r}")
    number = int(port)
    if not 0 < number < 65536:
        raise ValueError(f"port {number} is out of range (1-65535) in {text!r}")
    try:
        socket.getaddrinfo(host, number, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise ValueError(f"cannot resolve host {host!r} ({exc})") from None
    return host, number


class RemoteDispatcher:
    """Receive documents from a Bluesky 0MQ proxy and pass them to subscribers.

    The same wire format as bluesky's ``RemoteDispatcher`` (``prefix name payload``), with two
    differences: the default ``deserializer`` is :func:`deserializer` (no pickle), and a
    message that cannot be split, names no known document or does not decode is dropped with
    one log line and counted in :attr:`dropped`; nothing a sender puts in a message stops the
    receiver. A subscriber that raises is logged and the next document still comes.

    Parameters
    ----------
    address : str
        The proxy's output, ``"HOST:PORT"``.
    deserializer : callable
        ``bytes -> dict``. ``pickle.loads`` matches bluesky's default publisher, and runs
        any code a sender puts in a message: only on a network where every sender is trusted.
    prefix : bytes
        Only messages with this prefix are read (empty: all).
    max_message_bytes : int
        0MQ drops longer messages unread (bounds the memory one message can take).
    poll_interval : float
        Seconds between checks of :meth:`stop` while no message comes.
    """

    def __init__(
        self,
        address: str,
        *,
        deserializer: Callable[[bytes], dict] = deserializer,
        prefix: bytes = b"",
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        poll_interval: float = 0.2,
    ) -> None:
        self.host, self.port = parse_address(address)
        self.deserializer = deserializer
        self.prefix = bytes(prefix)
        self.max_message_bytes = int(max_message_bytes)
        self.poll_interval = float(poll_interval)
        self.received = 0
        self.dropped = 0
        #: Times the connection to the proxy was lost and made again (a message longer than
        #: ``max_message_bytes`` makes 0MQ drop the connection for good, not the message).
        self.reconnects = 0
        self._subscribers: list[Callable[[str, dict], Any]] = []
        self._stop = threading.Event()

    def subscribe(self, callback: Callable[[str, dict], Any]) -> None:
        """Pass every received document to ``callback(name, doc)``."""
        self._subscribers.append(callback)

    def stop(self) -> None:
        """Make :meth:`start` return within ``poll_interval`` (safe from a signal handler)."""
        self._stop.set()

    def _drop(self, reason: str) -> None:
        self.dropped += 1
        log.warning("dropped 0MQ message %d (%s)", self.dropped, reason)

    def handle(self, message: bytes) -> None:
        """Decode one 0MQ message and dispatch it, or drop it with one log line."""
        self.received += 1
        parts = message.split(b" ", 2)
        if len(parts) != 3:
            self._drop(f"not 'prefix name payload', {len(message)} bytes")
            return
        prefix, raw_name, payload = parts
        if self.prefix and prefix != self.prefix:
            return
        name = raw_name.decode("utf-8", "replace")
        if name not in DOCUMENT_NAMES:
            self._drop(f"unknown document name {name[:40]!r}")
            return
        try:
            doc = self.deserializer(payload)
        except Exception as exc:  # any decoder error is the sender's problem, not ours
            self._drop(f"{name} document does not decode: {str(exc)[:200]}")
            return
        if not isinstance(doc, dict):
            self._drop(f"{name} document is a {type(doc).__name__}, not a map")
            return
        for callback in self._subscribers:
            try:
                callback(name, doc)
            except Exception:
                log.exception("subscriber %r failed on a %s document", callback, name)

    def start(self) -> None:
        """Connect and dispatch until :meth:`stop` is called.

        A message longer than ``max_message_bytes`` is never read: 0MQ closes the connection
        on it and, for that protocol error, does not make it again. The connection's
        monitor sees it go; the receiver then connects anew (one warning, counted in
        :attr:`reconnects`), so the next runs still arrive. Documents sent while it was
        down are lost, like any sent before a subscriber connects.
        """
        import zmq
        from zmq.utils.monitor import recv_monitor_message

        context = zmq.Context()
        timeout_ms = max(1, int(self.poll_interval * 1000))
        sock, monitor, poller = self._connect(context)
        try:
            while not self._stop.is_set():
                ready = dict(poller.poll(timeout_ms))
                if sock in ready:
                    self.handle(sock.recv())
                elif monitor in ready:
                    recv_monitor_message(monitor)
                    self.reconnects += 1
                    log.warning(
                        "connection to the 0MQ proxy at %s:%d lost (a message longer than "
                        "%d bytes, or the proxy went away): connecting again",
                        self.host,
                        self.port,
                        self.max_message_bytes,
                    )
                    self._close(sock, monitor)
                    sock, monitor, poller = self._connect(context)
        finally:
            self._close(sock, monitor)
            context.term()

    def _connect(self, context: Any) -> tuple[Any, Any, Any]:
        """A SUB socket connected to the proxy, a monitor that reports its disconnects, and a
        poller of both."""
        import zmq

        sock = context.socket(zmq.SUB)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
        sock.setsockopt(zmq.LINGER, 0)
        monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        sock.connect(f"tcp://{self.host}:{self.port}")
        sock.setsockopt(zmq.SUBSCRIBE, self.prefix)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        return sock, monitor, poller

    @staticmethod
    def _close(sock: Any, monitor: Any) -> None:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)
