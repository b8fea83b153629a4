"""The prepared GPU check holds together on a machine without a GPU: a lent machine's minutes are too few to find
there a typo, or a carried wheel that breaks the image's packages (scripts/gpu_check.sh, gpu_carry.py)."""

import base64
import hashlib
import importlib.util
import os
import subprocess
import sys
import zipfile
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
    assert "transformers==5.25.0" in plan and "huggingface-hub==2.4.0" in plan
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
