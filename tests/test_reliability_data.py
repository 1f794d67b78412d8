"""Never lose a run, part two (issue 22), the data items: rows that crash or swamp the reader
(6), BOM and ``NA``/number cells (8), control-token text in message content (10). Each test
reproduced its failure first; the matrix is in docs/reliability.md.
"""

import json
import subprocess
import sys

import pytest
from ftengine.config import DataOptions
from ftengine.data import read_rows
from ftengine.errors import DataError
from ftengine.testing import write_jsonl

CLEAN = {"prompt": "Reverse: alpha", "response": "ahpla"}


def read_in_a_subprocess(path):
    """``read_rows(path)`` in a fresh interpreter, so that a crash of a reader fails the test
    instead of killing pytest: ``(returncode, what it printed)``."""
    script = (
        "import sys\n"
        "from ftengine.data import read_rows\n"
        "from ftengine.errors import DataError\n"
        "try:\n"
        "    read_rows(sys.argv[1])\n"
        "except DataError as exc:\n"
        "    print(exc)\n"
        "    sys.exit(2)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout + done.stderr


def nested(depth):
    return "[" * depth + "]" * depth


# --------------------------------------------------------------------------------------------
# 6. rows that crash or swamp the process
# --------------------------------------------------------------------------------------------


def test_6_a_deeply_nested_jsonl_row_is_named_not_a_segfault(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text(json.dumps(CLEAN) + "\n" + '{"prompt": "a", "response": ' + nested(20_000) + "}\n")
    returncode, output = read_in_a_subprocess(path)
    assert returncode == 2, output  # was -11 (SIGSEGV in the JSON reader), no message
    assert f"{path}:2" in output and "nested" in output and "Traceback" not in output


def test_6_a_deeply_nested_json_array_file_is_named_not_a_traceback(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" + json.dumps(CLEAN) + ', {"prompt": "a", "response": ' + nested(20_000) + "}]")
    returncode, output = read_in_a_subprocess(path)
    assert returncode == 2, output  # was a RecursionError traceback
    assert str(path) in output and "nested" in output and "Traceback" not in output


def test_6_a_row_over_max_row_bytes_is_refused_before_it_is_parsed(tmp_path):
    big = {"prompt": "x" * (2 << 20), "response": "y"}
    path = write_jsonl(tmp_path / "big.jsonl", [CLEAN, big, CLEAN])
    with pytest.raises(DataError) as raised:
        read_rows(path)
    message = str(raised.value)
    assert f"{path}:2" in message and "1048576 bytes" in message and "data.max_row_bytes" in message
    # The limit is the user's to raise.
    rows = read_rows(path, DataOptions(max_row_bytes=4 << 20))
    assert [row for row, _ in rows] == [CLEAN, big, CLEAN]


def test_6_nesting_inside_strings_is_not_counted(tmp_path):
    path = write_jsonl(tmp_path / "brackets.jsonl", [{"prompt": nested(500) + '"{', "response": "]}"}])
    assert read_rows(path)[0][0]["prompt"] == nested(500) + '"{'


# --------------------------------------------------------------------------------------------
# 8. a byte-order mark; NA and number cells in CSV
# --------------------------------------------------------------------------------------------


def test_8_a_jsonl_file_starting_with_a_bom_is_read(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (json.dumps(CLEAN) + "\n").encode() * 2)
    assert [row for row, _ in read_rows(path)] == [CLEAN, CLEAN]  # was "malformed JSON (Unexpected UTF-8 BOM)"


def test_8_csv_cells_are_read_as_the_text_they_hold(tmp_path):
    path = tmp_path / "sums.csv"
    path.write_bytes(b"\xef\xbb\xbfprompt,response\nWhat is 1+1?,2\nWhat is 2+2?,4\nSay NA,NA\n")
    rows = [row for row, _ in read_rows(path)]
    # was 2.0, 4.0 and None: pandas guessed numbers and missing values
    assert rows == [
        {"prompt": "What is 1+1?", "response": "2"},
        {"prompt": "What is 2+2?", "response": "4"},
        {"prompt": "Say NA", "response": "NA"},
    ]
