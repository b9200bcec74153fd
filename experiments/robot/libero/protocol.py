"""Messages between the evaluation runner and its simulator workers.

Why a hand-rolled protocol: the workers run under the simulator's own interpreter (``.venv-libero``, numpy 1.26,
robosuite 1.4.1) while the runner runs under the training environment (numpy 2.x, torch, tensorflow), so
Python's pickled numpy arrays (which name numpy-internal modules) cannot cross. A message is a dict of builtin
types in which numpy arrays are replaced by ``(dtype, shape, bytes)`` triples; the frame is an 8-byte length
followed by a pickle of builtins only. Imports: stdlib and numpy, nothing else (both sides load this file).
"""

from __future__ import annotations

import pickle
import struct
from typing import Any, BinaryIO

import numpy as np

_ARRAY_TAG = "__ndarray__"
_HEADER = struct.Struct(">Q")
PICKLE_PROTOCOL = 4  # readable by every Python >= 3.8


class WorkerClosed(EOFError):
    """The other end of a worker pipe closed (the process exited or was killed)."""


def encode(value: Any) -> Any:
    """Replace numpy arrays and scalars (at any depth of dicts, lists and tuples) by portable triples."""
    if isinstance(value, np.ndarray):
        array = np.ascontiguousarray(value)
        return (_ARRAY_TAG, array.dtype.str, array.shape, array.tobytes())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(encode(v) for v in value)
    return value


def decode(value: Any) -> Any:
    """Inverse of ``encode``: arrays come back as writable numpy arrays of the same dtype and shape."""
    if isinstance(value, tuple) and len(value) == 4 and value[0] == _ARRAY_TAG:
        _, dtype, shape, data = value
        return np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape).copy()
    if isinstance(value, dict):
        return {k: decode(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(decode(v) for v in value)
    return value


def send(stream: BinaryIO, message: dict[str, Any]) -> None:
    """Write one framed message and flush (a reader never sees half a message followed by a stall)."""
    payload = pickle.dumps(encode(message), protocol=PICKLE_PROTOCOL)
    stream.write(_HEADER.pack(len(payload)) + payload)
    stream.flush()


def _read_exactly(stream: BinaryIO, size: int) -> bytes:
    chunks, remaining = [], size
    while remaining:
        chunk = stream.read(remaining)
        if not chunk:
            raise WorkerClosed(f"pipe closed with {remaining} of {size} bytes unread")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def receive(stream: BinaryIO) -> dict[str, Any]:
    """Read one framed message; ``WorkerClosed`` when the pipe ends before a complete frame."""
    (size,) = _HEADER.unpack(_read_exactly(stream, _HEADER.size))
    return decode(pickle.loads(_read_exactly(stream, size)))
