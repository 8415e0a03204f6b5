"""Measure what exact resumption costs: the random state kept at every training step, and
the atomic checkpoint write compared with Lightning's own.

    python benchmarks/resume_overhead.py
    python benchmarks/resume_overhead.py --checkpoint-mb 500 --repeats 5 --output /scratch
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from genlab.resume import AtomicCheckpointIO, _random_state, _set_random_state


def time_random_state(steps: int) -> float:
    """Return the mean seconds per step of recording and restoring the random state."""
    start = time.perf_counter()
    for _ in range(steps):
        state = _random_state()
        _set_random_state(state)
    return (time.perf_counter() - start) / steps


def time_saves(io: TorchCheckpointIO, checkpoint: dict, path: Path, repeats: int) -> list[float]:
    """Return the seconds of each of `repeats` saves of `checkpoint` to `path`."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        io.save_checkpoint(checkpoint, path)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000, help="steps to time the state over")
    parser.add_argument("--checkpoint-mb", type=int, default=200, help="size of the checkpoint")
    parser.add_argument("--repeats", type=int, default=5, help="saves per writer")
    parser.add_argument("--output", type=Path, default=None, help="folder for the checkpoints")
    args = parser.parse_args()

    per_step = time_random_state(args.steps)
    print(f"random state, record and restore: {per_step * 1e6:.1f} us per training step")

    numel = args.checkpoint_mb * 2**20 // 4
    checkpoint = {"state_dict": {"weight": torch.randn(numel)}, "global_step": 1}
    with tempfile.TemporaryDirectory(dir=args.output) as folder:
        path = Path(folder) / "last.ckpt"
        for name, io in (("Lightning", TorchCheckpointIO()), ("atomic", AtomicCheckpointIO())):
            times = time_saves(io, checkpoint, path, args.repeats)
            median = statistics.median(times)
            print(
                f"{name:>9} save of {args.checkpoint_mb} MB: median {median:.3f} s"
                f" (min {min(times):.3f}, max {max(times):.3f}, {args.repeats} saves)"
            )


if __name__ == "__main__":
    main()
