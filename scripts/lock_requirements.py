#!/usr/bin/env python3
"""Refresh the pinned dependency sets in ``requirements/`` (run deliberately, never by CI).

    python3 scripts/lock_requirements.py                       # the Pythons found on PATH / pyenv
    python3 scripts/lock_requirements.py --python 3.11=/usr/bin/python3.11 --python 3.12=/opt/py312/bin/python3

For every Python (3.10, 3.11, 3.12) and every install the README and CI make, pip resolves the
package's extras from scratch in a throw-away virtual environment (``pip install --dry-run
--ignore-installed --report``: nothing is installed), and the exact versions it picked become one
constraints file per ROS 2 distro:

- ``requirements/lock.txt``: ``.[cpu,ros,training,dev]`` (Kilted, the README's commands and CI's
  first environment) and ``.[gpu,ros,training,dev]`` (``onnxruntime-gpu`` and the CUDA wheels).
- ``requirements/lock-jazzy.txt``: ``.[cpu,ros-jazzy,training,test]`` (CI's second environment).

A package whose version differs between Pythons gets one line per Python with a
``python_version`` marker. Both ROS distros ship their libraries under the same distribution
names (``ros-rclpy`` …) at different versions, so they cannot share one file.

After a refresh: run both README commands and ``bash .ci/run`` on a fresh clone, read the diff
of ``requirements/`` and note in ``requirements/README.md`` what moved and what was re-verified.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "requirements"
PYTHONS = ("3.10", "3.11", "3.12")
# (lock file, extras sets resolved into it). The first set of a file wins where two sets pick differently.
LOCKS = {
    "lock.txt": ("cpu,ros,training,dev", "gpu,ros,training,dev"),
    "lock-jazzy.txt": ("cpu,ros-jazzy,training,test",),
}
HEADER = """\
# Exact versions for {what}, resolved by scripts/lock_requirements.py on {date}
# (pip {pip}, Pythons {pythons}). Install with `PIP_CONSTRAINT={name} pip install -e ".[...]"`;
# refresh deliberately with `python3 scripts/lock_requirements.py` (see requirements/README.md).
"""
WHAT = {"lock.txt": "the Kilted environment (README, CI) and the gpu extra",
        "lock-jazzy.txt": "CI's ROS 2 Jazzy environment"}


def find_python(version: str) -> str | None:
    """An interpreter of ``version``: ``pythonX.Y`` on PATH, else a pyenv install."""
    candidates = [shutil.which(f"python{version}")]
    candidates += [str(p) for p in sorted(Path.home().glob(f".pyenv/versions/{version}.*/bin/python"), reverse=True)]
    for path in filter(None, candidates):
        # A pyenv shim is on PATH for every installed version but runs only the selected ones.
        run = subprocess.run([path, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True)
        if run.returncode == 0 and run.stdout.strip() == version:
            return path
    return None


def resolve(python: str, extras: str, work: Path) -> dict[str, str]:
    """``{distribution: version}`` pip would install for ``.[extras]`` into a fresh venv of ``python``."""
    venv = work / "venv"
    if venv.exists():
        shutil.rmtree(venv)
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    report = work / "report.json"
    cmd = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed",
           "--report", str(report), "-e", f".[{extras}]"]
    subprocess.run(cmd, check=True, cwd=ROOT)
    data = json.loads(report.read_text())
    pins = {}
    for item in data["install"]:
        meta = item["metadata"]
        if canonical(meta["name"]) == "dgss-perception":
            continue  # the package itself
        pins[canonical(meta["name"])] = meta["version"]
    return pins


def canonical(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return "-".join(name.lower().replace("_", "-").replace(".", "-").split("-"))


def merge(per_python: dict[str, dict[str, str]]) -> list[str]:
    """Constraint lines: ``name==v`` where every Python agrees, else one marked line per Python."""
    names = sorted({n for pins in per_python.values() for n in pins})
    lines = []
    for name in names:
        versions = {py: pins.get(name) for py, pins in per_python.items()}
        present = {v for v in versions.values() if v is not None}
        if len(present) == 1 and all(v is not None for v in versions.values()):
            lines.append(f"{name}=={present.pop()}")
            continue
        for py, version in sorted(versions.items()):
            if version is not None:
                lines.append(f'{name}=={version} ; python_version == "{py}"')
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", action="append", default=[], metavar="X.Y=PATH",
                        help="interpreter for a Python version (default: found on PATH or in pyenv)")
    args = parser.parse_args(argv)
    given = dict(item.split("=", 1) for item in args.python)
    pythons = {v: given.get(v) or find_python(v) for v in PYTHONS}
    missing = [v for v, p in pythons.items() if p is None]
    if missing:
        print(f"no interpreter for Python {', '.join(missing)}: pass --python X.Y=PATH", file=sys.stderr)
        return 2
    import datetime as dt

    pip = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True, text=True).stdout.split()[1]
    OUT.mkdir(exist_ok=True)
    for name, sets in LOCKS.items():
        per_python: dict[str, dict[str, str]] = {}
        for version, python in pythons.items():
            pins: dict[str, str] = {}
            for extras in sets:
                with tempfile.TemporaryDirectory() as tmp:
                    print(f"{name}: Python {version}, .[{extras}]", flush=True)
                    for dist, v in resolve(python, extras, Path(tmp)).items():
                        pins.setdefault(dist, v)
            per_python[version] = pins
        text = HEADER.format(what=WHAT[name], date=dt.date.today().isoformat(), pip=pip,
                             pythons=", ".join(PYTHONS), name=f"requirements/{name}")
        (OUT / name).write_text(text + "\n".join(merge(per_python)) + "\n")
        print(f"wrote requirements/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
