"""The folder carried to a lent GPU machine (no network there), and the check that it fits the machine's image.

    python scripts/gpu_carry.py plan     what is carried, name==version as installed in this venv, and why
    python scripts/gpu_carry.py build    make gpu-wheels: .gpu-carry/ with wheels/ (Python 3.12, manylinux
                                         x86_64), models/ (the tiny model's cache) and gsm8k/ (the real rows,
                                         gzipped), then the check and its size with the repository's
    python scripts/gpu_carry.py check    the carried set over the image's packages (scripts/gpu_image.txt):
                                         exit 0 it holds, 1 it does not, 3 PyPI did not answer
    python scripts/gpu_carry.py kept     there, after the install: the image's own numpy, pandas, pyarrow, scipy and
                                         matplotlib meet what the carried wheels and the project require of them
                                         (their versions there are not all recorded here); one line, exit 1 if not

What is carried: the project's requirements (as installed here from pyproject.toml, the qlora extra's included)
and everything they need, at the versions this venv has (what `make setup` installs), wherever the image lacks the
package or may have another version of it. The image's CUDA build (torch and its libraries) is never replaced, nor
are its large compiled libraries unless its recorded version is older than a carried package needs (then carried,
if it fits); two requirements are left behind. Each list below says why. Run by the venv's Python (`kept`: by the
machine's).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import replace
from importlib import metadata
from pathlib import Path

import gpu_compat as compat
from packaging.requirements import Requirement
from packaging.utils import parse_wheel_filename

ROOT = compat.ROOT
CARRY = ROOT / ".gpu-carry"
IMAGE = Path(__file__).with_name("gpu_image.txt")
LIMIT_MIB = 60  # the carry folder with the repository; a call carries 64 MiB, 4 are kept for the code to grow
EXTRAS = ("qlora",)  # the project's extras the machine needs and this venv has
GPU_ONLY = {  # extras a CPU machine cannot install (they need CUDA's Triton), carried at pinned versions
    "liger-kernel": ("0.8.5", "trainer.use_liger_kernel (the liger extra): Triton kernels, CUDA only"),
}
LEFT_OUT = {  # requirements the check runs without
    "wandb": "a 20 MB wheel; the check runs with logger=none, and tracking.py imports wandb only for a run that logs",
    "gguf": "transformers imports it only to read a GGUF checkpoint, which the check does not load",
}
IMAGE_BUILD = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*)$")  # the image's CUDA build: never replaced
IMAGE_KEPT = {  # large compiled libraries the image has: its builds stay (arrays pass through them, unmeasured),
    "numpy", "pandas", "pyarrow", "scipy", "matplotlib",  # unless one is older than a carried package needs
}
IMAGE_UNUSED = {  # image packages whose requirements a carried version breaks, which nothing in the check imports
    "sentence-transformers": "nothing the check runs imports it (transformers, TRL and PEFT never do)",
}
BITSANDBYTES_LIBS = {"libbitsandbytes_cpu.so", "libbitsandbytes_cuda130.so", "libbitsandbytes_cuda132.so"}
PIP = [sys.executable, "-m", "pip", "--isolated", "--disable-pip-version-check"]  # PyPI alone, no local config
TARGET = ["--python-version", "3.12", "--implementation", "cp", "--abi", "cp312", "--only-binary=:all:",
          *(arg for platform in compat.PLATFORMS for arg in ("--platform", platform))]


def project() -> compat.Package:
    """This package's own requirements as installed here, those of EXTRAS included (torch: the image's)."""
    dist = installed("gsm8k_lora")
    requires = []
    for line in dist.requires or ():
        req = Requirement(line)
        wanted = req.marker is None or any(req.marker.evaluate({**compat.MARKERS, "extra": e}) for e in EXTRAS)
        if wanted and compat.canon(req.name) not in LEFT_OUT:
            req.marker = None  # wanted on the machine: the check reads an extra's marker as false
            requires.append(str(req))
    return compat.Package("gsm8k_lora", dist.version, tuple(requires), "project")


def image() -> list[compat.Package]:
    return [compat.Package(name, version) for name, version in compat.read_pins(IMAGE).items()]


def installed(name: str) -> metadata.Distribution:
    try:
        return metadata.distribution(name)
    except metadata.PackageNotFoundError:
        sys.exit(f"gpu-carry: {name} is needed on Python 3.12 but not installed in this venv: make setup, or add it")


def needed() -> dict[str, str]:
    """{name: version in this venv} of the project's requirements and theirs, down to what the image keeps."""
    found, todo = {}, [Requirement(r) for r in project().requires]
    while todo:
        req = todo.pop()
        name = compat.canon(req.name)
        if name in found or not compat.applies(req) or IMAGE_BUILD.match(name) or name in IMAGE_KEPT:
            continue
        dist = installed(name)
        found[name] = dist.version
        todo += [Requirement(r) for r in dist.requires or ()]
    return found


def plan() -> dict[str, tuple[str, str]]:
    """{name: (version, why)} of what is carried."""
    have = compat.read_pins(IMAGE)
    carried = {}
    for name, version in sorted(needed().items()):
        if name not in have:
            carried[name] = (version, "not in the image")
        elif have[name] is None:
            carried[name] = (version, "the image's version is not recorded")
        elif have[name] != version:
            carried[name] = (version, f"the image has {have[name]}")
    recorded = {name: have[name] for name in IMAGE_KEPT if have.get(name)}
    too_old: dict[str, list[str]] = {}
    for name, problem in compat.kept_problems(kept_requirements(), recorded):  # one the image has too old
        too_old.setdefault(name, []).append(problem)
    for name, problems in too_old.items():
        carried[name] = (installed(name).version, f"too old in the image: {'; '.join(problems)}")
    return {**carried, **GPU_ONLY}


def kept_requirements() -> list[tuple[str, Requirement]]:
    """(who, requirement) of each requirement the carried packages and the project make on a library the image
    keeps (`IMAGE_KEPT`), as installed here."""
    found = [("gsm8k_lora", Requirement(line)) for line in project().requires]
    for name, version in needed().items():
        found += [(f"{name} {version}", Requirement(line)) for line in installed(name).requires or ()]
    return [(who, req) for who, req in found if compat.canon(req.name) in IMAGE_KEPT]


def carried(pins: dict[str, str]) -> list[compat.Package]:
    """The carried name==version pins with their requirements: from PyPI's metadata of each wheel, else (a
    package built here from its sdist) from this venv where it has that version."""
    packages = compat.with_index_requires([compat.Package(n, v, source="carried") for n, v in pins.items()])
    return [replace(p, requires=tuple(installed(p.name).requires or ())) if p.requires is None and venv_has(p)
            else p for p in packages]


def venv_has(package: compat.Package) -> bool:
    try:
        return metadata.version(package.name) == package.version
    except metadata.PackageNotFoundError:
        return False


def verdict(packages: list[compat.Package], label: str) -> int:
    """Print the check of the carried `packages` over the image; 0 when it holds, 1 when not."""
    image_packages = compat.with_index_requires(image())
    result = compat.check(compat.environment(image_packages, packages), project(), IMAGE_UNUSED)
    print(f"check: {label}: {len(packages)} carried over {len(image_packages)} image packages")
    for kind, lines in (("unverifiable", result.unverifiable), ("note", result.notes),
                        ("accepted", result.accepted), ("FAIL", result.failures)):
        for line in lines:
            print(f"  {kind}: {line}")
    print(f"check: {'FAILED' if result.failures else 'holds'}: {len(result.failures)} broken requirements, "
          f"{len(result.accepted)} accepted in unused image packages, {len(result.unverifiable)} unverifiable "
          f"(the image's version not recorded: not counted as failures)")
    return 1 if result.failures else 0


def check(args) -> int:
    """The pins given, else the wheels built in the carry folder, else this venv's plan."""
    if args.pins:
        return verdict(carried(compat.read_pins(args.pins)), f"the pins of {args.pins}")
    if not args.plan and any((args.carry / "wheels").glob("*.whl")):
        return check_built(args.carry)
    return verdict(carried({name: version for name, (version, _) in plan().items()}), "this venv's plan")


def check_built(carry: Path) -> int:
    """The wheels in `carry`, their requirements read from the wheels themselves."""
    built = [compat.wheel_requires(w) for w in sorted((carry / "wheels").glob("*.whl"))]
    stale = {(p.name, p.version) for p in built} ^ {(n, v) for n, (v, _) in plan().items()}
    if stale:
        print(f"check: {carry} differs from this venv's plan ({', '.join(sorted(map('=='.join, stale)))}): "
              f"make gpu-wheels")
    return verdict(built, f"the wheels in {carry}")


def cut_bitsandbytes(wheel: Path) -> None:
    """Keep only the native libraries the image's CUDA 13 torch loads (and the CPU one), RECORD to match."""
    with zipfile.ZipFile(wheel) as src:
        drop = {n for n in src.namelist()
                if re.fullmatch(r"bitsandbytes/libbitsandbytes_\w+\.(so|dll|dylib)", n)
                and n.rsplit("/", 1)[1] not in BITSANDBYTES_LIBS}
        if not drop:
            return
        cut = wheel.with_suffix(".cut")
        with zipfile.ZipFile(cut, "w", zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                data = src.read(info)
                if info.filename in drop:
                    continue
                if info.filename.endswith(".dist-info/RECORD"):
                    rows = [row for row in csv.reader(io.StringIO(data.decode())) if row and row[0] not in drop]
                    out = io.StringIO()
                    csv.writer(out, lineterminator="\n").writerows(rows)
                    data = out.getvalue().encode()
                dst.writestr(info, data)
    cut.replace(wheel)


def fetch_wheels(wheels: Path) -> None:
    """The planned wheels into `wheels` (those already there kept, others removed); a package with no wheel
    for Python 3.12 on PyPI (antlr4-python3-runtime 4.9.3) is built here from its sdist."""
    wanted = {name: version for name, (version, _) in plan().items()}
    wheels.mkdir(parents=True, exist_ok=True)
    for path in wheels.glob("*.whl"):
        name, version, _, _ = parse_wheel_filename(path.name)
        if wanted.get(name) == str(version):
            del wanted[name]
        else:
            path.unlink()
    pins = [f"{name}=={version}" for name, version in wanted.items()]
    source_only = [pin for pin in pins if compat.index_requires(*pin.split("=="))["file"] is None]
    binary = [pin for pin in pins if pin not in source_only]
    if binary:
        subprocess.run([*PIP, "download", "-q", "--no-deps", *TARGET, "-d", str(wheels), *binary], check=True)
    for pin in source_only:
        subprocess.run([*PIP, "wheel", "-q", "--no-deps", "-w", str(wheels), pin], check=True)
    for path in wheels.glob("bitsandbytes-*.whl"):
        cut_bitsandbytes(path)


def mib(paths: list[Path]) -> float:
    files = [f for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()]
    return sum(f.stat().st_size for f in files) / 2**20


def build(args) -> int:
    from gsm8k_lora.model import tiny  # the package's own builder and naming: what model=tiny reads there

    splits = ("train.jsonl", "test.jsonl")
    if not all((args.gsm8k / split).is_file() for split in splits):
        sys.exit(f"gpu-carry: no {' and '.join(splits)} in {args.gsm8k}: give a GSM8K copy with --gsm8k DIR")
    fetch_wheels(args.carry / "wheels")
    model = tiny.ensure(0, args.models)
    shutil.rmtree(args.carry / "models", ignore_errors=True)
    shutil.copytree(model, args.carry / "models" / model.name)
    (args.carry / "gsm8k").mkdir(exist_ok=True)
    for split in splits:  # gzipped: 4.7 MB of rows travel as 1.6
        with open(args.gsm8k / split, "rb") as src, gzip.GzipFile(args.carry / "gsm8k" / f"{split}.gz", "wb",
                                                                  mtime=0) as dst:
            shutil.copyfileobj(src, dst)
    tree = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout.split("\0")
    repo = mib([ROOT / f for f in tree if f and (ROOT / f).is_file()])
    parts = {part: mib([args.carry / part]) for part in ("wheels", "models", "gsm8k")}
    total = repo + sum(parts.values())
    print("gpu-carry: " + ", ".join(f"{part} {size:.1f} MiB" for part, size in parts.items())
          + f"; with the repository ({repo:.1f} MiB) {total:.1f} MiB of the {LIMIT_MIB} MiB allowed")
    status = check_built(args.carry)
    if total > LIMIT_MIB:
        kept = [f"{name} ({why})" for name, (_, why) in plan().items() if why.startswith("too old")]
        print(f"gpu-carry: over {LIMIT_MIB} MiB" + (f", kept libraries carried: {'; '.join(kept)}" if kept else ""))
        return 1
    return status


def kept(args) -> int:
    """On the machine after the install: the image's kept libraries against what the carried wheels and the project
    require of them. One line, also written to --out; exit 1 when one is too old or missing."""
    import tomllib

    requirements = [(f"{p.name} {p.version}", Requirement(line))
                    for p in map(compat.wheel_requires, sorted((args.carry / "wheels").glob("*.whl")))
                    for line in p.requires or ()]
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    requirements += [("gsm8k_lora", Requirement(line)) for line in dependencies]
    versions = {}
    for name in sorted(IMAGE_KEPT):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    problems = compat.kept_problems(requirements, versions)
    if problems:
        line = (f"kept image libraries FAIL: {'; '.join(why for _, why in problems)} (not carried: its version "
                f"there was not recorded in scripts/gpu_image.txt; record it, and make gpu-wheels carries a newer one "
                f"if it fits)")
    else:
        line = (f"kept image libraries hold what the carried packages need: "
                f"{', '.join(f'{name} {version}' for name, version in versions.items())}")
    print(line)
    if args.out:
        args.out.write_text(line + "\n")
    return 1 if problems else 0


def show_plan(args) -> int:
    for name, (version, why) in plan().items():
        print(f"{name + '==' + version:<36} # {why}")
    print(f"# left out: {'; '.join(f'{name}: {why}' for name, why in LEFT_OUT.items())}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("plan").set_defaults(run=show_plan)
    build_cmd = commands.add_parser("build")
    build_cmd.add_argument("--gsm8k", type=Path, default=ROOT.parent / "shared" / "gsm8k",
                           help="a GSM8K copy with train.jsonl and test.jsonl (default: ../shared/gsm8k)")
    build_cmd.add_argument("--models", type=Path,
                           default=Path(os.environ.get("GSM8K_LORA_TEST_CACHE", ROOT / ".cache" / "models")),
                           help="where the tiny model is cached, built there first if missing (the test suite's)")
    build_cmd.set_defaults(run=build)
    check_cmd = commands.add_parser("check")
    check_cmd.add_argument("--pins", type=Path, help="check these name==version pins instead")
    check_cmd.add_argument("--plan", action="store_true", help="check this venv's plan even where wheels are built")
    check_cmd.set_defaults(run=check)
    kept_cmd = commands.add_parser("kept")
    kept_cmd.add_argument("--out", type=Path, help="also write the line here")
    kept_cmd.set_defaults(run=kept)
    for sub in (build_cmd, check_cmd, kept_cmd):
        sub.add_argument("--carry", type=Path, default=CARRY, help="the carry folder (default: .gpu-carry)")
    args = parser.parse_args()
    try:
        return args.run(args)
    except compat.Unreachable as err:
        print(f"check: PyPI did not answer ({err}): the carried set cannot be checked")
        return 3


if __name__ == "__main__":
    sys.exit(main())
