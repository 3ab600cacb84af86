"""Reading Eurus-2-RL-Data rows from jsonl and parquet; malformed rows named by file:line."""

import json
import logging

import pytest

from megatron_prime.data import MATH_SUFFIX, SYSTEM_PROMPT, DataConfig, PromptRecord, load_prompts

CHAT = [{"role": "system", "content": "S"}, {"role": "user", "content": "What is 2+2?"}]
CODE_TESTS = {"inputs": ["1\n"], "outputs": ["2\n"]}
ROWS = [
    {"prompt": CHAT, "ability": "math", "reward_model": {"ground_truth": "4", "style": "rule"},
     "data_source": "numina_olympiads", "extra_info": {"index": 17, "split": "train"}},
    {"prompt": "What is 3*3?", "ability": "math", "reward_model": {"ground_truth": "9", "style": "rule"},
     "data_source": "numina_cn_k12"},
    {"prompt": [{"role": "user", "content": "Add one."}], "ability": "code",
     "reward_model": {"ground_truth": json.dumps(CODE_TESTS), "style": "rule"}, "data_source": "taco"},
]


def expected_records(path):
    return [
        PromptRecord(CHAT, "math", "4", "numina_olympiads", 0, str(path), 1),
        PromptRecord([{"role": "system", "content": SYSTEM_PROMPT},
                      {"role": "user", "content": "What is 3*3?" + MATH_SUFFIX}],
                     "math", "9", "numina_cn_k12", 1, str(path), 2),
        PromptRecord([{"role": "user", "content": "Add one."}], "code", json.dumps(CODE_TESTS), "taco", 2,
                     str(path), 3),
    ]


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_jsonl_round_trip(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    assert load_prompts(DataConfig(paths=[str(path)])) == expected_records(path)


def test_parquet_round_trip(tmp_path):
    # Parquet needs one type per column: the string prompt gets its own file.
    chat_rows = [ROWS[0], ROWS[2]]
    path = write_parquet(tmp_path / "train.parquet", chat_rows)
    plain = write_parquet(tmp_path / "plain.parquet", [ROWS[1]])
    records = load_prompts(DataConfig(paths=[str(path), str(plain)]))
    first, _, third = expected_records(path)
    second = expected_records(plain)[1]
    assert records == [
        first,
        PromptRecord(third.messages, "code", third.ground_truth, "taco", 1, str(path), 2),
        PromptRecord(second.messages, "math", "9", "numina_cn_k12", 2, str(plain), 1),
    ]


def test_code_ground_truth_as_dict_is_kept(tmp_path):
    row = dict(ROWS[2], reward_model={"ground_truth": CODE_TESTS, "style": "rule"})
    path = write_jsonl(tmp_path / "code.jsonl", [row])
    (record,) = load_prompts(DataConfig(paths=[str(path)]))
    assert record.ground_truth == CODE_TESTS


def test_indices_run_over_files_and_blank_lines_are_not_rows(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [ROWS[0], "", ROWS[1]])
    b = write_jsonl(tmp_path / "b.jsonl", [ROWS[1]])
    records = load_prompts(DataConfig(paths=[str(a), str(b)]))
    assert [(r.index, r.source_file, r.source_line) for r in records] == [
        (0, str(a), 1), (1, str(a), 3), (2, str(b), 1)]


def without(row, key):
    return {k: v for k, v in row.items() if k != key}


# Each malformed line, and the problem the loader must name for it.
MALFORMED = [
    ('{"prompt": "Q", "ability": ', "bad JSON: Expecting value at column 28"),
    ("[1, 2]", "row must be an object, got list"),
    (without(ROWS[1], "prompt"), "missing field 'prompt'"),
    (without(ROWS[1], "reward_model"), "missing field 'reward_model'"),
    (dict(ROWS[1], reward_model={"style": "rule"}), "missing field 'reward_model.ground_truth'"),
    (dict(ROWS[1], ability="poetry"),
     "unknown ability 'poetry'; allowed: ['code', 'coding', 'math']"),
    (dict(ROWS[1], ability=1), "'ability' must be a string, got int"),
    (dict(ROWS[1], data_source=["x"]), "'data_source' must be a string, got list"),
    (dict(ROWS[1], reward_model="4"), "'reward_model' must be an object, got str"),
    (dict(ROWS[1], reward_model={"ground_truth": 9}),
     "'reward_model.ground_truth' of a math row must be a string, got int"),
    (dict(ROWS[2], reward_model={"ground_truth": "{not json"}),
     "'reward_model.ground_truth' is not valid code tests: Expecting property name enclosed in double quotes: "
     "line 1 column 2 (char 1)"),
    (dict(ROWS[2], reward_model={"ground_truth": {"inputs": ["1"]}}),
     "'reward_model.ground_truth' is not valid code tests: code ground truth must have 'inputs' and 'outputs', "
     "got \"{'inputs': ['1']}\""),
    (dict(ROWS[1], prompt=[{"role": "user", "content": 5}]), "'prompt'[0].content must be a string, got int"),
]


def test_malformed_rows_are_skipped_with_file_and_line(tmp_path, caplog):
    # Good rows at lines 1 and len+2, a malformed row on every line between.
    path = write_jsonl(tmp_path / "mixed.jsonl", [ROWS[0]] + [line for line, _ in MALFORMED] + [ROWS[1]])
    with caplog.at_level(logging.WARNING, logger="megatron_prime.data.dataset"):
        records = load_prompts(DataConfig(paths=[str(path)], on_malformed="skip"))
    assert [(r.index, r.source_line) for r in records] == [(0, 1), (1, len(MALFORMED) + 2)]
    messages = [record.getMessage() for record in caplog.records]
    assert messages[:-1] == [f"skipping malformed row at {path}:{line}: {problem}"
                             for line, (_, problem) in enumerate(MALFORMED, start=2)]
    assert messages[-1] == f"skipped {len(MALFORMED)} malformed rows in {[str(path)]}"


@pytest.mark.parametrize("line, problem", MALFORMED, ids=[p.split(":")[0][:40] for _, p in MALFORMED])
def test_malformed_row_is_fatal_in_error_mode(tmp_path, line, problem):
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], ROWS[1], line])
    with pytest.raises(ValueError) as error:
        load_prompts(DataConfig(paths=[str(path)], on_malformed="error"))
    assert str(error.value) == f"{path}:3: malformed row: {problem}"


def test_malformed_parquet_row_names_its_row(tmp_path):
    rows = [dict(ROWS[1]), dict(ROWS[1], ability="poetry")]
    path = write_parquet(tmp_path / "bad.parquet", rows)
    with pytest.raises(ValueError) as error:
        load_prompts(DataConfig(paths=[str(path)]))
    assert str(error.value) == f"{path}:2: malformed row: unknown ability 'poetry'; allowed: ['code', 'coding', 'math']"


def test_missing_file_is_named_before_anything_is_read(tmp_path):
    good = write_jsonl(tmp_path / "good.jsonl", ROWS)
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError) as error:
        load_prompts(DataConfig(paths=[str(good), str(missing)]))
    assert str(error.value) == f"data file not found: {missing}"


def test_unsupported_suffix_and_unreadable_parquet(tmp_path):
    csv = tmp_path / "train.csv"
    csv.write_text("a,b\n")
    with pytest.raises(ValueError) as error:
        load_prompts(DataConfig(paths=[str(csv)]))
    assert str(error.value) == f"data file {csv} has suffix '.csv': expected one of ['.jsonl', '.parquet']"
    fake = tmp_path / "fake.parquet"
    fake.write_text("not parquet")
    with pytest.raises(ValueError, match=f"^{fake}: not a readable parquet file: "):
        load_prompts(DataConfig(paths=[str(fake)]))


def test_all_rows_malformed_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", ["{", "{"])
    with pytest.raises(ValueError) as error:
        load_prompts(DataConfig(paths=[str(path)], on_malformed="skip"))
    assert str(error.value) == f"no usable prompts in {[str(path)]} (2 malformed, 0 over max_prompt_tokens)"


@pytest.mark.parametrize("kwargs, message", [
    ({"paths": []}, "data.paths=[] is invalid: expected a non-empty list of file paths"),
    ({"paths": "a.jsonl"}, "data.paths='a.jsonl' is invalid: expected a non-empty list of file paths"),
    ({"paths": ["a"], "on_malformed": "ignore"}, "data.on_malformed='ignore' is invalid: expected one of ['skip', 'error']"),
    ({"paths": ["a"], "shuffle_seed": -1}, "data.shuffle_seed=-1 is invalid: expected an integer >= 0"),
    ({"paths": ["a"], "max_prompt_tokens": 0}, "data.max_prompt_tokens=0 is invalid: expected an integer >= 1"),
])
def test_config_errors_name_key_value_and_allowed(kwargs, message):
    with pytest.raises(ValueError) as error:
        DataConfig(**kwargs).validate()
    assert str(error.value) == message


def test_non_utf8_row_names_its_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    good = json.dumps(ROWS[1]).encode()
    bad = json.dumps(dict(ROWS[1], data_source="caf\u00e9"), ensure_ascii=False).encode().replace(b"\xc3\xa9", b"\xe9")
    path.write_bytes(good + b"\n" + bad + b"\n")
    with pytest.raises(ValueError) as error:
        load_prompts(DataConfig(paths=[str(path)]))
    message = str(error.value)
    assert message.startswith(f"{path}:2: malformed row: not UTF-8: byte 0xe9 at byte ")
    assert "\n" not in message
    records = load_prompts(DataConfig(paths=[str(path)], on_malformed="skip"))
    assert [record.source_line for record in records] == [1]


def test_non_utf8_sft_and_benchmark_rows_name_their_file_and_line(tmp_path):
    from megatron_prime.evaluate import EvalInputError, load_benchmark
    from megatron_prime.sft import load_sft_examples

    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"question": "caf\xe9", "answer": "1"}\n')
    with pytest.raises(EvalInputError, match=rf"^{path}:1: not UTF-8: byte 0xe9"):
        load_benchmark(path)
    with pytest.raises(ValueError, match=rf"^{path}:1: malformed row: not UTF-8: byte 0xe9"):
        load_sft_examples([str(path)], tokenizer=None, max_tokens=10, on_malformed="error")


def test_damaged_parquet_page_names_file_row_group_and_column(tmp_path):
    import pyarrow.parquet as pq

    path = write_parquet(tmp_path / "damaged.parquet", [ROWS[1]] * 200)
    # Rewrite with two row groups, then overwrite the start of row group 1's first column.
    pq.write_table(pq.read_table(path), path, row_group_size=100)
    column = pq.ParquetFile(path).metadata.row_group(1).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    data = bytearray(path.read_bytes())
    data[start + 20:start + 60] = b"\xab" * 40
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError) as error:
        load_prompts(DataConfig(paths=[str(path)]))
    message = str(error.value)
    assert message.startswith(f"{path}: damaged parquet data in row group 1 (rows 101..200), "
                              "column 'prompt': ")
    assert "\n" not in message
