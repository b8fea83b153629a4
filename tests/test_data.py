"""Loading, cleaning, splitting and formatting GSM8K-format data."""

import pytest
from datasets import Dataset

from gsm8k_lora.data import loading as data
from gsm8k_lora.data.formatting import to_prompt_completion
from gsm8k_lora.data.gsm8k import parse_answer
from gsm8k_lora.data.synthetic import generate
from tests.conftest import compose, load_tiny, run_cli, write_jsonl

GOOD = {"question": "Tom has 2 apples and gets 3. How many?", "answer": "2+3=<<2+3=5>>5\n#### 5"}


def test_local_jsonl_directory(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", generate(50, 0))
    write_jsonl(tmp_path / "test.jsonl", generate(10, 1))
    splits = data.build_splits(compose("data=local", f"data.path={tmp_path}").data)
    assert (splits.stats["rows_train"], splits.stats["rows_validation"], splits.stats["rows_test"]) == (45, 5, 10)
    assert splits.test[0]["gold"] == parse_answer(generate(10, 1)[0]["answer"]).final


def test_local_parquet_in_the_hub_layout_loads_through_load_dataset(tmp_path):
    """The hub repo openai/gsm8k holds main/{train,test}-*.parquet and a README declaring the configs."""
    (tmp_path / "main").mkdir()
    Dataset.from_list(generate(40, 0)).to_parquet(str(tmp_path / "main" / "train-00000-of-00001.parquet"))
    Dataset.from_list(generate(8, 1)).to_parquet(str(tmp_path / "main" / "test-00000-of-00001.parquet"))
    (tmp_path / "README.md").write_text(
        "---\nconfigs:\n- config_name: main\n  data_files:\n  - split: train\n    path: main/train-*\n"
        "  - split: test\n    path: main/test-*\n---\n")
    splits = data.build_splits(compose(f"data.path={tmp_path}").data)
    assert (splits.stats["rows_train"] + splits.stats["rows_validation"], splits.stats["rows_test"]) == (40, 8)
    # data=local reads the directory's own train*/test* files only: none here, and it says where to go
    with pytest.raises(data.DataError, match="data=gsm8k data.path="):
        data.build_splits(compose("data=local", f"data.path={tmp_path}").data)


def test_unreachable_hub_dataset_suggests_offline_options():
    with pytest.raises(data.DataError, match="data=synthetic or data=local"):
        data.load_hub("no-such-org/no-such-dataset-xyz", "main")



def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(data.DataError, match="does not exist"):
        data.load_local(str(tmp_path / "nope"), 0.0)


def test_bad_rows_are_dropped_counted_and_bounded():
    rows = [GOOD] * 98 + [{"question": "", "answer": "#### 1"}, {"question": "q", "answer": "no number"}]
    kept, dropped = data.clean(rows, "train", max_bad_fraction=0.05)
    assert len(kept) == 98 and sum(dropped.values()) == 2
    with pytest.raises(data.DataError, match="2 of 100 rows are not GSM8K rows"):
        data.clean(rows, "train", max_bad_fraction=0.01)
    with pytest.raises(data.DataError, match="malformed"):
        data.clean([{"question": "", "answer": ""}], "train", max_bad_fraction=1.0)


def test_split_is_90_10_disjoint_and_seed_stable():
    cfg = compose("data=synthetic", "data.num_train=500", "data.num_test=20").data
    a, b = data.build_splits(cfg), data.build_splits(cfg)
    assert (len(a.train), len(a.validation)) == (450, 50)
    assert set(a.train["id"]).isdisjoint(a.validation["id"])
    assert a.validation["id"] == b.validation["id"]
    other = data.build_splits(
        compose("data=synthetic", "data.num_train=500", "data.num_test=20", "data.split_seed=7").data)
    assert other.validation["id"] != a.validation["id"]
    # the test split is the test source's rows, and none of them is trained or validated on (by content)
    source_test = {(r["question"], r["answer"]) for r in generate(20, seed=1)}
    assert {(r["question"], r["answer"]) for r in a.test.to_list()} == source_test
    seen = [(r["question"], r["answer"]) for split in (a.train, a.validation) for r in split.to_list()]
    assert not source_test & set(seen) and not {q for q, _ in source_test} & {q for q, _ in seen}


def test_prompt_uses_the_chat_template_and_completion_is_the_solution(tiny_tokenizer):
    tok = tiny_tokenizer
    ds = Dataset.from_list([{"question": GOOD["question"], "answer": GOOD["answer"]}])
    row = to_prompt_completion(ds, tok, "Solve it.")[0]
    assert row["prompt"] == f"<|system|>\nSolve it.\n<|user|>\n{GOOD['question']}\n<|assistant|>\n"
    assert row["completion"] == GOOD["answer"]


def test_completion_only_labels_mask_the_prompt_and_train_the_eos(tiny_model_dir, tmp_path):
    """What TRL makes of our rows: prompt tokens masked, solution and EOS trained."""
    from trl import SFTTrainer

    from gsm8k_lora.training.sft import build_lora_config, build_sft_config

    model, tok = load_tiny()
    ds = to_prompt_completion(Dataset.from_list([GOOD] * 4), tok, None)
    cfg = compose("experiment=smoke", "trainer.early_stopping_patience=null")
    args = build_sft_config(cfg.trainer, tmp_path, "t")
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, eval_dataset=ds, processing_class=tok,
                         peft_config=build_lora_config(cfg.lora))
    row = trainer.train_dataset[0]
    prompt_ids = tok(ds[0]["prompt"])["input_ids"]
    ids, labels = row["input_ids"], row["labels"]
    assert ids[: len(prompt_ids)] == prompt_ids
    assert all(label == -100 for label in labels[: len(prompt_ids)])
    assert labels[len(prompt_ids):] == ids[len(prompt_ids):]
    assert ids[-1] == tok.eos_token_id and labels[-1] == tok.eos_token_id
    assert tok.decode(ids[len(prompt_ids):-1]) == GOOD["answer"]


def test_malformed_json_line_is_reported_with_file_and_line(tmp_path):
    data_dir = tmp_path / "data"
    write_jsonl(data_dir / "train.jsonl", [{"question": "q", "answer": "a\n#### 1"}] * 20)
    with (data_dir / "train.jsonl").open("a") as handle:
        handle.write("{not json\n")
    proc = run_cli("train", "experiment=smoke", "logger=none", "data=local", f"data.path={data_dir}",
                   f"hydra.run.dir={tmp_path / 'run'}", timeout=180)
    assert proc.returncode == 1 and "train.jsonl:21: malformed JSON" in proc.stderr
    assert not (tmp_path / "run").exists()  # the run never began: it leaves no directory behind
