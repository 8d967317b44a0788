"""Start-up time of the ``timm-remem`` command against ``python -c "import timm"``, measured side by side.

Each row is a fresh interpreter (``sys.executable``), wall time from start to exit. The commands are run in turn,
round after round (``--repeats`` rounds), so a machine that gets busier or quieter affects every row alike; the
table shows the median of each and its ratio to the median of ``import timm`` (target: below 0.2). The last column
says whether the command imported torch or timm (``python -X importtime``; it must not).

Usage: ``python benchmarks/bench_cli.py [--repeats 7]``. Never asserts.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time

PY = sys.executable
ROWS = {
    'python -c "import timm"': [PY, "-c", "import timm"],
    'python -c "pass"': [PY, "-c", "pass"],
    "timm-remem --help": [PY, "-m", "timm_remem", "--help"],
    "timm-remem --version": [PY, "-m", "timm_remem", "--version"],
    "timm-remem finetune --help": [PY, "-m", "timm_remem", "finetune", "--help"],
    "timm-remem finetune --epochs x (usage error)": [PY, "-m", "timm_remem", "finetune", "--epochs", "x"],
}
REFERENCE = 'python -c "import timm"'


def wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - t0


def imports_heavy(cmd: list[str]) -> str:
    if cmd[1] != "-m":
        return ""
    done = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], capture_output=True, text=True, check=False)
    names = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    return ", ".join(sorted(names & {"torch", "timm"})) or "no"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="rounds over all rows (default: 7)")
    args = parser.parse_args()
    times: dict[str, list[float]] = {name: [] for name in ROWS}
    for cmd in ROWS.values():  # one warm-up round: the file cache, .pyc files
        wall(cmd)
    for _ in range(args.repeats):
        for name, cmd in ROWS.items():
            times[name].append(wall(cmd))
    reference = statistics.median(times[REFERENCE])
    script = shutil.which("timm-remem")
    print(f"python {sys.version.split()[0]}, {args.repeats} rounds, median wall time of a fresh process"
          + (f"; the console script is {script}" if script else ""))
    print()
    print("| command | median (s) | min (s) | ratio to import timm | imports torch/timm |")
    print("|---|---|---|---|---|")
    for name, cmd in ROWS.items():
        median = statistics.median(times[name])
        print(f"| `{name}` | {median:.3f} | {min(times[name]):.3f} | {median / reference:.3f} | "
              f"{imports_heavy(cmd)} |")


if __name__ == "__main__":
    main()
