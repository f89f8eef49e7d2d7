"""Data users already have: UltraFeedback-binarized pairs, ShareGPT and Alpaca demonstrations, tool turns, splits
of a DatasetDict and of a directory of parquet files, dataset names (offline); their broken variants name
file:row: field; and they pass `rlhf data check` and train."""

from __future__ import annotations

import json
from typing import Any

import pytest

from rlhf.cli import main
from rlhf.data import DataError, load_records, parse_row

QUESTION = "sort: cab"


def ultrafeedback(answer: str = "abc", worse: str = "ab", prompt: str = QUESTION) -> dict[str, Any]:
    """A row as HuggingFaceH4/ultrafeedback_binarized has it: chosen/rejected repeat the user turn."""
    user = {"role": "user", "content": QUESTION}
    return {
        "prompt": prompt,
        "chosen": [user, {"role": "assistant", "content": answer}],
        "rejected": [user, {"role": "assistant", "content": worse}],
        "score_chosen": 8.0,
    }


def sharegpt(answer: str = "abc") -> dict[str, Any]:
    return {"conversations": [{"from": "system", "value": ""}, {"from": "human", "value": QUESTION},
                              {"from": "gpt", "value": answer}]}  # fmt: skip


def error(kind: str, row: dict[str, Any]) -> str:
    with pytest.raises(DataError) as info:
        parse_row(row, kind, source="uf.jsonl", row=4)
    return str(info.value)


def test_ultrafeedback_rows_become_prompt_chosen_rejected():
    record = parse_row(ultrafeedback(), "preference")
    assert record.prompt == [{"role": "user", "content": QUESTION}]
    assert record.chosen == [{"role": "assistant", "content": "abc"}]
    assert record.rejected == [{"role": "assistant", "content": "ab"}]
    assert record.extra == {"score_chosen": 8.0} and "UltraFeedback" in record.format
    assert error("preference", ultrafeedback(prompt="sort: xyz")).startswith(
        "uf.jsonl:4: prompt: does not match the conversations' last user turn"
    )
    broken = ultrafeedback()
    broken["rejected"] = "ab"
    assert error("preference", broken) == "uf.jsonl:4: rejected: expected a message list like chosen, got a string"
    broken = ultrafeedback()
    broken["rejected"][0] = {"role": "user", "content": "sort: other"}
    assert error("preference", broken).startswith("uf.jsonl:4: rejected: must share every message but the last")


def test_sharegpt_and_alpaca_rows_become_sft_records():
    record = parse_row(sharegpt(), "sft")
    assert record.prompt == [{"role": "system", "content": ""}, {"role": "user", "content": QUESTION}]
    assert record.completion == [{"role": "assistant", "content": "abc"}] and record.format == "sharegpt"
    alpaca = parse_row({"instruction": "Sort the letters.", "input": "cab", "output": "abc", "id": 3}, "sft")
    assert (alpaca.prompt, alpaca.completion, alpaca.extra) == ("Sort the letters.\n\ncab", "abc", {"id": 3})
    assert parse_row({"instruction": "Say hi.", "input": "", "output": "hi"}, "sft").prompt == "Say hi."

    bad = sharegpt()
    bad["conversations"][1]["from"] = "robot"
    assert error("sft", bad).startswith("uf.jsonl:4: conversations[1].from: unknown speaker 'robot' (expected one of")
    bad = sharegpt()
    del bad["conversations"][2]["value"]
    assert error("sft", bad) == "uf.jsonl:4: conversations[2].value: missing field"
    assert error("sft", {"instruction": "Sort."}) == "uf.jsonl:4: output: missing field"


def test_tool_turns_are_context_never_the_answer():
    call = {"role": "assistant", "content": '{"tool": "sort", "args": "cab"}'}
    result = {"role": "tool", "content": "abc"}
    messages = [{"role": "user", "content": QUESTION}, call, result, {"role": "assistant", "content": "abc"}]
    assert parse_row({"messages": messages}, "sft").prompt[2] == result
    assert error("sft", {"messages": messages[:3]}) == (
        "uf.jsonl:4: messages[2].role: the last message must be the assistant's response"
    )


def test_splits_of_a_dataset_dict_and_of_a_parquet_directory(tmp_path):
    import datasets

    rows = [ultrafeedback(), ultrafeedback("abc", "ba")]
    splits = {"train_prefs": datasets.Dataset.from_list(rows), "test_prefs": datasets.Dataset.from_list(rows[:1])}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "saved"))
    assert len(load_records(f"{tmp_path / 'saved'}:train_prefs", "preference")[0]) == 2
    assert len(load_records(f"{tmp_path / 'saved'}:test_prefs", "preference")[0]) == 1
    with pytest.raises(
        DataError, match=r"no split 'train' \(splits: train_prefs, test_prefs\); pick one as PATH:SPLIT"
    ):
        load_records(tmp_path / "saved", "preference")

    hub = tmp_path / "hub_layout" / "data"  # as a dataset repository downloaded from the hub is laid out
    hub.mkdir(parents=True)
    for name, ds in splits.items():
        ds.to_parquet(str(hub / f"{name}-00000-of-00001.parquet"))
    records, _ = load_records(f"{tmp_path / 'hub_layout'}:test_prefs", "preference")
    assert len(records) == 1 and records[0].chosen == [{"role": "assistant", "content": "abc"}]
    with pytest.raises(DataError, match="a single file has no splits"):
        load_records(f"{hub / 'train_prefs-00000-of-00001.parquet'}:train", "preference")


def test_a_dataset_name_is_only_read_from_the_local_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("RLHF_ALLOW_HUB", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(DataError) as info:
        load_records("someorg/somedata:train_prefs", "preference")
    assert str(info.value) == (
        "someorg/somedata:train_prefs: no such file or directory, and no dataset 'someorg/somedata' in the local "
        "datasets cache (nothing is downloaded unless RLHF_ALLOW_HUB=1 is set)"
    )


def test_the_new_shapes_pass_data_check_and_train(tiny_dirs, tmp_path, capsys):
    """`rlhf data check` accepts ShareGPT and UltraFeedback files; a DPO run trains on the UltraFeedback one."""
    uf = tmp_path / "uf.jsonl"
    uf.write_text("".join(json.dumps(ultrafeedback("abc", w)) + "\n" for w in ("ab", "ba", "cab", "a", "bac", "c")))
    sg = tmp_path / "sg.jsonl"
    sg.write_text("".join(json.dumps(sharegpt(a)) + "\n" for a in ("abc", "ab")))
    assert main(["data", "check", str(uf), "--kind", "preference", "--tokenizer", tiny_dirs["llama"]]) == 0
    assert main(["data", "check", str(sg), "--kind", "sft"]) == 0
    assert "6 rows" in capsys.readouterr().out
    argv = ["train", "dpo", f"--output_dir={tmp_path / 'dpo'}", f"--model.path={tiny_dirs['llama']}",
            f"--data.train={uf}", "--train.batch_size=2", "--train.micro_batch_size=2", "--train.max_steps=2",
            "--logging.progress=false"]  # fmt: skip
    assert main(argv) == 0 and (tmp_path / "dpo" / "final" / "model.safetensors").is_file()
