"""Data loading from local files in every accepted format, tokenisation, masks, bad input."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch

from rlhf import data, task

# A minimal chat template (Jinja): "<bos><|user|>hi\n<|assistant|>yo\n"
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def base_tokenizer():
    corpus = task.make_corpus(300, seed=0)
    return task.train_tokenizer([e["prompt"] + e["completion"] for e in corpus], vocab_size=400)


@pytest.fixture
def tokenizer(base_tokenizer):
    import copy

    return copy.deepcopy(base_tokenizer)  # tests may set a template or remove the pad token


@pytest.fixture
def chat_tokenizer(tokenizer):
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _write(path, rows, kind):
    if kind == "jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif kind == "json":
        path.write_text(json.dumps(rows))
    else:
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(str(path))
    return path


SFT_ROWS = {
    "prompt_completion": [{"prompt": "Review of the tent:", "completion": " It is great."},
                          {"prompt": "Iron Valley review:", "completion": " I hate the plot."}],
    "messages": [{"messages": [{"role": "user", "content": "Review the tent."},
                               {"role": "assistant", "content": "It is great."}]},
                 {"messages": [{"role": "user", "content": "Hi"},
                               {"role": "assistant", "content": "Hello."},
                               {"role": "user", "content": "Review the lamp."},
                               {"role": "assistant", "content": "It is bad."}]}],
    "conversational_prompt_completion": [
        {"prompt": [{"role": "user", "content": "Review the tent."}],
         "completion": [{"role": "assistant", "content": "It is great."}]}],
    "text": [{"text": "The plot is dull."}, {"text": "I love the sound."}],
}


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet"])
@pytest.mark.parametrize("fmt", sorted(SFT_ROWS))
def test_sft_files_in_every_format(tmp_path, chat_tokenizer, kind, fmt):
    rows = SFT_ROWS[fmt]
    path = _write(tmp_path / f"sft.{kind}", rows, kind)
    dataset = data.load_sft_dataset(path)
    assert len(dataset) == len(rows)
    batch = data.tokenize_sft(dataset, chat_tokenizer, max_length=64)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape and ids.shape[0] == len(rows)
    assert ids.dtype == labels.dtype == torch.long
    for row in range(len(rows)):
        n = int(mask[row].sum())
        assert (mask[row, :n] == 1).all() and (mask[row, n:] == 0).all()  # right padding
        assert (labels[row, n:] == data.IGNORE_INDEX).all()
        trained = labels[row] != data.IGNORE_INDEX
        assert (labels[row][trained] == ids[row][trained]).all()
        assert ids[row, n - 1] == chat_tokenizer.eos_token_id and trained[n - 1]
        trained_text = chat_tokenizer.decode(ids[row][trained], skip_special_tokens=True)
        if fmt == "text":
            assert trained_text == rows[row]["text"]
        elif fmt == "prompt_completion":
            assert trained_text == rows[row]["completion"]
            prompt_ids = ids[row][~trained & (mask[row] == 1)]
            assert prompt_ids[0] == chat_tokenizer.bos_token_id
            assert chat_tokenizer.decode(prompt_ids, skip_special_tokens=True) == \
                rows[row]["prompt"]
        else:  # chat: every assistant turn is trained, nothing else
            messages = rows[row].get("messages") or rows[row]["prompt"] + rows[row]["completion"]
            answers = [m["content"] + "\n" for m in messages if m["role"] == "assistant"]
            assert trained_text == "".join(answers)
            full = chat_tokenizer.apply_chat_template(messages, tokenize=False)
            assert chat_tokenizer.decode(ids[row, :n - 1]) == full  # template bos, not doubled


def test_sft_string_layout_matches_generation(tokenizer):
    # prompt ids (as PPO encodes them) are exactly the prefix of the SFT sequence
    example = {"prompt": "Review of the tent:", "completion": " It is great."}
    encoded = data.encode_sft_example(example, tokenizer)
    prompt_ids = data.encode_prompt(example["prompt"], tokenizer)
    assert encoded["input_ids"][: len(prompt_ids)] == prompt_ids
    assert encoded["prompt_length"] == len(prompt_ids)
    assert encoded["labels"][: len(prompt_ids)] == [data.IGNORE_INDEX] * len(prompt_ids)
    completion = tokenizer(example["completion"], add_special_tokens=False)["input_ids"]
    assert encoded["input_ids"] == prompt_ids + completion + [tokenizer.eos_token_id]


PREFERENCE_ROWS = {
    "strings": [{"prompt": "Review of the tent:", "chosen": " It is great.",
                 "rejected": " It is bad and I hate it."},
                {"prompt": "Glass City review:", "chosen": " I love it.", "rejected": " Dull."}],
    "implicit_prompt": [{"chosen": "It is great.", "rejected": "It is bad."}],
    "conversational": [{"prompt": [{"role": "user", "content": "Review the tent."}],
                        "chosen": [{"role": "assistant", "content": "It is great."}],
                        "rejected": [{"role": "assistant", "content": "It is bad."}]}],
}


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet"])
@pytest.mark.parametrize("fmt", sorted(PREFERENCE_ROWS))
def test_preference_files_in_every_format(tmp_path, chat_tokenizer, kind, fmt):
    rows = PREFERENCE_ROWS[fmt]
    dataset = data.load_preference_dataset(_write(tmp_path / f"pairs.{kind}", rows, kind))
    batch = data.tokenize_preferences(dataset, chat_tokenizer, max_length=64)
    for key in ("chosen", "rejected"):
        ids, mask = batch[f"{key}_input_ids"], batch[f"{key}_attention_mask"]
        assert ids.shape == mask.shape and ids.shape[0] == len(rows)
        for row in range(len(rows)):
            n = int(mask[row].sum())
            assert (mask[row, n:] == 0).all() and ids[row, n - 1] == chat_tokenizer.eos_token_id
            text = chat_tokenizer.decode(ids[row, :n], skip_special_tokens=True)
            response = rows[row][key]
            response = response if isinstance(response, str) else response[0]["content"]
            assert response in text
    assert batch["n_dropped"] == 0 and batch["kept_indices"].tolist() == list(range(len(rows)))


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet"])
def test_prompt_files_left_padded(tmp_path, chat_tokenizer, kind):
    rows = [{"prompt": "Review of the tent:"}, {"prompt": "Glass City review: long long long"},
            {"prompt": [{"role": "user", "content": "Review the lamp."}]}]
    if kind == "parquet":  # one column type per Parquet file: strings only there
        rows = rows[:2]
    dataset = data.load_prompt_dataset(_write(tmp_path / f"prompts.{kind}", rows, kind))
    batch = data.tokenize_prompts(dataset, chat_tokenizer, max_length=32)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert (mask[:, -1] == 1).all()  # left padding: every row ends with a real token
    for row, example in enumerate(rows):
        n = int(mask[row].sum())
        assert (mask[row, : ids.shape[1] - n] == 0).all()
        assert ids[row, -n:].tolist() == data.encode_prompt(example["prompt"], chat_tokenizer)
    if kind != "parquet":
        rendered = chat_tokenizer.decode(ids[2, -int(mask[2].sum()):])
        assert rendered.endswith("<|assistant|>")  # the generation prompt is there
    # plain strings work too, and the prompt's text survives the round trip
    plain = data.tokenize_prompts(["Review of the tent:"], chat_tokenizer, max_length=32)
    assert chat_tokenizer.decode(plain["input_ids"][0], skip_special_tokens=True) == \
        "Review of the tent:"


def test_directory_of_files_and_in_memory_rows(tmp_path, tokenizer):
    rows = SFT_ROWS["prompt_completion"]
    _write(tmp_path / "a.jsonl", rows, "jsonl")
    _write(tmp_path / "b.jsonl", rows, "jsonl")
    assert len(data.load_sft_dataset(tmp_path)) == 4
    # lists of dicts (the built-in task) go straight to the tokenisers
    corpus = task.make_corpus(20, seed=1)
    batch = data.tokenize_sft(corpus, tokenizer, max_length=128)
    assert batch["input_ids"].shape[0] == 20 and batch["n_truncated"] == 0


@pytest.mark.parametrize("rows, loader, message", [
    ([{"question": "q", "answer": "a"}], data.load_sft_dataset,
     r"no columns for the accepted formats \(prompt \+ completion, messages, or text\); its "
     r"columns are \['answer', 'question'\]"),
    ([{"prompt": "p", "chosen": "c"}], data.load_preference_dataset,
     r"columns are \['chosen', 'prompt'\]"),
    ([{"query": "p"}], data.load_prompt_dataset, r"\(prompt\); its columns are \['query'\]"),
])
def test_missing_columns_name_what_exists(tmp_path, rows, loader, message):
    with pytest.raises(ValueError, match=message):
        loader(_write(tmp_path / "bad.jsonl", rows, "jsonl"))


def test_empty_and_missing_files(tmp_path, tokenizer):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty"):
        data.load_sft_dataset(tmp_path / "empty.jsonl")
    import datasets

    datasets.Dataset.from_list([{"prompt": "x", "completion": "y"}]).select([]).to_parquet(
        str(tmp_path / "zero.parquet"))
    with pytest.raises(ValueError, match="has no rows"):
        data.load_sft_dataset(tmp_path / "zero.parquet")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_sft_dataset(tmp_path / "nope.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"prompt": "x", "completion": \n')
    with pytest.raises(ValueError, match="could not read dataset"):
        data.load_sft_dataset(tmp_path / "broken.jsonl")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"expected \.json, \.jsonl, \.parquet or \.csv"):
        data.load_sft_dataset(tmp_path / "notes.txt")
    for tokenize in (data.tokenize_sft, data.tokenize_preferences, data.tokenize_prompts):
        with pytest.raises(ValueError, match="empty"):
            tokenize([], tokenizer, max_length=16)


@pytest.mark.parametrize("name, text, message", [
    ("cut.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "a", "compl\n',
     r"cut.jsonl line 2, column 17: Unterminated string .*each line must be one JSON object"),
    ("list.jsonl", '{"prompt": "a", "completion": "b"}\n[1, 2]\n',
     r"list.jsonl line 2 is a JSON list, not an object"),
    ("doc.json", '[{"prompt": "a", "completion": "b"},\n {"prompt": "a" "completion": "b"}]',
     r"doc.json line 2, column 17: Expecting ',' delimiter \(the file must be valid JSON\)"),
])
def test_broken_json_names_the_line(tmp_path, name, text, message):
    """`datasets` says only "An error occurred while generating the dataset": the error must
    say which line of which file is wrong and how."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        data.load_sft_dataset(path)
    assert "An error occurred while generating" not in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("name, text, message", [
    ("scalar.json", '"hello"', r"scalar.json holds a single JSON str, not rows; expected a list "
                               r"of objects"),
    ("rows.json", '[{"prompt": "a", "completion": "b"}, 3]',
     r"rows.json row 2 is a JSON int, not an object"),
])
def test_json_that_is_not_rows_is_named(tmp_path, name, text, message):
    """A JSON document that is no list of row objects: one line saying what it holds, not
    pandas' "DataFrame constructor not properly called!" or Arrow's "changed from object to
    string"."""
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        data.load_sft_dataset(path)
    assert "DataFrame" not in str(info.value) and "Arrow" not in str(info.value)


@pytest.mark.parametrize("document", [
    {"prompt": ["a", "b"], "completion": ["c", "d"]},
    # pandas' DataFrame.to_json(path) default layout (orient="columns")
    {"prompt": {"0": "a", "1": "b"}, "completion": {"0": "c", "1": "d"}},
])
@pytest.mark.parametrize("loader", [data.load_sft_dataset, data.load_prompt_dataset])
def test_one_object_of_columns_is_named(tmp_path, document, loader):
    """`datasets` reads a JSON object of columns as ONE row whose cells are whole columns; the
    row check then said "row 1: column 'prompt' is dict ...; fix or remove that row"."""
    path = tmp_path / "columns.json"
    path.write_text(json.dumps(document))
    with pytest.raises(ValueError, match=r"is one JSON object of columns .*\['completion', "
                                         r"'prompt'\].*orient='records', lines=True") as info:
        loader(path)
    assert "fix or remove that row" not in str(info.value)


def test_one_row_chat_file_is_not_taken_for_rows_under_a_key(tmp_path):
    """A .jsonl of one chat row ({"messages": [{"role": ..., "content": ...}, ...]}) given to
    the reward-model or prompt loader was said to hold "its rows under the key 'messages'"; it
    is one row whose columns do not fit, and the error says which columns are expected. A
    one-row SFT chat file loads."""
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant",
                                                            "content": "yo"}]}
    path = _write(tmp_path / "chat.jsonl", [chat], "jsonl")
    assert data.load_sft_dataset(path).column_names == ["messages"]
    for loader, accepted in ((data.load_preference_dataset, "prompt + chosen + rejected"),
                             (data.load_prompt_dataset, "(prompt)")):
        with pytest.raises(ValueError, match="no columns for the accepted formats") as info:
            loader(path)
        assert "holding its rows" not in str(info.value) and accepted in str(info.value)
        assert "its columns are ['messages']" in str(info.value)


def test_sharegpt_messages_say_which_keys_to_rename(tmp_path):
    rows = [{"messages": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}]
    with pytest.raises(ValueError, match=r"line 1: column 'messages', message 1 is .*ShareGPT's "
                                         r"'from'/'value' keys; each message needs 'role'"):
        data.load_sft_dataset(_write(tmp_path / "share.jsonl", rows, "jsonl"))


@pytest.mark.parametrize("name", ["chats.csv", "chats.jsonl"])
def test_messages_given_as_a_string_are_named(tmp_path, name):
    """A `messages` cell that is a string (a chat saved as JSON text in a CSV cell, or a JSON
    line with a string) ended in "TypeError: string indices must be integers" (its characters
    were taken for messages)."""
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    path = tmp_path / name
    if name.endswith(".csv"):
        import csv

        with path.open("w", newline="") as handle:
            csv.writer(handle).writerows([["messages"], [json.dumps(chat)]])
    else:
        path.write_text(json.dumps({"messages": "hi there"}) + "\n")
    with pytest.raises(ValueError, match=r"line \d: column 'messages' is a string .*expected a "
                                         r"list of \{'role', 'content'\} messages") as info:
        data.load_sft_dataset(path)
    assert ("a CSV cell is text" in str(info.value)) == name.endswith(".csv")


@pytest.mark.parametrize("separator", [";", "\t"])
def test_a_csv_with_another_separator_is_named(tmp_path, separator):
    """A CSV saved with ';' (a spreadsheet in a comma-decimal locale) or tabs reads as one
    column 'prompt;completion', and the missing-columns error did not say why."""
    path = tmp_path / "rows.csv"
    path.write_text(f"prompt{separator}completion\na{separator}b\n")
    header = f"prompt{separator}completion"
    with pytest.raises(ValueError, match=re.escape(f"reads as one column {header!r}: its fields "
                                                   f"look separated by {separator!r}")):
        data.load_sft_dataset(path)
    path.write_text("prompt\nReview of the lamp:\n")  # one column without a separator loads
    assert data.load_prompt_dataset(path)["prompt"] == ["Review of the lamp:"]


def test_an_unpaired_preference_dataset_given_to_sft_is_warned_about(tmp_path):
    """prompt/completion/label (TRL's KTO format) loads as SFT data, whose training would
    imitate the completions labelled undesired too; that was silent."""
    rows = [{"prompt": "a", "completion": "good", "label": True},
            {"prompt": "b", "completion": "bad", "label": False}]
    with pytest.warns(UserWarning, match=r"'label' column, False in 1 of 2 rows .*SFT ignores it "
                                         r"and trains on every completion"):
        assert len(data.load_sft_dataset(_write(tmp_path / "kto.jsonl", rows, "jsonl"))) == 2
    kept = [row for row in rows if row["label"]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every row labelled true: nothing to say
        data.load_sft_dataset(_write(tmp_path / "good.jsonl", kept, "jsonl"))


def test_columns_of_two_sft_formats_say_which_one_trains(tmp_path):
    """A file with prompt/completion and messages trained on prompt/completion alone, silently
    (the messages column, perhaps the data meant, was never read)."""
    chat = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    rows = [{"prompt": "a", "completion": "b", "messages": chat}]
    with pytest.warns(UserWarning, match=r"more than one SFT format: SFT trains on prompt \+ "
                                         r"completion and ignores messages"):
        data.load_sft_dataset(_write(tmp_path / "both.jsonl", rows, "jsonl"))
    with pytest.warns(UserWarning, match=r"trains on messages and ignores text"):
        data.load_sft_dataset(_write(tmp_path / "two.jsonl",
                                     [{"messages": chat, "text": "t"}], "jsonl"))


def test_chat_rows_without_template_name_fixes_every_stage_has(tokenizer):
    """`rlhf rm` takes no tokenizer= setting: the message must not offer it as the only fix."""
    rows = [{"prompt": [{"role": "user", "content": "hi"}], "chosen": "a", "rejected": "b"}]
    with pytest.raises(ValueError, match=r"row 1: column 'prompt' is a chat .* no chat template"
                                         r".*use a model whose tokenizer has one .*add a "
                                         r"chat_template to the tokenizer's tokenizer_config"):
        data.check_chat_rows(rows, tokenizer)


def test_bad_rows_are_clear_errors(tokenizer):
    with pytest.raises(ValueError, match=r"row 1: column 'completion' must be a string"):
        data.tokenize_sft([{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": 3}],
                          tokenizer, max_length=16)
    chat = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant",
                                                              "content": "yo"}]}]
    with pytest.raises(ValueError, match="no chat template"):
        data.tokenize_sft(chat, tokenizer, max_length=64)
    chat_tokenizer = tokenizer
    chat_tokenizer.chat_template = CHAT_TEMPLATE
    with pytest.raises(ValueError, match="no assistant turn"):
        data.tokenize_sft([{"messages": [{"role": "user", "content": "hi"}]}], chat_tokenizer,
                          max_length=64)
    with pytest.raises(ValueError, match="overlong must be one of"):
        data.tokenize_sft(chat, chat_tokenizer, max_length=16, overlong="cut")


def test_overlong_rows_truncated_dropped_or_errors(tokenizer):
    short = {"prompt": "Review of the tent:", "completion": " It is great."}
    long_completion = {"prompt": "Review of the tent:", "completion": " It is great." * 20}
    long_prompt = {"prompt": "Review of the tent:" * 20, "completion": " It is great."}
    rows = [short, long_completion, long_prompt]
    with pytest.warns(UserWarning, match=r"2 of 3 SFT examples were longer than max_length=24 "
                                         r"tokens: 1 truncated, 1 dropped"):
        batch = data.tokenize_sft(rows, tokenizer, max_length=24)
    assert batch["kept_indices"].tolist() == [0, 1]
    assert batch["n_truncated"] == 1 and batch["n_dropped"] == 1
    assert batch["input_ids"].shape == (2, 24)
    # the truncated row keeps its whole prompt and trains on the completion's start
    prompt_len = len(data.encode_prompt(long_completion["prompt"], tokenizer))
    assert (batch["labels"][1, :prompt_len] == data.IGNORE_INDEX).all()
    assert (batch["labels"][1, prompt_len:] != data.IGNORE_INDEX).all()

    with pytest.warns(UserWarning, match="0 truncated, 2 dropped"):
        batch = data.tokenize_sft(rows, tokenizer, max_length=24, overlong="drop")
    assert batch["kept_indices"].tolist() == [0]
    with pytest.raises(ValueError, match=r"SFT row 1 has \d+ tokens, more than max_length=24"):
        data.tokenize_sft(rows, tokenizer, max_length=24, overlong="error")
    with pytest.raises(ValueError, match="all 1 SFT examples were dropped"), \
            pytest.warns(UserWarning):
        data.tokenize_sft([long_prompt], tokenizer, max_length=24)

    pairs = [{"prompt": "p", "chosen": " good", "rejected": " bad"},
             {"prompt": "p", "chosen": " good" * 40, "rejected": " bad"}]
    with pytest.warns(UserWarning, match="1 truncated, 0 dropped"):
        batch = data.tokenize_preferences(pairs, tokenizer, max_length=16)
    assert batch["chosen_input_ids"].shape == (2, 16)

    prompts = ["Review of the tent:", "Review of the tent:" * 10]
    with pytest.warns(UserWarning, match="0 truncated, 1 dropped"):
        batch = data.tokenize_prompts(prompts, tokenizer, max_length=12)
    assert batch["kept_indices"].tolist() == [0]
    with pytest.warns(UserWarning, match="1 truncated, 0 dropped"):
        batch = data.tokenize_prompts(prompts, tokenizer, max_length=12, overlong="truncate")
    row = batch["input_ids"][1]
    assert row.shape == (12,) and row[0] == tokenizer.bos_token_id  # bos kept, tail kept
    full = data.encode_prompt(prompts[1], tokenizer)
    assert row[1:].tolist() == full[-11:]


def test_tokenizer_without_pad_token_uses_eos(tokenizer):
    tokenizer.pad_token = None
    assert tokenizer.pad_token_id is None
    rows = [{"prompt": "a", "completion": " b"}, {"prompt": "a", "completion": " b c d e"}]
    with pytest.warns(UserWarning, match="no pad token; using its eos token"):
        batch = data.tokenize_sft(rows, tokenizer, max_length=32)
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos
    # the real eos of the short row is still trained on; its padding is masked by the mask
    n = int(batch["attention_mask"][0].sum())
    assert batch["labels"][0, n - 1] == eos and (batch["labels"][0, n:] == -100).all()
    assert (batch["input_ids"][0, n:] == eos).all()

    tokenizer.pad_token = None
    tokenizer.eos_token = None
    with pytest.raises(ValueError, match="neither a pad token nor an eos token"):
        data.ensure_pad_token(tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tokenizer.pad_token = "<pad>"
        assert data.ensure_pad_token(tokenizer) == 0  # no warning when a pad token exists


def test_pad_sequences_and_collators():
    ids, mask = data.pad_sequences([[5, 6, 7], [8], []], pad_value=0, side="left")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    ids, mask = data.pad_sequences([[5, 6, 7], [8]], pad_value=9)
    assert ids.tolist() == [[5, 6, 7], [8, 9, 9]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    with pytest.raises(ValueError, match="side"):
        data.pad_sequences([[1]], 0, side="middle")
    batch = data.collate_sft([{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]},
                              {"input_ids": [1, 4], "labels": [-100, 4]}], pad_token_id=0)
    assert batch["labels"].tolist() == [[-100, 2, 3], [-100, 4, -100]]
    prompts = data.collate_prompts([[1, 2], [3]], pad_token_id=0)
    assert prompts["input_ids"].tolist() == [[1, 2], [0, 3]]


@pytest.mark.parametrize("files", [("config.json", "model.safetensors"),
                                   ("adapter_config.json", "adapter_model.safetensors"),
                                   ("tokenizer_config.json", "tokenizer.json")])
def test_a_model_directory_given_as_dataset_is_named(tmp_path, files):
    """dataset= pointing at a save_pretrained folder (model, adapter or tokenizer) read its
    config .json files as rows and printed datasets' CastError, a schema 1,500 characters long;
    it now says what the folder is."""
    for name in files:
        (tmp_path / name).write_text('{"model_type": "llama", "hidden_size": 8}')
    with pytest.raises(ValueError, match=r"is a model directory .* not data: give the dataset"):
        data.load_records(tmp_path)
    # a folder of data .json files is still read as data
    rows = tmp_path.parent / f"{tmp_path.name}-data"
    rows.mkdir()
    (rows / "rows.json").write_text('[{"prompt": "a", "response": "b"}]')
    assert len(data.load_records(rows)) == 1



def test_reading_a_local_file_draws_no_datasets_progress_bar(tmp_path, capfd):
    """Each stage reading its local .jsonl printed datasets' "Generating train split: 0 examples
    [00:00, ...]" bar between the run's own lines. Its bars are off while we read a local file
    (a save_to_disk folder too, whose bar shows on a terminal only), and the global switch is
    as it was afterwards."""
    import datasets

    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(3)))
    capfd.readouterr()
    assert not datasets.are_progress_bars_disabled()
    assert len(data.load_records(path)) == 3
    err = capfd.readouterr().err
    assert "Generating" not in err and "examples/s" not in err, err
    assert not datasets.are_progress_bars_disabled()
