"""The prepared GPU check holds together on a machine without a GPU: a lent machine's minutes are too few to find
there a typo, or a carried wheel that breaks the image's packages (scripts/gpu_check.sh, gpu_carry.py)."""

import base64
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNREACHABLE = 3  # the scripts' exit code when PyPI does not answer (its metadata not cached yet)
# The carried set the previous check shipped: huggingface-hub 2.4 pinned, transformers left at the image's 5.17.
PINNED_HUB_WITHOUT_TRANSFORMERS = """
trl==1.16.0 datasets==5.2.0 hydra-core==1.3.8 omegaconf==2.3.1 antlr4-python3-runtime==4.9.3 bitsandbytes==0.50.2
filelock==4.3.1 dill==0.4.1 fsspec==2026.9.0 huggingface-hub==2.4.0 multiprocess==0.70.19 packaging==26.4
psutil==7.2.2 pyyaml==6.0.4 tqdm==4.70.1 jinja2==3.1.6 xxhash==4.1.0 click==8.5.1 httpx2==2.16.2 httpcore2==2.16.2
markupsafe==3.0.4 python-dateutil==4.0.0 typing-extensions==4.16.0 typer==0.29.2 annotated-doc==0.0.7 anyio==4.16.0
idna==3.20 pydantic==2.14.4 pydantic-core==2.50.5 rich==15.0.0 shellingham==1.5.4 truststore==0.10.5 tzdata==2026.6
annotated-types==0.8.0 h11==0.16.0 markdown-it-py==4.3.0 pygments==2.21.0 typing-inspection==0.4.5 mdurl==0.1.2
"""


def run(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable})


def skip_if_unreachable(proc: subprocess.CompletedProcess) -> None:
    if proc.returncode == UNREACHABLE:
        pytest.skip("PyPI is not reachable from here: the carried set cannot be checked")


def script(name: str):
    """A module of scripts/ (they are run as files, not installed), loaded by its path."""
    if name != "gpu_compat":
        script("gpu_compat")  # gpu_carry imports it by name, as a file beside it
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def test_dry_run_checks_the_carried_set_and_says_why_gpu_steps_skip():
    proc = run("bash", "scripts/gpu_check.sh", "--dry-run")
    out = proc.stdout + proc.stderr
    assert proc.returncode in (0, UNREACHABLE), out[-3000:]
    assert "the training steps compose" in out  # checked offline too
    import torch

    if not torch.cuda.is_available():
        assert "the GPU steps skip: no CUDA GPU here" in out
    skip_if_unreachable(proc)
    assert "check: holds" in out


def test_the_check_refuses_hub_2_carried_beside_the_images_transformers(tmp_path):
    pins = tmp_path / "pins.txt"
    pins.write_text("\n".join(PINNED_HUB_WITHOUT_TRANSFORMERS.split()))
    proc = run(sys.executable, "scripts/gpu_carry.py", "check", "--pins", str(pins))
    skip_if_unreachable(proc)
    assert proc.returncode == 1, proc.stdout[-3000:]
    assert ("FAIL: transformers 5.17.0 (image) needs huggingface-hub<2.0,>=1.5.0, but huggingface-hub is 2.4.0 "
            "(carried)") in proc.stdout


def test_the_check_passes_this_venvs_plan_which_carries_transformers_with_the_hub():
    proc = run(sys.executable, "scripts/gpu_carry.py", "check", "--plan")
    skip_if_unreachable(proc)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "check: holds: 0 broken requirements" in proc.stdout
    plan = run(sys.executable, "scripts/gpu_carry.py", "plan").stdout
    hub, transformers = metadata.version("huggingface-hub"), metadata.version("transformers")  # as installed here
    assert f"transformers=={transformers}" in plan and f"huggingface-hub=={hub}" in plan
    assert not any(line.startswith(("torch==", "nvidia-", "wandb==")) for line in plan.splitlines())


def image(*pins: str, requires: dict | None = None):
    compat = script("gpu_compat")
    return [compat.Package(name, version or None, tuple((requires or {}).get(name, ())) or None)
            for name, _, version in (pin.partition("==") for pin in pins)]


def carried(name: str, version: str, *requires: str):
    return script("gpu_compat").Package(name, version, requires, "carried")


CASES = [  # (what, image, carried, failures, unverifiable): substrings expected in the verdict
    ("a carried version outside an image package's range fails",
     image("transformers==5.17.0", requires={"transformers": ["huggingface-hub<2.0,>=1.5.0"]}),
     [carried("huggingface-hub", "2.4.0")], ["transformers 5.17.0 (image) needs huggingface-hub<2.0,>=1.5.0"], []),
    ("carried together, the two agree",
     image("transformers==5.17.0", requires={"transformers": ["huggingface-hub<2.0"]}),
     [carried("huggingface-hub", "2.4.0"), carried("transformers", "5.25.0", "huggingface-hub<3.0,>=1.5.0")], [], []),
    ("a requirement neither in the image nor carried fails",
     image("torch==2.11.0"), [carried("trl", "1.16.0", "datasets>=3.0.0")], ["datasets is neither"], []),
    ("a version specifier on an image package of unknown version is unverifiable, not a failure",
     image("pyarrow"), [carried("datasets", "5.2.0", "pyarrow>=21.0.0", "pyarrow")], [], ["pyarrow>=21.0.0"]),
    ("other platforms' and extras' requirements are not read",
     image(), [carried("hub", "1.0", 'pywin32; sys_platform == "win32"', 'pytest; extra == "testing"')], [], []),
    ("the image's requirements among its own packages are its own",
     image("torch==2.11.0", requires={"torch": ["triton==9.9"]}), [carried("trl", "1.16.0")], [], []),
]


@pytest.mark.parametrize(("what", "image_packages", "carried_packages", "failures", "unverifiable"), CASES,
                         ids=[case[0] for case in CASES])
def test_check_reads_requirements_both_ways(what, image_packages, carried_packages, failures, unverifiable):
    compat = script("gpu_compat")
    verdict = compat.check(compat.environment(image_packages, carried_packages))
    assert len(verdict.failures) == len(failures) and all(
        want in got for want, got in zip(failures, verdict.failures, strict=True)), verdict
    assert len(verdict.unverifiable) == len(unverifiable) and all(
        want in got for want, got in zip(unverifiable, verdict.unverifiable, strict=True)), verdict


def test_an_image_package_nothing_imports_is_reported_apart_not_failed():
    compat = script("gpu_compat")
    env = compat.environment(image("sentence-transformers==6.0.1", requires={
        "sentence-transformers": ["huggingface-hub<2.0.0"]}), [carried("huggingface-hub", "2.4.0")])
    verdict = compat.check(env, unused={"sentence-transformers": "never imported"})
    assert not verdict.failures and verdict.accepted == [
        "sentence-transformers 6.0.1 (image) needs huggingface-hub<2.0.0, but huggingface-hub is 2.4.0 (carried): "
        "never imported"]


def record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def test_bitsandbytes_keeps_the_images_cuda_libraries_and_a_record_that_matches(tmp_path):
    libs = ["cpu", "cuda118", "cuda126", "cuda130", "cuda132", "rocm64", "xpu2025"]
    files = {f"bitsandbytes/libbitsandbytes_{lib}.so": lib.encode() * 100 for lib in libs}
    files["bitsandbytes/__init__.py"] = b"__version__ = '0.0.1'\n"
    files["bitsandbytes-0.0.1.dist-info/METADATA"] = b"Metadata-Version: 2.1\nName: bitsandbytes\nVersion: 0.0.1\n"
    files["bitsandbytes-0.0.1.dist-info/WHEEL"] = b"Wheel-Version: 1.0\nRoot-Is-Purelib: false\nTag: py3-none-any\n"
    record = "\n".join(record_line(n, d) for n, d in files.items()) + "\nbitsandbytes-0.0.1.dist-info/RECORD,,\n"
    wheel = tmp_path / "bitsandbytes-0.0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, data in [*files.items(), ("bitsandbytes-0.0.1.dist-info/RECORD", record.encode())]:
            zf.writestr(name, data)

    script("gpu_carry").cut_bitsandbytes(wheel)

    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        rows = [line.split(",") for line in zf.read("bitsandbytes-0.0.1.dist-info/RECORD").decode().splitlines()]
        assert {row[0] for row in rows} == names
        assert all(record_line(row[0], zf.read(row[0])) == ",".join(row) for row in rows if row[1])
    assert sorted(n for n in names if n.endswith(".so")) == [f"bitsandbytes/libbitsandbytes_{lib}.so"
                                                            for lib in ("cpu", "cuda130", "cuda132")]
    target = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "--isolated", "install", "-q", "--no-deps", "--no-index",
                          "--target", str(target), str(wheel)], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr


def test_a_kept_library_the_image_has_too_old_is_carried_and_one_new_enough_is_not(tmp_path, monkeypatch):
    """The image's numpy, pandas, pyarrow, scipy and matplotlib stay, unless the version recorded for one is older
    than a carried package needs (datasets 5.2 needs pyarrow>=24): then a newer one is carried."""
    gpu_carry = script("gpu_carry")
    lines = (ROOT / "scripts" / "gpu_image.txt").read_text().splitlines()
    for recorded, carried_too in (("19.0.1", True), (metadata.version("pyarrow"), False)):
        image_file = tmp_path / "image.txt"
        image_file.write_text("\n".join(f"pyarrow=={recorded}" if line == "pyarrow" else line for line in lines))
        monkeypatch.setattr(gpu_carry, "IMAGE", image_file)
        plan = gpu_carry.plan()
        assert ("pyarrow" in plan) is carried_too, plan.get("pyarrow")
    needs = [str(req.specifier) for _, req in gpu_carry.kept_requirements() if req.name == "pyarrow"]
    assert any(s.startswith(">=") for s in needs), needs  # what made 19.0.1 too old is read from the packages


def fake_wheel(directory: Path, *requires: str) -> Path:
    meta = "Metadata-Version: 2.1\nName: fake\nVersion: 1.0\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    wheel = directory / "wheels" / "fake-1.0-py3-none-any.whl"
    wheel.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("fake-1.0.dist-info/METADATA", meta)
    return wheel


@pytest.mark.parametrize("requirement, holds", [("pyarrow>=1", True), ("pyarrow>=999", False)])
def test_the_install_checks_the_images_kept_libraries_in_one_line(tmp_path, requirement, holds):
    """After the install, each kept library of the machine (here: this venv's) against what the carried wheels need;
    one line, written for the summary, and exit 1 (the install step fails) on one too old."""
    fake_wheel(tmp_path, requirement, "numpy>=1")
    out = tmp_path / "kept.txt"
    proc = run(sys.executable, "scripts/gpu_carry.py", "kept", "--carry", str(tmp_path), "--out", str(out))
    line = out.read_text().strip()
    assert proc.stdout.strip() == line and "\n" not in line
    assert proc.returncode == (0 if holds else 1), proc.stdout + proc.stderr
    if holds:
        assert line.startswith("kept image libraries hold") and f"pyarrow {metadata.version('pyarrow')}" in line
    else:
        assert line.startswith("kept image libraries FAIL: fake 1.0 needs pyarrow>=999, and the image has pyarrow "
                               f"{metadata.version('pyarrow')}")


def check_shell(tmp_path: Path, commands: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`commands` run after sourcing scripts/gpu_check.sh (its functions, nothing run), in a work folder of tmp_path."""
    setup = (f"source scripts/gpu_check.sh && WORK={tmp_path}/work RUNS={tmp_path}/work/runs DATA={tmp_path}/data "
             f"OUT={tmp_path}/out && mkdir -p $RUNS $DATA $OUT && deadline=$((SECONDS + TOTAL_S)) && export PY RUNS")
    return subprocess.run(["bash", "-c", f"{setup}\n{commands}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT)})


def lever(tokens_per_s: float) -> dict:
    return {"variant": "x", "real_tokens": 100, "computed_tokens": 100, "real_tokens_per_s": tokens_per_s}


def test_the_check_hands_the_runs_only_the_overrides_the_bench_chose(tmp_path):
    """chosen.txt, gpu_check.json's `chosen` and the table's row hold the overrides alone, as GPU_CHOSEN takes them:
    a run composes with them."""
    bench = tmp_path / "work" / "runs" / "bench" / "bench.json"
    bench.parent.mkdir(parents=True)
    bench.write_text(json.dumps({"falcon3_package_default": lever(10), "falcon3_flex_attention": lever(14),
                                 "gen_padded_tokens_per_s": 800.0, "gen_slots_tokens_per_s": 900.0}))
    proc = check_shell(tmp_path, "step bench 30 true && choose && pack")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    expected = "model.attn_implementation=flex_attention eval.engine=slots"
    assert (tmp_path / "work" / "chosen.txt").read_text().strip() == expected
    assert json.loads((tmp_path / "out" / "gpu_check.json").read_text())["chosen"] == expected
    table = (tmp_path / "out" / "gpu_check.txt").read_text().splitlines()
    (row,) = [line for line in table if line.startswith("chosen")]
    assert row.split(None, 1)[1] == expected
    composed = run(sys.executable, "-m", "gsm8k_lora.train", "experiment=falcon3_shape", *row.split()[1:],
                   "--cfg", "job")
    assert composed.returncode == 0, composed.stderr[-2000:]
    assert "attn_implementation: flex_attention" in composed.stdout and "engine: slots" in composed.stdout


def test_the_summary_imports_the_package_before_bitsandbytes(tmp_path):
    """The summary imports bitsandbytes (its version) after the package, so bitsandbytes loads under the package's
    refusal of its Hub kernel (`BitsandbytesOffTheHub`) and, on a CPU with AVX512-BF16, asks the Hub for nothing:
    a recorder stands in for `get_kernel`, as in tests/test_model.py."""
    pytest.importorskip("bitsandbytes")
    work = tmp_path / "work"
    (work / "runs").mkdir(parents=True)
    (work / "steps.jsonl").write_text('{"step": "install", "rc": 0, "seconds": 1, "limit_s": 90}\n')
    code = f"""if True:
        import json, runpy, sys, kernels
        asked = []
        def recorder(repo_id, *args, **kwargs):
            asked.append(repo_id)
            raise RuntimeError("recorded")
        kernels.get_kernel = recorder
        sys.argv = ["gpu_summary.py", {str(work)!r}, {str(tmp_path)!r}]
        runpy.run_path("scripts/gpu_summary.py", run_name="__main__")
        loader = sys.modules["bitsandbytes"].__spec__.loader
        print(json.dumps({{"asked": asked, "refused": loader.exec_module.__name__ == "exec_off_the_hub"}}))"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen == {"asked": [], "refused": True}
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert summary["environment"]["bitsandbytes"] == metadata.version("bitsandbytes")


@pytest.mark.slow
def test_a_recipe_cut_off_by_its_time_limit_leaves_its_figures_so_far(tmp_path):
    """The check's step runs the recipe under `timeout`; stopped before metrics.json, the run still leaves its
    training figures (the checkpoint its stop saves), and gpu_check.json carries them."""
    limit = 60  # past the run's start-up on a 2-core machine; its 10,000 steps take far longer
    proc = check_shell(tmp_path, f"""step recipe {limit} $PY -m gsm8k_lora.train experiment=smoke logger=none \\
        trainer.max_steps=10000 trainer.logging_steps=1 trainer.save_steps=10000 trainer.eval_on_start=false \\
        hydra.run.dir=$RUNS/recipe && pack""", timeout=limit + 200)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    log = (tmp_path / "work" / "recipe.log").read_text()
    (step,) = summary["steps"]
    # timeout's: cut off (124), or killed 10 s later where the step it was finishing took longer (137)
    assert step["rc"] in (124, 137), log[-3000:]
    run_figures = summary["runs"]["recipe"]
    if run_figures["source"].startswith("nothing") and not re.search(r"Training:.*\b[1-9]\d*/10000", log):
        pytest.skip(f"this machine was too busy to train one step in {limit} s: nothing to stop part-way")
    assert run_figures["source"].startswith("checkpoints/checkpoint-"), (run_figures, log[-3000:])
    assert run_figures["done"] is False and 1 <= run_figures["timed_steps"] <= run_figures["steps"] < 10000
    assert run_figures["step_s"] > 0 and run_figures["trained_tokens_per_s"] > 0
    assert "run recipe" in (tmp_path / "out" / "gpu_check.txt").read_text()
