"""Print the FID values of a run, epoch by epoch, from its CSV metrics.

    python benchmarks/fid_curve.py logs/mnist_gan/runs/<timestamp>

Reads <run dir>/csv/metrics.csv (written by the `csv` logger) and prints every column
whose name starts with val/fid, together with val/nelbo when the run logged it.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="run directory that contains csv/metrics.csv")
    args = parser.parse_args()

    path = args.run_dir / "csv" / "metrics.csv"
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    if not rows:
        raise SystemExit(f"no metrics in {path}")

    columns = [name for name in rows[0] if name.startswith("val/fid")]
    columns += [name for name in ("val/nelbo",) if name in rows[0]]
    if not any(name.startswith("val/fid") for name in columns):
        raise SystemExit(f"no val/fid column in {path}: was FID enabled (model.fid)?")

    print("epoch  step  " + "  ".join(columns))
    for row in rows:
        if any(row[name] for name in columns):
            values = "  ".join(f"{float(row[name]):.4f}" if row[name] else "-" for name in columns)
            print(f"{row['epoch']:>5}  {row['step']:>4}  {values}")


if __name__ == "__main__":
    main()
