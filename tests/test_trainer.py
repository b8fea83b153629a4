"""The trainer a run builds: TRL's SFTTrainer, or without per-step figures (`trainer.step_metrics=false`) its
subclass that reads nothing back to the host in a training step, and trains the same."""

import pytest

from gsm8k_lora.data.loading import build_splits
from gsm8k_lora.training import sft
from tests.conftest import compose, load_tiny

STEPS = ["experiment=smoke", "trainer.max_steps=4", "trainer.logging_steps=2", "trainer.eval_steps=2",
         "trainer.save_steps=2", "trainer.eval_on_start=false", "data.num_train=80", "data.num_test=4"]


def trained(tmp_path, step_metrics: bool) -> tuple[type, list[dict]]:
    cfg = compose(*STEPS, f"trainer.step_metrics={str(step_metrics).lower()}")
    model, tokenizer = load_tiny()
    splits = build_splits(cfg.data)
    trainer = sft.build_trainer(cfg.trainer, cfg.lora, model, tokenizer, splits, None, tmp_path / str(step_metrics),
                                "x", [])
    trainer.train()
    return type(trainer), trainer.state.log_history


@pytest.fixture(scope="module")
def both(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("trainers")
    return trained(tmp, True), trained(tmp, False)


def test_without_step_metrics_the_trainer_trains_the_same(both):
    (loud_class, loud), (quiet_class, quiet) = both
    assert loud_class.__name__ == "SFTTrainer" and quiet_class.__name__ == "QuietSFTTrainer"

    def series(history, key):
        return [row["step"] for row in history if key in row], [row[key] for row in history if key in row]

    for key in ("loss", "eval_loss"):  # the same figures at the same steps
        (steps, values), (loud_steps, loud_values) = series(quiet, key), series(loud, key)
        assert steps == loud_steps and values == pytest.approx(loud_values, rel=1e-5), key
    assert series(quiet, "num_input_tokens_seen") == series(loud, "num_input_tokens_seen") != ([], [])


def test_without_step_metrics_only_the_training_steps_lose_their_token_figures(both):
    (_, loud), (_, quiet) = both
    train_logs = [row for row in quiet if "loss" in row]
    assert train_logs and not any("mean_token_accuracy" in row or "entropy" in row for row in train_logs)
    assert any("mean_token_accuracy" in row for row in loud if "loss" in row)
    # validation keeps TRL's next-token accuracy
    assert [row["eval_mean_token_accuracy"] for row in quiet if "eval_loss" in row] == pytest.approx(
        [row["eval_mean_token_accuracy"] for row in loud if "eval_loss" in row])
