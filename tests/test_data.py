"""Data reading, chat rendering, masking and bad-data errors."""

import json
from types import SimpleNamespace

import pytest
from ftengine.config import DataOptions
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


# --------------------------------------------------------------------------------------------
# formats and shapes (read with the datasets library)
# --------------------------------------------------------------------------------------------

ROWS = [{"prompt": "Say hi", "response": "hi there"}, {"prompt": "Say bye", "response": "bye now"}]
EXPECTED_TEXT = "<|im_start|>user\nSay hi<|im_end|>\n<|im_start|>assistant\nhi there<|im_end|>\n"


def write_as(path, rows):
    """Write ``rows`` in the format ``path``'s suffix names."""
    import pyarrow
    import pyarrow.parquet as pq

    if path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=2))
    elif path.suffix == ".csv":
        path.write_text("prompt,response\n" + "".join(f'"{r["prompt"]}","{r["response"]}"\n' for r in rows))
    elif path.suffix == ".parquet":
        pq.write_table(pyarrow.Table.from_pylist(rows), path)
    else:
        write_jsonl(path, rows)
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_format_reads_the_same_examples(tokenizer, tmp_path, suffix):
    examples, stats = load_sft_file(write_as(tmp_path / f"d{suffix}", ROWS), tokenizer, 512)
    assert stats["rows"] == 2 and tokenizer.decode(examples[0]["input_ids"]) == EXPECTED_TEXT
    assert examples[1]["source"] == (f"{tmp_path}/d.jsonl:2" if suffix == ".jsonl" else f"{tmp_path}/d{suffix}[1]")


def test_a_directory_reads_all_its_files_in_name_order(tokenizer, tmp_path):
    (tmp_path / "data").mkdir()
    write_as(tmp_path / "data" / "b.parquet", ROWS[1:])
    write_as(tmp_path / "data" / "a.parquet", ROWS[:1])
    examples, _ = load_sft_file(tmp_path / "data", tokenizer, 512)
    assert [e["row"]["prompt"] for e in examples] == ["Say hi", "Say bye"]


SHAPES = {
    "alpaca": ({"instruction": "Say hi", "input": "", "output": "hi there"}, {}),
    "alpaca with input": ({"instruction": "Say", "input": "hi", "output": "hi there"}, {}),
    "mapped columns": ({"question": "Say hi", "answer": "hi there"}, {"prompt": "question", "response": "answer"}),
    "trl prompt/completion": ({"prompt": "Say hi", "completion": "hi there"}, {}),
    "sharegpt": ({"conversations": [{"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "hi there"}]}, {}),
    "messages under another name": (
        {"chat": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi there"}]},
        {"messages": "chat"},
    ),
}


@pytest.mark.parametrize("shape", SHAPES)
def test_common_row_shapes_become_the_same_chat(tokenizer, tmp_path, shape):
    row, fields = SHAPES[shape]
    options = DataOptions(fields=fields)
    examples, _ = load_sft_file(write_jsonl(tmp_path / "d.jsonl", [row]), tokenizer, 512, options)
    prompt = "Say\n\nhi" if shape == "alpaca with input" else "Say hi"
    assert tokenizer.decode(examples[0]["input_ids"]) == EXPECTED_TEXT.replace("Say hi", prompt)
    assert trained_text(tokenizer, examples[0]) == "hi there<|im_end|>\n"


def test_a_system_turn_comes_from_the_row_or_a_system_column(tokenizer, tmp_path):
    rows = [
        {"system": "Be terse.", "prompt": "Say hi", "response": "hi"},
        {
            "conversations": [
                {"from": "system", "value": "Be terse."},
                {"from": "human", "value": "Say hi"},
                {"from": "gpt", "value": "hi"},
            ]
        },
    ]
    examples, _ = load_sft_file(write_jsonl(tmp_path / "d.jsonl", rows), tokenizer, 512)
    first, second = (tokenizer.decode(e["input_ids"]) for e in examples)
    assert first == second and first.startswith("<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nSay hi")


def test_a_sharegpt_role_outside_its_names_is_named(tokenizer, tmp_path):
    row = {"conversations": [{"from": "humn", "value": "q"}, {"from": "gpt", "value": "a"}]}
    with pytest.raises(DataError, match=r"d.jsonl:1: conversations\[0\].from is 'humn', which is not a ShareGPT role"):
        load_sft_file(write_jsonl(tmp_path / "d.jsonl", [row]), tokenizer, 512)


def test_a_mapped_field_names_the_column_it_came_from(tokenizer, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": 3}])
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'answer' \(data.fields.response\) must be a string, got int"):
        load_sft_file(path, tokenizer, 512, DataOptions(fields={"prompt": "question", "response": "answer"}))


def test_every_bad_row_is_counted_and_the_first_ten_listed(tokenizer, tmp_path):
    rows = [{"prompt": "q", "response": "a"}] + [{"prompt": "q"}] * 12
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as error:
        load_sft_file(path, tokenizer, 512)
    lines = str(error.value).splitlines()
    assert lines[:10] == [f"{path}:{n}: missing field 'response'" for n in range(2, 12)]
    assert lines[10] == f"12 bad rows in {path} (the first 10 shown); fix or remove them"


def test_limit_and_a_seeded_eval_split(tokenizer, tmp_path):
    from ftengine.data import load_splits

    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(40)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    examples, stats = load_sft_file(path, tokenizer, 512, DataOptions(limit=30))
    assert stats["rows"] == 30 and examples[-1]["row"]["prompt"] == "q29"

    def split(seed):
        config = SimpleNamespace(data=DataOptions(train=str(path), eval_split=0.1), train=SimpleNamespace(seed=seed))
        datasets = load_splits(config, lambda p, s: load_sft_file(p, tokenizer, 512, config.data), list)
        return [e["row"]["prompt"] for e in datasets.train], [e["row"]["prompt"] for e in datasets.eval]

    train, held_out = split(0)
    assert len(held_out) == 4 and len(train) == 36 and not set(train) & set(held_out)
    assert split(0) == (train, held_out) and split(1)[1] != held_out


def test_tokenised_data_is_cached_by_content(tokenizer, tmp_path):
    from ftengine.data import cache_root

    path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    entries = lambda: sorted(p.name for p in (cache_root() / "tokenized").iterdir())  # noqa: E731
    before = set(entries()) if (cache_root() / "tokenized").is_dir() else set()
    first, _ = load_sft_file(path, tokenizer, 512)
    (key,) = set(entries()) - before
    assert sorted(p.name for p in (cache_root() / "tokenized" / key).iterdir()) == ["meta.json", "tokens.safetensors"]
    again, _ = load_sft_file(path, tokenizer, 512)
    assert again == first and set(entries()) - before == {key}  # served from the cache, nothing new written
    write_jsonl(path, ROWS[::-1])  # new content: tokenised afresh
    changed, _ = load_sft_file(path, tokenizer, 512)
    assert [e["input_ids"] for e in changed] == [e["input_ids"] for e in first[::-1]] and len(set(entries()) - before) == 2


# --------------------------------------------------------------------------------------------
# bad input: a clear error before the model loads, nothing written to output_dir
# --------------------------------------------------------------------------------------------


@pytest.fixture
def tokenizer_only(tiny_model_dir, tmp_path):
    """The tiny model's directory without its weights: loading the model would fail."""
    path = tmp_path / "tokenizer-only"
    path.mkdir()
    for item in tiny_model_dir.iterdir():
        if item.suffix != ".safetensors":
            (path / item.name).write_bytes(item.read_bytes())
    return path


def bad_inputs(tmp_path):
    unreadable = tmp_path / "broken.parquet"
    unreadable.write_bytes(b"PAR1 not really parquet")
    sheet = tmp_path / "rows.xlsx"
    sheet.write_bytes(b"PK\x03\x04")
    columns = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    empty = tmp_path / "empty.csv"
    empty.write_text("prompt,response\n")
    rows = write_jsonl(tmp_path / "ok.jsonl", ROWS)
    return {
        "unreadable": ([f"data.train={unreadable}"], f"{unreadable}: cannot read the file as PARQUET"),
        "unknown format": ([f"data.train={sheet}"], f"{sheet}: unknown data format '.xlsx'"),
        "missing column": (
            [f"data.train={columns}", "data.fields.prompt=query"],
            f"{columns}: data.fields.prompt: column 'query' is not in the data; its columns are: answer, question",
        ),
        "empty split": ([f"data.train={empty}"], f"{empty}: the file holds no rows"),
        "eval split leaves nothing": (
            [f"data.train={write_jsonl(tmp_path / 'one.jsonl', ROWS[:1])}", "data.eval_split=0.5"],
            "leaves no training example",
        ),
        "hub id without internet": (["data.train=someone/no-such-dataset"], "someone/no-such-dataset: not a local file"),
        "packed row too long": (
            [f"data.train={rows}", "train.packing=true", "train.max_length=20"],
            f"{rows}:1: 35 tokens do not fit a packed row of train.max_length=20",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "unreadable",
        "unknown format",
        "missing column",
        "empty split",
        "eval split leaves nothing",
        "hub id without internet",
        "packed row too long",
    ],
)
def test_bad_input_is_a_message_before_the_model_loads(case, tokenizer_only, run_overrides, tmp_path):
    from ftengine.build import configure
    from ftengine.loop import train
    from ftengine.rundir import LOCK_FILE

    overrides, expected = bad_inputs(tmp_path)[case]
    output_dir = tmp_path / "run"
    run = [*run_overrides, "data.eval=null", f"model={tokenizer_only}", f"output_dir={output_dir}", *overrides]
    with pytest.raises(DataError) as error:
        train(*configure(None, ["lora"], run))
    assert expected in " ".join(str(error.value).split())
    assert "Traceback" not in str(error.value) and "Retry" not in str(error.value)
    assert [p.name for p in output_dir.iterdir()] == [LOCK_FILE]  # the run's lock, no output


def test_dpo_refuses_a_field_mapping_it_would_ignore(run_overrides):
    from ftengine.build import configure
    from ftengine.errors import ConfigError

    with pytest.raises(ConfigError) as error:
        configure(None, ["lora", "dpo"], [*run_overrides, "data.fields.prompt=question"])
    assert any(p.startswith("data.fields: the dpo plugin reads preference rows") for p in error.value.problems)
