"""Load GSM8K-format data (hub, local files or the seeded generator), check it, split it.

`build_splits`: `load_splits` -> `clean` (drop and count malformed rows) -> `split_train_val` (GSM8K's
test split is never touched). `formatting.py` then puts rows in the model's own chat template.
Every row limit is applied here: `data.train_limit` and `data.val_limit` in `build_splits`, `eval.limit` and
`eval.during_training_limit` in `questions` and `first`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from datasets import Dataset, load_dataset

from gsm8k_lora import hub
from gsm8k_lora.config import DataConfig
from gsm8k_lora.data import synthetic
from gsm8k_lora.data.files import LOCAL_SUFFIXES, gsm8k_rows, local_files, refuse_bad_rows
from gsm8k_lora.data.gsm8k import parse_answer, row_problem
from gsm8k_lora.errors import DataError


@dataclass
class Splits:
    train: Dataset
    validation: Dataset
    test: Dataset
    stats: dict = field(default_factory=dict)  # rows per split and rows dropped, for metrics.json
    pool: Dataset | None = None  # every usable train row, in the published order: lm-eval's shot pool
    validation_loss: Dataset | None = None  # the validation rows the loss is computed on (`data.val_limit`)


def first(ds: Dataset, limit: int | None) -> Dataset:
    """The first `limit` rows (all with None); a limit is an upper bound."""
    return ds if limit is None else ds.select(range(min(limit, len(ds))))


def questions(splits: Splits, split: str, limit: int | None) -> list[dict]:
    """The questions evaluation answers: the first `eval.limit` of the split; an upper bound, as lm-eval's --limit."""
    rows = (splits.test if split == "test" else splits.validation).to_list()
    if limit is not None and limit > len(rows):
        print(f"eval: eval.limit={limit} but the {split} split has {len(rows)} rows: answering all {len(rows)}")
    return rows[:limit] if limit else rows


def shot_pool(splits: Splits, split: str) -> list[dict]:
    """Where few-shot examples come from: GSM8K's whole train split in its published order when the test
    split is answered (what lm-eval draws from); when the validation split is answered, the training part
    only, so no question under test is its own example."""
    return (splits.pool if split == "test" else splits.train).to_list()


def load_local(path: str, max_bad_fraction: float) -> dict[str, list[dict]]:
    """Rows of a directory holding `train*` and `test*` files (jsonl, json or parquet), or of one file; each file
    read and checked by `files.gsm8k_rows` (DataError naming a broken one)."""
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"data.path={path!r} does not exist; give a directory with train/test files "
                        f"({', '.join(LOCAL_SUFFIXES)}) or one such file")
    found = local_files(root)
    if not found["train"]:
        raise DataError(f"data.path={path!r} has no train* file of its own with one of the suffixes "
                        f"{', '.join(LOCAL_SUFFIXES)} (a directory in the hub repository's layout loads with "
                        f"data=gsm8k data.path=DIR)")
    return {split: [row for f in files for row in gsm8k_rows(f, max_bad_fraction)] for split, files in found.items()}


def load_hub(path: str, name: str | None) -> dict[str, list[dict]]:
    """GSM8K from the Hugging Face hub (or a local directory in the hub repository's layout)."""
    if not Path(path).expanduser().exists():
        hub.probe()  # offline: the lookup below fails at once or finds the local cache
    try:
        ds = load_dataset(path, name)
    except Exception as err:  # datasets raises several types for offline / missing / private
        raise DataError(f"cannot load dataset {path!r} (config {name!r}): {type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''}. Offline, use data=synthetic or "
                        f"data=local data.path=DIR") from None
    return {split: ds[split].to_list() for split in ("train", "test") if split in ds}


def load_splits(cfg: DataConfig) -> dict[str, list[dict]]:
    if cfg.source == "synthetic":
        return {"train": synthetic.generate(cfg.num_train, cfg.synthetic_seed),
                "test": synthetic.generate(cfg.num_test, cfg.synthetic_seed + 1)}
    if cfg.source == "local":
        return load_local(cfg.path, cfg.max_bad_fraction)
    return load_hub(cfg.path, cfg.name)


def clean(rows: list[dict], split: str, max_bad_fraction: float) -> tuple[Dataset, Counter]:
    """Keep valid rows with a stable `id`; count the others by reason; fail if too many are bad."""
    kept, dropped = [], Counter()
    for index, row in enumerate(rows):
        problem = row_problem(row)
        if problem is not None:
            dropped[problem] += 1
            continue
        gold = parse_answer(row["answer"])
        kept.append({
            "id": f"{split}-{index}",
            "question": row["question"].strip(),
            "answer": row["answer"].strip(),
            "gold": gold.final,
            "num_steps": gold.num_steps,
            "problem_type": row.get("problem_type") or "",
        })
    refuse_bad_rows(dropped, len(rows), max_bad_fraction, f"{split} split")
    if rows and not kept:
        raise DataError(f"{split} split is empty after dropping {sum(dropped.values())} malformed rows")
    empty = {key: [] for key in ("id", "question", "answer", "gold", "num_steps", "problem_type")}
    return (Dataset.from_list(kept) if kept else Dataset.from_dict(empty)), dropped


def split_train_val(train: Dataset, val_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    parts = train.train_test_split(test_size=val_fraction, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def build_splits(cfg: DataConfig) -> Splits:
    raw = load_splits(cfg)
    train_all, dropped_train = clean(raw.get("train", []), "train", cfg.max_bad_fraction)
    if len(train_all) < 2:
        raise DataError(f"train split has {len(train_all)} usable rows; need at least 2 to split off validation")
    test, dropped_test = clean(raw.get("test", []), "test", cfg.max_bad_fraction)
    train, validation = split_train_val(train_all, cfg.val_fraction, cfg.split_seed)
    train = first(train, cfg.train_limit)
    # the validation loss during training on the first `data.val_limit` rows of the (shuffled) split, so its
    # cost is bounded on a CPU; all of them by default
    validation_loss = first(validation, cfg.val_limit)
    stats = {
        "rows_train": len(train), "rows_validation": len(validation), "rows_test": len(test),
        "rows_dropped_train": sum(dropped_train.values()), "rows_dropped_test": sum(dropped_test.values()),
        "dropped_reasons": dict(dropped_train + dropped_test), "rows_validation_loss": len(validation_loss),
    }
    return Splits(train=train, validation=validation, test=test, stats=stats, pool=train_all,
                  validation_loss=validation_loss)
