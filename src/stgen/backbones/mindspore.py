"""Read (and, for tests, write) MindSpore ``.ckpt`` checkpoint files without MindSpore.

File format
-----------
A MindSpore checkpoint is a protobuf ``Checkpoint`` message, schema
``mindspore/ccsrc/utils/checkpoint.proto`` (proto2, no package)::

    message Checkpoint {
        message Value {
            required string tag = 1;                  // parameter name
            oneof value {
                TensorProto tensor = 2;
                MapTensorProto maptensor = 3;         // MapParameter (not supported here)
            }
        }
        repeated Value value = 1;
    }
    message TensorProto {
        repeated int64 dims = 1;                      // shape; [0] for a 0-d scalar
        required string tensor_type = 2;              // "Float32", "Float16", "BFloat16", "Int32", ...
        required bytes tensor_content = 3;            // raw little-endian C-order data
    }
    message MapTensorProto { repeated TensorProto tensor = 1; }

MindSpore's writer (``mindspore/train/serialization.py``: ``_exec_save`` and
``_write_parameter_bytes_data``) serialises one ``Checkpoint`` message per
parameter chunk and appends them to the file; a parameter larger than 512 MiB is
split into consecutive ``Value`` entries with the same ``tag`` and the same
``dims`` whose ``tensor_content`` pieces concatenate to the full tensor (its
loader joins consecutive same-tag entries). A 0-d scalar is stored with
``dims = [0]`` and one element of content.

Reader
------
:func:`read_mindspore_ckpt` parses the protobuf wire format itself over a
read-only ``mmap`` of the file: only the small headers are decoded in Python,
tensor data are returned as zero-copy ``numpy`` views into the map (so there is
no 2 GB protobuf message limit, no MindSpore/protobuf install and no full copy
of the file in memory). The views keep the map alive; they are read-only.
Exceptions to zero-copy: ``BFloat16`` (numpy has no bfloat16; returned exactly
up-cast to float32) and tensors split over several entries (joined into one
array). A file cut exactly between two entries still parses (protobuf has no
trailer); it then lacks tensors, which the CellFM converter reports as missing
keys. Every problem a user's file can have (empty, truncated, corrupt wire
data, unknown ``tensor_type``, duplicated names, content size not matching
``dims``, map tensors) raises :class:`stgen.errors.InputError` naming the file
and the tensor.

Writer
------
:func:`write_mindspore_ckpt` writes the same format with the official
``protobuf`` package from a descriptor built at runtime that mirrors
``checkpoint.proto`` exactly, chunking like MindSpore does; it exists so tests
can produce checkpoints independently of the hand-written reader.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping
import numpy as np
from stgen.errors import InputError


#: MindSpore ``tensor_type`` string -> numpy dtype of the stored bytes (little endian).
#: ``BFloat16`` is stored as raw 16-bit words and up-cast to float32 on read.
TENSOR_TYPES: dict[str, np.dtype] = {
    "Bool": np.dtype("?"),
    "Int8": np.dtype("i1"),
    "UInt8": np.dtype("u1"),
    "Int16": np.dtype("<i2"),
    "UInt16": np.dtype("<u2"),
    "Int32": np.dtype("<i4"),
    "UInt32": np.dtype("<u4"),
    "Int64": np.dtype("<i8"),
    "UInt64": np.dtype("<u8"),
    "Float16": np.dtype("<f2"),
    "Float32": np.dtype("<f4"),
    "Float64": np.dtype("<f8"),
    "BFloat16": np.dtype("<u2"),
}

#: numpy dtype -> MindSpore ``tensor_type`` (writer side).
_NP_TO_TYPE: dict[np.dtype, str] = {v.newbyteorder("<"): k for k, v in TENSOR_TYPES.items() if k != "BFloat16"}

#: MindSpore's chunk size for one ``Value`` (``1024 * SLICE_SIZE`` bytes, SLICE_SIZE = 512 Ki).
MINDSPORE_CHUNK_BYTES = 512 * 1024 * 1024

_WIRE_VARINT, _WIRE_I64, _WIRE_LEN, _WIRE_SGROUP, _WIRE_EGROUP, _WIRE_I32 = 0, 1, 2, 3, 4, 5


@dataclass(frozen=True)
class CkptEntry:
    """One named tensor of a checkpoint, as located in the file (no data read).

    ``chunks`` are ``(byte offset, byte length)`` pieces of ``tensor_content``
    in file order (more than one when MindSpore split a large parameter).
    """

    name: str
    tensor_type: str
    dims: tuple[int, ...]
    chunks: tuple[tuple[int, int], ...]

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.chunks)

    @property
    def shape(self) -> tuple[int, ...]:
        """Array shape: ``()`` for MindSpore's scalar encoding ``dims=[0]`` with one element."""
        dt = TENSOR_TYPES.get(self.tensor_type)
        if self.dims == (0,) and dt is not None and self.nbytes == dt.itemsize:
            return ()
        return self.dims


class _Corrupt(Exception):
    """Internal: malformed wire data at a byte offset."""

    def __init__(self, msg: str, pos: int) -> None:
        super().__init__(msg)
        self.pos = pos


def _varint(buf, pos: int, end: int) -> tuple[int, int]:
    """Decode a base-128 varint at ``pos`` (at most 10 bytes) -> (value, next pos)."""
    result, shift, start = 0, 0, pos
    while True:
        if pos >= end:
            raise _Corrupt("varint runs past the end of its message", start)
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise _Corrupt("varint longer than 10 bytes", start)


def _key(buf, pos: int, end: int) -> tuple[int, int, int]:
    """Field key at ``pos`` -> (field number, wire type, next pos)."""
    start = pos
    key, pos = _varint(buf, pos, end)
    field, wire = key >> 3, key & 7
    if field == 0 or wire in (6, 7):
        raise _Corrupt(f"invalid field key {key}", start)
    return field, wire, pos


def _len_delimited(buf, pos: int, end: int) -> tuple[int, int]:
    """Length-delimited payload at ``pos`` -> (payload start, payload end)."""
    start = pos
    n, pos = _varint(buf, pos, end)
    if n > end - pos:
        raise _Corrupt(f"length-delimited field of {n} bytes runs past the end of its message", start)
    return pos, pos + n


def _skip(buf, pos: int, end: int, wire: int) -> int:
    """Skip an unknown field's payload (protobuf semantics); groups are not accepted."""
    if wire == _WIRE_VARINT:
        return _varint(buf, pos, end)[1]
    if wire == _WIRE_LEN:
        return _len_delimited(buf, pos, end)[1]
    size = {_WIRE_I64: 8, _WIRE_I32: 4}.get(wire)
    if size is None:
        raise _Corrupt(f"unsupported wire type {wire} (group)", pos)
    if pos + size > end:
        raise _Corrupt("fixed-width field runs past the end of its message", pos)
    return pos + size


def _utf8(buf, a: int, b: int, what: str) -> str:
    """A protobuf string field ``buf[a:b]``; _Corrupt naming ``what`` if it is not UTF-8."""
    try:
        return bytes(buf[a:b]).decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Corrupt(f"{what} is not valid UTF-8", a) from e


def _int64(v: int) -> int:
    """Two's-complement int64 from a decoded varint."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def _parse_tensor(buf, pos: int, end: int) -> tuple[list[int], str | None, tuple[int, int] | None]:
    """TensorProto payload -> (dims, tensor_type, (content offset, content length))."""
    dims: list[int] = []
    ttype: str | None = None
    content: tuple[int, int] | None = None
    while pos < end:
        field, wire, pos = _key(buf, pos, end)
        if field == 1 and wire == _WIRE_VARINT:  # unpacked repeated int64 (proto2 default)
            v, pos = _varint(buf, pos, end)
            dims.append(_int64(v))
        elif field == 1 and wire == _WIRE_LEN:  # packed encoding, also legal on the wire
            a, b = _len_delimited(buf, pos, end)
            pos = b
            while a < b:
                v, a = _varint(buf, a, b)
                dims.append(_int64(v))
        elif field == 2 and wire == _WIRE_LEN:
            a, pos = _len_delimited(buf, pos, end)
            ttype = _utf8(buf, a, pos, "tensor_type")
        elif field == 3 and wire == _WIRE_LEN:
            a, pos = _len_delimited(buf, pos, end)
            content = (a, pos - a)  # protobuf: the last occurrence wins
        elif field in (1, 2, 3):
            raise _Corrupt(f"TensorProto field {field} has wrong wire type {wire}", pos)
        else:
            pos = _skip(buf, pos, end, wire)
    return dims, ttype, content


def _parse_value(buf, pos: int, end: int, path: str) -> tuple[str, str, tuple[int, ...], tuple[int, int]]:
    """Checkpoint.Value payload -> (tag, tensor_type, dims, content span)."""
    start = pos
    tag: str | None = None
    tensor = None
    while pos < end:
        field, wire, pos = _key(buf, pos, end)
        if field == 1 and wire == _WIRE_LEN:
            a, pos = _len_delimited(buf, pos, end)
            tag = _utf8(buf, a, pos, "tag")
        elif field == 2 and wire == _WIRE_LEN:
            a, pos = _len_delimited(buf, pos, end)
            if tensor is not None:
                raise _Corrupt("Value holds two tensor fields", a)
            tensor = _parse_tensor(buf, a, pos)
        elif field == 3 and wire == _WIRE_LEN:
            raise InputError(
                f"{path}: entry {tag or '?'!r} is a MindSpore map tensor (MapParameter), which is not supported"
            )
        elif field in (1, 2):
            raise _Corrupt(f"Value field {field} has wrong wire type {wire}", pos)
        else:
            pos = _skip(buf, pos, end, wire)
    if tag is None:
        raise _Corrupt("Value without its required tag (name)", start)
    if tensor is None:
        raise _Corrupt(f"Value {tag!r} without a tensor", start)
    dims, ttype, content = tensor
    if ttype is None or content is None:
        raise _Corrupt(f"tensor {tag!r} lacks its required tensor_type or tensor_content", start)
    if any(d < 0 for d in dims):
        raise _Corrupt(f"tensor {tag!r} has negative dims {dims}", start)
    return tag, ttype, tuple(dims), content


def _open_map(path: Path) -> mmap.mmap:
    try:
        size = path.stat().st_size
    except OSError as e:
        raise InputError(f"{path}: cannot read MindSpore checkpoint ({e.strerror or e})") from e
    if size == 0:
        raise InputError(f"{path}: MindSpore checkpoint is empty")
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _index(mm, path: Path) -> list[CkptEntry]:
    """Scan the top-level message; join consecutive same-tag chunks; validate sizes."""
    end = len(mm)
    pos = 0
    raw: list[tuple[str, str, tuple[int, ...], tuple[int, int]]] = []
    try:
        while pos < end:
            field, wire, pos = _key(mm, pos, end)
            if field == 1 and wire == _WIRE_LEN:
                a, pos = _len_delimited(mm, pos, end)
                raw.append(_parse_value(mm, a, pos, str(path)))
            elif field == 1:
                raise _Corrupt(f"Checkpoint.value has wrong wire type {wire}", pos)
            else:
                pos = _skip(mm, pos, end, wire)
    except _Corrupt as e:
        raise InputError(
            f"{path}: not a readable MindSpore checkpoint (truncated or corrupt at byte {e.pos} of {end}: {e})"
        ) from None
    if not raw:
        raise InputError(f"{path}: MindSpore checkpoint holds no tensors")

    entries: list[CkptEntry] = []
    seen: set[str] = set()
    i = 0
    while i < len(raw):
        tag, ttype, dims, span = raw[i]
        chunks = [span]
        j = i + 1
        while j < len(raw) and raw[j][0] == tag:  # MindSpore's split of one large parameter
            if raw[j][1] != ttype or raw[j][2] != dims:
                raise InputError(
                    f"{path}: consecutive entries named {tag!r} disagree on type/shape "
                    f"({ttype} {list(dims)} vs {raw[j][1]} {list(raw[j][2])})"
                )
            chunks.append(raw[j][3])
            j += 1
        if tag in seen:
            raise InputError(f"{path}: tensor name {tag!r} occurs more than once (duplicated, not consecutive slices)")
        seen.add(tag)
        entry = CkptEntry(tag, ttype, dims, tuple(chunks))
        _check_entry(entry, path)
        entries.append(entry)
        i = j
    return entries


def _check_entry(e: CkptEntry, path: Path) -> None:
    if e.tensor_type == "str":
        return
    if e.tensor_type not in TENSOR_TYPES:
        raise InputError(
            f"{path}: tensor {e.name!r} has unknown tensor_type {e.tensor_type!r} "
            f"(known: {', '.join(sorted(TENSOR_TYPES))}, str)"
        )
    itemsize = TENSOR_TYPES[e.tensor_type].itemsize
    n = int(np.prod(e.shape, dtype=np.int64)) if e.shape else 1
    if e.nbytes != n * itemsize:
        raise InputError(
            f"{path}: tensor {e.name!r} ({e.tensor_type}, dims {list(e.dims)}) should hold {n * itemsize} bytes "
            f"but its content has {e.nbytes}"
        )


def index_mindspore_ckpt(path: str | os.PathLike) -> list[CkptEntry]:
    """Names, types, shapes and byte locations of a checkpoint's tensors (reads headers only)."""
    path = Path(path)
    mm = _open_map(path)
    try:
        return _index(mm, path)
    finally:
        mm.close()


def _materialise(mm, e: CkptEntry, path: Path) -> np.ndarray:
    if e.tensor_type == "str":
        data = b"".join(bytes(mm[a : a + n]) for a, n in e.chunks)
        if len(data) % 4:
            raise InputError(f"{path}: string tensor {e.name!r} is not UCS-4 encoded")
        arr = np.frombuffer(data, dtype=f"<U{max(len(data) // 4, 1)}") if data else np.array([""])
        return arr.reshape(()) if e.dims in ((), (0,)) else arr
    dt = TENSOR_TYPES[e.tensor_type]
    if len(e.chunks) == 1:
        a, n = e.chunks[0]
        arr = np.frombuffer(mm, dtype=dt, count=n // dt.itemsize, offset=a)
    else:
        arr = np.frombuffer(b"".join(bytes(mm[a : a + n]) for a, n in e.chunks), dtype=dt)
    arr = arr.reshape(e.shape)
    if e.tensor_type == "BFloat16":  # exact up-cast: bf16 bits are the top half of a float32
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return arr


def read_mindspore_ckpt(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a MindSpore checkpoint, by name, in file order.

    Arrays are read-only zero-copy views into a memory map of the file (see the
    module docstring for the exceptions). Raises :class:`InputError` for
    unreadable, truncated or corrupt files, unknown tensor types, duplicated
    names and content sizes that do not match ``dims``.
    """
    path = Path(path)
    mm = _open_map(path)
    try:
        entries = _index(mm, path)
        out = {e.name: _materialise(mm, e, path) for e in entries}
    except BaseException:
        mm.close()
        raise
    return out  # the arrays keep the map open until they are garbage-collected


# --------------------------------------------------------------------------- writer (tests)
@lru_cache(maxsize=1)
def checkpoint_message_class():
    """The ``Checkpoint`` protobuf class, built at runtime from a descriptor equal to ``checkpoint.proto``."""
    from google.protobuf import descriptor_pb2, descriptor_pool

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="mindspore_checkpoint.proto", syntax="proto2")

    tensor = fdp.message_type.add(name="TensorProto")
    tensor.field.add(name="dims", number=1, label=F.LABEL_REPEATED, type=F.TYPE_INT64)
    tensor.field.add(name="tensor_type", number=2, label=F.LABEL_REQUIRED, type=F.TYPE_STRING)
    tensor.field.add(name="tensor_content", number=3, label=F.LABEL_REQUIRED, type=F.TYPE_BYTES)

    maptensor = fdp.message_type.add(name="MapTensorProto")
    maptensor.field.add(name="tensor", number=1, label=F.LABEL_REPEATED, type=F.TYPE_MESSAGE, type_name=".TensorProto")

    ckpt = fdp.message_type.add(name="Checkpoint")
    value = ckpt.nested_type.add(name="Value")
    value.oneof_decl.add(name="value")
    value.field.add(name="tag", number=1, label=F.LABEL_REQUIRED, type=F.TYPE_STRING)
    value.field.add(name="tensor", number=2, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE,
                    type_name=".TensorProto", oneof_index=0)
    value.field.add(name="maptensor", number=3, label=F.LABEL_OPTIONAL, type=F.TYPE_MESSAGE,
                    type_name=".MapTensorProto", oneof_index=0)
    ckpt.field.add(name="value", number=1, label=F.LABEL_REPEATED, type=F.TYPE_MESSAGE, type_name=".Checkpoint.Value")

    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    desc = pool.FindMessageTypeByName("Checkpoint")
    try:
        from google.protobuf.message_factory import GetMessageClass
    except ImportError:  # protobuf < 4.22
        from google.protobuf.message_factory import MessageFactory

        return MessageFactory(pool).GetPrototype(desc)
    return GetMessageClass(desc)


def _to_bfloat16_bits(a: np.ndarray) -> np.ndarray:
    """float -> bfloat16 bit patterns (round to nearest even), as little-endian uint16."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return u.astype("<u2")


def write_mindspore_ckpt(
    path: str | os.PathLike,
    tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
    tensor_types: Mapping[str, str] | None = None,
    chunk_bytes: int = MINDSPORE_CHUNK_BYTES,
) -> Path:
    """Write ``tensors`` as a MindSpore checkpoint with the official ``protobuf`` package.

    Parameters
    ----------
    tensors : name -> array (or ``(name, array)`` pairs, which may repeat a name
        to produce a deliberately invalid file for tests).
    tensor_types : optional name -> ``tensor_type`` override, e.g. ``"BFloat16"``
        for a float array (stored rounded to bfloat16) or any string (written as
        is, with the array's raw bytes).
    chunk_bytes : split content larger than this into consecutive same-name
        entries, as MindSpore does at 512 MiB.

    Like MindSpore, each chunk is one serialised ``Checkpoint`` message appended
    to the file; 0-d arrays are stored with ``dims = [0]``.
    """
    Checkpoint = checkpoint_message_class()
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    tensor_types = dict(tensor_types or {})
    path = Path(path)
    with open(path, "wb") as f:
        for name, arr in items:
            arr = np.asarray(arr)
            ttype = tensor_types.get(name)
            if ttype == "BFloat16":
                data = _to_bfloat16_bits(arr).tobytes()
            else:
                le = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
                if ttype is None:
                    ttype = _NP_TO_TYPE.get(le.dtype)
                    if ttype is None:
                        raise InputError(f"write_mindspore_ckpt: no MindSpore tensor_type for {arr.dtype} ({name!r})")
                data = np.ascontiguousarray(le).tobytes()
            dims = list(arr.shape) if arr.ndim else [0]
            pieces = [data[i : i + chunk_bytes] for i in range(0, len(data), chunk_bytes)] or [b""]
            for piece in pieces:
                msg = Checkpoint()
                val = msg.value.add()
                val.tag = name
                val.tensor.dims.extend(dims)
                val.tensor.tensor_type = ttype
                val.tensor.tensor_content = piece
                f.write(msg.SerializeToString())
    return path
