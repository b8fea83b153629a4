"""Fine-tune with LoRA on GSM8K and measure what it bought: `python -m gsm8k_lora.train [overrides]`.

The recipe, top to bottom; each step is a call into the folder that holds it (ARCHITECTURE.md):
  1. compose    Hydra composes conf/ and the command line                        (`main`, `cli.run`)
  2. validate   the typed schemas check every value, before anything loads     `config.py`
  3. data       GSM8K loaded, cleaned, split; the questions to answer picked     `data/`
  4. model      the weights resolved (hub, directory, GGUF, PyPI copy), loaded   `model/`
  5. trainer    TRL's SFTTrainer from our config (`build_sft_config`)          `training/`
  6. train      resumable, stopped cleanly by a signal, a NaN or OOM            `training/`
  7. evaluate   baseline and fine-tuned answers, generated and graded           `evaluation/`
  8. report     report.md and plots from the run directory's files alone        `reporting/`
Every file goes to the run directory through `records.py`, and every W&B call through `tracking.py`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from gsm8k_lora import cli, records, tracking
from gsm8k_lora.config import Config, register_configs, validate
from gsm8k_lora.data.formatting import describe_system_prompt
from gsm8k_lora.data.loading import Splits, build_splits
from gsm8k_lora.errors import EXPECTED, INTERRUPTED, ConfigError, stops_a_sweep
from gsm8k_lora.evaluation.answers import eval_rows, evaluate
from gsm8k_lora.evaluation.scoring import summary_lines
from gsm8k_lora.model import sources
from gsm8k_lora.model.loading import four_bit_device, load, resolve_dtype, weight_memory
from gsm8k_lora.reporting import plots
from gsm8k_lora.reporting.report import build as build_report
from gsm8k_lora.training import sft


def check_hardware(cfg: Config) -> None:
    """Settings this machine cannot run, caught before anything is loaded."""
    cuda = torch.cuda.is_available() and not cfg.trainer.use_cpu
    if cfg.trainer.bf16 and not (cuda and torch.cuda.is_bf16_supported()):
        raise ConfigError("trainer.bf16=True is invalid: this machine has no bf16-capable CUDA GPU; "
                          "use trainer=cpu_smoke or trainer.bf16=false")
    if cfg.trainer.fp16 and not cuda:
        raise ConfigError("trainer.fp16=True is invalid: fp16 mixed precision needs a CUDA GPU")
    if cfg.trainer.tf32 and not cuda:
        raise ConfigError("trainer.tf32=True is invalid: TF32 needs an Ampere or newer CUDA GPU; set it to null")
    if cfg.model.load_in_4bit:
        four_bit_device(cfg.trainer.use_cpu)  # bitsandbytes installed, with kernels for this device


def load_data(cfg: Config) -> tuple[Splits, list[dict]]:
    """Step 3: the splits, and the questions evaluation will answer (data problems surface before the model loads)."""
    splits = build_splits(cfg.data)
    stats = splits.stats
    print(f"data: {stats['rows_train']} train / {stats['rows_validation']} validation / {stats['rows_test']} test "
          f"rows ({stats['rows_dropped_train'] + stats['rows_dropped_test']} malformed rows dropped)")
    return splits, (eval_rows(splits, cfg.eval) if cfg.eval.enabled else [])


def prepare_model(cfg: Config, splits: Splits, run_dir: Path, raw_cfg: DictConfig, main_process: bool):
    """Step 4: the weights resolved (fetched or converted first where needed), recorded, loaded; with the
    facts `metrics.json` keeps about them."""
    weights = sources.resolve(cfg.model, cfg.cache_dir)
    resolved = records.write_run_record(run_dir, raw_cfg, weights.as_dict()) if main_process else {}
    model, tokenizer = load(cfg.model, cfg.cache_dir, use_cpu=cfg.trainer.use_cpu, resolved=weights)
    facts = weight_memory(model, resolve_dtype(cfg.model.dtype))  # before the adapter: base weights only
    facts.update(model_weights=weights.description,
                 rows_validation_loss=len(sft.validation_for_loss(cfg, splits)),
                 system_prompt=describe_system_prompt(tokenizer, cfg.data.system_prompt))
    print(f"model: {weights.description}; system prompt: {facts['system_prompt']}")
    return model, tokenizer, facts, resolved


def run(cfg: Config, raw_cfg: DictConfig, run_dir: Path, name: str, on_stop_now=None) -> dict:
    """One run, steps 3 to 8; returns its figures (metrics.json and eval_metrics.json together).
    `on_stop_now` is called when a second SIGINT/SIGTERM ends training at once."""
    main_process = records.is_main_process()  # data-parallel: every rank trains, rank 0 writes and evaluates
    run_dir.mkdir(parents=True, exist_ok=True)
    splits, questions = load_data(cfg)
    model, tokenizer, facts, resolved = prepare_model(cfg, splits, run_dir, raw_cfg, main_process)
    tracker = tracking.start(cfg.logger, run_dir, name, resolved) if main_process else tracking.Tracker()
    exit_code = 1
    try:
        trainer = sft.build_trainer(cfg, model, tokenizer, splits, run_dir / "checkpoints", name, main_process,
                                    tracker.callback(), on_stop_now)
        sft.train(trainer, cfg, run_dir)
        trainer.save_model(str(run_dir / "adapter"))
        if not main_process:
            exit_code = 0
            return {}
        tokenizer.save_pretrained(run_dir / "adapter")
        metrics = {**sft.training_metrics(trainer, splits, cfg), **facts}
        history = trainer.state.log_history
        records.write_training(run_dir, metrics, history, {"loss": plots.loss_curves(history, f"Loss: {name}")})
        tracker.summary(metrics)
        eval_figures = {}
        if questions:  # GSM8K accuracy from generated answers, baseline and fine-tuned on the same questions
            predictions, eval_figures = evaluate(cfg, trainer.model, tokenizer, splits, questions, adapters=True)
            records.write_eval(run_dir, predictions, eval_figures)
            tracker.summary({k: v for k, v in eval_figures.items() if isinstance(v, (int, float))})
            tracker.predictions(predictions)
            print("\n".join(summary_lines(eval_figures)))
        if cfg.trainer.save_merged:  # last: merging folds the adapter into the base weights in place
            trainer.model.merge_and_unload().save_pretrained(run_dir / "merged")
            tokenizer.save_pretrained(run_dir / "merged")
        if cfg.report.enabled:
            text, figures = build_report(run_dir, cfg.report.gpu_hour_price_usd)
            print(f"report: {records.write_text(run_dir / 'report.md', text)}")
            records.write_figures(run_dir, figures)
            tracker.images(sorted(run_dir.glob("*.png")))
        print_loss_summary(metrics, run_dir)
        exit_code = 0
        return {**metrics, **eval_figures}
    finally:
        tracker.finish(exit_code)


def print_loss_summary(metrics: dict, run_dir: Path) -> None:
    def fmt(key: str) -> str:
        value = metrics.get(key)
        return "n/a" if value is None else f"{value:.4f}"

    print(f"train loss: first {fmt('train_loss_first')} -> last {fmt('train_loss_last')}; "
          f"validation loss: first {fmt('eval_loss_first')} -> last {fmt('eval_loss_last')} "
          f"(best {fmt('eval_loss_best')}); stop: {metrics['stop_reason']} at step {metrics['steps']}")
    print(f"run directory: {run_dir}")


def run_name_from_overrides(overrides: list[str], fallback: str) -> str:
    """W&B run name from the command-line overrides, e.g. 'lora.r=16,trainer.learning_rate=1e-4'."""
    keep = [o for o in overrides if not o.lstrip("+~").startswith("hydra.")]
    return ",".join(keep) if keep else fallback


def stopped_at_once(job_dir: Path) -> str:
    return (f"stopped at once; checkpoints in {job_dir / 'checkpoints'} marked .complete can be resumed with the "
            f"same command and hydra.run.dir={job_dir}")


def main_guarded(cfg: DictConfig) -> float | None:
    """Steps 2 to 8 for one Hydra job; expected failures become one line and a non-zero exit (in a sweep,
    the job is marked failed and Hydra goes on with the others)."""
    hydra_cfg = HydraConfig.get()
    job_dir, overrides = Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    done = records.completed(job_dir, overrides)
    if done is not None:
        print(f"skipping {job_dir}: completed before with the same overrides ({done['objective']}={done['value']})")
        return done["value"]

    def stop_now() -> None:  # a second signal in training, or Ctrl-C outside it: record the stop, say one line
        records.mark_failed(job_dir, overrides, RuntimeError("stopped at once"))
        print(stopped_at_once(job_dir), file=sys.stderr)

    try:
        config = validate(cfg)
        check_hardware(config)
        if multirun and config.logger.group is None:  # one W&B group per sweep: its directory name
            config.logger.group = Path(hydra_cfg.sweep.dir).name
        results = run(config, cfg, job_dir, run_name_from_overrides(overrides, config.experiment_name), stop_now)
    except EXPECTED as err:
        records.mark_failed(job_dir, overrides, err)
        if multirun and not stops_a_sweep(err):  # Hydra marks the job failed and goes on with the others
            raise
        cli.fail(err)
    except KeyboardInterrupt:  # Ctrl-C outside training (loading, evaluating): stop at once, in one line
        stop_now()
        sys.exit(INTERRUPTED)
    except Exception as err:
        records.mark_failed(job_dir, overrides, err)
        raise
    value = results.get(config.objective)
    if records.is_main_process():
        records.mark_done(job_dir, overrides, config.objective, value)
    return value


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    start = time.perf_counter()
    result = main_guarded(cfg)
    print(f"done in {time.perf_counter() - start:.1f}s; config: {OmegaConf.select(cfg, 'experiment_name')}")
    return result


if __name__ == "__main__":
    register_configs()  # the schemas must be in Hydra's ConfigStore before it composes
    cli.run(main)  # step 1, checked first: a config mistake is one line, exit code 2
