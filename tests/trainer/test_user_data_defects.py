"""Data and tokenizers as a user brings them: each test is a file or tokenizer that once loaded
into something else than it holds (rows of another split, values shifted a column) or stopped
with a bare traceback, and the one clear error or the exact rows it gives now."""

from __future__ import annotations

import json
import warnings

import pytest
from helpers import review_tokenizer

from rlhf import data, task


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _rows(tag, n):
    return [{"prompt": f"{tag} {i}", "completion": f" answer {i}"} for i in range(n)]


def test_a_directory_of_split_files_gives_its_train_split_alone(tmp_path):
    # train.jsonl beside test.jsonl: every row of both files used to be trained on
    folder = tmp_path / "flat"
    _jsonl(folder / "train.jsonl", _rows("train", 3))
    _jsonl(folder / "test.jsonl", _rows("test", 2))
    _jsonl(folder / "notes.jsonl", _rows("notes", 1))
    with pytest.warns(UserWarning, match=r"\['notes.jsonl'\] belong to none of them"):
        rows = data.load_sft_dataset(folder)
    assert rows.to_list() == _rows("train", 3)
    # a bad row is named in the file it is in, the train split's
    _jsonl(folder / "train.jsonl", _rows("train", 1) + [{"prompt": "x"}])
    with pytest.raises(ValueError, match=r"train.jsonl' line 2: column 'completion'"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data.load_sft_dataset(folder)


def test_a_hub_snapshot_folder_gives_its_train_split(tmp_path):
    import datasets

    folder = tmp_path / "snapshot"
    (folder / "data").mkdir(parents=True)
    (folder / "README.md").write_text("# a dataset card\n")
    for split, n in (("train", 3), ("test", 2)):
        datasets.Dataset.from_list(_rows(split, n)).to_parquet(
            str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no file is left out: nothing to say
        assert data.load_sft_dataset(folder).to_list() == _rows("train", 3)
        assert data.load_sft_dataset(folder / "data").to_list() == _rows("train", 3)


def test_split_files_without_a_train_split_and_nested_folders_are_named(tmp_path):
    _jsonl(tmp_path / "only" / "sft_test.jsonl", _rows("test", 2))
    with pytest.raises(ValueError, match=r"splits of a dataset \(test: \['sft_test.jsonl'\]\), "
                                         r"none of them 'train'"):
        data.load_sft_dataset(tmp_path / "only")
    _jsonl(tmp_path / "nested" / "part" / "rows.jsonl", _rows("a", 2))
    with pytest.raises(ValueError, match=r"none at its top level \(subfolders are not read: "
                                         r"\['part/'\]"):
        data.load_sft_dataset(tmp_path / "nested")
    # names that merely contain a split word are plain data files, all of them read
    _jsonl(tmp_path / "plain" / "contest.jsonl", _rows("a", 1))
    _jsonl(tmp_path / "plain" / "latest.jsonl", _rows("b", 1))
    assert data.load_sft_dataset(tmp_path / "plain").to_list() == _rows("a", 1) + _rows("b", 1)


@pytest.mark.parametrize("text, line", [
    ("prompt,completion\na,b,extra\nc,d,more\n", 2),  # pandas made column 1 a row index
    ("prompt,completion\na,b,\nc,d,\n", 2),  # a trailing comma on every record
    ("prompt,completion\na,b\nc,d,e,f\n", 3),
])
def test_a_csv_record_with_more_fields_than_its_header_is_refused(tmp_path, text, line):
    path = tmp_path / "rows.csv"
    path.write_text(text)
    with pytest.raises(ValueError, match=rf"rows.csv line {line} has \d fields but the header "
                                         rf"names 2"):
        data.load_sft_dataset(path)


def test_csv_header_names_repeated_or_empty(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("prompt,completion,prompt\na,b,c\n")
    with pytest.raises(ValueError, match=r"names the column\(s\) \['prompt'\] more than once"):
        data.load_sft_dataset(path)
    # a trailing comma on the header and on every record: an empty column, values in place
    path.write_text("prompt,completion,\na,b,\nc,d,\n")
    rows = data.load_sft_dataset(path)
    assert rows["prompt"] == ["a", "c"] and rows["completion"] == ["b", "d"]


@pytest.mark.parametrize("name", ["rows.jsonl", "rows.csv"])
def test_a_file_that_is_not_utf8_names_its_line(tmp_path, name):
    path = tmp_path / name
    good = ('{"prompt": "a", "completion": "b"}\n' if name.endswith("jsonl")
            else "prompt,completion\na,b\n")
    bad = ('{"prompt": "caf\u00e9", "completion": "b"}\n' if name.endswith("jsonl")
           else "caf\u00e9,b\n")
    path.write_bytes(good.encode() + bad.encode("latin-1"))  # é as the one byte 0xe9
    line, offset = good.count("\n") + 1, len(good.encode()) + bad.index("\u00e9")
    with pytest.raises(ValueError, match=rf"{name} is not UTF-8 text \(line {line}, byte {offset}: "
                                         rf"invalid continuation byte\); save it as UTF-8"):
        data.load_sft_dataset(path)


def test_sft_refuses_a_tokenizer_without_an_eos_token():
    tokenizer = review_tokenizer(task.make_corpus(32, seed=0))
    rows = [{"prompt": "Review of the tent:", "completion": " It is great."}]
    eos = tokenizer.eos_token_id
    assert data.tokenize_sft(rows, tokenizer, max_length=64)["input_ids"][0, -1] == eos
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="the tokenizer has no eos token: SFT appends it"):
        data.tokenize_sft(rows, tokenizer, max_length=64)


# a chat template that refuses roles other than system, user and assistant, as Gemma's and
# Mistral's refuse what they do not expect (raise_exception)
STRICT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('Unknown role: ' + m['role']) }}{% endif %}"
    "<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture
def strict_chat_tokenizer():
    tokenizer = review_tokenizer(task.make_corpus(32, seed=0))
    tokenizer.chat_template = STRICT_TEMPLATE
    return tokenizer


def test_a_chat_template_refusing_a_row_is_one_error_naming_the_row(strict_chat_tokenizer):
    good = {"messages": [{"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "yo"}]}
    bad = {"messages": [{"role": "human", "content": "hi"},
                        {"role": "assistant", "content": "yo"}]}
    with pytest.raises(ValueError, match=r"^SFT example 2: the tokenizer's chat template refuses "
                                         r"a conversation of the roles \[human\]: TemplateError: "
                                         r"Unknown role: human"):
        data.tokenize_sft([good, bad], strict_chat_tokenizer, max_length=64)
    with pytest.raises(ValueError, match=r"^prompt 1: .*Unknown role: human"):
        data.tokenize_prompts([bad["messages"][:1]], strict_chat_tokenizer, max_length=64)


def test_a_list_of_content_parts_printed_by_the_template_is_refused(strict_chat_tokenizer):
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                          {"role": "assistant", "content": "yo"}]}
    with pytest.raises(ValueError, match=r"SFT example 1: message 1 \(user\) has a content that "
                                         r"is not a string.*renders it as it is printed"):
        data.tokenize_sft([parts], strict_chat_tokenizer, max_length=64)
    # a template that reads the parts renders their text: taken as it is
    strict_chat_tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{% if m['content'] is string %}"
        "{{ m['content'] }}{% else %}{% for p in m['content'] %}{{ p['text'] }}{% endfor %}"
        "{% endif %}<eos>{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
    ids = data.tokenize_sft([parts], strict_chat_tokenizer, max_length=64)["input_ids"][0]
    assert strict_chat_tokenizer.decode(ids) == "<user>hi<eos><assistant>yo<eos>"


def test_a_prompt_ending_with_an_assistant_message_is_continued(strict_chat_tokenizer):
    tokenizer = strict_chat_tokenizer
    prefill = [{"role": "user", "content": "Review the tent."},
               {"role": "assistant", "content": "The tent is"}]
    # the policy continues the assistant's words (TRL's continue_final_message), where it
    # used to close them and open a second assistant turn
    assert tokenizer.decode(data.encode_prompt(prefill, tokenizer)) == \
        "<user>Review the tent.<eos><assistant>The tent is"
    assert tokenizer.decode(data.encode_prompt(prefill[:1], tokenizer)) == \
        "<user>Review the tent.<eos><assistant>"


PAIRS = [{"prompt": "Review the tent.", "chosen": " Great.", "rejected": " Bad."}]
SFT = [{"prompt": "Review the tent.", "completion": " Great."}]
CHATS = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]


@pytest.mark.parametrize("rows, loader, message", [
    (PAIRS, data.load_sft_dataset, r"preference pairs, the reward model's data \(rlhf rm "),
    (SFT, data.load_preference_dataset, r"SFT examples \(rlhf sft dataset="),
    ([{"prompt": "Review the tent."}], data.load_sft_dataset,
     r"prompts alone, the RL stages' data \(rlhf ppo / grpo"),
    (CHATS, data.load_prompt_dataset, r"SFT chats \(rlhf sft dataset="),
])
def test_another_stages_data_is_named_as_such(tmp_path, rows, loader, message):
    # it used to say only "Rename the columns", as if the columns were misnamed
    with pytest.raises(ValueError, match=message + r".*, not this stage's data$"):
        loader(_jsonl(tmp_path / "rows.jsonl", rows))


def test_column_names_with_spaces_around_them_are_pointed_at(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("prompt, completion\na,b\n")
    with pytest.raises(ValueError, match=r"its columns are \[' completion', 'prompt'\] \(the "
                                         r"names \[' completion'\] have spaces around them\)"):
        data.load_sft_dataset(path)


def test_responses_that_repeat_the_prompt_are_warned_about(tmp_path):
    # chosen/rejected written as the whole text beside a prompt column: the reward model was
    # trained on the prompt twice (prompt + chosen), without a word
    pairs = [{"prompt": f"Question {i}:", "chosen": f"Question {i}: yes", "rejected":
              f"Question {i}: no"} for i in range(10)]
    with pytest.warns(UserWarning, match=r"in 10 of 10 rows chosen and rejected start with the "
                                         r"row's prompt \(the first: '.*pairs.jsonl' line 1\)"):
        data.load_preference_dataset(_jsonl(tmp_path / "pairs.jsonl", pairs))
    sft = [{"prompt": row["prompt"], "completion": row["chosen"]} for row in pairs]
    with pytest.warns(UserWarning, match=r"in 10 of 10 rows completion start with"):
        data.load_sft_dataset(_jsonl(tmp_path / "sft.jsonl", sft))
    # one row in ten by chance ("b" -> "bad") is not such a mistake; nor is a chosen without it
    sft[1:] = [{"prompt": f"Question {i}:", "completion": " yes"} for i in range(1, 10)]
    pairs = [dict(row, chosen=" yes", rejected=" no") for row in pairs]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data.load_sft_dataset(_jsonl(tmp_path / "sft.jsonl", sft))
        data.load_preference_dataset(_jsonl(tmp_path / "pairs.jsonl", pairs))


def test_broken_json_lines_after_a_byte_order_mark_are_named_where_they_are(tmp_path):
    # the mark made the first line the culprit ("Unexpected UTF-8 BOM"), wherever the fault was
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "completion": "b"}\n'
                     b'{"prompt": "c", "completion": "d"}\n{"prompt": "e", "completion" "f"}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl line 3, column 30: Expecting ':' delimiter"):
        data.load_sft_dataset(path)
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "completion": "b"}\n')
    assert data.load_sft_dataset(path).to_list() == [{"prompt": "a", "completion": "b"}]


def test_a_json_row_naming_a_key_twice_is_named(tmp_path):
    # pandas' reading of it failed with "If using all scalar values, you must pass an index"
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "a", "completion": "c"}\n'
                    '{"prompt": "a", "prompt": "b", "completion": "c"}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl line 2 names the key 'prompt' twice"):
        data.load_sft_dataset(path)


def test_the_overlong_warning_says_what_truncated_and_dropped_rows_lose():
    tokenizer = review_tokenizer(task.make_corpus(32, seed=0))
    rows = [{"prompt": "Review of the tent:", "completion": " It is great." * 6},
            {"prompt": "Review of the tent:" * 9, "completion": " It is great."},
            {"prompt": "Review:", "completion": " Fine."}]
    whole = data.encode_sft_example(rows[0], tokenizer)["input_ids"]
    with pytest.warns(UserWarning, match=r"2 of 3 SFT examples were longer than max_length=24 "
                                         r"tokens: 1 truncated, 1 dropped; a truncated row keeps "
                                         r"its prompt and loses the end of its response"):
        batch = data.tokenize_sft(rows, tokenizer, max_length=24)
    assert batch["kept_indices"].tolist() == [0, 2]
    assert len(whole) > 24 and batch["input_ids"][0].tolist() == whole[:24]


def test_a_peft_adapter_folder_given_as_the_model_is_named_with_its_base(tmp_path):
    from rlhf.loading import resolve_pretrained

    folder = tmp_path / "my-lora"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(
        {"base_model_name_or_path": "/models/base", "peft_type": "LORA", "r": 8}))
    (folder / "adapter_model.safetensors").write_bytes(b"")
    # it used to be "not a Hugging Face model directory ... check the path"
    with pytest.raises(ValueError, match=r"model='.*my-lora' is a PEFT adapter \(adapter_config"
                                         r".json\), not a whole model; its base model is "
                                         r"'/models/base': merge it into its base"):
        resolve_pretrained(str(folder))


def test_split_files_that_are_links_to_elsewhere_are_read(tmp_path):
    _jsonl(tmp_path / "store" / "train.jsonl", _rows("train", 2))
    _jsonl(tmp_path / "store" / "test.jsonl", _rows("test", 1))
    linked = tmp_path / "linked"
    linked.mkdir()
    for name in ("train.jsonl", "test.jsonl"):
        (linked / name).symlink_to(tmp_path / "store" / name)
    assert data.load_sft_dataset(linked).to_list() == _rows("train", 2)
    assert data._row_location(linked, 1, {}) == f"{str(linked / 'train.jsonl')!r} line 2"


@pytest.mark.parametrize("written", [
    json.dumps([{"role": "user", "content": "Review the tent."}]),  # as JSON
    str([{"role": "user", "content": "Review the tent."}]),  # as pandas' to_csv writes a list
])
def test_a_chat_written_as_text_in_a_prompt_or_response_column_is_refused(tmp_path, written):
    # it was taken for a plain prompt and trained on as those characters
    with pytest.raises(ValueError, match=r"rows.jsonl' line 2: column 'prompt' is a string .*, "
                                         r"a chat written as text; expected a list of"):
        data.load_prompt_dataset(_jsonl(tmp_path / "rows.jsonl",
                                        [{"prompt": "Review the lamp."}, {"prompt": written}]))
    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected\n" + ",".join(
        '"' + text.replace('"', '""') + '"' for text in ("Review:", written, " Bad.")) + "\n")
    with pytest.raises(ValueError, match=r"pairs.csv' line 2: column 'chosen' .* a chat written "
                                         r"as text.*\(a CSV cell is text, never a list"):
        data.load_preference_dataset(path)
    # brackets in a plain prompt are text
    rows = [{"prompt": "[1, 2, 3] sorted is"}, {"prompt": "[{'role' is a word}]"}]
    assert data.load_prompt_dataset(_jsonl(tmp_path / "plain.jsonl", rows)).to_list() == rows


@pytest.mark.parametrize("name", ["runs/data/train", "my data"])
def test_a_missing_dataset_path_that_cannot_be_a_hub_name_is_said_missing(tmp_path, name,
                                                                          monkeypatch):
    # it was looked up on the hub (offline: "not in the datasets cache"), as if a dataset name
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"dataset file '{name}' does not exist"):
        data.load_sft_dataset(name)
