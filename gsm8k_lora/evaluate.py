"""GSM8K accuracy from generated, graded answers: `python -m gsm8k_lora.evaluate [adapter=RUN_DIR] [overrides]`.

The same questions are answered by the base model (adapter disabled) and the fine-tuned model;
every grading rule gets its accuracy with a 95% Wilson interval, and the pair a difference and an
exact McNemar test (`evaluation/`). Writes `predictions.jsonl` and `eval_metrics.json` to its own directory.
Like `train`, the command's door composes once and answers `--help` and config mistakes before the libraries are
imported; the job is the recipe's evaluation (`recipe.evaluate`).
"""

from __future__ import annotations

import sys
from datetime import datetime
from functools import partial
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from gsm8k_lora import cli, failures, naming, parallel
from gsm8k_lora import figures as F
from gsm8k_lora.config import CONF_DIR, Config, register_configs
from gsm8k_lora.errors import EXPECTED, ConfigError, fail
from gsm8k_lora.rundir import RunDirectory, run_directory
from gsm8k_lora.stopping import STOP, Interrupted, StopNow


def help_text() -> str:
    options = cli.group_options(CONF_DIR)
    return "\n".join([
        "usage: python -m gsm8k_lora.evaluate [adapter=RUN_DIR] [group=option ...] [key=value ...]",
        "",
        "Answers GSM8K questions with a model and grades the answers (by-value, and lm-eval's strict-match and",
        "flexible-extract), each accuracy with a 95% interval. With adapter=, the base model (adapter disabled) and",
        "the fine-tuned one answer the same questions, and a paired McNemar test compares them.",
        "",
        "  adapter=outputs/runs/RUN        a run directory (or its adapter/): its own model, data, prompt and system",
        "                                  prompt are used unless the command line overrides them",
        "  model=smollm2_135m              a base model alone (options: " + ", ".join(options["model"]) + ")",
        "  eval.prompt=lm_eval_gsm8k_plain the protocol (zero_shot_cot, fewshot, lm_eval_gsm8k, lm_eval_gsm8k_plain)",
        "  eval.limit=100                  answer the first 100 questions (all 1,319 by default)",
        "  eval.num_samples=8 eval.temperature=0.7   self-consistency: maj@8 and pass@8",
        "  eval.split=validation           questions from the validation split instead of the test split",
        "",
        "It writes eval_metrics.json and predictions.jsonl to its own directory (hydra.run.dir=...).",
        "every key and its value: --cfg job;  Hydra's own help: --hydra-help",
    ])


def job(raw: DictConfig, checked: tuple[Config, DictConfig] | None = None) -> None:
    """One Hydra job: the evaluation in its directory. A single run comes checked from the door; a sweep's job
    checks its own config. Under a launcher every rank answers its share, and a failure ends them as one run
    (`failures.job`)."""
    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    run_dir = RunDirectory(Path(hydra_cfg.runtime.output_dir), overrides,
                           parallel.command_line("gsm8k_lora.evaluate", sys.argv[1:]))
    if parallel.distributed():
        with failures.job(run_dir, multirun=False):
            evaluate(raw, checked, overrides, run_dir)
        return
    STOP.install()
    try:
        evaluate(raw, checked, overrides, run_dir)
    except EXPECTED as err:
        fail(err)
    except (Interrupted, StopNow) as stop:
        print(f"{stop} before the answers were graded; no results were written", file=sys.stderr)
        sys.exit(stop.exit_code)
    finally:
        STOP.restore()


def evaluate(raw: DictConfig, checked: tuple[Config, DictConfig] | None, overrides: list[str],
             run_dir: RunDirectory) -> None:
    cfg, merged = checked or cli.check_evaluation(raw, overrides)
    from gsm8k_lora import recipe  # deferred: the libraries, after the checks (see the top)

    source = run_directory(raw.adapter)
    if source is not None:
        print(f"evaluate: model, data and prompt from {source / 'config.yaml'} (command-line overrides win)")
    what = source.name if source else naming.model_name(cfg.model.name_or_path)
    own = naming.run_name([o for o in overrides if not o.startswith("adapter=")], None, "")
    run_naming = naming.RunNaming(f"evaluate {what} {own}".strip(), cfg.logger.group, "evaluate", naming.tags(cfg))
    started = datetime.now()
    figures = recipe.evaluate(cfg, merged, run_dir, run_naming)
    headline = F.figure("finetuned" if cfg.adapter else "baseline", F.headline(F.sampled_k(figures)))
    run_dir.mark_done(headline, F.read(figures, headline), started)  # a sweep of evaluations counts it done


def checked_job(composed: cli.Composed):
    """A single evaluation, checked before anything loads: its config and files, and a directory of its own (the
    run it evaluates keeps its files as they are)."""
    checked = cli.check_evaluation(composed.task, composed.overrides)
    source = run_directory(checked[0].adapter)
    if source is not None and source.resolve() == composed.run_dir.resolve():
        raise ConfigError(f"hydra.run.dir={composed.run_dir} is invalid: it is the run being evaluated, whose files "
                          f"the evaluation would replace; give the evaluation a directory of its own")
    return partial(job, checked=checked)


if __name__ == "__main__":
    register_configs()  # the schemas must be in Hydra's ConfigStore before it composes
    cli.command(sys.argv[1:], help_text(), job, checked_job)
