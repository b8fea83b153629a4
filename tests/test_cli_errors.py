"""A config mistake Hydra finds while composing is one line naming the key and what is allowed, exit code 2,
from both Hydra entry points, in a single run and in a sweep."""

import pytest

from tests.conftest import run_cli


def one_line_error(proc) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith("config error: ") and "base_" not in lines[0]
    return lines[0]


@pytest.mark.parametrize("entry", ["train", "evaluate"])
@pytest.mark.parametrize("override, says", [
    ("lora.rr=8", "lora.rr is invalid: lora has no key 'rr'; allowed: r, alpha, dropout, bias, target_modules"),
    ("lora=nonexistent", "lora=nonexistent is invalid: no such option; allowed: attn_only, default, r16"),
])
def test_unknown_key_or_option_is_one_line_with_what_is_allowed(tmp_path, entry, override, says):
    proc = run_cli(entry, "experiment=smoke", override, f"hydra.run.dir={tmp_path / 'run'}", timeout=120)
    assert says in one_line_error(proc)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, says", [
    (["lora.r=eight"], "lora.r=eight is invalid: Value 'eight' of type 'str' could not be converted to Integer; "
                       "allowed: int"),
    (["lorra.r=8"], "lorra is invalid: the config has no key 'lorra'; allowed: model, data, lora, trainer"),
    (["experiment=nope"], "experiment=nope is invalid: no such option; allowed: "),
    (["lora.r=["], "lora.r=[ is invalid: "),
    (["lora.r=4,8"], "Ambiguous value for argument 'lora.r=4,8'"),
    (["--config-name", "nope"], "--config-name nope is invalid: no such config; allowed: config"),
    (["eval.prompt=lm_eval_gsm8k", "eval.max_new_tokens=300"],  # a value the protocol would replace by 256
     "eval.max_new_tokens is invalid with eval.prompt=lm_eval_gsm8k: lm-eval's gsm8k task generates at most 256"),
])
def test_other_composition_mistakes_are_one_line(tmp_path, args, says):
    proc = run_cli("train", "experiment=smoke", f"hydra.run.dir={tmp_path / 'run'}", *args, timeout=120)
    assert says in one_line_error(proc)


def test_a_mistake_in_one_value_of_a_sweep_stops_it_before_any_job(tmp_path):
    proc = run_cli("train", "-m", "experiment=smoke", "lora=default,nonexistent",
                   f"hydra.sweep.dir={tmp_path / 'sweep'}", timeout=120)
    assert "lora=nonexistent is invalid: no such option" in one_line_error(proc)
    assert not (tmp_path / "sweep").exists()


def test_a_sweep_asked_for_no_seeds_stops_before_any_job(tmp_path):
    # the sweep file turns grid.seeds into trainer.seed's values (config.seed_list) while its sweeper reads them
    proc = run_cli("train", "-m", "--config-dir", "sweeps", "--config-name", "lr_epochs", "experiment=smoke",
                   "grid.seeds=0", f"hydra.sweep.dir={tmp_path / 'sweep'}", timeout=120)
    said = one_line_error(proc)
    assert said == "config error: grid.seeds=0 is invalid: must be a positive integer (seeds per setting)"
    assert not (tmp_path / "sweep").exists()


def test_hydra_is_held_below_the_version_whose_private_api_cli_uses():
    # cli.py composes every job of a sweep through hydra._internal (its docstring says why); a hydra-core that
    # changes those calls must be a deliberate upgrade, not what a fresh install happens to pick
    from importlib.metadata import requires, version

    from packaging.requirements import Requirement
    from packaging.version import Version

    pin = next(Requirement(r) for r in requires("gsm8k_lora") if Requirement(r).name == "hydra-core")
    assert not pin.specifier.contains("1.4.0") and pin.specifier.contains("1.3.2"), pin
    assert Version(version("hydra-core")) in pin.specifier
