"""Weights & Biases: the one module that talks to it.

W&B never needs an account here: with no API key configured the run logs offline (files that
`wandb sync` uploads later), and any failure to start falls back to offline with one line saying so.
A failure mid-run turns W&B off with one line, never the training: the run directory keeps every figure.
No key or token is ever written: the run directory holds the resolved config, not the environment.
The recipe holds one `Tracker` and hands it what to log; with `logger=none` (or on a rank other than 0)
the tracker is off and each call does nothing.

What a dashboard gets from a run (`naming.py` says how it is named and grouped):
- config: the resolved config once (nested), and the flat identifying settings beside it; transformers' own
  dump of every TrainingArguments field and the model config is not added (`safe_wandb_callback`);
- metrics: the live curves (`train/*`, `eval/*`), and the headline figures once, as metrics in their own
  section (`results/...`, named as in eval_metrics.json and metrics.json) so default panels draw them;
- summary: numbers only; text and local paths stay in the run directory.
- artifact: the trained adapter with its tokenizer (`adapter`, type `model`; `logger.log_adapter`), with the base
  model's name, revision and weights hash as metadata; one collection per sweep (a version per job, named by
  `naming.adapter_artifact`), so that the sweep's best can carry the alias `best`.
A sweep ends with a summary run in its group (`log_sweep_summary`): the comparison's table and plots, what it
concludes (the run's notes, and numbers in its summary), the alias `best` on the best job's adapter, and a saved
dashboard view built with wandb-workspaces (`sweep_view`).
"""

from __future__ import annotations

import json
import netrc
import os
import sys
from pathlib import Path

from gsm8k_lora import figures as F
from gsm8k_lora import naming, parallel
from gsm8k_lora.config import LoggerConfig
from gsm8k_lora.naming import RunNaming
from gsm8k_lora.rundir import WANDB_RUN, read_json, write_json, write_text


def _wandb():
    """wandb, imported where a run logs to it: with logger=none the package runs where wandb is not installed (a
    lent GPU machine's image lacks it, and its 20 MB wheel would take a third of what one call there may carry)."""
    import wandb

    return wandb


RESULTS = "results"  # the section of the headline figures on the dashboard
VIEW_SPEC = "wandb_view.json"  # a sweep's dashboard view, written where it cannot be saved
# The figures transformers' W&B callback already puts in the summary (train_runtime, ...): not added twice.
LIBRARY_SUMMARY = ("train_runtime_s", "train_samples_per_s")


def has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(cfg: LoggerConfig) -> str:
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "online"):
        return os.environ["WANDB_MODE"]
    if cfg.mode != "auto":
        return cfg.mode
    return "online" if has_wandb_key() else "offline"


class Tracker:
    """One W&B run, or none (`run is None`): every method is then a no-op."""

    def __init__(self, run=None):
        self.run = run

    @property
    def on(self) -> bool:
        return self.run is not None

    def callback(self):
        """transformers' W&B callback for the Trainer, guarded (`safe_wandb_callback`); None when off."""
        return safe_wandb_callback() if self.run is not None else None

    def summary(self, figures: dict) -> None:
        """Numbers only (text, such as which weights were used, and local paths stay in the run directory); the
        headline figures go to `results/` instead (`results`), so each figure has one key."""
        if self.run is not None:
            self.run.summary.update({k: v for k, v in figures.items() if isinstance(v, (int, float))
                                     and not isinstance(v, bool) and k not in LIBRARY_SUMMARY and not F.is_result(k)})

    def results(self, metrics: dict, eval_figures: dict) -> None:
        """The headline figures, logged once as metrics in their own section (and so in the summary)."""
        if self.run is not None:
            self.run.log({f"{RESULTS}/{k}": v for k, v in headline_figures(metrics, eval_figures).items()})

    def predictions(self, predictions: dict[str, list[dict]]) -> None:
        if self.run is not None:
            rows = [[r[c] for c in F.PREDICTION_TABLE] for answers in predictions.values() for r in answers]
            self.run.log({"eval/predictions": _wandb().Table(columns=list(F.PREDICTION_TABLE), data=rows)})

    def adapter(self, directory: Path, run_dir: Path, metadata: dict) -> None:
        """The trained adapter and its tokenizer (`directory`) as a W&B artifact; its name, digest and metadata go
        to wandb_run.json, from which the sweep's summary run aliases the best (`alias_best`). Offline, W&B keeps
        a copy of the files in its staging directory for `wandb sync`."""
        if self.run is None:
            return
        name = naming.adapter_artifact(self.run.group or None, self.run.id)
        try:
            logged = self.run.log_artifact(_adapter_artifact(name, directory, metadata))
        except Exception as err:  # W&B's trouble never ends a run: the adapter is in the run directory
            print(f"W&B could not log the adapter ({type(err).__name__}: {err}); the run goes on, and {directory} "
                  f"holds it", file=sys.stderr)
            return
        record = read_json(run_dir / WANDB_RUN)
        write_json(run_dir / WANDB_RUN, {**record, "artifact": {"name": name, "digest": logged.digest,
                                                                 "metadata": metadata}})

    def images(self, paths: list[Path]) -> None:
        if self.run is not None:
            self.run.log({f"plots/{p.stem}": _wandb().Image(str(p)) for p in paths})

    def finish(self, exit_code: int = 0) -> None:
        # Hydra runs multirun jobs in one process: an unfinished run would swallow the next job's logs.
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None


# The Trainer's pickled TrainingArguments: local paths, and a pickle is code to whoever loads it; config.yaml in the
# run directory says the same settings as text.
NOT_IN_ARTIFACT = ("training_args.bin",)


def _adapter_artifact(name: str, directory: Path, metadata: dict):
    artifact = _wandb().Artifact(name, type="model", metadata=metadata,
                                 description="a LoRA adapter (PEFT) and its tokenizer; metadata: its base model")
    for file in sorted(directory.iterdir()):
        if file.is_file() and file.name not in NOT_IN_ARTIFACT:
            artifact.add_file(str(file), name=file.name)
    return artifact


def headline_figures(metrics: dict, eval_figures: dict) -> dict:
    return {k: v for k, v in {**metrics, **eval_figures}.items()
            if F.is_result(k) and isinstance(v, (int, float)) and not isinstance(v, bool)}


def start(cfg: LoggerConfig, run_dir: Path, naming: RunNaming, config: dict) -> Tracker:
    """Start a W&B run (a tracker that is off when logging is off); fall back to offline if online fails. A run
    resumed in its directory continues its W&B run (same id) rather than starting a second one."""
    if cfg.backend != "wandb" or not parallel.is_main_process():  # several processes: rank 0's run only
        return Tracker()
    mode = resolve_mode(cfg)
    if mode == "offline":
        quiet_offline()
    earlier = read_json(run_dir / WANDB_RUN).get("id")
    kwargs = dict(project=cfg.project, entity=cfg.entity, group=naming.group, job_type=naming.job_type,
                  tags=naming.tags, name=naming.name, config=config, dir=str(run_dir), reinit="finish_previous",
                  **({"id": earlier, "resume": "allow"} if earlier else {}))
    try:
        run = _wandb().init(mode=mode, settings=_settings(cfg), **kwargs)
    except Exception as err:  # bad key, no network, server error: the training result must not depend on W&B
        if mode != "online":
            raise
        print(f"W&B online start failed ({type(err).__name__}); logging offline instead", file=sys.stderr)
        mode = "offline"
        quiet_offline()
        run = _wandb().init(mode=mode, settings=_settings(cfg), **kwargs)
    sync = f"wandb sync {Path(run.dir).parent}"
    if mode == "offline":
        print(f"W&B is logging offline to {run.dir}; upload later with: {sync}")
    else:
        print(f"W&B run: {run.url}")
    online = mode == "online"
    write_json(run_dir / WANDB_RUN, {"id": run.id, "mode": mode, "name": naming.name,
                                                     "group": naming.group, "url": run.url if online else None,
                                                     "sync": None if online else sync})
    return Tracker(run)


def _settings(cfg: LoggerConfig):
    # silent: W&B's own banner (syncing mode, local directory, `wandb leet`) would stand beside the package's one
    # line that says where the run logs and how to sync it
    return _wandb().Settings(init_timeout=cfg.init_timeout_s, silent=True)


def quiet_offline() -> None:
    """Offline, W&B warns "URL not available in offline run" each time anything asks for the run's URL (TRL's
    model card does, at every checkpoint), a line a user can do nothing about; the package already said the
    run is offline and how to sync it. W&B's terminal warnings are a process setting (`wandb.setup`): off
    for an offline run, so they are not shown."""
    _wandb().setup(_wandb().Settings(show_warnings=False, quiet=True))


def safe_wandb_callback():
    """transformers' WandbCallback, except that a W&B failure mid-run (service crash, lost network, quota)
    turns W&B logging off with one line instead of ending the training, and that its setup adds nothing to
    the run's config: `tracking.start` logged the resolved config and the identifying settings, and the
    library's dump of every TrainingArguments field and the model config (~170 flat keys) would say each
    setting a second time under another name."""
    # Imported here, not at the top: transformers' W&B integration prints "[INFO] Running in WANDB offline
    # mode" to stdout when it is imported, which would land in the output of every command (`--cfg`, `--help`).
    from transformers.integrations import WandbCallback

    class SafeWandbCallback(WandbCallback):
        failed = False

        def setup(self, args, state, model, **kwargs):
            self._initialized = True
            if state.is_world_process_zero:  # as the library does: curves against the optimizer step
                self._wandb.define_metric("train/global_step")
                self._wandb.define_metric("*", step_metric="train/global_step", step_sync=True)

    for name in ("setup", "on_train_begin", "on_train_end", "on_log", "on_save", "on_predict"):
        setattr(SafeWandbCallback, name, _guarded(getattr(SafeWandbCallback, name)))
    return SafeWandbCallback()


def _guarded(original):
    def method(self, *args, **kwargs):
        if self.failed:
            return None
        try:
            return original(self, *args, **kwargs)
        except Exception as err:
            self.failed = True
            print(f"W&B failed ({type(err).__name__}: {err}); training goes on without W&B, and the run "
                  f"directory keeps every figure", file=sys.stderr)
            return None

    return method


def log_sweep_summary(cfg: LoggerConfig, sweep_dir: Path, sweep: dict, comparison, plots: list[Path]) -> None:
    """The sweep's summary run in its group: the comparison's rows as a W&B Table, its plots, what it concludes (the
    run's notes; numbers in its summary), the alias `best` on the best job's adapter; then its dashboard view.
    Nothing with logger=none."""
    if cfg.backend != "wandb":
        return
    mode = resolve_mode(cfg)
    if mode == "offline":
        quiet_offline()
    name = f"{sweep.get('name', sweep_dir.name)} summary"
    group = sweep.get("group") or sweep_dir.name
    init = dict(project=cfg.project, entity=cfg.entity, group=group, job_type="sweep_summary", name=name,
                tags=list(cfg.tags), dir=str(sweep_dir), reinit="finish_previous", notes=comparison.conclusion,
                config={"sweep": sweep.get("name"), "swept": comparison.swept, "jobs": len(comparison.rows)})
    try:
        run = _wandb().init(mode=mode, settings=_settings(cfg), **init)
    except Exception as err:  # the comparison is on disk either way
        print(f"W&B summary run not started ({type(err).__name__}); the comparison is in {sweep_dir}", file=sys.stderr)
        return
    columns = comparison.columns
    table = _wandb().Table(columns=columns, data=[[_cell(row[c]) for c in columns] for row in comparison.table])
    run.log({"sweep/jobs": table, **{f"sweep/{p.stem}": _wandb().Image(str(p)) for p in plots}})
    run.summary.update({"sweep/jobs_done": sum(r["status"] == "done" for r in comparison.rows),
                        "sweep/jobs_failed": sum(r["status"] != "done" for r in comparison.rows),
                        **comparison.summary_figures})
    if cfg.log_adapter:
        alias_best(run, comparison)
    online = mode == "online"
    url = run.url if online else None
    run.finish()
    print(f"W&B sweep summary: {url}" if online else
          f"W&B sweep summary logged offline; upload later with: wandb sync {Path(run.dir).parent}")
    save_view(cfg, sweep_dir, group, comparison.swept, online)


def alias_best(run, comparison) -> None:
    """The alias `best` on the adapter of each protocol's best job. Offline runs can neither use nor link an
    artifact (wandb 0.31: `use_artifact` raises TypeError, `link_artifact` NotImplementedError), so the summary run
    logs the same files again under the same name: W&B checks a logged artifact's contents, and the same contents
    are the same version (the digest below equals the job's), which gets the alias when synced."""
    for name, ranked in comparison.rankings.items():
        job = comparison.best_job(name)
        if job is None:
            if ranked.tied:
                print(f"W&B: no adapter aliased `best` ({name}): {', '.join(ranked.top)} tie")
            continue
        logged = read_json(Path(job["dir"]) / WANDB_RUN).get("artifact")
        if not logged or not (Path(job["dir"]) / "adapter").is_dir():
            continue
        artifact = _adapter_artifact(logged["name"], Path(job["dir"]) / "adapter", logged["metadata"])
        run.log_artifact(artifact, aliases=["best"])
        print(f"W&B: the adapter of job {job['job']} ({job['setting']}) is {logged['name']}:best")


def _cell(value):
    return value if value is None or isinstance(value, (int, float, str)) else str(value)


def sweep_view(entity: str, project: str, group: str, swept: list[str]):
    """The sweep's saved dashboard view, as code (wandb-workspaces, an optional extra): the group's runs, grouped by
    setting where the sweep ran several seeds; the swept settings to fine-tuned accuracy in parallel coordinates;
    fine-tuned accuracy against learning rate (epochs as the third axis); the summary run's table; validation
    loss. Built without a server."""
    import wandb_workspaces.reports.v2 as wr  # an optional extra (.[dashboard]), imported for sweeps only
    import wandb_workspaces.workspaces as ws

    accuracy = wr.SummaryMetric(f"{RESULTS}/{F.figure('finetuned', F.HEADLINE.figure)}")
    flat = {"lr": "lr", "epochs": "epochs", "r": "lora_r", "alpha": "lora_alpha", "dropout": "lora_dropout"}
    axes = list(dict.fromkeys([*(flat[k] for k in swept if k in flat), "lr", "epochs", "lora_r"]))
    panels = [
        wr.ParallelCoordinatesPlot(title="swept settings against fine-tuned accuracy", columns=[
            *(wr.ParallelCoordinatesPlotColumn(metric=wr.Config(key)) for key in axes),
            wr.ParallelCoordinatesPlotColumn(metric=accuracy, display_name="fine-tuned GSM8K by-value")]),
        wr.ScatterPlot(title="fine-tuned accuracy against learning rate, by epochs", x=wr.Config("lr"), y=accuracy,
                       z=wr.Config("epochs"), log_x=True),
        wr.WeavePanelSummaryTable(table_name="sweep/jobs"),
        wr.LinePlot(title="validation loss", x="train/global_step", y=["eval/loss"]),
    ]
    seeded = naming.short(naming.SEED) in swept  # a setting's seeds as one line, their mean and spread
    return ws.Workspace(entity=entity, project=project, name=f"sweep {group}",
                        sections=[ws.Section(name=f"sweep {group}", panels=panels, is_open=True)],
                        runset_settings=ws.RunsetSettings(filters=[ws.Metric("Group") == group],
                                                          groupby=[ws.Config("setting")] if seeded else []))


def save_view(cfg: LoggerConfig, sweep_dir: Path, group: str, swept: list[str], online: bool) -> None:
    """Saved to W&B when online; otherwise (offline, or the extra missing) its spec is written to the sweep
    directory and the line says how to save it later."""
    later = f"save it later (W&B online) with: python -m gsm8k_lora.compare {sweep_dir} --save-view"
    try:
        view = sweep_view(cfg.entity or "", cfg.project, group, swept)
    except ImportError:
        print(f"W&B view not built: pip install -e .[dashboard] (wandb-workspaces), then {later}")
        return
    if online and cfg.entity:
        try:
            view.save()
            return
        except Exception as err:  # the spec below keeps it
            print(f"W&B view not saved ({type(err).__name__})", file=sys.stderr)
    write_text(sweep_dir / VIEW_SPEC, view._to_model().model_dump_json(by_alias=True, indent=1))
    print(f"W&B view written to {sweep_dir / VIEW_SPEC}; {later}" + ("" if cfg.entity else " --entity <yours>"))


def read_view(path: Path):
    """A view spec written by `save_view`, back as a workspace (wandb-workspaces' own model)."""
    from wandb_workspaces.workspaces import Workspace, internal  # an optional extra, as above

    return Workspace._from_model(internal.View.model_validate(json.loads(path.read_text(encoding="utf-8"))))
