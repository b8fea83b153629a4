"""The recipe: fine-tune with LoRA on GSM8K and measure what it bought. `python -m gsm8k_lora.train` runs it
(`run`), and `python -m gsm8k_lora.evaluate` its evaluation alone (`evaluate`).

Top to bottom; each step is a call into the folder that holds it (ARCHITECTURE.md):
  1. compose    Hydra composes conf/ and the command line, once                  `train.py`, `cli.py`
  2. validate   the typed schemas and this machine's limits, before anything loads  `config.py`, `preflight.py`
  3. data       GSM8K loaded, cleaned, split; the questions to answer picked     `data/`
  4. model      the weights resolved (hub, directory, GGUF, PyPI copy), loaded   `model/`
  5. trainer    TRL's SFTTrainer from our config (`build_sft_config`)          `training/`
  6. train      resumable, stopped cleanly by a signal, a NaN or OOM            `training/`
  7. evaluate   baseline and fine-tuned answers, generated, graded, recorded    `evaluation/`
  8. report     report.md and plots from the run directory's files alone        `reporting/`
Steps 1 and 2 are the door of the commands; this module is steps 3 to 8. Every file goes to the run directory
through `rundir.RunDirectory`, and every W&B call through `tracking.py`. In a data-parallel run (`parallel.py`)
every process runs every step: each trains its share of a batch and answers its share of the questions, and rank 0
alone writes, logs and reports (the run directory's writers, the tracker and the report are rank 0's).
"""

from __future__ import annotations

import dataclasses

from omegaconf import DictConfig, OmegaConf

from gsm8k_lora import figures as F
from gsm8k_lora import naming, parallel, tracking
from gsm8k_lora.config import Config
from gsm8k_lora.data.formatting import describe_system_prompt
from gsm8k_lora.data.loading import Splits, build_splits, first, questions
from gsm8k_lora.errors import RunStopped
from gsm8k_lora.evaluation import baseline_cache, protocols
from gsm8k_lora.evaluation.answers import evaluate as evaluate_answers
from gsm8k_lora.evaluation.answers import model_note
from gsm8k_lora.evaluation.scoring import summary_lines
from gsm8k_lora.model import kernels, sources
from gsm8k_lora.model.loading import load, load_adapter, resolve_dtype, to_device, weight_memory
from gsm8k_lora.naming import RunNaming
from gsm8k_lora.reporting import plots
from gsm8k_lora.reporting.report import build as build_report
from gsm8k_lora.rundir import RunDirectory, resolve_adapter
from gsm8k_lora.stopping import STOP, Interrupted
from gsm8k_lora.training import sft
from gsm8k_lora.training.callbacks import GSM8KAccuracyCallback
from gsm8k_lora.training.resilience import oom_message


def load_data(cfg: Config) -> tuple[Splits, list[dict]]:
    """Step 3: the splits, and the questions evaluation will answer (data problems surface before the model loads)."""
    splits = build_splits(cfg.data)
    stats = splits.stats
    print(f"data: {stats['rows_train']} train / {stats['rows_validation']} validation / {stats['rows_test']} test "
          f"rows ({stats['rows_dropped_train'] + stats['rows_dropped_test']} malformed rows dropped)")
    return splits, (questions(splits, cfg.eval.split, cfg.eval.limit) if cfg.eval.enabled else [])


def prepare_model(cfg: Config, run_dir: RunDirectory, resolved: dict, scale: dict):
    """Step 4: the weights resolved (fetched or converted first where needed), loaded, recorded with the run's
    config and scale; with the facts `metrics.json` keeps about them, and their identity (the baseline cache's
    key)."""
    weights = sources.resolve(cfg.model, cfg.cache_dir)
    model, tokenizer = load(cfg.model, cfg.cache_dir, use_cpu=cfg.trainer.use_cpu, resolved=weights)
    loaded = {**weights.as_dict(), "hub_kernels": kernels.describe(model, cfg.model.hub_kernels)}
    run_dir.write_record(resolved, loaded, scale)
    facts = weight_memory(model, resolve_dtype(cfg.model.dtype))  # before the adapter: base weights only
    facts["model_weights"] = weights.description
    identity = baseline_cache.weights_identity(weights.path, cfg.model.revision, cfg.model.hub_kernels)
    return model, tokenizer, facts, identity


def build_trainer(cfg: Config, model, tokenizer, splits: Splits, run_dir: RunDirectory, name: str, wandb_callback):
    """Step 5: the trainer, with GSM8K accuracy during training on the first validation questions if asked."""
    extra = [wandb_callback] if wandb_callback is not None else []
    if cfg.eval.during_training:  # before early stopping, which reads the metric it adds
        sample = first(splits.validation, cfg.eval.during_training_limit).to_list()
        extra.append(GSM8KAccuracyCallback(tokenizer, sample, cfg.eval, cfg.data.system_prompt))
    return sft.build_trainer(cfg.trainer, cfg.lora, model, tokenizer, splits, cfg.data.system_prompt,
                             run_dir.path / "checkpoints", name, extra)


def run(cfg: Config, raw_cfg: DictConfig, run_dir: RunDirectory, run_naming: RunNaming) -> dict:
    """One run, steps 3 to 8; returns its figures (metrics.json and eval_metrics.json together)."""
    parallel.start(cfg.trainer.ddp_timeout, cfg.trainer.use_cpu)  # several processes: their group, made once
    run_dir.path.mkdir(parents=True, exist_ok=True)
    splits, asked = load_data(cfg)
    scale = sft.scale_record(cfg.trainer, parallel.scale())
    resolved = OmegaConf.to_container(raw_cfg, resolve=True)
    model, tokenizer, facts, identity = prepare_model(cfg, run_dir, resolved, scale)
    facts["system_prompt"] = describe_system_prompt(tokenizer, cfg.data.system_prompt)
    print(f"model: {facts['model_weights']}; system prompt: {facts['system_prompt']}")
    if scale["processes"] > 1:
        print(f"data-parallel: {parallel.describe(parallel.scale())}, global batch {scale['global_batch']} "
              f"({scale['per_device_train_batch_size']} a process x {scale['gradient_accumulation_steps']} "
              f"accumulated x {scale['processes']} processes)")
    # A run whose training ended and was written (stopped later, while answering) is not trained again.
    finished = run_dir.finished_training() if cfg.trainer.resume == "auto" else None
    name = run_naming.name
    logged = {**resolved, **naming.identifying(cfg, splits.stats["rows_train"], len(asked) or None),
              **naming.scale_keys(scale), **({"setting": run_naming.setting} if run_naming.setting else {})}
    tracker = tracking.start(cfg.logger, run_dir.path, run_naming, logged)
    exit_code = 1
    try:
        if finished is not None:
            print(f"training finished earlier, at step {finished['steps']}: evaluating {run_dir.path / 'adapter'}")
            model = to_device(load_adapter(model, str(run_dir.path / "adapter"), cfg.model.name_or_path),
                              cfg.trainer.use_cpu)
            metrics = finished
        else:
            trainer = build_trainer(cfg, model, tokenizer, splits, run_dir, name, tracker.callback())
            sft.train(trainer, cfg.trainer, run_dir, oom_message(cfg.trainer, cfg.model))
            trainer.save_model(str(run_dir.path / "adapter"))  # the Trainer's own: rank 0 writes
            model, metrics = trainer.model, {**sft.training_metrics(trainer, splits, cfg.trainer), **facts}
            record_training(run_dir, tokenizer, metrics, trainer.state.log_history, name)
        tracker.summary(metrics)
        if cfg.logger.log_adapter and tracker.on:  # before the answers: an adapter is traceable even if they fail
            tracker.adapter(run_dir.path / "adapter", run_dir.path, adapter_metadata(cfg, facts, identity))
        eval_figures = {}
        if asked:  # GSM8K accuracy from generated answers, baseline and fine-tuned on the same questions
            try:
                with STOP.safe_section():
                    eval_figures = answer_and_record(cfg, model, tokenizer, splits, asked, True, identity, run_dir,
                                                     tracker)
            except Interrupted as stop:
                raise RunStopped(f"by {stop.signal_name} while answering the test questions; the training "
                                 f"results are kept (metrics.json, adapter/). Resume with: "
                                 f"{run_dir.resume_command()} (it answers them without training again)",
                                 stop.exit_code) from None
        tracker.results(metrics, eval_figures)
        finish(cfg, model, tokenizer, run_dir, tracker, metrics, eval_figures)
        exit_code = 0
        return {**metrics, **eval_figures}
    finally:
        tracker.finish(exit_code)


@parallel.main_only
def record_training(run_dir: RunDirectory, tokenizer, metrics: dict, history: list[dict], name: str) -> None:
    """What training leaves beside the Trainer's adapter, rank 0's: the tokenizer, the figures, the loss curves."""
    tokenizer.save_pretrained(run_dir.path / "adapter")
    run_dir.write_training(metrics, history, {"loss": plots.loss_curves(history, f"Loss: {name}")})


@parallel.main_only
def finish(cfg: Config, model, tokenizer, run_dir: RunDirectory, tracker: tracking.Tracker, metrics: dict,
           eval_figures: dict) -> None:
    """Step 8, rank 0's: the merged model if asked for, the report from the run directory's files, the summary."""
    if cfg.trainer.save_merged:  # last: merging folds the adapter into the base weights in place
        model.merge_and_unload().save_pretrained(run_dir.path / "merged")
        tokenizer.save_pretrained(run_dir.path / "merged")
    report = None
    if cfg.report.enabled:
        text, report_plots = build_report(run_dir.path, cfg.report.gpu_hour_price_usd)
        report = run_dir.write_report(text, report_plots)
        tracker.images(sorted(run_dir.path.glob("*.png")))
    print_summary(metrics, eval_figures, cfg)
    print(f"run directory: {run_dir.path}" + (f" (report: {report.name})" if report else ""))


def adapter_metadata(cfg: Config, facts: dict, identity: dict) -> dict:
    """What the adapter's W&B artifact says of the base it was trained on: its name, revision, which weights, and a
    hash of their content (`baseline_cache.weights_sha256`)."""
    return {"base_model": cfg.model.name_or_path, "base_model_revision": cfg.model.revision,
            "base_weights": facts["model_weights"],
            "base_weights_sha256": baseline_cache.weights_sha256(identity["path"], cfg.model.revision),
            "trainer_seed": cfg.trainer.seed}


def answer_and_record(cfg: Config, model, tokenizer, splits: Splits, asked: list[dict], adapters: bool,
                      identity: dict, run_dir: RunDirectory, tracker: tracking.Tracker) -> dict:
    """Step 7, for the recipe and the evaluate command alike: the questions answered by the baseline and (with
    `adapters`) the fine-tuned model, graded, written to the run directory and logged; returns eval_metrics.json."""
    predictions, figures = evaluate_answers(cfg.eval, cfg.data.system_prompt, model, tokenizer, splits, asked,
                                            adapters=adapters, weights=identity,
                                            note=model_note(cfg.model.name_or_path))
    run_dir.write_eval(predictions, figures)
    tracker.summary(figures)
    tracker.predictions(predictions)
    return figures


def evaluate(cfg: Config, merged: DictConfig, run_dir: RunDirectory, run_naming: RunNaming) -> dict:
    """`python -m gsm8k_lora.evaluate`: steps 3, 4 and 7 of a run, for a base model or a trained adapter (`merged`:
    the config as evaluated, a run's own with the command line's changes); returns eval_metrics.json."""
    parallel.start(cfg.trainer.ddp_timeout, cfg.trainer.use_cpu)  # several processes share the answers
    adapter = resolve_adapter(cfg.adapter) if cfg.adapter else None
    splits = build_splits(cfg.data)
    asked = questions(splits, cfg.eval.split, cfg.eval.limit)
    weights = sources.resolve(cfg.model, cfg.cache_dir)
    model, tokenizer = load(cfg.model, cfg.cache_dir, resolved=weights)
    if adapter:
        model = load_adapter(model, adapter, cfg.model.name_or_path)
    to_device(model)
    loaded = {**weights.as_dict(), "hub_kernels": kernels.describe(model, cfg.model.hub_kernels)}
    resolved = OmegaConf.to_container(merged, resolve=True)  # the config as evaluated
    scale = sft.scale_record(cfg.trainer, parallel.scale())
    run_dir.write_record(resolved, loaded, scale)
    tracker = tracking.start(cfg.logger, run_dir.path, run_naming,
                             {**resolved, **naming.identifying(cfg, None, len(asked)), **naming.scale_keys(scale)})
    identity = baseline_cache.weights_identity(weights.path, cfg.model.revision, cfg.model.hub_kernels)
    exit_code = 1
    try:
        with STOP.safe_section():  # a signal stops the answers within one decoding step
            figures = answer_and_record(cfg, model, tokenizer, splits, asked, adapter is not None, identity, run_dir,
                                        tracker)
        tracker.results({}, figures)
        exit_code = 0
    finally:
        tracker.finish(exit_code)
    for line in summary_lines(figures, protocols.describe(dataclasses.asdict(cfg.eval), short=True), cfg.eval.split):
        print(line)
    print(f"evaluation written to {run_dir.path} (eval_metrics.json, predictions.jsonl)")
    return figures


def print_summary(metrics: dict, eval_figures: dict, cfg: Config) -> None:
    """The run's last lines: what training did to the loss, then what it did to the answers."""
    def fmt(curve: str, stat: str) -> str:
        value = F.read(metrics, F.curve(curve, stat))
        return "n/a" if value is None else f"{value:.4f}"

    print(f"train loss: first {fmt('train_loss', 'first')} -> last {fmt('train_loss', 'last')}; "
          f"validation loss: first {fmt('eval_loss', 'first')} -> last {fmt('eval_loss', 'last')} "
          f"(best {fmt('eval_loss', 'best')}); stop: {metrics['stop_reason']} at step {metrics['steps']}")
    protocol = protocols.describe(dataclasses.asdict(cfg.eval), short=True)
    for line in summary_lines(eval_figures, protocol, cfg.eval.split):
        print(line)
