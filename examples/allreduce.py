"""A small all-reduce over TCP for the NumPy path of ``train_ddp.py``.

Rank 0 hosts a coordinator on ``MASTER_ADDR:MASTER_PORT`` (what torch.distributed's store
uses too); every rank, rank 0 included, connects to it. Each call of :meth:`AllReduce.mean`
is one round: every rank sends its arrays, the coordinator sums them and sends each rank the
mean. Leaving is a round of its own: a rank's ``__exit__`` returns only once every rank has
said goodbye, and rank 0's coordinator stops only after that, so no rank ever depends on
which rank exits last. Any rank that dies breaks every other rank's connection, and they
fail instead of waiting forever.

Messages are pickles of lists of arrays behind an 8-byte length; the peers are the ranks of
one gang, which trust each other.
"""

from __future__ import annotations

import os
import pickle
import socket
import struct
import threading
import time
from types import TracebackType
from typing import Any

import numpy as np

_BYE = "bye"
CONNECT_TIMEOUT_S = 120.0
ROUND_TIMEOUT_S = 300.0


def _send(sock: socket.socket, obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(struct.pack("!Q", len(data)) + data)


def _recv(sock: socket.socket) -> Any:
    (size,) = struct.unpack("!Q", _exactly(sock, 8))
    return pickle.loads(_exactly(sock, size))


def _exactly(sock: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            raise ConnectionError("a peer of the gang closed its connection")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


class _Coordinator(threading.Thread):
    """Rank 0's side: accepts one connection per rank, then serves rounds until all leave."""

    def __init__(self, listener: socket.socket, world: int) -> None:
        super().__init__(name="allreduce-coordinator", daemon=True)
        self.listener = listener
        self.world = world
        self.error: BaseException | None = None

    def run(self) -> None:
        peers: dict[int, socket.socket] = {}
        try:
            self.listener.settimeout(CONNECT_TIMEOUT_S)
            while len(peers) < self.world:
                conn, _ = self.listener.accept()
                conn.settimeout(ROUND_TIMEOUT_S)
                peers[int(_recv(conn))] = conn
            while True:
                messages = [_recv(peers[r]) for r in range(self.world)]
                if all(m == _BYE for m in messages):
                    for r in range(self.world):
                        _send(peers[r], _BYE)
                    return
                if any(m == _BYE for m in messages):
                    raise RuntimeError("a rank left while others were still training")
                total = [np.sum(arrays, axis=0) for arrays in zip(*messages, strict=True)]
                mean = [t / self.world for t in total]
                for r in range(self.world):
                    _send(peers[r], mean)
        except BaseException as exc:  # reported by rank 0's __exit__
            self.error = exc
        finally:
            for conn in peers.values():
                conn.close()
            self.listener.close()


class AllReduce:
    def __init__(self, rank: int, world: int, address: str, port: int) -> None:
        self.rank = rank
        self.world = world
        self.address = address
        self.port = port
        self._coordinator: _Coordinator | None = None
        self._sock: socket.socket | None = None

    @classmethod
    def from_env(cls, rank: int, world: int) -> AllReduce:
        return cls(
            rank,
            world,
            os.environ.get("MASTER_ADDR", "127.0.0.1"),
            int(os.environ.get("MASTER_PORT", "29500")),
        )

    def __enter__(self) -> AllReduce:
        if self.rank == 0:
            listener = socket.create_server(("", self.port), reuse_port=False)
            self._coordinator = _Coordinator(listener, self.world)
            self._coordinator.start()
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while True:
            try:
                sock = socket.create_connection((self.address, self.port), timeout=5)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit(
                        f"rank {self.rank}: no coordinator at {self.address}:{self.port}"
                    ) from None
                time.sleep(0.2)
        sock.settimeout(ROUND_TIMEOUT_S)
        _send(sock, self.rank)
        self._sock = sock
        return self

    def mean(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """The element-wise mean of ``arrays`` over all ranks (one round, a barrier)."""
        assert self._sock is not None
        _send(self._sock, arrays)
        result: list[np.ndarray] = _recv(self._sock)
        return result

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if self._sock is not None:
                if exc_type is None:
                    _send(self._sock, _BYE)
                    if _recv(self._sock) != _BYE:
                        raise RuntimeError("unexpected answer to goodbye")
                self._sock.close()
        finally:
            if self._coordinator is not None:
                self._coordinator.join(ROUND_TIMEOUT_S)
                if self._coordinator.error is not None and exc_type is None:
                    raise RuntimeError(
                        f"all-reduce coordinator failed: {self._coordinator.error}"
                    ) from self._coordinator.error
