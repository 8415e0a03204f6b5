"""Compare runs in one self-contained HTML report: table, metric curves and samples.

    python compare.py logs/vae_digits/multiruns/2026-12-04_10-00-00_123456
    python compare.py logs/vae_digits/runs/A logs/gan_digits/runs/B -o report.html
    python compare.py logs --force                      # every run under logs/
    python compare.py logs -o report.html --screenshot report.png

Each path is a run directory, a sweep directory or any folder with runs below it. The
report needs no network and no other file, so it can be opened offline or sent by mail.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import track

from genlab.report import (
    DEFAULT_OUTPUT,
    NoRunFoundError,
    build_report,
    find_run_dirs,
    name_runs,
    now_iso,
    read_run,
    save_screenshot,
    write_report,
)

log = logging.getLogger("genlab.compare")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Write an HTML report that compares training runs: a sortable table of "
        "their status, differing hyperparameters and metrics, the metric curves of all runs "
        "overlaid, and the last samples of each run.",
    )
    parser.add_argument(
        "paths",
        nargs="+",
        type=Path,
        help="run directories, sweep directories or folders that contain runs (searched "
        "recursively)",
    )
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path(DEFAULT_OUTPUT),
        help=f"HTML file to write (default: {DEFAULT_OUTPUT} in the current directory)",
    )
    parser.add_argument(
        "-f",
        "--force",
        action="store_true",
        help="overwrite the output files if they exist",
    )
    parser.add_argument(
        "--screenshot",
        type=Path,
        metavar="PNG",
        help="also save a PNG screenshot of the top of the report, taken with headless Chromium",
    )
    parser.add_argument(
        "--window-size",
        type=_window_size,
        default=(1280, 1600),
        metavar="WIDTH,HEIGHT",
        help="size of the screenshot in CSS pixels (default: 1280,1600)",
    )
    return parser.parse_args(argv)


def _window_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid window size {text!r}: expected WIDTH,HEIGHT in pixels, e.g. 1280,1600"
        ) from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(
            f"invalid window size {text!r}: width and height must be at least 1"
        )
    return width, height


def main(argv: list[str] | None = None) -> int:
    """Write the report of the runs found in the given paths and return the exit status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    console = Console(stderr=True)

    for path in (args.output, args.screenshot):
        if path is not None and path.exists() and not args.force:
            log.error(
                "%s already exists. Pass --force to overwrite it, or choose another file.", path
            )
            return 1

    try:
        run_dirs = find_run_dirs(args.paths)
    except NoRunFoundError as error:
        log.error("No runs to compare:\n%s", error)
        return 2

    start = time.perf_counter()
    now = time.time()
    runs = [
        read_run(path, now)
        for path in track(run_dirs, description="Reading runs", console=console, transient=True)
    ]
    name_runs(runs)
    for run in runs:
        for problem in run.problems:
            log.warning("%s: %s", run.path, problem)
    report = build_report(runs, [str(path) for path in args.paths], now_iso())
    try:
        write_report(report, args.output, force=args.force)
    except FileExistsError as error:
        log.error("%s", error)
        return 1
    except OSError as error:
        log.error("Writing the report to %s failed: %s", args.output, error)
        return 1

    seconds = time.perf_counter() - start
    size_mb = args.output.stat().st_size / 1e6
    log.info(
        "Compared %d runs in %.1f s and wrote %s (%.1f MB)",
        len(runs),
        seconds,
        args.output,
        size_mb,
    )
    if args.screenshot is not None:
        try:
            save_screenshot(args.output, args.screenshot, args.window_size)
        except (FileNotFoundError, RuntimeError) as error:
            log.error("Screenshot failed: %s", error)
            return 1
        log.info("Saved a screenshot to %s", args.screenshot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
