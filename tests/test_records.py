"""The run directory's records: which settings a rerun may change, and what a run that never began leaves."""

from omegaconf import OmegaConf

from gsm8k_lora.config import compose_raw
from gsm8k_lora.records import discard_empty_run, training_differences


def resolved(*overrides: str) -> dict:
    """The resolved config a run directory's config.yaml holds, as train compares it on a rerun."""
    return OmegaConf.to_container(compose_raw(["experiment=smoke", *overrides]), resolve=True)


def test_only_settings_that_shape_training_must_match_on_a_rerun():
    old = resolved()
    assert training_differences(old, resolved("eval.limit=3", "logger=none", "report.enabled=false")) == []
    assert training_differences(old, resolved("trainer.learning_rate=0.5")) == [
        f"trainer.learning_rate {old['trainer']['learning_rate']!r} -> 0.5"]
    # accuracy during training can choose the best checkpoint: an eval.* key that must match
    assert [d.split()[0] for d in training_differences(old, resolved("eval.during_training_limit=3"))] == [
        "eval.during_training_limit"]
    # a key only one config has (written by another version of the package) is not compared
    newer = {**old, "trainer": {**old["trainer"], "new_setting": 1}}
    assert training_differences(old, newer) == []


def test_a_directory_holding_no_run_is_removed_and_one_holding_a_run_is_kept(tmp_path):
    empty = tmp_path / "empty"
    (empty / ".hydra").mkdir(parents=True)
    (empty / "failed.json").write_text("{}")
    assert discard_empty_run(empty) and not empty.exists()
    run = tmp_path / "run"
    (run / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-2" / ".complete").write_text("2")
    assert not discard_empty_run(run) and run.exists()
