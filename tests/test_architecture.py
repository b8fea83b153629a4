"""The package's shape, as ARCHITECTURE.md states it: an acyclic import graph read from each module's top,
each default written once, one translation to TRL, and one `#### N` rule."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

PACKAGE = Path(__file__).resolve().parents[1] / "gsm8k_lora"
CONF = PACKAGE.parent / "conf"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_imports(tree: ast.AST, name: str) -> list[tuple[str, bool]]:
    """(imported package module, at the module's top level) for every import of a gsm8k_lora module."""
    top = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gsm8k_lora"):
            targets = [node.module]
            # `from gsm8k_lora.x import y`: y may be a module of the package
            targets += [f"{node.module}.{alias.name}" for alias in node.names]
            found += [(t, id(node) in top) for t in targets]
        elif isinstance(node, ast.Import):
            found += [(a.name, id(node) in top) for a in node.names if a.name.startswith("gsm8k_lora")]
    return found


def graph() -> tuple[dict[str, set[str]], list[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges, nested = {}, []
    for name, path in modules.items():
        imports = package_imports(ast.parse(path.read_text(encoding="utf-8")), name)
        edges[name] = {target for target, _ in imports if target in modules and target != name}
        nested += [f"{name} imports {target} inside a function" for target, top in imports if not top]
    return edges, nested


# The two commands import their body after their door (help, config and machine checks): the body's libraries
# take ~8 s to import, a typo is answered in ~2. No other package import may sit inside a function.
DEFERRED_BODIES = ["gsm8k_lora.evaluate imports gsm8k_lora inside a function",
                   "gsm8k_lora.evaluate imports gsm8k_lora.recipe inside a function",
                   "gsm8k_lora.train imports gsm8k_lora inside a function",
                   "gsm8k_lora.train imports gsm8k_lora.recipe inside a function"]


def test_package_imports_are_at_the_top_of_each_module():
    _, nested = graph()
    assert sorted(nested) == DEFERRED_BODIES


def test_the_doors_import_no_heavy_library():
    """What `--help` and a config error cost: the commands' top-level imports never reach torch or the libraries
    built on it (checked in a fresh interpreter)."""
    heavy = ("torch", "transformers", "trl", "peft", "datasets", "wandb")
    code = f"import sys, gsm8k_lora.train, gsm8k_lora.evaluate; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_import_graph_has_no_cycle():
    edges, _ = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_the_entry_point_is_above_its_recipe():
    edges, _ = graph()
    assert sorted(name for name, targets in edges.items() if "gsm8k_lora.train" in targets) == []
    # the recipe is the commands' body alone
    assert sorted(name for name, targets in edges.items() if "gsm8k_lora.recipe" in targets) == [
        "gsm8k_lora.evaluate", "gsm8k_lora.train"]


def source_lines(pattern: str) -> list[str]:
    hits = []
    for path in PACKAGE.rglob("*.py"):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(pattern, line):
                hits.append(f"{path.relative_to(PACKAGE)}:{number}")
    return hits


def test_one_translation_to_sft_config_and_one_to_lora_config():
    sft = sorted(source_lines(r"\bSFTConfig\("))
    # the bench's other SFTConfig is TRL's own defaults, the baseline it measures against: not our config
    assert [h.split(":")[0] for h in sft] == ["benchmarks/training.py", "training/sft.py"]
    assert [h.split(":")[0] for h in source_lines(r"peft\.LoraConfig\(")] == ["training/sft.py"]


PARSING_CALLS = {"split", "rsplit", "partition", "rpartition", "find", "rfind", "index", "count", "startswith",
                 "endswith", "compile", "search", "match", "fullmatch", "findall", "finditer", "sub", "format"}


def final_marker_uses(path: Path) -> list[str]:
    """Places that parse or write `####` in code (docstrings, comments and display text aside): a regex, a
    string method or an `in` test with a `####` literal, or an f-string that writes a `#### N` line."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    hits = []

    def has_marker(node: ast.AST) -> bool:
        return any(isinstance(n, ast.Constant) and isinstance(n.value, str) and "####" in n.value
                   for n in ast.walk(node))

    for node in ast.walk(tree):
        parsing = (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                   and node.func.attr in PARSING_CALLS and any(has_marker(a) for a in node.args))
        testing = isinstance(node, ast.Compare) and has_marker(node.left)
        pairs = zip(node.values, node.values[1:], strict=False) if isinstance(node, ast.JoinedStr) else []
        writing = any(  # f"... #### {n}": a `#### N` line written
            isinstance(part, ast.Constant) and str(part.value).rstrip().endswith("####")
            and isinstance(after, ast.FormattedValue) for part, after in pairs)
        if parsing or testing or writing:
            hits.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    return hits


def test_one_final_answer_rule():
    # The package's `####` rule is data/gsm8k.py's; lm-eval's own patterns are lm-eval's, copied verbatim.
    hits = [h for path in sorted(PACKAGE.rglob("*.py")) for h in final_marker_uses(path)]
    outside = [h for h in hits if not h.startswith("data/gsm8k.py")]
    assert all(h.startswith("evaluation/grading.py") and "LM_EVAL_" in _line(h) for h in outside), outside
    assert any(h.startswith("data/gsm8k.py") for h in hits)


def _line(hit: str) -> str:
    path, number = hit.rsplit(":", 1)
    return (PACKAGE / path).read_text(encoding="utf-8").splitlines()[int(number) - 1]


def test_only_the_tracking_module_talks_to_wandb():
    users = {h.split(":")[0] for h in source_lines(r"^\s*(import wandb|from wandb|from transformers\.integrations)")}
    assert users == {"tracking.py"}


# Every default written once: the schemas carry none, and a preset sets only what differs from what it inherits.

def test_the_schemas_carry_no_defaults():
    import dataclasses

    from omegaconf import MISSING

    from gsm8k_lora import config

    schemas = [v for v in vars(config).values() if dataclasses.is_dataclass(v) and v.__module__ == config.__name__]
    assert len(schemas) >= 9
    written = [f"{s.__name__}.{f.name}={f.default!r}" for s in schemas for f in dataclasses.fields(s)
               if f.default is not MISSING or f.default_factory is not dataclasses.MISSING]
    assert written == []


def _yaml(path: Path) -> dict:
    # OmegaConf's YAML reading, as Hydra's: `2e-4` is a number (plain YAML 1.1 reads it as a string)
    return OmegaConf.to_container(OmegaConf.load(path)) or {}


def _inherited(group: str, data: dict) -> dict:
    """What a group option inherits from the options named in its defaults list (base_* schemas hold nothing)."""
    merged: dict = {}
    for entry in data.get("defaults", []):
        if isinstance(entry, str) and entry not in ("_self_",) and not entry.startswith("base_"):
            parent = _yaml(CONF / group / f"{entry}.yaml")
            merged.update({**_inherited(group, parent), **{k: v for k, v in parent.items() if k != "defaults"}})
    return merged


@pytest.mark.parametrize("path", sorted(p for p in CONF.glob("*/*.yaml") if p.parent.name != "experiment"),
                         ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_no_preset_restates_a_value_it_inherits(path):
    data = _yaml(path)
    inherited = _inherited(path.parent.name, data)
    restated = {k: v for k, v in data.items() if k != "defaults" and k in inherited and inherited[k] == v}
    assert restated == {}


def test_each_group_has_one_option_that_holds_every_key_and_the_others_start_from_it():
    from gsm8k_lora.config import compose

    cfg = compose()  # composes, with nothing missing: every key has a value in the default options
    for group in ("model", "data", "lora", "trainer", "logger"):
        default = _yaml(CONF / "config.yaml")["defaults"]
        option = next(e[group] for e in default if isinstance(e, dict) and group in e)
        assert set(_yaml(CONF / group / f"{option}.yaml")) - {"defaults"} == set(vars(getattr(cfg, group)))
        for other in sorted((CONF / group).glob("*.yaml")):
            if other.stem != option:
                parents = [e for e in _yaml(other).get("defaults", []) if e != "_self_"]
                assert parents and not any(str(p).startswith("base_") for p in parents), other.name


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_no_experiment_restates_a_value_it_would_get_anyway(experiment):
    """An experiment is its option choices plus the values it changes: each value it sets differs from what the
    same option choices compose without it."""
    data = _yaml(CONF / "experiment" / f"{experiment}.yaml")
    choices = [f"{k.split('/')[-1]}={v}" for entry in data.get("defaults", [])
               for k, v in entry.items() if k.startswith("override /")]
    from gsm8k_lora.config import compose_raw

    without = OmegaConf.to_container(compose_raw(choices), resolve=True)

    def leaves(tree: dict, prefix: str = "") -> dict:
        out = {}
        for key, value in tree.items():
            if key == "defaults":
                continue
            if isinstance(value, dict):
                out.update(leaves(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    restated = {k: v for k, v in leaves(data).items()
                if OmegaConf.select(OmegaConf.create(without), k) == v}
    assert restated == {}


# --- every figure one definition (gsm8k_lora/figures.py) ------------------------------------------------------
FIGURE_LIKE = re.compile(r"^(baseline|finetuned|paired|eval|train)_[a-z0-9_@]+$")
NOT_FIGURES = {  # strings that look like a figure's name and are something else
    "eval_steps": "a trainer setting, named in its config error",
    "eval_n": "a W&B config key (naming.identifying)", "eval_samples": "a W&B config key",
    "eval_prompt": "a W&B config key",
}
# Built names: an f-string holding one of these outside figures.py builds a figure's name by hand.
NAME_PARTS = ("paired_", "_ci95", "gsm8k_maj@", "gsm8k_pass@", "_gsm8k_")


def run_directory_modules() -> list[Path]:
    """Every module but figures.py itself and the benchmarks (whose results are their own file's names)."""
    return [p for p in PACKAGE.rglob("*.py") if p.name not in ("figures.py", "bench.py")
            and "benchmarks" not in p.parts]


def test_every_figure_a_module_names_is_defined_once_in_figures():
    from gsm8k_lora import figures as F

    names = [*F.eval_names(), *F.training_names(), *F.HISTORY, *F.during_training_names()]
    assert len(names) == len(set(names)), "a figure defined twice"
    sampled = F.eval_names(8)
    assert len(sampled) == len(set(sampled))
    undefined, built = [], []
    for path in run_directory_modules():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and FIGURE_LIKE.match(node.value):
                name = node.value
                if not (F.defined(name) or name in F.CURVES or name in F.COMPARISON or name in NOT_FIGURES):
                    undefined.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {name}")
            if isinstance(node, ast.JoinedStr):
                text = "".join(v.value for v in node.values if isinstance(v, ast.Constant))
                if any(part in text for part in NAME_PARTS):
                    built.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: f{text!r}")
    assert not undefined, "names no figure has:\n" + "\n".join(undefined)
    assert not built, "figure names built outside figures.py:\n" + "\n".join(built)


def test_a_reader_asking_for_an_undefined_figure_fails():
    from gsm8k_lora import figures as F

    assert F.read({"finetuned_gsm8k_by_value": 0.5}, "finetuned_gsm8k_by_value") == 0.5
    assert F.read({}, "finetuned_gsm8k_maj@4") is None  # defined, absent from a greedy run
    with pytest.raises(KeyError, match="finetuned_gsm8k_by_valu"):
        F.read({"finetuned_gsm8k_by_value": 0.5}, "finetuned_gsm8k_by_valu")
