"""GSM8K accuracy from generated, graded answers: `python -m gsm8k_lora.evaluate [adapter=RUN_DIR] [overrides]`.

The same questions are answered by the base model (adapter disabled) and the fine-tuned model;
every grading rule gets its accuracy with a 95% Wilson interval, and the pair a difference and an
exact McNemar test (`evaluation/`). Writes `predictions.jsonl` and `eval_metrics.json` to its own directory.
Like `train`, the command's door answers `--help` and config mistakes before the libraries are imported; the
evaluation itself is `evaluation/standalone.py`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import setup_globals
from omegaconf import DictConfig, OmegaConf

from gsm8k_lora import cli, hub, naming, preflight
from gsm8k_lora.config import CONF_DIR, Config, register_configs, validate
from gsm8k_lora.errors import EXPECTED, ConfigError
from gsm8k_lora.evaluation import protocols
from gsm8k_lora.records import resolve_adapter, run_directory
from gsm8k_lora.stopping import STOP, Interrupted, StopNow

# What an evaluation of a run directory takes from the run's own config.yaml unless the command line sets it.
RUN_KEYS = ("model", "data", "eval.prompt", "eval.num_fewshot")


def inherit_run_config(raw: DictConfig, overrides: list[str]) -> DictConfig:
    """Evaluate a run on what it was trained on: its model, data, prompt and system prompt, unless an
    override on the command line names them; an adapter is refused on any other base model."""
    run_dir = run_directory(raw.adapter)
    if run_dir is None:
        return raw
    run = OmegaConf.load(run_dir / "config.yaml")
    given = cli.typed_keys(overrides)
    merged = raw.copy()
    for key in RUN_KEYS:
        if any(g == key or key.startswith(g + ".") for g in given):  # replaced as a whole (model=tiny)
            continue
        OmegaConf.update(merged, key, OmegaConf.select(run, key), merge=True)
        for leaf in (g for g in given if g.startswith(key + ".")):  # model.dtype=...: the run's, but this key
            OmegaConf.update(merged, leaf, OmegaConf.select(raw, leaf), merge=False)
    for key in ("model.name_or_path", "model.gguf_file"):
        ours, theirs = OmegaConf.select(merged, key), OmegaConf.select(run, key)
        if ours != theirs:
            raise ConfigError(f"{key}={ours!r} is invalid: the adapter in {run_dir} was trained on {key}={theirs!r}; "
                              f"drop the model override to evaluate it on its own base model")
    return merged


def checked_config(raw: DictConfig, overrides: list[str]) -> tuple[Config, DictConfig]:
    """The config to evaluate (a run's own where `adapter=` names one), validated, with everything this machine
    cannot do for it said at once (ConfigError)."""
    merged = inherit_run_config(raw, overrides)
    cfg = validate(merged)
    ignored = protocols.get(cfg.eval.prompt).fixed_problem(cli.typed_keys(overrides))
    if ignored:
        raise ConfigError(ignored)
    if cfg.adapter:
        resolve_adapter(cfg.adapter)
    found = preflight.problems(cfg, training=False)
    if found:
        raise ConfigError(preflight.message(found))
    return cfg, merged


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


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(raw: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    STOP.install()
    try:
        cfg, merged = checked_config(raw, overrides)
        from gsm8k_lora.evaluation import standalone  # deferred: the libraries, after the checks (see the top)

        if run_directory(raw.adapter) is not None:
            print(f"evaluate: model, data and prompt from {run_directory(raw.adapter) / 'config.yaml'} "
                  f"(command-line overrides win)")
        what = run_directory(raw.adapter).name if run_directory(raw.adapter) else naming.model_name(
            cfg.model.name_or_path)
        own = naming.run_name([o for o in overrides if not o.startswith("adapter=")], None, "")
        run_naming = naming.RunNaming(f"evaluate {what} {own}".strip(), cfg.logger.group, "evaluate", naming.tags(cfg))
        standalone.run(cfg, merged, Path(hydra_cfg.runtime.output_dir), run_naming)
    except EXPECTED as err:
        cli.fail(err)
    except (Interrupted, StopNow) as stop:
        print(f"{stop} before the answers were graded; no results were written", file=sys.stderr)
        sys.exit(stop.exit_code)
    finally:
        STOP.restore()


if __name__ == "__main__":
    register_configs()  # the schemas must be in Hydra's ConfigStore before it composes
    cli.answer_help(help_text())
    try:
        setup_globals()
        composed = cli.compose(sys.argv[1:])
        for job in composed.jobs if composed else []:
            checked_config(cli.task_config(job), composed.overrides)
        if hub.unreachable_note():
            print(hub.unreachable_note(), file=sys.stderr)
    except EXPECTED as error:
        cli.fail(error)
    main()
