"""Read the GGUF container: header, typed metadata, tensor directory, and tensor data views.

What it does: `GGUFFile.open(path)` memory-maps a GGUF file (versions 2 and 3, little- or
big-endian) once with numpy, parses the header, every metadata key/value pair (scalars, strings,
arrays, nested arrays) and the tensor infos with `struct` straight from the mapped bytes, and
gives each tensor a zero-copy numpy view of its data. Every count, length and offset read from
the file is checked against the bytes that remain, so a truncated or corrupt file raises one
`CheckpointError` naming the file, never a MemoryError, a hang or a stray built-in exception.
Memory stays bounded for a hostile file: arrays are checked when the file is opened but read
into Python lists only when `contents()` asks for them, and the number of metadata entries,
tensors and array items has a hard cap (`MAX_METADATA_KEYS`, `MAX_TENSORS`, `MAX_ARRAY_ITEMS`).

Layout (from the GGUF spec, ggml/docs/gguf.md): magic "GGUF", u32 version, u64 tensor_count,
u64 kv_count; kv_count pairs of (string key, u32 value type, value); tensor_count infos of
(string name, u32 n_dims, n_dims x u64 dims in ggml's ne order, u32 ggml type, u64 offset);
then padding to `general.alignment` (default 32) and the tensor data, each offset relative to
that aligned start. A string is a u64 byte length followed by UTF-8 bytes; an array is a u32
item type, a u64 count and the items.

Why not `gguf.GGUFReader`: it builds a numpy memmap slice per metadata element, which takes
seconds for a 49k-token vocabulary; this reader takes milliseconds. The objects it returns
mirror the parts of GGUFReader's API that `gguf.py` uses (`fields[key].contents()`,
`field.types`, `tensors[i].data` in the layout `gguf.quants.dequantize` expects).

What it does not do: write or modify files, dequantize (see `gguf.quants`), or interpret what
the metadata means (see `gguf.py`). Unlike GGUFReader, nested arrays keep their nesting in
`contents()` instead of being flattened.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from weightsmith.errors import CheckpointError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
# Real files nest arrays at most once or twice; the limit keeps a corrupt file from recursing
# until Python's stack runs out.
MAX_ARRAY_DEPTH = 16
# Hard caps, whatever the file's size: every metadata entry and tensor info costs a few hundred
# bytes of Python objects for its 13 or 24 bytes of file, so a small hostile file with millions
# of them would take many times its size in memory. Real files have ~50 keys, a few thousand
# tensors and arrays of at most a few hundred thousand items (vocabularies, merges).
MAX_METADATA_KEYS = 1 << 16
MAX_TENSORS = 1 << 16
MAX_ARRAY_ITEMS = 1 << 24

# Scalar value type -> struct format character (byte order added per file).
_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}
# The fewest bytes one array item of each type can take: bounds an array's count before reading.
_MIN_ITEM_SIZE = {
    **{t: struct.calcsize(f) for t, f in _SCALAR_FORMATS.items()},
    GGUFValueType.STRING: 8,  # u64 length, empty text
    GGUFValueType.ARRAY: 12,  # u32 item type + u64 count, no items
}
# ggml types whose data GGUFReader exposes as typed elements; every other type (quantized, and
# BF16, which numpy lacks) is raw bytes, shaped (..., bytes per row) for `gguf.quants.dequantize`.
_ELEMENT_DTYPES = {
    GGMLQuantizationType.F32: "f4",
    GGMLQuantizationType.F16: "f2",
    GGMLQuantizationType.F64: "f8",
    GGMLQuantizationType.I8: "i1",
    GGMLQuantizationType.I16: "i2",
    GGMLQuantizationType.I32: "i4",
    GGMLQuantizationType.I64: "i8",
}


@dataclass
class GGUFField:
    """One metadata key/value pair."""

    name: str
    # The value type, then for an array the item type, and for nested arrays the types of the
    # first item, as GGUFReader records them: [ARRAY, ARRAY, INT32] for a list of int lists.
    types: list[GGUFValueType]
    value: Any = field(repr=False)  # int, float, bool, str, or an _Array (read by contents())
    offset: int  # where the pair starts in the file

    def contents(self) -> Any:
        """The value as Python objects; an array is read from the file now, as a fresh list the
        caller may change (arrays stay in the map until asked for: parsing costs no memory)."""
        return self.value.read() if isinstance(self.value, _Array) else self.value


@dataclass(frozen=True)
class _Array:
    """Where an array's items lie in the mapped file (already checked when the file was parsed)."""

    buf: memoryview
    path: Path
    order: str
    start: int
    item_type: GGUFValueType
    count: int
    what: str

    def read(self) -> list:
        cursor = _Cursor(self.buf, self.path)
        cursor.set_order(self.order)
        cursor.pos = self.start
        return cursor.items(self.item_type, self.count, self.what, 0, build=True)


@dataclass
class GGUFTensor:
    """One tensor's directory entry and a read-only view of its bytes in the mapped file."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: np.ndarray  # (n_dims,) uint64 in ggml's ne order: fastest-varying axis first
    n_elements: int
    n_bytes: int
    data_offset: int  # absolute position of the first byte in the file
    # Element types: shaped reversed(shape). Others: uint8, (*reversed(shape)[:-1], row bytes).
    data: np.ndarray = field(repr=False)


@dataclass
class GGUFFile:
    """A parsed GGUF file; its tensor data stays in the memory map until read."""

    path: Path
    version: int
    byte_order: str  # struct/numpy prefix: "<" little-endian (the norm), ">" big-endian
    alignment: int
    data_offset: int  # start of the tensor data section
    fields: dict[str, GGUFField]
    tensors: list[GGUFTensor]
    data: np.memmap = field(repr=False)  # the whole file, read-only

    @classmethod
    def open(cls, path: str | Path) -> GGUFFile:
        """Map and parse `path`; a malformed file raises CheckpointError, an unreadable one OSError.

        The map is released when the returned object and every tensor view are garbage-collected.
        """
        path = Path(path)
        if os.path.getsize(path) == 0:  # numpy cannot map an empty file
            raise _invalid(path, "the file is empty: it ends at byte 0")
        data = np.memmap(path, mode="r")
        cursor = _Cursor(memoryview(data), path)
        version, order = _read_header(cursor)
        tensor_count, kv_count = cursor.u64("the tensor count"), cursor.u64("the metadata count")
        # Every pair takes at least 13 bytes and every tensor info 24: a count that cannot fit in
        # the file is corrupt, and is caught before a loop runs millions of times to find out.
        cursor.check_count(kv_count, 13, "metadata entries")
        cursor.check_cap(kv_count, MAX_METADATA_KEYS, "metadata entries")
        fields = _read_fields(cursor, kv_count)
        cursor.check_count(tensor_count, 24, "tensor infos")
        cursor.check_cap(tensor_count, MAX_TENSORS, "tensors")
        infos = [_read_tensor_info(cursor, i) for i in range(tensor_count)]
        alignment = _alignment(fields, path)
        data_start = -(-cursor.pos // alignment) * alignment  # round up to the alignment
        tensors = _build_tensors(data, infos, data_start, order, path)
        return cls(path, version, order, alignment, data_start, fields, tensors, data)


def _invalid(path: Path, detail: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: not a valid or complete GGUF file ({detail}); re-download or re-convert it"
    )


class _Cursor:
    """A read position in the mapped file; every read is checked against the file's end."""

    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf, self.path, self.pos, self.end = buf, path, 0, len(buf)
        self.set_order("<")

    def set_order(self, order: str) -> None:
        self.order = order
        self._u32 = struct.Struct(order + "I").unpack_from
        self._u64 = struct.Struct(order + "Q").unpack_from

    def error(self, detail: str) -> CheckpointError:
        return _invalid(self.path, detail)

    def past_end(self, what: str, n: int, pos: int) -> CheckpointError:
        # One wording for every truncation, naming where the file ends: a cut download is the
        # common case, and the byte count tells the user how much of it arrived.
        return self.error(f"{what} needs {n} bytes from byte {pos}, but the file ends at byte {self.end}")

    def take(self, n: int, what: str) -> int:
        """Advance past `n` bytes of `what`, returning where they start."""
        if n > self.end - self.pos:
            raise self.past_end(what, n, self.pos)
        start = self.pos
        self.pos += n
        return start

    def check_count(self, count: int, min_size: int, what: str) -> None:
        if count > (self.end - self.pos) // min_size:
            raise self.past_end(f"{count} {what}", count * min_size, self.pos)

    def check_cap(self, count: int, cap: int, what: str) -> None:
        if count > cap:
            raise self.error(f"it declares {count} {what}, more than the {cap} weightsmith reads")

    def u32(self, what: str) -> int:
        return self._u32(self.buf, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return self._u64(self.buf, self.take(8, what))[0]

    def string(self, what: str) -> str:
        n = self.u64(f"the length of {what}")
        start = self.take(n, what)
        try:
            return str(self.buf[start : self.pos], "utf-8")
        except UnicodeDecodeError as error:
            raise self.error(f"{what} is not UTF-8: {error}") from None

    def value_type(self, what: str) -> GGUFValueType:
        raw = self.u32(f"the value type of {what}")
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self.error(f"{what} has unknown value type {raw}") from None

    def value(self, vtype: GGUFValueType, what: str, depth: int = 0) -> tuple[Any, list[GGUFValueType]]:
        """(value, types) of one value of type `vtype`, as `GGUFField` holds them."""
        if vtype == GGUFValueType.STRING:
            return self.string(what), [vtype]
        if vtype == GGUFValueType.ARRAY:
            return self.array(what, depth)
        fmt = self.order + _SCALAR_FORMATS[vtype]
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt), what))[0], [vtype]

    def array(self, what: str, depth: int) -> tuple[_Array, list[GGUFValueType]]:
        """Check an array and step past it; its items are read only when asked for (_Array)."""
        item_type, count = self.array_header(what, depth)
        start = self.pos
        types = self.items(item_type, count, what, depth, build=False)
        return _Array(self.buf, self.path, self.order, start, item_type, count, what), types

    def array_header(self, what: str, depth: int) -> tuple[GGUFValueType, int]:
        if depth >= MAX_ARRAY_DEPTH:
            raise self.error(f"{what} nests arrays more than {MAX_ARRAY_DEPTH} deep")
        item_type = self.value_type(f"the items of {what}")
        count = self.u64(f"the item count of {what}")
        self.check_count(count, _MIN_ITEM_SIZE[item_type], f"items of {what}")
        if count > MAX_ARRAY_ITEMS:
            raise self.error(f"{what} has {count} items, more than the {MAX_ARRAY_ITEMS} weightsmith reads")
        return item_type, count

    def items(self, item_type: GGUFValueType, count: int, what: str, depth: int, *, build: bool) -> Any:
        """Step past `count` items; `build`: return them as a list, else return the array's
        types ([ARRAY, item type, ...], nested arrays typed by their first item)."""
        if item_type == GGUFValueType.STRING:
            values: Any = self.strings(count, what, build)
        elif item_type == GGUFValueType.ARRAY:
            values, first = [], [item_type]
            for i in range(count):
                inner_type, inner_count = self.array_header(f"item {i} of {what}", depth + 1)
                inner = self.items(inner_type, inner_count, f"item {i} of {what}", depth + 1, build=build)
                if build:
                    values.append(inner)
                elif i == 0:  # walking only: keep nothing but the first item's types
                    first = inner[1:]
            if not build:
                return [GGUFValueType.ARRAY, GGUFValueType.ARRAY, *first]
        else:
            dtype = np.dtype(self.order + _SCALAR_FORMATS[item_type])
            start = self.take(count * dtype.itemsize, what)
            # One numpy read for the whole array; tolist() gives the same Python values as struct.
            values = np.frombuffer(self.buf, dtype, count, start).tolist() if build else None
        return values if build else [GGUFValueType.ARRAY, item_type]

    def strings(self, count: int, what: str, build: bool = True) -> list[str]:
        """`count` strings in one tight loop: vocabularies hold tens of thousands of them. Each
        is decoded (so bad UTF-8 is found when the file is opened) and kept only if `build`."""
        buf, pos, end, u64 = self.buf, self.pos, self.end, self._u64
        out: list[str] = []
        append = out.append if build else (lambda _: None)
        try:
            for index in range(count):
                if pos + 8 > end:
                    raise self.past_end(f"the length of item {index} of {what}", 8, pos)
                (n,) = u64(buf, pos)
                pos += 8
                if n > end - pos:
                    raise self.past_end(f"item {index} of {what}", n, pos)
                append(str(buf[pos : pos + n], "utf-8"))
                pos += n
        except UnicodeDecodeError as error:
            raise self.error(f"item {index} of {what} is not UTF-8: {error}") from None
        self.pos = pos
        return out


def _read_header(cursor: _Cursor) -> tuple[int, str]:
    """(version, byte order) from the magic and version at the start of the file."""
    magic = bytes(cursor.buf[cursor.take(4, "the magic bytes") : cursor.pos])
    if magic != GGUF_MAGIC:
        raise cursor.error(f"it starts with {magic!r}, not the GGUF magic {GGUF_MAGIC!r}")
    version = cursor.u32("the version")
    # A big-endian file's small version number reads, little-endian, as a multiple of 2**16; this
    # is how llama.cpp's gguf-py tells the byte orders apart (the magic is the same in both).
    if version and not version & 0xFFFF:
        cursor.set_order(">")
        version = int.from_bytes(version.to_bytes(4, "little"), "big")
    if version not in SUPPORTED_VERSIONS:
        raise cursor.error(f"GGUF version {version} is not supported; versions 2 and 3 are")
    return version, cursor.order


def _read_fields(cursor: _Cursor, count: int) -> dict[str, GGUFField]:
    fields: dict[str, GGUFField] = {}
    for index in range(count):
        offset = cursor.pos
        key = cursor.string(f"the key of metadata entry {index}")
        if key in fields:
            raise cursor.error(f"metadata key '{key}' appears twice")
        value, types = cursor.value(cursor.value_type(f"metadata '{key}'"), f"metadata '{key}'")
        fields[key] = GGUFField(key, types, value, offset)
    return fields


@dataclass
class _TensorInfo:
    name: str
    dims: list[int]  # ne order
    tensor_type: GGMLQuantizationType
    offset: int  # relative to the data section


def _read_tensor_info(cursor: _Cursor, index: int) -> _TensorInfo:
    name = cursor.string(f"the name of tensor {index}")
    what = f"the info of tensor '{name}'"
    n_dims = cursor.u32(f"the dimension count of {what}")
    cursor.check_count(n_dims, 8, f"dimensions of {what}")
    dims = [cursor.u64(f"the dimensions of {what}") for _ in range(n_dims)]
    raw_type = cursor.u32(f"the type of {what}")
    try:
        tensor_type = GGMLQuantizationType(raw_type)
    except ValueError:
        raise cursor.error(f"tensor '{name}' has unknown ggml type {raw_type}") from None
    return _TensorInfo(name, dims, tensor_type, cursor.u64(f"the data offset of {what}"))


def _alignment(fields: dict[str, GGUFField], path: Path) -> int:
    entry = fields.get("general.alignment")
    if entry is None:
        return DEFAULT_ALIGNMENT
    if entry.types != [GGUFValueType.UINT32]:
        raise _invalid(path, f"general.alignment has type {entry.types[0].name}, not UINT32")
    if entry.value == 0 or entry.value & (entry.value - 1):
        raise _invalid(path, f"general.alignment is {entry.value}, not a power of two")
    return entry.value


def _build_tensors(
    data: np.memmap, infos: list[_TensorInfo], data_start: int, order: str, path: Path
) -> list[GGUFTensor]:
    raw = data.view(np.ndarray)  # plain ndarray views: memmap slices are slow to make
    tensors, names = [], set()
    for info in infos:
        if info.name in names:
            raise _invalid(path, f"tensor '{info.name}' appears twice")
        names.add(info.name)
        n_elements, n_bytes, dtype, shape = _tensor_layout(info, order, path)
        start = data_start + info.offset
        if start + n_bytes > raw.size:
            raise _invalid(
                path,
                f"the data of tensor '{info.name}' needs {n_bytes} bytes from byte {start}, "
                f"but the file ends at byte {raw.size}",
            )
        try:
            view = raw[start : start + n_bytes].view(dtype).reshape(shape)
        except ValueError as error:  # an empty tensor whose other dimensions overflow numpy's
            raise _invalid(
                path, f"tensor '{info.name}' has shape {shape} numpy cannot hold: {error}"
            ) from None
        shape_ne = np.array(info.dims, dtype=np.uint64)
        tensors.append(GGUFTensor(info.name, info.tensor_type, shape_ne, n_elements, n_bytes, start, view))
    return tensors


def _tensor_layout(info: _TensorInfo, order: str, path: Path) -> tuple[int, int, np.dtype, tuple[int, ...]]:
    """(n_elements, n_bytes, numpy dtype, numpy shape) of a tensor's data, validated."""
    n_elements = math.prod(info.dims)
    # llama.cpp's limits: dimensions are int64 and so is their product.
    if n_elements >= 2**63 or any(d >= 2**63 for d in info.dims):
        raise _invalid(path, f"tensor '{info.name}' has impossible dimensions {info.dims}")
    block_size, type_size = GGML_QUANT_SIZES[info.tensor_type]
    shape = tuple(reversed(info.dims))  # numpy order: slowest axis first
    row = shape[-1] if shape else 1
    if row % block_size:
        raise _invalid(
            path,
            f"tensor '{info.name}' rows of {row} values do not divide into "
            f"{info.tensor_type.name} blocks of {block_size}",
        )
    n_bytes = n_elements // block_size * type_size
    if info.tensor_type in _ELEMENT_DTYPES:
        return n_elements, n_bytes, np.dtype(order + _ELEMENT_DTYPES[info.tensor_type]), shape
    return n_elements, n_bytes, np.dtype(np.uint8), (*shape[:-1], row // block_size * type_size)
