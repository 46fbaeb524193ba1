"""Fine-tuning data: checking, loss masks against the template's own rendering, batching, packing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from weightsmith.chat_template import ChatTemplateError, assistant_spans
from weightsmith.checkpoint.load import load_checkpoint
from weightsmith.tokenizer import Tokenizer
from weightsmith.train.data import (
    IGNORE,
    BatchOrder,
    DataError,
    Example,
    Record,
    collate,
    read_records,
    split_records,
    to_rows,
    tokenize_record,
    tokenize_records,
)

# ChatML with {% generation %} around what the assistant writes, as HF's masking templates do.
TAGGED_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'assistant' %}<|im_start|>assistant\n"
    "{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}{{ '\\n' }}"
    "{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML = TAGGED_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", "")

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Once upon a time?"},
    {"role": "assistant", "content": "There was a small model."},
    {"role": "user", "content": "The quick brown fox?"},
    {"role": "assistant", "content": "It jumps over the lazy dog. 0123"},
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    from conftest import build_tiny_tokenizer_dir

    path = tmp_path_factory.mktemp("tok")
    build_tiny_tokenizer_dir(path)
    return path


def _with_template(tiny_dir: Path, tmp_path: Path, template: str) -> Path:
    out = tmp_path / "tok"
    out.mkdir(parents=True)
    (out / "tokenizer.json").write_bytes((tiny_dir / "tokenizer.json").read_bytes())
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    return out


@pytest.mark.parametrize("template", [TAGGED_TEMPLATE, CHATML], ids=["generation-tags", "prefix-diff"])
def test_assistant_mask_equals_transformers(tiny_dir, tmp_path, template):
    """Both ways of finding assistant text give exactly the tokens transformers' own
    assistant mask marks on the tagged template."""
    import transformers

    ref_dir = _with_template(tiny_dir, tmp_path, TAGGED_TEMPLATE)
    hf = transformers.AutoTokenizer.from_pretrained(str(ref_dir))
    ref = hf.apply_chat_template(
        CONVERSATION, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ours_dir = ref_dir if template is TAGGED_TEMPLATE else _with_template(tiny_dir, tmp_path / "b", template)
    tok = Tokenizer.from_dir(ours_dir)
    ex = tokenize_record(Record("x:1", messages=CONVERSATION), tok)
    assert ex.ids == list(ref["input_ids"])
    assert [int(t) for t in ex.targets] == list(ref["assistant_masks"])
    assert sum(ex.targets) > 0


def test_targets_are_exactly_each_assistant_turn(tiny_dir):
    tok = Tokenizer.from_dir(tiny_dir)
    ex = tokenize_record(Record("x:1", messages=CONVERSATION), tok)
    learned = tok.decode([i for i, t in zip(ex.ids, ex.targets, strict=True) if t])
    expected = "".join(m["content"] + "<|im_end|>" for m in CONVERSATION if m["role"] == "assistant")
    assert learned == expected
    everything = tokenize_record(Record("x:1", messages=CONVERSATION), tok, train_on_prompt=True)
    assert all(everything.targets) and everything.ids == ex.ids


def test_default_model_masks_multi_turn(default_gguf):
    """SmolLM2's own template (no generation tags): the learned tokens are the assistant
    replies and their end-of-turn token, nothing of the system prompt it injects."""
    tok = load_checkpoint(default_gguf).tokenizer
    convo = CONVERSATION[1:]  # the template adds its default system prompt
    ex = tokenize_record(Record("x:1", messages=convo), tok)
    runs, current = [], []
    for i, t in zip(ex.ids, ex.targets, strict=True):
        if t:
            current.append(i)
        elif current:
            runs.append(tok.decode(current))
            current = []
    assert runs == [m["content"] + "<|im_end|>" for m in convo if m["role"] == "assistant"]
    assert tok.apply_chat_template(convo, add_generation_prompt=False, tokenize=True) == ex.ids


def test_unstable_template_is_refused():
    template = "{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}{% endfor %}"
    with pytest.raises(ChatTemplateError, match=r"messages\[1\].*generation"):
        assistant_spans(
            template, [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}] * 2
        )


def _write(tmp_path: Path, lines: list[str]) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = json.dumps(
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("{not json", r"data\.jsonl:2: invalid JSON"),
        (
            json.dumps({"messages": [{"role": "bot", "content": "x"}]}),
            r":2: messages\[0\] has unknown role 'bot'",
        ),
        (json.dumps({"messages": [{"role": "user", "content": "x"}]}), r":2: .*no assistant turn"),
        (
            json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "system", "content": "y"}]}),
            r":2: messages\[1\] is a system message",
        ),
        (json.dumps({"messages": [{"role": "user", "content": 3}]}), r":2: messages\[0\]: 'content' must be"),
        (json.dumps({"prompt": "x"}), r":2: unknown format \(keys: prompt\)"),
        (json.dumps({"instruction": "x", "output": ""}), r":2: 'output' must be a non-empty string"),
        (json.dumps([1, 2]), r":2: expected a JSON object"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, line, problem):
    with pytest.raises(DataError, match=problem):
        read_records(_write(tmp_path, [GOOD, line, GOOD]))


def test_bad_file_reports_first_problem_and_count(tmp_path):
    with pytest.raises(DataError, match=r":2: invalid JSON.*\(and 1 more bad lines\)"):
        read_records(_write(tmp_path, [GOOD, "{", GOOD, "[", GOOD]))


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="has no examples"):
        read_records(empty)
    with pytest.raises(DataError, match="no such file"):
        read_records(tmp_path / "missing.jsonl")


def test_formats_and_content_parts(tmp_path, tiny_dir):
    lines = [
        json.dumps({"instruction": "Say hi", "input": "to Bob", "output": "hi Bob"}),
        json.dumps({"text": "The quick brown fox."}),
        json.dumps(
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                          {"role": "assistant", "content": "c"}]}
        ),
    ]  # fmt: skip
    records = read_records(_write(tmp_path, lines))
    assert records[0].messages == [
        {"role": "user", "content": "Say hi\n\nto Bob"},
        {"role": "assistant", "content": "hi Bob"},
    ]
    assert records[2].messages[0]["content"] == "ab"
    tok = Tokenizer.from_dir(tiny_dir)
    text = tokenize_record(records[1], tok)
    assert all(text.targets) and text.ids[-1] == tok.eos_token_id


def test_truncation_is_counted_and_empty_targets_dropped(tiny_dir):
    tok = Tokenizer.from_dir(tiny_dir)
    long = Record(
        "x:1", messages=[{"role": "user", "content": "fox " * 40}, {"role": "assistant", "content": "ok"}]
    )
    short = Record(
        "x:2", messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "fox " * 20}]
    )
    n_short = len(tokenize_record(short, tok).ids)
    examples, stats = tokenize_records([long, short], tok, max_seq_len=n_short - 3)
    assert stats.truncated == 2 and stats.dropped == 1 and stats.examples == 1
    assert len(examples[0].ids) == n_short - 3 and stats.longest > n_short


def test_collate_shifts_labels_and_pads(tiny_dir):
    rows = to_rows(
        [Example([5, 6, 7, 8], [False, False, True, True]), Example([9, 10], [True, True])], 16, packing=False
    )
    batch = collate(rows, pad_id=0)
    assert batch.inputs.tolist() == [[5, 6, 7], [9, 0, 0]]
    assert batch.labels.tolist() == [[IGNORE, 7, 8], [10, IGNORE, IGNORE]]
    assert batch.n_targets == 3 and batch.n_tokens == 4 and batch.documents is None


def test_packing_restarts_positions_and_never_predicts_across_documents():
    examples = [
        Example([1, 2, 3], [True] * 3),
        Example([4, 5], [True] * 2),
        Example([6, 7, 8, 9], [True] * 4),
    ]
    rows = to_rows(examples, 6, packing=True)
    assert [r.lengths for r in rows] == [[3, 2], [4]]
    batch = collate(rows, pad_id=0)
    assert batch.inputs[0].tolist() == [1, 2, 3, 4]
    assert batch.labels[0].tolist() == [2, 3, IGNORE, 5]  # 3 -> 4 crosses documents
    assert batch.positions[0].tolist() == [0, 1, 2, 0]
    assert batch.documents[0].tolist() == [0, 0, 0, 1]


def test_packed_forward_equals_separate_forwards(tiny_hf_dir):
    model = load_checkpoint(tiny_hf_dir, decode_layout=False).model
    a, b = [3, 14, 15, 92, 65], [35, 89, 79]
    batch = collate(to_rows([Example(a, [True] * 5), Example(b, [True] * 3)], 16, packing=True), pad_id=0)
    with torch.no_grad():
        packed = model.logits(
            model.hidden_states(batch.inputs, positions=batch.positions, documents=batch.documents)
        )
        alone_a = model(torch.tensor([a]))
        alone_b = model(torch.tensor([b]))
    torch.testing.assert_close(packed[0, :5], alone_a[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[0, 5:7], alone_b[0, :2], atol=1e-5, rtol=1e-5)


def test_batch_order_is_a_seeded_permutation_per_epoch():
    order = BatchOrder(10, 3, seed=7)
    epoch0 = [i for k in range(order.batches_per_epoch) for i in order.rows(0, k)]
    assert sorted(epoch0) == list(range(10)) and order.batches_per_epoch == 4
    again = BatchOrder(10, 3, seed=7)
    assert again.rows(1, 2) == order.rows(1, 2)
    assert [again.rows(1, k) for k in range(4)] != [order.rows(0, k) for k in range(4)]


def _padded_tokens(order: BatchOrder, lengths: list[int], epoch: int) -> int:
    return sum(
        max(lengths[i] for i in rows) * len(rows)
        for rows in (order.rows(epoch, k) for k in range(order.batches_per_epoch))
    )


@pytest.mark.parametrize("n_rows", [1000, 997])  # whole batches, and a short last one
def test_grouping_by_length_pads_less_and_still_sees_every_row_once(n_rows):
    g = torch.Generator().manual_seed(5)
    lengths = torch.randint(20, 400, (n_rows,), generator=g).tolist()
    plain = BatchOrder(n_rows, 8, seed=3)
    grouped = BatchOrder(n_rows, 8, seed=3, lengths=lengths)
    for epoch in (0, 1):
        batches = [grouped.rows(epoch, k) for k in range(grouped.batches_per_epoch)]
        assert sorted(i for b in batches for i in b) == list(range(n_rows))  # each row once
        assert all(len(b) == 8 for b in batches[:-1])  # only the epoch's last batch may be short
        real = sum(lengths)
        # Random batches of uniform lengths pad to about 1.5x the real tokens; grouped, to under 1.05x.
        assert _padded_tokens(plain, lengths, epoch) > 1.3 * real
        assert _padded_tokens(grouped, lengths, epoch) < 1.05 * real
        longest = [max(lengths[i] for i in b) for b in batches[:50]]
        assert longest != sorted(longest, reverse=True)  # the batches of a run are shuffled
    again = BatchOrder(n_rows, 8, seed=3, lengths=lengths)  # a resumed run: the same batches
    assert [again.rows(1, k) for k in range(5)] == [grouped.rows(1, k) for k in range(5)]
    assert grouped.rows(0, 0) != grouped.rows(1, 0)


def test_validation_split_is_seeded_and_disjoint():
    records = [Record(f"f:{i}", text=str(i)) for i in range(20)]
    train, valid = split_records(records, 0.2, seed=1)
    assert len(valid) == 4 and len(train) == 16
    assert {r.source for r in train}.isdisjoint(r.source for r in valid)
    assert split_records(records, 0.2, seed=1)[1] == valid
