"""Data reading, chat rendering, masking and bad-data errors."""

import pytest
from ftengine.data import IGNORE_INDEX, collate_sft, load_sft_file, render_chat, tokenize_with_mask
from ftengine.errors import DataError
from ftengine.testing import tiny_tokenizer, write_jsonl


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def trained_text(tokenizer, example):
    return tokenizer.decode([i for i, label in zip(example["input_ids"], example["labels"]) if label != IGNORE_INDEX])


def test_multi_turn_chat_trains_on_assistant_turns_only(tokenizer, tmp_path):
    chat = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "ANSWER-ONE"},
        {"role": "user", "content": "second question"},
        {"role": "assistant", "content": "ANSWER-TWO"},
    ]
    examples, _ = load_sft_file(write_jsonl(tmp_path / "d.jsonl", [{"messages": chat}]), tokenizer, 512)
    assert trained_text(tokenizer, examples[0]) == "ANSWER-ONE<|im_end|>\nANSWER-TWO<|im_end|>\n"
    assert tokenizer.decode(examples[0]["input_ids"]) == tokenizer.apply_chat_template(chat, tokenize=False)


def test_prompt_response_rows_use_the_chat_template(tokenizer, tmp_path):
    rows = [{"prompt": "Say hi", "response": "hi there"}]
    examples, _ = load_sft_file(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, 512)
    assert tokenizer.decode(examples[0]["input_ids"]) == (
        "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\nhi there<|im_end|>\n"
    )
    assert trained_text(tokenizer, examples[0]) == "hi there<|im_end|>\n"


def test_without_chat_template_response_ends_with_eos(tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    text, spans = render_chat(tokenizer, [{"role": "user", "content": "Q "}, {"role": "assistant", "content": "A"}], "x:1")
    ids, labels = tokenize_with_mask(tokenizer, text, spans)
    assert tokenizer.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX]) == "A<|im_end|>"


def test_truncation_is_counted_and_fully_cut_rows_are_dropped(tokenizer, tmp_path):
    rows = [
        {"prompt": "short", "response": "ok"},
        {"prompt": "x" * 40, "response": "long answer " * 5},
        {"prompt": "y" * 80, "response": "z"},
    ]
    examples, stats = load_sft_file(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, 60)
    assert stats == {"rows": 3, "truncated": 2, "dropped": 1}
    assert len(examples) == 2 and all(len(e["input_ids"]) <= 60 for e in examples)


def test_collate_pads_right_and_masks_padding(tokenizer):
    batch = collate_sft(
        [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4], "labels": [4]}], tokenizer.pad_token_id
    )
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 256, 256]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [4, -100, -100]]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"prompt": "a", "response": "b"}\n{"prompt": "a", "respo', r"d.jsonl:2: malformed JSON"),
        ('{"prompt": "a"}\n', r"d.jsonl:1: missing field 'response'"),
        ('{"prompt": "a", "response": 3}\n', r"d.jsonl:1: field 'response' must be a string, got int"),
        ('{"prompt": "a", "response": "  "}\n', r"d.jsonl:1: field 'response' is empty"),
        ("[1, 2]\n", r"d.jsonl:1: each line must be a JSON object"),
        ("\n\n", r"d.jsonl: the file holds no rows"),
        ('{"text": "a"}\n', r"d.jsonl:1: expected a 'messages' list or 'prompt' and 'response'"),
        ('{"messages": [{"role": "user", "content": "q"}]}\n', r"d.jsonl:1: 'messages' has no assistant turn"),
        ('{"messages": [{"role": "user", "content": 5}]}\n', r"d.jsonl:1: messages\[0\].content must be a string"),
    ],
)
def test_bad_data_names_file_line_and_field(tokenizer, tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_sft_file(path, tokenizer, 512)


def test_response_empty_after_tokenisation(tokenizer, tmp_path):
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}"
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "q", "response": "dropped by the template"}])
    with pytest.raises(DataError, match="d.jsonl:1: the response is empty after tokenisation"):
        load_sft_file(path, tokenizer, 512)


def test_missing_file(tokenizer, tmp_path):
    with pytest.raises(DataError, match="data file not found"):
        load_sft_file(tmp_path / "none.jsonl", tokenizer, 512)
