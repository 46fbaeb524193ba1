"""weightsmith's GGUF container reader against gguf-py's `GGUFReader`, the reference parser.

Parity: the real default model and small files written here with `gguf.GGUFWriter` (every value
type, nested arrays, F32/F16/Q8_0/Q4_0/I32 tensors, non-default alignments, big-endian) must give
the same metadata values and the same tensor directory and bytes. Robustness: truncated files,
corrupt lengths and random byte flips must raise `CheckpointError` and nothing else.
"""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as QT
from gguf import GGUFValueType as VT
from numpy.lib.array_utils import byte_bounds

from weightsmith.checkpoint.gguf import open_gguf
from weightsmith.checkpoint.gguf_reader import MAX_ARRAY_DEPTH, GGUFFile
from weightsmith.errors import CheckpointError

# ---------------------------------------------------------------------------------------------
# Comparing with GGUFReader


def typed(value):
    """`value` with the type of every leaf, so True and 1 (equal in Python) compare unequal."""
    if isinstance(value, list):
        return [typed(item) for item in value]
    return (type(value), value)


def flatten(value):
    """GGUFReader flattens nested arrays into one list of leaves; we keep the nesting."""
    if not isinstance(value, list):
        return [value]
    return [leaf for item in value for leaf in flatten(item)]


def assert_same_as_gguf_reader(ours: GGUFFile, theirs: gguf.GGUFReader) -> None:
    their_fields = {k: f for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.fields) == list(their_fields)  # same keys, in file order
    assert ours.version == theirs.fields["GGUF.version"].contents()
    for key, theirs_field in their_fields.items():
        field = ours.fields[key]
        assert field.types == theirs_field.types, key
        assert field.offset == theirs_field.offset, key
        value = field.contents()
        if field.types[:2] == [VT.ARRAY, VT.ARRAY]:
            value = flatten(value)
        assert typed(value) == typed(theirs_field.contents()), key
    assert (ours.alignment, ours.data_offset) == (theirs.alignment, theirs.data_offset)
    assert ours.data.size == theirs.data.size
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, ref in zip(ours.tensors, theirs.tensors, strict=True):
        assert mine.tensor_type == ref.tensor_type, mine.name
        # GGUFReader's shape keeps the file's byte order (">u8" in big-endian files); ours is native.
        assert mine.shape.dtype == np.uint64 and mine.shape.tolist() == ref.shape.tolist(), mine.name
        assert (mine.n_elements, mine.n_bytes, mine.data_offset) == (
            ref.n_elements,
            ref.n_bytes,
            ref.data_offset,
        ), mine.name
        assert mine.data.dtype == ref.data.dtype and mine.data.shape == ref.data.shape, mine.name
        assert np.array_equal(mine.data, ref.data), mine.name


def test_default_model_matches_gguf_reader(default_gguf: Path) -> None:
    ours = GGUFFile.open(default_gguf)
    assert_same_as_gguf_reader(ours, gguf.GGUFReader(default_gguf))
    assert len(ours.fields["tokenizer.ggml.tokens"].contents()) == 49152  # the check saw the vocab
    assert {t.tensor_type for t in ours.tensors} >= {QT.Q4_1, QT.F32}


# ---------------------------------------------------------------------------------------------
# Small files written with GGUFWriter

SCALARS = {
    "test.u8": (VT.UINT8, 255),
    "test.i8": (VT.INT8, -128),
    "test.u16": (VT.UINT16, 65535),
    "test.i16": (VT.INT16, -32768),
    "test.u32": (VT.UINT32, 2**32 - 1),
    "test.i32": (VT.INT32, -(2**31)),
    "test.f32": (VT.FLOAT32, 0.1),  # not exact in float32: both must give the same rounding
    "test.u64": (VT.UINT64, 2**64 - 1),
    "test.i64": (VT.INT64, -(2**63)),
    "test.f64": (VT.FLOAT64, 3.141592653589793),
    "test.true": (VT.BOOL, True),
    "test.false": (VT.BOOL, False),
    "test.text": (VT.STRING, "héllo ✓ 🙂"),
    "test.empty_text": (VT.STRING, ""),  # add_string() would skip it; add_key_value() writes it
}
# Array item type -> items, written with that exact item type.
ARRAYS = {
    VT.UINT8: [0, 1, 255],
    VT.INT8: [-128, 0, 127],
    VT.UINT16: [0, 65535],
    VT.INT16: [-32768, 32767],
    VT.UINT32: [0, 2**32 - 1],
    VT.INT32: [-(2**31), 7],
    VT.FLOAT32: [0.1, -2.5, 1e-5],
    VT.UINT64: [2**64 - 1, 0],
    VT.INT64: [-(2**63), 2**63 - 1],
    VT.FLOAT64: [0.1, -1e300],
    VT.BOOL: [True, False, True],
    VT.STRING: ["a", "", "Ġthe", "日本語"],
}
NESTED = {
    "test.nested_ints": [[1, 2], [3, 4, 5]],
    "test.nested_strings": [["a", "bc"], [""], ["déf"]],
    "test.nested_three_deep": [[[1.5], [2.5, 3.5]], [[4.5]]],
}


def small_tensors() -> dict[str, tuple[np.ndarray, QT | None]]:
    """name -> (array to write, raw ggml type for quantized bytes or None)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 64)).astype(np.float32)
    return {
        "f32.matrix": (rng.standard_normal((3, 5)).astype(np.float32), None),
        "f32.vector": (rng.standard_normal(7).astype(np.float32), None),
        "f16.cube": (rng.standard_normal((2, 3, 4)).astype(np.float16), None),
        "q8_0.matrix": (gguf.quants.quantize(w, QT.Q8_0), QT.Q8_0),
        "q4_0.matrix": (gguf.quants.quantize(w, QT.Q4_0), QT.Q4_0),
        "i32.ids": (np.arange(5, dtype=np.int32), None),
    }


def write_small_gguf(
    path: Path, alignment: int | None = None, endianess: gguf.GGUFEndian = gguf.GGUFEndian.LITTLE
) -> Path:
    writer = gguf.GGUFWriter(str(path), "test", endianess=endianess)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for key, (value_type, value) in SCALARS.items():
        writer.add_key_value(key, value, value_type)
    for item_type, items in ARRAYS.items():
        writer.add_key_value(f"test.array.{item_type.name.lower()}", items, VT.ARRAY, sub_type=item_type)
    for key, value in NESTED.items():
        writer.add_array(key, value)
    for name, (array, raw_dtype) in small_tensors().items():
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("alignment", [None, 8, 64, 256])
def test_small_file_matches_gguf_reader(tmp_path: Path, alignment: int | None) -> None:
    path = write_small_gguf(tmp_path / "small.gguf", alignment)
    ours = GGUFFile.open(path)
    assert_same_as_gguf_reader(ours, gguf.GGUFReader(path))
    assert ours.alignment == (alignment or 32)
    assert ours.data_offset % ours.alignment == 0


def test_small_file_values_are_the_written_ones(tmp_path: Path) -> None:
    """Against what was written, not only against GGUFReader: nesting kept, types as written."""
    ours = GGUFFile.open(write_small_gguf(tmp_path / "small.gguf"))
    for key, (_, value) in SCALARS.items():
        got = ours.fields[key].contents()
        expected = float(np.float32(value)) if key == "test.f32" else value
        assert typed(got) == typed(expected), key
    for item_type, items in ARRAYS.items():
        got = ours.fields[f"test.array.{item_type.name.lower()}"]
        assert got.types == [VT.ARRAY, item_type]
        if item_type == VT.FLOAT32:
            items = np.array(items, dtype=np.float32).tolist()
        assert typed(got.contents()) == typed(items), item_type.name
    for key, value in NESTED.items():
        assert ours.fields[key].contents() == value, key
    assert ours.fields["test.nested_three_deep"].types == [VT.ARRAY, VT.ARRAY, VT.ARRAY, VT.FLOAT32]
    for tensor, (array, raw_dtype) in zip(ours.tensors, small_tensors().values(), strict=True):
        assert np.array_equal(tensor.data, array), tensor.name
        if raw_dtype is None:  # element types: the numpy shape is the ne shape reversed
            assert tensor.data.shape == tuple(reversed(tensor.shape.tolist())), tensor.name


def test_contents_is_a_fresh_copy(tmp_path: Path) -> None:
    ours = GGUFFile.open(write_small_gguf(tmp_path / "small.gguf"))
    ours.fields["test.nested_ints"].contents()[0].append(99)
    assert ours.fields["test.nested_ints"].contents() == NESTED["test.nested_ints"]


def test_big_endian_file_matches_gguf_reader(tmp_path: Path) -> None:
    path = write_small_gguf(tmp_path / "big.gguf", endianess=gguf.GGUFEndian.BIG)
    ours = GGUFFile.open(path)
    assert ours.byte_order == ">"
    assert_same_as_gguf_reader(ours, gguf.GGUFReader(path))
    assert ours.fields["test.u32"].contents() == 2**32 - 1
    assert np.array_equal(ours.tensors[0].data, small_tensors()["f32.matrix"][0])


# ---------------------------------------------------------------------------------------------
# Files built byte by byte: what GGUFWriter refuses to write


def raw_gguf(path: Path, *kv_pairs: bytes) -> Path:
    """A version 3 GGUF file with these encoded key/value pairs and no tensors."""
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kv_pairs)) + b"".join(kv_pairs))
    return path


def gguf_string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("<Q", len(data)) + data


def array_header(item_type: VT, count: int) -> bytes:
    return struct.pack("<IQ", item_type, count)


def test_empty_arrays(tmp_path: Path) -> None:
    empty = gguf_string("empty") + struct.pack("<I", VT.ARRAY) + array_header(VT.INT32, 0)
    nested = gguf_string("nested") + struct.pack("<I", VT.ARRAY) + array_header(VT.ARRAY, 2)
    nested += array_header(VT.STRING, 0) + array_header(VT.STRING, 1) + gguf_string("x")
    path = raw_gguf(tmp_path / "empty.gguf", empty, nested)
    ours, theirs = GGUFFile.open(path), gguf.GGUFReader(path)
    assert ours.fields["empty"].contents() == theirs.fields["empty"].contents() == []
    # We keep the declared item type of an empty array; GGUFReader records none.
    assert ours.fields["empty"].types == [VT.ARRAY, VT.INT32]
    assert theirs.fields["empty"].types == [VT.ARRAY]
    # GGUFReader takes a nested array's types from its first item, and misreads this one.
    assert ours.fields["nested"].contents() == [[], ["x"]]
    assert ours.fields["nested"].types == [VT.ARRAY, VT.ARRAY, VT.STRING]


@pytest.mark.parametrize("depth", [MAX_ARRAY_DEPTH, MAX_ARRAY_DEPTH + 1])
def test_array_nesting_limit(tmp_path: Path, depth: int) -> None:
    value = array_header(VT.ARRAY, 1) * (depth - 1) + array_header(VT.UINT8, 1) + b"\x07"
    path = raw_gguf(tmp_path / "deep.gguf", gguf_string("deep") + struct.pack("<I", VT.ARRAY) + value)
    if depth <= MAX_ARRAY_DEPTH:
        assert flatten(GGUFFile.open(path).fields["deep"].contents()) == [7]
    else:
        with pytest.raises(CheckpointError, match="nests arrays more than"):
            GGUFFile.open(path)


# ---------------------------------------------------------------------------------------------
# Broken files


def offset_of(part: np.ndarray, reader: gguf.GGUFReader) -> int:
    """Where one of GGUFReader's memmap parts lies in the file: our map of the layout comes from
    the reference parser, not from the reader under test."""
    return int(byte_bounds(part)[0] - byte_bounds(reader.data)[0])


def regions(reader: gguf.GGUFReader) -> dict[str, tuple[int, int]]:
    """[start, end) of the header, metadata, tensor infos and tensor data of a file."""
    kv_start = 24
    infos_start = offset_of(reader.tensors[0].field.parts[0], reader)
    infos_end = max(offset_of(t.field.parts[-1], reader) + 8 for t in reader.tensors)
    data_end = max(t.data_offset + t.n_bytes for t in reader.tensors)
    return {
        "header": (0, kv_start),
        "metadata": (kv_start, infos_start),
        "tensor infos": (infos_start, infos_end),
        "tensor data": (reader.data_offset, data_end),
    }


@pytest.fixture
def small_gguf(tmp_path: Path) -> tuple[bytes, gguf.GGUFReader]:
    path = write_small_gguf(tmp_path / "small.gguf")
    return path.read_bytes(), gguf.GGUFReader(path)


def assert_rejected(path: Path) -> str:
    """Both entry points raise CheckpointError naming the file (any other exception fails the
    test); returns the message."""
    with pytest.raises(CheckpointError) as info:
        GGUFFile.open(path)
    message = str(info.value)
    assert str(path) in message and "GGUF file" in message and "\n" not in message
    with pytest.raises(CheckpointError):
        open_gguf(path)
    return message


def test_truncated_files(tmp_path: Path, small_gguf) -> None:
    data, reader = small_gguf
    cuts = []
    for start, end in regions(reader).values():  # 10 cuts in each region, its ends included
        cuts += np.linspace(start, end - 1, 10, dtype=int).tolist()
    assert len(set(cuts)) >= 36
    for cut in sorted(set(cuts)):
        path = tmp_path / f"cut_{cut}.gguf"
        path.write_bytes(data[:cut])
        assert f"ends at byte {cut})" in assert_rejected(path)  # seen as a cut, and where


def length_fields(reader: gguf.GGUFReader) -> list[tuple[int, int]]:
    """(offset, size) of every count and length in the file, found through GGUFReader's parts."""
    fields = [(8, 8), (16, 8)]  # tensor count, metadata count
    for key, entry in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        parts = entry.parts
        fields.append((offset_of(parts[0], reader), 8))  # key length
        if entry.types[0] == VT.STRING:
            fields.append((offset_of(parts[3], reader), 8))
        if entry.types[0] == VT.ARRAY:
            fields.append((offset_of(parts[4], reader), 8))  # item count
            if entry.types[1] == VT.STRING:  # each string's length precedes its bytes
                fields += [(offset_of(parts[i - 1], reader), 8) for i in entry.data]
    for tensor in reader.tensors:
        fields.append((offset_of(tensor.field.parts[0], reader), 8))  # name length
        fields.append((offset_of(tensor.field.parts[2], reader), 4))  # dimension count
    return fields


def test_huge_lengths(tmp_path: Path, small_gguf) -> None:
    """A length or count with a high byte set claims more bytes than the file has; the error
    comes at once, from the bytes right after the bad field, not later in a misaligned parse."""
    data, reader = small_gguf
    assert len(data) < 1 << 16  # so any length >= 2**16 (x 1 byte or more) is past the end
    rng = np.random.default_rng(1)
    fields = length_fields(reader)
    assert len(fields) > 40
    for i, (offset, size) in enumerate(fields):
        corrupt = bytearray(data)
        corrupt[offset + rng.integers(2, size)] = rng.integers(1, 256)  # little-endian high byte
        path = tmp_path / f"huge_{i}.gguf"
        path.write_bytes(bytes(corrupt))
        message = assert_rejected(path)
        if offset >= 24:  # the header's two counts are checked once the header is read
            assert f"bytes from byte {offset + size}, but the file ends at byte {len(data)})" in message


def test_random_byte_flips(tmp_path: Path, small_gguf) -> None:
    """Any byte of the header, metadata or tensor infos changed: either the file still parses
    (a changed value, say) or it raises CheckpointError; no other exception, no hang."""
    data, reader = small_gguf
    rng = np.random.default_rng(2)
    fields = length_fields(reader)
    rejected = 0
    for trial in range(300):
        if trial % 2:  # half the flips land in a length or count
            offset, size = fields[rng.integers(len(fields))]
            position = offset + rng.integers(size)
        else:
            position = rng.integers(reader.data_offset)
        corrupt = bytearray(data)
        corrupt[position] ^= 1 << rng.integers(8)
        path = tmp_path / f"flip_{trial}.gguf"
        path.write_bytes(bytes(corrupt))
        try:
            parsed = GGUFFile.open(path)
        except CheckpointError as error:
            assert str(path) in str(error)
            rejected += 1
            continue
        for entry in parsed.fields.values():
            entry.contents()
        for tensor in parsed.tensors:
            np.asarray(tensor.data).sum()
    assert 50 < rejected < 300  # most flips in lengths break the file; many elsewhere do not


def patch(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


def test_specific_corruptions(tmp_path: Path, small_gguf) -> None:
    data, reader = small_gguf
    fields = reader.fields
    text = fields["test.text"]
    q8 = next(t for t in reader.tensors if t.name == "q8_0.matrix")
    vector = next(t for t in reader.tensors if t.name == "f32.vector")
    broken = {
        "it starts with b'GGUX'": patch(data, 0, b"GGUX"),
        "version 1 is not supported": patch(data, 4, struct.pack("<I", 1)),
        "version 4 is not supported": patch(data, 4, struct.pack("<I", 4)),
        "'test.u8' appears twice": patch(data, offset_of(fields["test.i8"].parts[1], reader), b"test.u8"),
        "unknown value type 99": patch(data, offset_of(fields["test.u8"].parts[2], reader), b"\x63\0\0\0"),
        "not UTF-8": patch(data, offset_of(text.parts[4], reader), b"\xff"),
        "tensor 'f32.matrix' appears twice": patch(
            data, offset_of(vector.field.parts[1], reader), b"f32.matrix"
        ),
        "unknown ggml type 999": patch(data, offset_of(q8.field.parts[4], reader), struct.pack("<I", 999)),
        "do not divide into Q8_0 blocks": patch(
            data, offset_of(q8.field.parts[3], reader), struct.pack("<Q", 48)
        ),
        "the version needs 4 bytes from byte 4, but the file ends at byte 6": b"GGUF\x03\0",
        "is empty": b"",
        "not the GGUF magic": b"this is a text file, not a GGUF checkpoint\n" * 10,
    }
    for i, (message, content) in enumerate(broken.items()):
        path = tmp_path / f"broken_{i}.gguf"
        path.write_bytes(content)
        assert_rejected(path)
        with pytest.raises(CheckpointError, match=message):
            GGUFFile.open(path)


@pytest.mark.parametrize(
    "method,value,message",
    [("add_uint32", 48, "not a power of two"), ("add_uint64", 64, "not UINT32")],
)
def test_bad_alignment(tmp_path: Path, method: str, value: int, message: str) -> None:
    writer = gguf.GGUFWriter(str(tmp_path / "align.gguf"), "test")
    getattr(writer, method)("general.alignment", value)
    writer.add_tensor("x", np.ones(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match=message):
        GGUFFile.open(tmp_path / "align.gguf")
