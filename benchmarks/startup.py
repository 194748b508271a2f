"""Start-up cost of `import aefeatures` and `aefeatures --help`, against a bare interpreter.

    python benchmarks/startup.py [--runs 21] [--source DIR]

Each command runs in a fresh process ``--runs`` times; the median and the minimum wall time
are printed, with the ratio of the median to the bare interpreter's (``python -c pass``, the
floor). ``--source`` points PYTHONPATH at another source tree (e.g. an older commit's) to
compare.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

COMMANDS = {
    "python -c pass (floor)": ["-c", "pass"],
    "import aefeatures": ["-c", "import aefeatures"],
    "aefeatures --help": ["-m", "aefeatures", "--help"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--source", type=Path, default=Path(__file__).resolve().parents[1])
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(args.source.resolve())}
    floor = None
    for label, argv in COMMANDS.items():
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            subprocess.run([sys.executable, *argv], env=env, cwd=args.source, stdout=subprocess.DEVNULL, check=True)
            times.append(1000 * (time.perf_counter() - start))
        median = statistics.median(times)
        floor = floor or median
        print(f"{label:28s} median {median:6.0f} ms  min {min(times):6.0f} ms  {median / floor:5.1f}x floor")


if __name__ == "__main__":
    main()
