"""The three files a GPU check sends back, read back and checked (after a device call, or by make gpu-rehearsal):
gpu_check.json parses; every step the check planned has an entry, the install's exit code 0; every library's version
was recorded (imported, none failed); the image's kept libraries were checked and hold; gpu_check.txt has a row for
each step; gpu_check.tar.gz opens and holds each step's log. Prints each step's exit code with its log's last line
(a step refused on a machine without a GPU: its one line). Exit 1 when any of these fails. Standard library only.

    python scripts/gpu_readback.py OUT
"""

from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path


def last_line(archive: tarfile.TarFile, name: str) -> str:
    member = archive.extractfile(name)
    lines = [line for line in member.read().decode(errors="replace").splitlines() if line.strip()] if member else []
    return lines[-1].strip() if lines else "(empty log)"


def check(out: Path) -> list[str]:
    """What is wrong with the files in `out`; printed as it reads them."""
    try:
        summary = json.loads((out / "gpu_check.json").read_text())
    except (OSError, ValueError) as err:
        return [f"gpu_check.json does not parse: {err}"]
    problems = []
    steps = {step["step"]: step for step in summary.get("steps", [])}
    planned = summary.get("planned") or []
    problems += [] if planned else ["gpu_check.json names no planned step"]
    problems += [f"step {name}: no entry in gpu_check.json" for name in planned if name not in steps]
    if steps.get("install", {}).get("rc") != 0:
        problems.append(f"the install failed: {steps.get('install')}")
    failed = {k: v for k, v in summary.get("environment", {}).items() if str(v).startswith("import failed")}
    problems += [f"version not recorded: {name}: {why}" for name, why in failed.items()]
    kept = summary.get("kept_libraries") or ""
    if not kept.startswith("kept image libraries hold"):
        problems.append(f"kept libraries: {kept}")
    table = (out / "gpu_check.txt").read_text() if (out / "gpu_check.txt").exists() else ""
    problems += [f"gpu_check.txt has no row for step {name}" for name in planned if f"step {name} " not in table]
    try:
        with tarfile.open(out / "gpu_check.tar.gz") as archive:
            names = set(archive.getnames())
            for name in planned:
                log = f"{name}.log"
                if log not in names:
                    problems.append(f"gpu_check.tar.gz holds no {log}")
                    continue
                step = steps.get(name, {})
                print(f"  {name:11s} rc {step.get('rc')} in {step.get('seconds')} s: {last_line(archive, log)[:200]}")
    except (OSError, tarfile.TarError) as err:
        problems.append(f"gpu_check.tar.gz does not open: {err}")
    print(f"  versions: {', '.join(f'{k} {v}' for k, v in summary.get('environment', {}).items())}")
    print(f"  {kept}")
    return problems


def main() -> int:
    out = Path(sys.argv[1])
    problems = check(out)
    for problem in problems:
        print(f"readback: {problem}")
    print(f"readback: {out}: {'FAILED' if problems else 'all three files read back and hold'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
