"""Property-based fuzzing of the readers of files people share (issue 16): GGUF files, safetensors
headers and index files, task files, guard policies and probe packs. Whatever the bytes or the
YAML structure, a reader returns or raises one of weightsmith's own errors (`WeightsmithError`):
never another exception, never a hang.

The normal run tries a few examples per property (WEIGHTSMITH_FUZZ_EXAMPLES, default 30);
`make fuzz` runs only these tests with many more. Fixed seeds' worth of hand-written hostile
files live beside each reader's own tests (test_gguf_reader.py, test_hardening_*.py).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weightsmith.errors import WeightsmithError

pytestmark = pytest.mark.fuzz

FUZZ = settings(
    max_examples=int(os.environ.get("WEIGHTSMITH_FUZZ_EXAMPLES", "30")),
    deadline=None,
    derandomize=os.environ.get("WEIGHTSMITH_FUZZ_EXAMPLES") is None,  # the normal run is repeatable
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.function_scoped_fixture,
        HealthCheck.data_too_large,
    ],
)


def scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="ws-fuzz-"))


def mutations(data: bytes) -> st.SearchStrategy[bytes]:
    """`data` with a few bytes changed, a cut, or a few bytes inserted."""
    n = len(data)
    flips = st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 255)), min_size=1, max_size=8)

    def flip(changes: list[tuple[int, int]]) -> bytes:
        out = bytearray(data)
        for i, b in changes:
            out[i] = b
        return bytes(out)

    cut = st.integers(0, n).map(lambda k: data[:k])
    insert = st.tuples(st.integers(0, n), st.binary(min_size=1, max_size=16)).map(
        lambda t: data[: t[0]] + t[1] + data[t[0] :]
    )
    return st.one_of(flips.map(flip), cut, insert)


# -- GGUF ----------------------------------------------------------------------------------


def small_gguf() -> bytes:
    import gguf

    folder = scratch()
    path = folder / "small.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_context_length(32)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b", "ab", "<s>"])
    writer.add_token_types([1, 1, 1, 3])
    writer.add_token_merges(["a b"])
    writer.add_array("test.nested", [[1, 2], [3]])
    writer.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    data = path.read_bytes()
    shutil.rmtree(folder)
    return data


SMALL_GGUF = small_gguf()


def read_whole_gguf(path: Path) -> None:
    from weightsmith.checkpoint.gguf import read_gguf
    from weightsmith.checkpoint.gguf_reader import GGUFFile

    reader = GGUFFile.open(path)
    for field in reader.fields.values():
        field.contents()
    read_gguf(reader)


def read_gguf_bytes(data: bytes) -> None:
    """Read `data` as a GGUF file: it loads, or fails with one of our errors (nothing else)."""
    folder = scratch()
    try:
        (folder / "f.gguf").write_bytes(data)
        read_whole_gguf(folder / "f.gguf")
    except WeightsmithError:
        pass
    finally:
        shutil.rmtree(folder)


@FUZZ
@given(data=mutations(SMALL_GGUF))
def test_gguf_reader_mutated_bytes(data: bytes) -> None:
    read_gguf_bytes(data)


@FUZZ
@given(data=st.binary(max_size=512).map(lambda b: b"GGUF" + struct.pack("<I", 3) + b))
def test_gguf_reader_random_bytes_after_the_magic(data: bytes) -> None:
    read_gguf_bytes(data)


# -- safetensors headers and index files ----------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
tensor_entries = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "X"]) | json_values,
        "shape": st.lists(st.integers(-2, 2**40), max_size=3) | json_values,
        "data_offsets": st.lists(st.integers(-2, 2**40), max_size=3) | json_values,
    }
)
headers = st.dictionaries(
    st.sampled_from(["w", "model.norm.weight", "__metadata__"]), tensor_entries | json_values
)


@FUZZ
@given(header=headers, body=st.binary(max_size=64), length_delta=st.integers(-4, 4))
def test_safetensors_header(header: dict, body: bytes, length_delta: int) -> None:
    from weightsmith.checkpoint.safetensors import iter_tensors

    raw = json.dumps(header).encode()
    folder = scratch()
    try:
        path = folder / "model.safetensors"
        path.write_bytes(struct.pack("<Q", max(0, len(raw) + length_delta)) + raw + body)
        list(iter_tensors([path]))
    except WeightsmithError:
        pass
    finally:
        shutil.rmtree(folder)


@FUZZ
@given(
    index=st.one_of(
        json_values,
        st.fixed_dictionaries(
            {
                "weight_map": st.dictionaries(
                    st.text(max_size=10), st.text(max_size=30) | json_values, max_size=4
                )
            }
        ),
    )
)
def test_safetensors_index(index) -> None:
    from weightsmith.checkpoint.safetensors import INDEX_FILE, weight_files

    folder = scratch()
    try:
        (folder / "model.safetensors").write_bytes(b"")
        (folder / INDEX_FILE).write_text(json.dumps(index))
        for path in weight_files(folder):
            assert path.parent == folder  # whatever it accepted is a file inside the folder
    except WeightsmithError:
        pass
    finally:
        shutil.rmtree(folder)


# -- task files, policies, probe packs: random YAML structures and mutated real files ---------

yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers(-1000, 10**6) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=25,
)
TASK_KEYS = ["task", "dataset_path", "dataset_kwargs", "data_files", "output_type", "doc_to_text",
             "doc_to_target", "doc_to_choice", "test_split", "num_fewshot", "generation_kwargs",
             "metric_list", "filter_list", "judge", "group", "fewshot_config", "metadata"]  # fmt: skip
POLICY_KEYS = ["policy", "version", "input", "output", "refusals", "classifier", "rules", "categories"]
PACK_KEYS = ["pack", "kind", "probes", "success", "description", "transforms", "category"]


def documents(keys: list[str]) -> st.SearchStrategy:
    """Random YAML documents: anything, or mappings of the format's own keys to anything."""
    return st.one_of(yaml_values, st.dictionaries(st.sampled_from(keys), yaml_values, max_size=len(keys)))


def read_with(reader, name: str, text: str) -> None:
    folder = scratch()
    try:
        (folder / "data.jsonl").write_text('{"q": "x", "a": "y"}\n')
        (folder / name).write_text(text, encoding="utf-8")
        reader(folder / name)
    except WeightsmithError:
        pass
    finally:
        shutil.rmtree(folder)


def dump(doc) -> str:
    return yaml.safe_dump(doc, allow_unicode=True)


def read_task(path: Path) -> None:
    from weightsmith.eval.runner import load_tasks

    load_tasks([str(path)])


def read_policy(path: Path) -> None:
    from weightsmith.safety.policy_file import read_policy as read

    read(path)


def read_pack(path: Path) -> None:
    from weightsmith.safety.probes import load_pack

    load_pack(path)


SHIPPED = Path(__file__).resolve().parents[1] / "src" / "weightsmith"
TASK_TEXT = (
    "task: t\ndataset_path: json\ndataset_kwargs: {data_files: {test: data.jsonl}}\n"
    'output_type: generate_until\ndoc_to_text: "{{q}}"\ndoc_to_target: a\n'
    'generation_kwargs: {until: ["\\n"], max_gen_toks: 2}\n'
)
POLICY_TEXT = (SHIPPED / "safety" / "policies" / "school.yaml").read_text(encoding="utf-8")
PACK_TEXT = (SHIPPED / "safety" / "packs" / "harmful.yaml").read_text(encoding="utf-8")[:4000]


@FUZZ
@given(doc=documents(TASK_KEYS))
def test_task_file_structures(doc) -> None:
    read_with(read_task, "task.yaml", dump(doc))


@FUZZ
@given(doc=documents(POLICY_KEYS))
def test_policy_file_structures(doc) -> None:
    read_with(read_policy, "policy.yaml", dump(doc))


@FUZZ
@given(doc=documents(PACK_KEYS))
def test_probe_pack_structures(doc) -> None:
    read_with(read_pack, "pack.yaml", dump(doc))


def text_mutations(text: str) -> st.SearchStrategy[str]:
    return mutations(text.encode()).map(lambda b: b.decode("utf-8", errors="replace"))


@FUZZ
@given(text=text_mutations(TASK_TEXT))
def test_task_file_mutated_text(text: str) -> None:
    read_with(read_task, "task.yaml", text)


@FUZZ
@given(text=text_mutations(POLICY_TEXT))
def test_policy_file_mutated_text(text: str) -> None:
    read_with(read_policy, "policy.yaml", text)


@FUZZ
@given(text=text_mutations(PACK_TEXT))
def test_probe_pack_mutated_text(text: str) -> None:
    read_with(read_pack, "pack.yaml", text)
