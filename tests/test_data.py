"""first_kd.data: loading every supported source, layout detection, prompts, exact tokenization,
and one-line errors that name the record."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import datasets
import pytest

from first_kd.data import DataConfig, detect_format, load_records, prepare_dataset, tokenize_records
from first_kd.errors import FirstKDError
from helpers import read_jsonl

CSQA = [  # HF CommonsenseQA layout, plus an ARC record whose labels are digits
    {"id": "q0", "question": "Where would a cat sleep?",
     "choices": {"label": list("ABCDE"), "text": ["tree", "house", "river", "bank", "door"]}, "answerKey": "B"},
    {"id": "q1", "question": "What do people travel through?",
     "choices": {"label": list("ABCDE"), "text": ["door", "stone", "cloud", "water", "paper"]}, "answerKey": "E"},
    {"id": "q2", "question": "Which is green?",
     "choices": {"label": ["1", "2", "3", "4"], "text": ["tree", "light", "music", "table"]}, "answerKey": "1"},
]
FLAT_LABEL = [
    {"question": "Which is small?", "choices": ["bird", "house", "river", "store"], "answer": "C"},
    {"question": "Which is quick?", "choices": ["dog", "stone", "table"], "answer": "A"},
]
FLAT_INDEX = [
    {"id": "a", "question": "Which is happy?", "choices": ["dog", "stone", "tree", "bank"], "answer": 3},
    {"id": "b", "question": "Which is slow?", "choices": ["river", "cloud"], "answer": 0},
]
ALPACA = [
    {"instruction": "Name a green thing.", "input": "", "output": "a tree"},
    {"instruction": "Say what this is.", "input": "small bird", "output": "it is a bird"},
]
PLAIN = [
    {"id": "p0", "prompt": "Where is the dog?\n", "response": "in the house"},
    {"id": "p1", "prompt": "What is water?\n", "response": "a river drink"},
]
# layout -> (records, expected ids, gold letters for mcqa or None, expected number of options)
LAYOUTS = {
    "csqa": (CSQA, ["q0", "q1", "q2"], ["B", "E", "A"], [5, 5, 4]),
    "flat_label": (FLAT_LABEL, ["0", "1"], ["C", "A"], [4, 3]),
    "flat_index": (FLAT_INDEX, ["a", "b"], ["D", "A"], [4, 2]),
    "alpaca": (ALPACA, ["0", "1"], None, None),
    "plain": (PLAIN, ["p0", "p1"], None, None),
}


def write(records: list[dict], kind: str, directory: Path) -> Path:
    """Write records in one storage kind; return what --data should point at."""
    if kind == "jsonl":
        path = directory / "data.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif kind == "json":  # a single JSON list, not JSON lines
        path = directory / "data.json"
        path.write_text(json.dumps(records, indent=2))
    elif kind == "csv":  # nested values written as JSON, the way a person would in a spreadsheet
        path = directory / "data.csv"
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            for r in records:
                writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})
    elif kind == "parquet":
        path = directory / "data.parquet"
        datasets.Dataset.from_list(records).to_parquet(str(path))
    elif kind == "disk":
        path = directory / "saved"
        datasets.Dataset.from_list(records).save_to_disk(str(path))
    elif kind == "disk_dict":  # the records are the "validation" split; "train" is a decoy
        path = directory / "saved_dict"
        datasets.DatasetDict({"train": datasets.Dataset.from_list(records[:1]),
                              "validation": datasets.Dataset.from_list(records)}).save_to_disk(str(path))
    else:
        raise AssertionError(kind)
    return path


def expected_mcqa_prompt(record: dict) -> str:
    """An independent rendering of the default MCQA template."""
    choices = record["choices"]
    texts = choices["text"] if isinstance(choices, dict) else choices
    lines = "\n".join(f"{'ABCDEFGH'[i]}. {t}" for i, t in enumerate(texts))
    return f"Question: {record['question']}\n{lines}\nAnswer:"


def expected_response_prompt(record: dict) -> str:
    if "prompt" in record:
        return record["prompt"]
    if record["input"]:
        return f"### Instruction:\n{record['instruction']}\n\n### Input:\n{record['input']}\n\n### Response:\n"
    return f"### Instruction:\n{record['instruction']}\n\n### Response:\n"


def check_rows(ds, info, records, ids, letters, n_choices, tok, max_length=512):
    assert ds.column_names == ["id", "input_ids", "target_start", "answer_index", "n_choices", "truncated"]
    assert info["n_records"] == len(ds) == len(records)
    assert ds["id"] == ids
    for row, record in zip(ds, records):
        start = row["target_start"]
        assert len(row["input_ids"]) <= max_length and not row["truncated"]
        if letters is None:
            # The boundary is exact: the prefix is the prompt as the tokenizer encodes it on its own.
            assert row["input_ids"][:start] == tok(expected_response_prompt(record))["input_ids"]
            response = record.get("output", record.get("response"))
            assert tok.decode(row["input_ids"][start:]) == response + tok.eos_token
            assert row["answer_index"] == -1 and row["n_choices"] == 0
        else:
            assert row["input_ids"][:start] == tok(expected_mcqa_prompt(record))["input_ids"]
    if letters is not None:
        assert info["format"] == "mcqa"
        assert info["choice_labels"] == list("ABCDE")[: max(n_choices)]
        assert info["choice_token_ids"] == [tok.encode(" " + L, add_special_tokens=False)[0]
                                            for L in info["choice_labels"]]
        assert [r["n_choices"] for r in ds] == n_choices
        for row, letter in zip(ds, letters):
            target = row["input_ids"][row["target_start"]:]
            assert len(target) == 1 and tok.decode(target) == " " + letter
            assert target[0] == info["choice_token_ids"][row["answer_index"]]
            assert "ABCDE"[row["answer_index"]] == letter
    else:
        assert info["format"] == "prompt-response"
        assert info["choice_token_ids"] == [] and info["choice_labels"] == []
    assert info["n_truncated"] == 0


CASES = [(layout, kind) for layout in LAYOUTS for kind in ("jsonl", "json", "parquet", "disk", "csv")]


@pytest.mark.parametrize("layout,kind", CASES)
def test_each_layout_from_each_source(layout, kind, tmp_path, tiny_tokenizer):
    records, ids, letters, n_choices = LAYOUTS[layout]
    cfg = DataConfig(data=str(write(records, kind, tmp_path)))
    ds, info = prepare_dataset(cfg, tiny_tokenizer)
    check_rows(ds, info, records, ids, letters, n_choices, tiny_tokenizer)


def test_datasetdict_dir_uses_split(tmp_path, tiny_tokenizer):
    path = write(CSQA, "disk_dict", tmp_path)
    assert len(load_records(DataConfig(data=str(path)))) == 1
    ds, info = prepare_dataset(DataConfig(data=str(path), split="validation"), tiny_tokenizer)
    check_rows(ds, info, *LAYOUTS["csqa"], tiny_tokenizer)
    with pytest.raises(FirstKDError, match="no split 'test'.*train, validation"):
        load_records(DataConfig(data=str(path), split="test"))


def test_limit_takes_first_records(tmp_path):
    path = write(CSQA, "jsonl", tmp_path)
    assert load_records(DataConfig(data=str(path), limit=2))["id"] == ["q0", "q1"]
    assert len(load_records(DataConfig(data=str(path), limit=99))) == 3


def test_detection_and_forcing(tmp_path):
    for layout, expected in [("csqa", "mcqa"), ("flat_index", "mcqa"), ("alpaca", "prompt-response"),
                             ("plain", "prompt-response")]:
        ds = datasets.Dataset.from_list(LAYOUTS[layout][0])
        assert detect_format(ds, DataConfig()) == expected
    renamed = datasets.Dataset.from_list([{"q": "x?", "opts": ["a", "b"], "answer": 0}])
    with pytest.raises(FirstKDError, match=r"\(q, opts, answer\).*--question-field.*--format"):
        detect_format(renamed, DataConfig())
    assert detect_format(renamed, DataConfig(question_field="q", choices_field="opts")) == "mcqa"
    both = datasets.Dataset.from_list([{**FLAT_INDEX[0], "instruction": "i", "output": "o"}])
    with pytest.raises(FirstKDError, match="--format"):
        detect_format(both, DataConfig())
    assert detect_format(both, DataConfig(format="prompt-response")) == "prompt-response"


def test_renamed_fields_and_answer_as_text_or_digit_string(tiny_tokenizer):
    ds = datasets.Dataset.from_list([
        {"key": "k0", "q": "Which is a bird?", "opts": ["dog", "bird", "tree"], "gold": "bird"},
        {"key": "k1", "q": "Which is a tree?", "opts": ["dog", "bird", "tree"], "gold": "2"},
    ])
    cfg = DataConfig(id_field="key", question_field="q", choices_field="opts", answer_field="gold")
    out, info = tokenize_records(ds, tiny_tokenizer, cfg)
    assert out["id"] == ["k0", "k1"] and out["answer_index"] == [1, 2]
    assert [tiny_tokenizer.decode(r["input_ids"][r["target_start"]:]) for r in out] == [" B", " C"]


def test_prompt_gets_special_tokens_and_target_does_not(tiny_tokenizer):
    from tokenizers.processors import TemplateProcessing

    tok = copy.deepcopy(tiny_tokenizer)
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    assert tok("x")["input_ids"][0] == tok.bos_token_id  # the oracle: this tokenizer adds BOS
    for records in (FLAT_LABEL, ALPACA):
        out, _ = tokenize_records(datasets.Dataset.from_list(records), tok, DataConfig())
        for row in out:
            assert row["input_ids"][0] == tok.bos_token_id
            assert row["input_ids"].count(tok.bos_token_id) == 1


def test_chat_template(tiny_tokenizer):
    tok = copy.deepcopy(tiny_tokenizer)
    with pytest.raises(FirstKDError, match="no chat template"):
        tokenize_records(datasets.Dataset.from_list(ALPACA), tok, DataConfig(chat_template=True))
    tok.chat_template = ("<s>{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %} [assistant]{% endif %}")
    out, _ = tokenize_records(datasets.Dataset.from_list(ALPACA), tok, DataConfig(chat_template=True))
    row = out[1]
    expected = "<s>[user] Say what this is.\n\nsmall bird [assistant]"
    assert row["input_ids"][:row["target_start"]] == tok(expected, add_special_tokens=False)["input_ids"]
    assert row["input_ids"].count(tok.bos_token_id) == 1  # the template's BOS, not a second one
    assert tok.decode(row["input_ids"][row["target_start"]:]) == "it is a bird" + tok.eos_token


def test_long_response_is_truncated_and_flagged(tiny_tokenizer):
    tok = tiny_tokenizer
    long_response = " ".join(["the quick dog travels to the river bank"] * 10)
    records = [{"prompt": "Tell a story.\n", "response": long_response},
               {"prompt": "Tell a story.\n", "response": "a dog"}]
    prompt_len = len(tok("Tell a story.\n")["input_ids"])
    max_length = prompt_len + 7
    out, info = tokenize_records(datasets.Dataset.from_list(records), tok, DataConfig(max_length=max_length))
    full_target = tok(long_response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert len(full_target) > 7 >= len(tok("a dog", add_special_tokens=False)["input_ids"]) + 1
    row = out[0]
    assert row["truncated"] and len(row["input_ids"]) == max_length
    assert row["input_ids"][row["target_start"]:] == full_target[:7]
    assert out[1]["truncated"] is False and tok.decode(out[1]["input_ids"][prompt_len:]) == "a dog" + tok.eos_token
    assert info["n_truncated"] == 1
    no_eos, _ = tokenize_records(datasets.Dataset.from_list(PLAIN), tok, DataConfig(add_eos=False))
    assert tok.decode(no_eos[0]["input_ids"][no_eos[0]["target_start"]:]) == PLAIN[0]["response"]


# ----------------------------------------------------------------------------------------------
# Errors: one line, FirstKDError, naming the record and the fix


def tokenize_error(records, tok, **cfg) -> str:
    with pytest.raises(FirstKDError) as e:
        tokenize_records(datasets.Dataset.from_list(records), tok, DataConfig(**cfg))
    message = str(e.value)
    assert "\n" not in message
    return message


def test_missing_field_names_record_and_field(tiny_tokenizer):
    records = [dict(FLAT_INDEX[0]), {"id": "b", "choices": ["x", "y"], "answer": 1}]
    message = tokenize_error(records, tiny_tokenizer)
    assert "record 1 (id b)" in message and "'question'" in message and "--question-field" in message
    message = tokenize_error([{"question": "q?", "choices": ["x", "y"]}], tiny_tokenizer)
    assert "record 0" in message and "'answer'" in message and "--answer-field" in message
    message = tokenize_error([{"instruction": "do it"}, {"instruction": "x", "output": "y"}],
                             tiny_tokenizer, format="prompt-response")
    assert "record 0" in message


def test_answer_not_among_choices(tiny_tokenizer):
    for bad in ("F", 4, "7", "no such option"):
        good = (lambda i: i) if isinstance(bad, int) else (lambda i: "ABCD"[i])  # one type per column
        records = [{**r, "answer": good(r["answer"])} for r in FLAT_INDEX]
        records.append({"id": "c", "question": "q?", "choices": list("wxyz"), "answer": bad})
        message = tokenize_error(records, tiny_tokenizer)
        assert "record 2 (id c)" in message and "not among" in message


def test_empty_choices(tiny_tokenizer):
    message = tokenize_error([FLAT_INDEX[0], {"id": "e", "question": "q?", "choices": [], "answer": 0}], tiny_tokenizer)
    assert "record 1 (id e)" in message and "no options" in message


def test_letter_not_one_token(tiny_tokenizer):
    tok = tiny_tokenizer
    assert len(tok.encode("  A", add_special_tokens=False)) > 1  # oracle: two spaces split off
    message = tokenize_error(FLAT_INDEX, tok, answer_prefix="  ")
    assert "record 0" in message and "'A'" in message and "--answer-prefix" in message
    # A letter only the later record needs: the error names that record.
    rare = next(L for L in "FGHIJKLMNOPQRSTUVWXYZ" if len(tok.encode(" " + L, add_special_tokens=False)) > 1)
    n = "ABCDEFGHIJKLMNOPQRSTUVWXYZ".index(rare) + 1
    many = {"id": "m", "question": "q?", "choices": [f"o{i}" for i in range(n)], "answer": 0}
    message = tokenize_error([FLAT_INDEX[0], many], tok)
    assert "record 1 (id m)" in message and repr(rare) in message


def test_prompt_longer_than_max_length(tiny_tokenizer):
    long_q = {"id": "long", "question": "where " * 60 + "?", "choices": ["a", "b"], "answer": 0}
    message = tokenize_error([FLAT_INDEX[0], long_q], tiny_tokenizer, max_length=40)
    assert "record 1 (id long)" in message and "--max-length" in message
    # Exactly full: the prompt fits but leaves no room for even the answer letter.
    n = len(tiny_tokenizer(expected_mcqa_prompt(FLAT_INDEX[0]))["input_ids"])
    assert "record 0" in tokenize_error(FLAT_INDEX, tiny_tokenizer, max_length=n)
    out, _ = tokenize_records(datasets.Dataset.from_list(FLAT_INDEX[:1]), tiny_tokenizer, DataConfig(max_length=n + 1))
    assert len(out[0]["input_ids"]) == n + 1


def test_duplicate_ids(tiny_tokenizer):
    message = tokenize_error([PLAIN[0], PLAIN[1], PLAIN[0]], tiny_tokenizer)
    assert "record 2 (id p0)" in message and "record 0" in message


def test_source_errors(tmp_path):
    (tmp_path / "data.txt").write_text("hello\n")
    with pytest.raises(FirstKDError, match="unknown file type '.txt'"):
        load_records(DataConfig(data=str(tmp_path / "data.txt")))
    with pytest.raises(FirstKDError, match="file not found"):
        load_records(DataConfig(data=str(tmp_path / "missing.jsonl")))
    with pytest.raises(FirstKDError, match="no data given"):
        load_records(DataConfig())
    (tmp_path / "broken.jsonl").write_text('{"question": "a"\n')
    with pytest.raises(FirstKDError, match="could not read it as json"):
        load_records(DataConfig(data=str(tmp_path / "broken.jsonl")))
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(FirstKDError, match="not a datasets.save_to_disk folder"):
        load_records(DataConfig(data=str(tmp_path / "plain_dir")))
    empty = datasets.Dataset.from_list(FLAT_INDEX).select([])
    empty.save_to_disk(str(tmp_path / "empty_saved"))
    datasets.DatasetDict({"train": empty}).save_to_disk(str(tmp_path / "empty_dict"))
    empty.to_parquet(str(tmp_path / "empty.parquet"))
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "empty.json").write_text("[]\n")
    (tmp_path / "empty.csv").write_text("question,choices,answer\n")
    for name in ("empty_saved", "empty_dict", "empty.parquet", "empty.jsonl", "empty.json", "empty.csv"):
        with pytest.raises(FirstKDError, match="holds no records"):
            load_records(DataConfig(data=str(tmp_path / name)))


def test_hub_names_go_to_load_dataset_and_failures_are_one_line(monkeypatch):
    calls = []

    def fake_load_dataset(name, split=None, **kwargs):
        calls.append((name, split))
        if name == "owner/broken":
            raise ConnectionError("no network\nsecond line")
        return datasets.Dataset.from_list(CSQA)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert len(load_records(DataConfig(data="owner/csqa", split="validation"))) == 3
    assert calls == [("owner/csqa", "validation")]
    with pytest.raises(FirstKDError) as e:
        load_records(DataConfig(data="owner/broken"))
    assert "no network" in str(e.value) and "\n" not in str(e.value)


def test_config_validation():
    from first_kd.config import build

    with pytest.raises(FirstKDError, match="--template must contain {options}"):
        build(DataConfig, {"template": "Q: {question}\nAnswer:"})
    with pytest.raises(FirstKDError, match="--max-length"):
        build(DataConfig, {"max_length": 1})
    with pytest.raises(FirstKDError, match="format"):
        build(DataConfig, {"format": "qa"})
    assert build(DataConfig, {"format": "mcqa", "limit": "5"}).limit == 5


# ----------------------------------------------------------------------------------------------
# The real published layouts in ../shared/data


@pytest.fixture(scope="module")
def gpt2_tokenizer(shared_data):
    from transformers import GPT2TokenizerFast

    tok = GPT2TokenizerFast(vocab=str(shared_data / "tokenizers/gpt2/vocab.json"),
                            merges=str(shared_data / "tokenizers/gpt2/merges.txt"))
    assert tok("Hello world")["input_ids"] == [15496, 995]  # the real GPT-2 vocabulary, not an empty one
    return tok


def test_real_csqa(shared_data, gpt2_tokenizer):
    path = shared_data / "csqa/dev_rand_split.jsonl"
    raw = read_jsonl(path)
    ds, info = prepare_dataset(DataConfig(data=str(path)), gpt2_tokenizer)
    assert info["format"] == "mcqa" and info["n_records"] == len(raw) == 1221
    # " A".." E" are single GPT-2 tokens with these well-known ids.
    assert info["choice_token_ids"] == [317, 347, 327, 360, 412]
    assert info["choice_labels"] == list("ABCDE") and info["n_truncated"] == 0
    assert set(ds["n_choices"]) == {5}
    assert ds["id"] == [r["id"] for r in raw]
    gold = ["ABCDE"[i] for i in ds["answer_index"]]
    assert gold == [r["answerKey"] for r in raw]
    for row, letter in zip(ds, gold):
        assert row["input_ids"][row["target_start"]:] == [info["choice_token_ids"]["ABCDE".index(letter)]]
    first = ds[0]
    assert gpt2_tokenizer.decode(first["input_ids"]) == expected_mcqa_prompt(raw[0]) + " " + raw[0]["answerKey"]


def test_real_arc_easy_alpaca(shared_data, gpt2_tokenizer):
    path = shared_data / "arc_easy/train.json"
    raw = json.loads(path.read_text())
    ds, info = prepare_dataset(DataConfig(data=str(path)), gpt2_tokenizer)
    assert info["format"] == "prompt-response" and info["n_records"] == len(raw) == 2251
    assert info["n_truncated"] == 0 and info["choice_token_ids"] == []
    assert ds["id"] == [str(i) for i in range(len(raw))]
    eos = gpt2_tokenizer.eos_token
    targets = gpt2_tokenizer.batch_decode([r["input_ids"][r["target_start"]:] for r in ds])
    assert targets == [r["output"] + eos for r in raw]
    assert all(r["input"] == "" for r in raw)
    row = ds[0]
    assert gpt2_tokenizer.decode(row["input_ids"][:row["target_start"]]) == expected_response_prompt(raw[0])


def test_custom_template_names_record_fields_and_reads_typed_newlines(tiny_tokenizer):
    records = [{**CSQA[0], "question_concept": "cat"}]
    cfg = DataConfig(template=r"Topic {question_concept}. {question}\n{options}\nAnswer:")  # as typed in a shell
    out, _ = tokenize_records(datasets.Dataset.from_list(records), tiny_tokenizer, cfg)
    expected = "Topic cat. " + expected_mcqa_prompt(CSQA[0])[len("Question: "):]
    assert out[0]["input_ids"][:out[0]["target_start"]] == tiny_tokenizer(expected)["input_ids"]
    message = tokenize_error(CSQA[:1], tiny_tokenizer, template="{question} {topic}\n{options}")
    assert "record 0" in message and "'topic'" in message and "--template" in message
