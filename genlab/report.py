"""Offline comparison of runs: one self-contained HTML file with a table, curves and samples.

`compare.py` is the command line. The report has three parts:

- a table with one row per run: status, the hyperparameters that differ between the runs,
  and the best and final value of every metric. Clicking a column header sorts by it, and a
  fragment such as `report.html#sort=val%2Fnelbo+final&order=desc` sorts on load.
- one plot per metric of csv/metrics.csv, every run overlaid, drawn as inline SVG.
- the last sample grid of each run for every sample key, and the last text sample, embedded
  as data: URIs.

The file references nothing outside itself (no scripts, fonts or images from the network),
so it opens offline and can be sent by mail. All text read from run directories is
HTML-escaped before it is written into the page.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from genlab.metrics import is_lower_better

log = logging.getLogger(__name__)

DEFAULT_OUTPUT = "compare_report.html"

# A run without summary.json counts as running when one of these files changed within
# RUNNING_WINDOW_S, and as incomplete otherwise (killed, lost its node, or still running
# but silent for that long: Lightning's CSVLogger writes every 100 steps by default).
ACTIVITY_FILES = ("train.log", "csv/metrics.csv", "checkpoints/last.ckpt")
RUNNING_WINDOW_S = 15 * 60

# A plot uses a logarithmic y axis when all its values are positive and the largest is at
# least this many times the smallest. Otherwise its y axis is linear.
LOG_SCALE_RATIO = 100.0
# Longer curves are reduced to the minimum and maximum of each of MAX_CURVE_POINTS / 2
# buckets of steps, which keeps spikes visible and the file small.
MAX_CURVE_POINTS = 600
# Curves with at most this many points also get a marker at each point, so a metric
# validated once still shows up.
MAX_MARKED_POINTS = 40
# Text samples longer than this are cut in the report.
MAX_TEXT_SAMPLE_CHARS = 10_000

# Matplotlib's default colour cycle ("tab10"). Runs past the tenth reuse the colours with a
# dash pattern.
PALETTE = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
    "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
)  # fmt: skip
DASHES = ("", "6 3", "2 2", "8 3 2 3")

# Config keys that name folders and so differ between any two runs. Values that lie inside
# the run's own directory are left out as well (see `_is_location_key`).
LOCATION_GROUPS = ("paths",)
LOCATION_KEYS = ("dir", "dirpath", "save_dir", "default_root_dir", "output_dir")

SAMPLE_FILE = re.compile(r"^(?P<key>.+)_epoch(?P<epoch>\d+)_step(?P<step>\d+)\.(?P<ext>png|txt)$")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Columns of csv/metrics.csv that are not metrics.
CSV_INDEX_COLUMNS = ("epoch", "step")


class NoRunFoundError(ValueError):
    """A path given to the report is missing or contains no run directory."""


# ----------------------------------------------------------------------------------------
# Reading runs


@dataclass
class Sample:
    """The last sample file of one key in a run's samples/ folder."""

    key: str
    epoch: int
    step: int
    path: Path


@dataclass
class Run:
    """One run directory as the report shows it."""

    path: Path
    status: str  # finished, stopped, failed, running or incomplete
    status_detail: str = ""
    error: str | None = None
    config: dict[str, Any] = field(default_factory=dict)  # flattened: {"model.lr": 0.001}
    started_at: str | None = None
    git_commit: str | None = None
    steps: int | None = None
    final: dict[str, float] = field(default_factory=dict)
    best: dict[str, float] = field(default_factory=dict)
    metrics_source: str | None = None  # "summary.json" or "csv/metrics.csv"
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    name: str = ""


def is_run_dir(path: Path) -> bool:
    """Return whether `path` is a run directory.

    train.py writes config.yaml beside Hydra's .hydra/ folder and run_info.json. A job of a
    sweep whose config was rejected has only .hydra/config.yaml, summary.json and train.log.
    """
    if (path / "config.yaml").is_file():
        return (path / ".hydra").is_dir() or (path / "run_info.json").is_file()
    return (path / ".hydra" / "config.yaml").is_file()


def find_run_dirs(paths: Sequence[Path]) -> list[Path]:
    """Return the run directories in `paths`, each given or found by searching below it.

    The runs of each path are in natural order (job 2 before job 10), the paths in the
    order given, and a run found twice is listed once. Symbolic links to folders are
    followed. Raises NoRunFoundError naming every path that does not exist or contains
    no run.
    """
    found: list[Path] = []
    seen: set[Path] = set()
    problems = []
    for path in paths:
        if not path.exists():
            problems.append(f"{path}: no such file or directory")
            continue
        if not path.is_dir():
            problems.append(f"{path}: not a directory; give a run directory or a folder of runs")
            continue
        runs = sorted(_search_runs(path), key=lambda run: _natural_key(str(run)))
        if not runs:
            problems.append(
                f"{path}: contains no run directory (a folder with config.yaml and .hydra/ "
                "or run_info.json, as train.py writes)"
            )
        for run in runs:
            if run.resolve() not in seen:
                seen.add(run.resolve())
                found.append(run)
    if problems:
        raise NoRunFoundError("\n".join(problems))
    return found


def _search_runs(root: Path) -> Iterable[Path]:
    visited: set[str] = set()
    for dirpath, dirnames, _ in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:  # a link that leads back up the tree
            dirnames[:] = []
            continue
        visited.add(real)
        if is_run_dir(Path(dirpath)):
            dirnames[:] = []  # nothing below a run directory is another run
            yield Path(dirpath)
        else:
            dirnames[:] = [name for name in dirnames if name not in ("wandb", ".submitit")]


def _natural_key(text: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def read_run(path: Path, now: float | None = None) -> Run:
    """Read a run directory: its config, status, metrics, curves and last samples.

    `now` (seconds since the epoch, default the current time) separates running runs from
    incomplete ones. A file that cannot be read adds a line to
    `Run.problems` instead of raising, so one broken run does not stop the report.
    """
    now = time.time() if now is None else now
    run = Run(path=path, status="incomplete")
    run.config = _read_config(path, run.problems)
    run_info = _read_json(path / "run_info.json", run.problems) or {}
    run.started_at = run_info.get("started_at")
    run.git_commit = run_info.get("git_commit")
    summary = _current_summary(path, run_info, run.problems)
    steps, run.curves = _read_metrics_csv(path / "csv" / "metrics.csv", run.problems)

    if summary is not None:
        run.status = str(summary.get("status", "finished"))
        error = str(summary.get("error") or "").strip()
        if error:
            run.error = error
            run.status_detail = _error_summary(error)
    else:
        last_write = _last_write(path)
        age = _format_age(now - last_write) if last_write is not None else None
        run.status = (
            "running" if last_write is not None and now - last_write < RUNNING_WINDOW_S
            else "incomplete"
        )  # fmt: skip
        run.status_detail = "no summary.json" + (f"; last write {age} ago" if age else "")

    # RunSummary writes final and best metrics when fit ends. A failed run's summary.json
    # may still contain those of an earlier start, so its metrics come from the CSV log.
    if summary is not None and run.status in ("finished", "stopped"):
        run.final = _float_dict(summary.get("final"))
        run.best = _float_dict(summary.get("best"))
        run.metrics_source = "summary.json"
    elif run.curves:
        run.final, run.best = _final_and_best(run.curves)
        run.metrics_source = "csv/metrics.csv"
    # The last logged step is the x axis of the plots. summary.json's global_step can be
    # larger: Lightning counts each optimizer's step, so a GAN makes two per batch.
    run.steps = steps if steps is not None else (summary or {}).get("global_step")

    run.samples = _last_samples(path / "samples")
    return run


def _error_summary(error: str) -> str:
    """Return the first line of an error, and the next one when the first is a heading.

    A ConfigError's first line is "ConfigError: Invalid configuration (1 problem):", and the
    problem itself is on the second.
    """
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{lines[0]} {lines[1]}"
    return lines[0]


def _read_config(path: Path, problems: list[str]) -> dict[str, Any]:
    """Return the run's flattened config.yaml, or Hydra's copy when train.py wrote none."""
    config_path = path / "config.yaml"
    if not config_path.is_file():
        config_path = path / ".hydra" / "config.yaml"
        problems.append(
            "no config.yaml (train.py stopped before writing it); the config is Hydra's "
            ".hydra/config.yaml, with ${...} interpolations unresolved"
        )
    name = config_path.relative_to(path)
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        problems.append(f"{name} could not be read: {error}")
        return {}
    if not isinstance(config, dict):
        problems.append(f"{name} does not contain a mapping")
        return {}
    return flatten_config(config)


def flatten_config(node: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested mappings to dotted keys: {"model": {"lr": 1}} -> {"model.lr": 1}.

    Lists stay whole values, and an empty mapping is kept as the value {}.
    """
    flat: dict[str, Any] = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _read_json(path: Path, problems: list[str]) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        # summary.json is rewritten in place, so a report made at that moment reads part of it.
        problems.append(f"{path.name} could not be read: {error}")
        return None
    if not isinstance(data, dict):
        problems.append(f"{path.name} does not contain a JSON object")
        return None
    return data


def _current_summary(
    path: Path, run_info: dict[str, Any], problems: list[str]
) -> dict[str, Any] | None:
    """Return summary.json, or None when there is none or it predates the last resumption.

    A run resumed in its own directory keeps the summary.json of its previous start until
    it ends again; run_info.json records when each resumption started.
    """
    summary_path = path / "summary.json"
    summary = _read_json(summary_path, problems)
    if summary is None:
        return None
    resumed = run_info.get("resumed") or []
    if resumed and isinstance(resumed[-1], dict):
        try:
            resumed_at = datetime.fromisoformat(resumed[-1]["at"]).timestamp()
        except (KeyError, TypeError, ValueError):
            return summary
        if resumed_at > summary_path.stat().st_mtime:
            return None
    return summary


def _last_write(path: Path) -> float | None:
    times = [(path / name).stat().st_mtime for name in ACTIVITY_FILES if (path / name).is_file()]
    return max(times) if times else None


def _format_age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} days"


def _float_dict(node: Any) -> dict[str, float]:
    if not isinstance(node, dict):
        return {}
    values = {}
    for key, value in node.items():
        try:
            values[str(key)] = float(value)
        except (TypeError, ValueError):
            continue
    return values


def _read_metrics_csv(
    path: Path, problems: list[str]
) -> tuple[int | None, dict[str, list[tuple[int, float]]]]:
    """Return the last step and every metric's curve [(step, value), ...] from metrics.csv.

    A step logged twice keeps its last value: a run resumed from an earlier checkpoint
    appends the steps after that checkpoint again. Empty, unparsable and non-finite values
    are skipped. A last line without its newline is still being written by a running run
    and is skipped too.
    """
    if not path.is_file():
        return None, {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        problems.append(f"csv/metrics.csv could not be read: {error}")
        return None, {}
    lines = text.splitlines()
    if lines and not text.endswith("\n"):
        lines.pop()
    try:
        rows = csv.reader(lines)
        header = next(rows, [])
        if "step" not in header:
            problems.append("csv/metrics.csv has no step column")
            return None, {}
        step_index = header.index("step")
        columns = [(i, name) for i, name in enumerate(header) if name not in CSV_INDEX_COLUMNS]
        by_metric: dict[str, dict[int, float]] = {name: {} for _, name in columns}
        last_step = None
        for row in rows:
            if len(row) != len(header):
                continue
            step_value = _parse_float(row[step_index])
            if step_value is None:
                continue
            step = int(step_value)
            last_step = step if last_step is None else max(last_step, step)
            for index, name in columns:
                value = _parse_float(row[index])
                if value is not None:
                    by_metric[name][step] = value
    except csv.Error as error:
        problems.append(f"csv/metrics.csv could not be parsed: {error}")
        return None, {}
    curves = {name: sorted(points.items()) for name, points in by_metric.items() if points}
    return last_step, curves


def _parse_float(text: str | None) -> float | None:
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _final_and_best(
    curves: dict[str, list[tuple[int, float]]],
) -> tuple[dict[str, float], dict[str, float]]:
    """Return the final and best values of the train/ and val/ metrics of a CSV log.

    As in summary.json, the best value is tracked only for validation metrics that are
    better when lower.
    """
    final, best = {}, {}
    for name, points in curves.items():
        if not name.startswith(("train/", "val/")):
            continue
        final[name] = points[-1][1]
        if name.startswith("val/") and is_lower_better(name):
            best[name] = min(value for _, value in points)
    return final, best


def _last_samples(folder: Path) -> list[Sample]:
    """Return the sample file with the highest step of each key, ordered by key."""
    if not folder.is_dir():
        return []
    last: dict[str, Sample] = {}
    for path in folder.iterdir():
        match = SAMPLE_FILE.match(path.name)
        if match is None or not path.is_file():
            continue
        sample = Sample(match["key"], int(match["epoch"]), int(match["step"]), path)
        current = last.get(sample.key)
        if current is None or (sample.step, sample.epoch) > (current.step, current.epoch):
            last[sample.key] = sample
    return [last[key] for key in sorted(last)]


def name_runs(runs: Sequence[Run]) -> None:
    """Name each run by its path relative to the deepest folder that contains every run."""
    if not runs:
        return
    absolute = [run.path.absolute() for run in runs]
    common = Path(os.path.commonpath(absolute))
    for run, path in zip(runs, absolute, strict=True):
        relative = path.relative_to(common)
        run.name = str(relative) if relative != Path(".") else path.name


# ----------------------------------------------------------------------------------------
# Building the page


@dataclass
class RunStyle:
    """The line style of a run: colour, dash pattern and label in plot legends."""

    color: str
    dash: str
    label: str


def build_report(runs: Sequence[Run], sources: Sequence[str], generated_at: str) -> str:
    """Return the HTML page comparing `runs`.

    `sources` are the paths the runs were found in and `generated_at` the time shown in the
    page header.
    """
    hyperparameters = differing_keys(runs)
    styles = [
        RunStyle(
            PALETTE[index % len(PALETTE)],
            DASHES[(index // len(PALETTE)) % len(DASHES)],
            _legend_label(run, hyperparameters),
        )
        for index, run in enumerate(runs)
    ]
    sections = [
        _render_header(runs, sources, generated_at),
        _render_table(runs, styles, hyperparameters),
        _render_plots(runs, styles),
        _render_samples(runs),
    ]
    return PAGE.format(
        title=_escape(f"genlab: comparison of {_count(len(runs), 'run')}"),
        style=STYLE,
        body="\n".join(sections),
        script=SCRIPT,
    )


def differing_keys(runs: Sequence[Run]) -> list[str]:
    """Return the config keys whose values are not the same in every run.

    A key that some runs lack counts as differing. Keys that name folders are left out
    (see `_is_location_key`). First come the keys on which the runs that have them
    disagree. Then come the keys that differ only in which runs have them, such as the
    settings of another model family. Each group is in config order.
    """
    ordered: dict[str, None] = {}
    for run in runs:
        ordered.update(dict.fromkeys(run.config))
    disagreeing, partial = [], []
    for key in ordered:
        if any(_is_location_key(key, run) for run in runs):
            continue
        present = {_canonical(run.config[key]) for run in runs if key in run.config}
        if len(present) > 1:
            disagreeing.append(key)
        elif any(key not in run.config for run in runs):
            partial.append(key)
    return disagreeing + partial


_MISSING = object()


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _is_location_key(key: str, run: Run) -> bool:
    """Return whether `key` names a folder, which differs between any two runs.

    These are the keys of the paths group, keys such as `dirpath` or `save_dir`, keys that
    end in `_dir`, and keys whose value is a path inside the run's own directory.
    """
    parts = key.split(".")
    if parts[0] in LOCATION_GROUPS or parts[-1] in LOCATION_KEYS or parts[-1].endswith("_dir"):
        return True
    value = run.config.get(key)
    if not isinstance(value, str) or not value:
        return False
    run_dirs = {str(run.path.absolute()), str(run.config.get("paths.output_dir") or "")}
    return any(value == folder or value.startswith(folder + "/") for folder in run_dirs if folder)


def _legend_label(run: Run, hyperparameters: Sequence[str]) -> str:
    """Return the run's name, followed by its differing hyperparameters when there are few."""
    if not 0 < len(hyperparameters) <= 3:
        return run.name
    values = ", ".join(
        f"{key}={_format_value(run.config.get(key, _MISSING))}" for key in hyperparameters
    )
    return f"{run.name} ({values})"


def _render_header(runs: Sequence[Run], sources: Sequence[str], generated_at: str) -> str:
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.status] = counts.get(run.status, 0) + 1
    statuses = ", ".join(f"{count} {status}" for status, count in sorted(counts.items()))
    source_list = "".join(f"<li><code>{_escape(source)}</code></li>" for source in sources)
    return (
        f"<h1>Comparison of {_count(len(runs), 'run')}</h1>\n"
        f'<p class="meta">{_escape(statuses)}. Generated {_escape(generated_at)} from:</p>\n'
        f'<ul class="meta">{source_list}</ul>'
    )


# ---- table


@dataclass
class Column:
    """A column of the run table: its header, which is also its sort key, and its cells."""

    header: str
    cell: Callable[[Run], str]
    description: str = ""


def _render_table(
    runs: Sequence[Run], styles: Sequence[RunStyle], hyperparameters: Sequence[str]
) -> str:
    columns = _table_columns(runs, hyperparameters)
    header = '<th scope="col" tabindex="0" data-key="run">run</th>' + "".join(
        f'<th scope="col" tabindex="0" data-key="{_escape(column.header)}"'
        + (f' title="{_escape(column.description)}"' if column.description else "")
        + f">{_escape(column.header)}</th>"
        for column in columns
    )
    rows = []
    for run, style in zip(runs, styles, strict=True):
        cells = [_run_cell(run, style)] + [column.cell(run) for column in columns]
        rows.append(f'<tr data-run="{_escape(run.name)}">{"".join(cells)}</tr>')
    if hyperparameters:
        note = "Hyperparameters are the config keys whose values differ between the runs."
    elif len(runs) > 1:
        note = "All runs have the same config, apart from their folders."
    else:
        note = "There is one run, so no hyperparameters are compared."
    return (
        "<h2>Runs</h2>\n"
        f"<p>{note} Metrics come from summary.json, or from csv/metrics.csv for runs "
        "without a current summary. A dash marks a value the run does not have. Click a "
        "column header to sort by it; missing values stay last.</p>\n"
        f'<div class="table-wrap"><table id="runs"><thead><tr>{header}</tr></thead>\n'
        f"<tbody>\n{chr(10).join(rows)}\n</tbody></table></div>"
    )


def _table_columns(runs: Sequence[Run], hyperparameters: Sequence[str]) -> list[Column]:
    """Return the columns after the first, which shows each run's name and colour."""
    step_description = "last step in csv/metrics.csv, or global_step in summary.json without it"
    columns = [
        Column("status", _status_cell),
        Column("step", lambda run: _value_cell(run.steps), step_description),
        Column("started", lambda run: _text_cell(run.started_at)),
    ]
    if len({run.git_commit for run in runs if run.git_commit}) > 1:
        columns.append(Column("git commit", lambda run: _text_cell(run.git_commit)))
    for key in hyperparameters:
        columns.append(Column(key, _config_cell(key), "hyperparameter"))
    for metric in _ordered_metrics(runs):
        if any(metric in run.best for run in runs):
            best = _metric_cell(metric, "best")
            columns.append(Column(f"{metric} best", best, "lowest value at a validation"))
        final = _metric_cell(metric, "final")
        columns.append(Column(f"{metric} final", final, "last value"))
    return columns


def _ordered_metrics(runs: Sequence[Run]) -> list[str]:
    names = {name for run in runs for name in (*run.final, *run.best)}
    return sorted(names, key=_metric_order)


def _metric_order(name: str) -> tuple[int, str]:
    """Sort key of metric names: validation metrics first, then training, then the rest."""
    if name.startswith("val/"):
        return 0, name
    if name.startswith("train/"):
        return 1, name
    return 2, name


def _run_cell(run: Run, style: RunStyle) -> str:
    return (
        f'<td class="run" title="{_escape(str(run.path.absolute()))}">'
        f"{_swatch(style)}{_escape(run.name)}</td>"
    )


def _status_cell(run: Run) -> str:
    details = [run.status_detail] if run.status_detail else []
    details += run.problems
    tooltip = run.error or "\n".join(details)
    if run.metrics_source:
        tooltip += ("\n" if tooltip else "") + f"metrics from {run.metrics_source}"
    detail_html = "".join(f'<span class="detail">{_escape(text)}</span>' for text in details)
    return (
        f'<td class="status" data-text="{_escape(run.status)}" title="{_escape(tooltip)}">'
        f'<span class="badge {_escape(run.status)}">{_escape(run.status)}</span>{detail_html}</td>'
    )


def _config_cell(key: str) -> Callable[[Run], str]:
    def cell(run: Run) -> str:
        if key not in run.config:
            return _missing_cell()
        value = run.config[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return _value_cell(value, text=_format_value(value), tooltip=repr(value))
        return _text_cell(_format_value(value))

    return cell


def _metric_cell(metric: str, kind: str) -> Callable[[Run], str]:
    def cell(run: Run) -> str:
        values = run.best if kind == "best" else run.final
        if metric not in values:
            return _missing_cell()
        value = values[metric]
        return _value_cell(value, text=f"{value:.5g}", tooltip=repr(value))

    return cell


def _value_cell(value: float | int | None, text: str | None = None, tooltip: str = "") -> str:
    """Return a numeric cell; the table script sorts it by `data-value`."""
    if value is None:
        return _missing_cell()
    text = str(value) if text is None else text
    title = f' title="{_escape(tooltip)}"' if tooltip else ""
    if not math.isfinite(value):  # sorted as text, after the numbers
        return f'<td class="number"{title}>{_escape(text)}</td>'
    return f'<td class="number" data-value="{value!r}"{title}>{_escape(text)}</td>'


def _text_cell(text: str | None) -> str:
    if text is None:
        return _missing_cell()
    return f"<td>{_escape(text)}</td>"


def _missing_cell() -> str:
    return '<td class="missing">-</td>'


def _format_value(value: Any) -> str:
    """Format a config value as YAML shows it: true, null, 0.001, [1, 2]."""
    if value is _MISSING:
        return "-"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        # 10 significant digits show 0.009 for 1e-3 * 9 = 0.009000000000000001.
        return f"{value:.10g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, default=str)
    return str(value)


def _swatch(style: RunStyle) -> str:
    dash = f' stroke-dasharray="{style.dash}"' if style.dash else ""
    return (
        '<svg class="swatch" width="18" height="8" aria-hidden="true">'
        f'<line x1="0" y1="4" x2="18" y2="4" stroke="{style.color}" stroke-width="3"{dash}/>'
        "</svg>"
    )


# ---- plots

PLOT_WIDTH, PLOT_HEIGHT = 460, 280
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 62, 14, 10, 36


def _render_plots(runs: Sequence[Run], styles: Sequence[RunStyle]) -> str:
    metrics = sorted({name for run in runs for name in run.curves}, key=_metric_order)
    if not metrics:
        return "<h2>Metric curves</h2>\n<p>No run has a csv/metrics.csv with values.</p>"
    figures = []
    for metric in metrics:
        series = [
            (style, run.curves[metric])
            for run, style in zip(runs, styles, strict=True)
            if run.curves.get(metric)
        ]
        figures.append(render_plot(metric, series))
    return (
        "<h2>Metric curves</h2>\n"
        "<p>One plot per column of csv/metrics.csv, over its step column. A plot whose values "
        f"are all positive and span a factor of {LOG_SCALE_RATIO:g} or more has a logarithmic "
        "y axis, marked in its title. NaN and infinite values are not drawn. Curves of more "
        f"than {MAX_CURVE_POINTS} points show the lowest and highest value of each range of "
        "steps.</p>\n"
        f'<div class="plots">\n{chr(10).join(figures)}\n</div>'
    )


def render_plot(metric: str, series: Sequence[tuple[RunStyle, list[tuple[int, float]]]]) -> str:
    """Return a <figure> with an SVG line plot of one metric for several runs, and its legend."""
    steps = [step for _, points in series for step, _ in points]
    values = [value for _, points in series for _, value in points]
    log_scale = min(values) > 0 and max(values) >= LOG_SCALE_RATIO * min(values)
    x_axis = _Axis.linear(
        min(steps), max(steps), MARGIN_LEFT, PLOT_WIDTH - MARGIN_RIGHT, min_step=1
    )
    y_range = (PLOT_HEIGHT - MARGIN_BOTTOM, MARGIN_TOP)  # SVG y grows downwards
    y_axis = (
        _Axis.logarithmic(min(values), max(values), *y_range)
        if log_scale
        else _Axis.linear(min(values), max(values), *y_range)
    )

    parts = [_render_axes(x_axis, y_axis)]
    for style, points in series:
        parts.append(_render_curve(style, _decimate(points, MAX_CURVE_POINTS), x_axis, y_axis))
    title = metric + (" (log scale)" if log_scale else "")
    svg = (
        f'<svg viewBox="0 0 {PLOT_WIDTH} {PLOT_HEIGHT}" role="img" '
        f'aria-label="{_escape(title)}">{"".join(parts)}</svg>'
    )
    legend = "".join(f"<li>{_swatch(style)}{_escape(style.label)}</li>" for style, _ in series)
    return (
        f'<figure class="plot" data-metric="{_escape(metric)}">'
        f"<figcaption>{_escape(title)}</figcaption>{svg}"
        f'<ul class="legend">{legend}</ul></figure>'
    )


@dataclass
class _Axis:
    """A map from data values in [low, high] to pixels in [start, end], with tick values."""

    low: float
    high: float
    start: float
    end: float
    ticks: list[float]
    log: bool = False

    @classmethod
    def linear(
        cls, low: float, high: float, start: float, end: float, min_step: float = 0.0
    ) -> _Axis:
        """Return an axis with about five ticks, spaced 1, 2 or 5 times a power of ten.

        `min_step` is the smallest tick spacing, 1 for an axis of whole numbers.
        """
        if high - low <= 1e-9 * max(abs(low), abs(high)):  # constant, up to rounding
            pad = max(abs(low) * 0.05, min_step) or 1.0
            low, high = low - pad, high + pad
        step = max(_nice_step((high - low) / 5), min_step)
        low, high = math.floor(low / step) * step, math.ceil(high / step) * step
        count = round((high - low) / step)
        return cls(low, high, start, end, [low + index * step for index in range(count + 1)])

    @classmethod
    def logarithmic(cls, low: float, high: float, start: float, end: float) -> _Axis:
        """Return an axis from a power of ten below `low` to one above `high`.

        Ticks are at 1, 2 and 5 times each power of ten over up to two decades, and at
        every k-th power of ten over more, so that there are at most about seven.
        """
        first, last = math.floor(math.log10(low)), math.ceil(math.log10(high))
        last = max(last, first + 1)
        if last - first <= 2:
            powers = range(first, last + 1)
            ticks = [m * 10.0**power for power in powers for m in (1, 2, 5)]
            ticks = [tick for tick in ticks if tick <= 10.0**last]
        else:
            stride = math.ceil((last - first) / 6)
            last = first + stride * math.ceil((last - first) / stride)
            ticks = [10.0**power for power in range(first, last + 1, stride)]
        return cls(10.0**first, 10.0**last, start, end, ticks, log=True)

    def __call__(self, value: float) -> float:
        if self.log:
            fraction = (math.log10(value) - math.log10(self.low)) / (
                math.log10(self.high) - math.log10(self.low)
            )
        else:
            fraction = (value - self.low) / (self.high - self.low)
        return self.start + fraction * (self.end - self.start)


def _nice_step(raw: float) -> float:
    """Round a tick spacing up to 1, 2 or 5 times a power of ten."""
    power = 10.0 ** math.floor(math.log10(raw))
    for multiple in (1, 2, 5, 10):
        if raw <= multiple * power:
            return multiple * power
    return 10 * power


def _render_axes(x_axis: _Axis, y_axis: _Axis) -> str:
    left, right = x_axis.start, x_axis.end
    bottom, top = y_axis.start, y_axis.end
    parts = ['<g class="grid">']
    for tick in y_axis.ticks:
        y = y_axis(tick)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}"/>')
    for tick in x_axis.ticks:
        x = x_axis(tick)
        parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{bottom}"/>')
    parts.append("</g>")
    parts.append(
        f'<rect class="frame" x="{left}" y="{top}" width="{right - left}" height="{bottom - top}"/>'
    )
    parts.append('<g class="ticks">')
    for tick in y_axis.ticks:
        parts.append(
            f'<text x="{left - 5}" y="{y_axis(tick) + 4:.1f}" text-anchor="end">'
            f"{_format_tick(tick)}</text>"
        )
    for tick in x_axis.ticks:
        parts.append(
            f'<text x="{x_axis(tick):.1f}" y="{bottom + 15}" text-anchor="middle">'
            f"{_format_tick(tick)}</text>"
        )
    parts.append(
        f'<text x="{(left + right) / 2}" y="{PLOT_HEIGHT - 4}" text-anchor="middle">step</text>'
    )
    parts.append("</g>")
    return "".join(parts)


def _format_tick(value: float) -> str:
    text = f"{value:.4g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}e{int(exponent)}"
    return "0" if text == "-0" else text


def _render_curve(
    style: RunStyle, points: Sequence[tuple[int, float]], x_axis: _Axis, y_axis: _Axis
) -> str:
    coordinates = [(x_axis(step), y_axis(value)) for step, value in points]
    dash = f' stroke-dasharray="{style.dash}"' if style.dash else ""
    label = _escape(style.label)
    parts = [
        '<polyline fill="none" stroke-width="1.8" stroke-linejoin="round" '
        f'stroke="{style.color}"{dash} points="'
        + " ".join(f"{x:.1f},{y:.1f}" for x, y in coordinates)
        + f'"><title>{label}</title></polyline>'
    ]
    if len(coordinates) <= MAX_MARKED_POINTS:
        parts.append(f'<g fill="{style.color}"><title>{label}</title>')
        parts.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3"/>' for x, y in coordinates)
        parts.append("</g>")
    return "".join(parts)


def _decimate(points: Sequence[tuple[int, float]], max_points: int) -> list[tuple[int, float]]:
    """Reduce a curve to the lowest and highest point of each bucket of consecutive steps.

    The first and last points are always kept, so the curve still ends at the final value.
    """
    if len(points) <= max_points:
        return list(points)
    bucket = math.ceil(len(points) / ((max_points - 2) // 2))
    kept = {points[0], points[-1]}
    for start in range(0, len(points), bucket):
        chunk = points[start : start + bucket]
        kept.add(min(chunk, key=lambda point: point[1]))
        kept.add(max(chunk, key=lambda point: point[1]))
    return sorted(kept)


# ---- samples


def _render_samples(runs: Sequence[Run]) -> str:
    keys = sorted({sample.key for run in runs for sample in run.samples})
    if not keys:
        return "<h2>Samples</h2>\n<p>No run has sample files in its samples/ folder.</p>"
    sections = ["<h2>Samples</h2>\n<p>The last sample of each run, by the step it was made at.</p>"]
    for key in keys:
        figures = []
        for run in runs:
            sample = next((sample for sample in run.samples if sample.key == key), None)
            if sample is not None:
                figures.append(_render_sample(run, sample))
        sections.append(
            f'<section class="sample-key"><h3>{_escape(key)}</h3>'
            f'<div class="samples">{"".join(figures)}</div></section>'
        )
    return "\n".join(sections)


def _render_sample(run: Run, sample: Sample) -> str:
    caption = (
        f"<figcaption>{_escape(run.name)}<br>"
        f'<span class="detail">epoch {sample.epoch}, step {sample.step}</span></figcaption>'
    )
    try:
        data = sample.path.read_bytes()
    except OSError as error:
        return f"<figure>{caption}<p>{_escape(f'could not be read: {error}')}</p></figure>"
    if sample.path.suffix == ".txt":
        text = data.decode("utf-8", errors="replace")
        if len(text) > MAX_TEXT_SAMPLE_CHARS:
            text = (
                text[:MAX_TEXT_SAMPLE_CHARS]
                + f"\n[... {len(text) - MAX_TEXT_SAMPLE_CHARS} more characters]"
            )
        return f'<figure class="text-sample">{caption}<pre>{_escape(text)}</pre></figure>'
    if not data.startswith(PNG_SIGNATURE):
        return f"<figure>{caption}<p>{_escape(sample.path.name)} is not a PNG file</p></figure>"
    uri = "data:image/png;base64," + base64.b64encode(data).decode("ascii")
    return (
        f'<figure class="image-sample">{caption}'
        f'<img src="{uri}" alt="{_escape(sample.key)} of {_escape(run.name)}"></figure>'
    )


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _escape(text: str) -> str:
    return html.escape(str(text), quote=True)


# ----------------------------------------------------------------------------------------
# Output


def write_report(text: str, output: Path, force: bool = False) -> None:
    """Write the report to `output`; raise FileExistsError if it exists, unless `force`."""
    output.parent.mkdir(parents=True, exist_ok=True)
    if force:
        # Written beside the target and renamed, so a reader never sees half a report.
        # open() applies the umask, which tempfile.mkstemp's private 0600 mode would not.
        temporary = output.with_name(f".{output.name}.{os.getpid()}.tmp")
        try:
            with open(temporary, "w", encoding="utf-8") as file:
                file.write(text)
            os.replace(temporary, output)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        return
    try:
        with open(output, "x", encoding="utf-8") as file:
            file.write(text)
    except FileExistsError:
        raise FileExistsError(
            f"{output} already exists. Pass --force to overwrite it, or choose another file "
            "with --output."
        ) from None


def find_chromium() -> str | None:
    """Return the path of a Chromium or Chrome executable on PATH, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path is not None:
            return path
    return None


def chromium_command(
    chromium: str, url: str, profile_dir: Path, extra_flags: Sequence[str] = ()
) -> list[str]:
    """Return the command line of a headless Chromium that opens `url` offline.

    Background services (updates, sync, extensions) are off, and every host name resolves
    to nothing, so a page that loaded anything by host name would fail instead of reaching
    the network. The report loads nothing.
    """
    return [
        chromium,
        "--headless",
        # Chromium does not start as root with its sandbox on ("Running as root without
        # --no-sandbox is not supported"), and CI containers run as root.
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-default-apps",
        "--disable-extensions",
        "--disable-sync",
        "--no-default-browser-check",
        "--no-first-run",
        "--hide-scrollbars",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        f"--user-data-dir={profile_dir}",
        *extra_flags,
        url,
    ]


def save_screenshot(
    report: Path, png: Path, window_size: tuple[int, int] = (1280, 1600), timeout_s: float = 120
) -> None:
    """Save a PNG screenshot of the top `window_size` CSS pixels of a report with headless Chromium.

    Raises FileNotFoundError when no Chromium is installed and RuntimeError when Chromium
    fails or writes no image.
    """
    chromium = find_chromium()
    if chromium is None:
        raise FileNotFoundError(
            "A screenshot needs Chromium, and none was found on PATH (chromium, "
            "chromium-browser, google-chrome). Install it (Debian: apt-get install chromium) "
            "or leave out --screenshot."
        )
    png = png.absolute()
    png.parent.mkdir(parents=True, exist_ok=True)
    width, height = window_size
    with tempfile.TemporaryDirectory(prefix="genlab-chromium-") as profile_dir:
        command = chromium_command(
            chromium,
            report.absolute().as_uri(),
            Path(profile_dir),
            [f"--screenshot={png}", f"--window-size={width},{height}"],
        )
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as error:
            raise RuntimeError(f"Chromium timed out after {timeout_s} s: {command}") from error
    if result.returncode != 0 or not png.is_file():
        raise RuntimeError(
            f"Chromium failed with exit status {result.returncode} and wrote no screenshot "
            f"to {png}. Its output:\n{(result.stdout + result.stderr)[-2000:]}"
        )


def now_iso() -> str:
    """Return the local time with its UTC offset, to the second."""
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")


# ----------------------------------------------------------------------------------------
# Page template, style sheet and sorting script

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
{body}
<script>{script}</script>
</body>
</html>
"""

STYLE = """
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       margin: 1.5em; color: #222; background: #fff; }
h1 { font-size: 1.5em; margin: 0 0 0.3em; }
h2 { font-size: 1.2em; margin: 1.6em 0 0.4em; border-bottom: 1px solid #ddd; }
h3 { font-size: 1em; margin: 1em 0 0.4em; }
.meta { color: #555; margin: 0.2em 0; }
code, pre { font-family: ui-monospace, "DejaVu Sans Mono", Menlo, monospace; font-size: 12px; }
.table-wrap { overflow-x: auto; max-width: 100%; }
table { border-collapse: collapse; white-space: nowrap; }
th, td { padding: 3px 8px; border-bottom: 1px solid #e4e4e4; text-align: left;
         vertical-align: top; }
th { background: #f3f3f3; cursor: pointer; user-select: none; }
th:hover { background: #e6e6e6; }
th[aria-sort="ascending"]::after { content: " \\25B2"; font-size: 0.8em; }
th[aria-sort="descending"]::after { content: " \\25BC"; font-size: 0.8em; }
th:first-child, td.run { position: sticky; left: 0; background: #fff; z-index: 1; }
th:first-child { background: #f3f3f3; z-index: 2; }
tbody tr:nth-child(even) td { background: #fafafa; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
td.missing { color: #aaa; text-align: center; }
td.status .detail { display: block; min-width: 20em; max-width: 36em; white-space: normal; }
.detail { color: #666; font-size: 0.9em; }
.swatch { margin-right: 6px; vertical-align: middle; }
.badge { font-weight: 600; }
.badge.finished { color: #1a7f37; }
.badge.stopped { color: #9a6700; }
.badge.failed { color: #cf222e; }
.badge.running { color: #0969da; }
.badge.incomplete { color: #6e7781; }
.plots { display: grid; grid-template-columns: repeat(auto-fill, minmax(400px, 1fr)); gap: 1em; }
figure { margin: 0; }
figure.plot figcaption { font-weight: 600; }
figure.plot > svg { width: 100%; height: auto; display: block; }
.grid line { stroke: #e8e8e8; stroke-width: 1; }
.frame { fill: none; stroke: #999; stroke-width: 1; }
.ticks text { font-size: 11px; fill: #444; }
ul.legend { list-style: none; padding: 0; margin: 0.2em 0 0; font-size: 12px; }
ul.legend li { display: inline-block; margin-right: 1em; }
.samples { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
.image-sample img { display: block; width: 240px; height: auto; image-rendering: pixelated;
                    border: 1px solid #ddd; }
.samples figcaption { font-size: 12px; margin-bottom: 0.3em; max-width: 240px;
                      overflow-wrap: anywhere; }
.text-sample pre { width: 36em; max-height: 20em; overflow: auto; white-space: pre-wrap;
                   background: #f6f8fa; border: 1px solid #ddd; padding: 0.5em; margin: 0; }
"""

# Sorts the run table when a header is clicked (or focused and Enter pressed), and on load
# and on hashchange when the URL fragment is #sort=<column key>&order=<asc|desc>. Numbers
# sort by value, text in natural order, and missing values ("-") stay last in both orders.
SCRIPT = """
(function () {
  "use strict";
  var table = document.getElementById("runs");
  if (!table) { return; }
  var headers = Array.prototype.slice.call(table.tHead.rows[0].cells);

  function sortKey(cell) {
    if (!cell || cell.classList.contains("missing")) { return [2, ""]; }
    if (cell.hasAttribute("data-value")) { return [0, Number(cell.getAttribute("data-value"))]; }
    var text = cell.getAttribute("data-text");
    return [1, text !== null ? text : cell.textContent.trim()];
  }

  function sortBy(index, descending) {
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var sign = descending ? -1 : 1;
    rows.sort(function (a, b) {
      var ka = sortKey(a.cells[index]), kb = sortKey(b.cells[index]);
      if (ka[0] !== kb[0]) { return ka[0] - kb[0]; }
      if (ka[0] === 2) { return 0; }
      var order = ka[0] === 0 ? ka[1] - kb[1]
        : ka[1].localeCompare(kb[1], undefined, {numeric: true});
      return sign * order;
    });
    rows.forEach(function (row) { body.appendChild(row); });
    headers.forEach(function (header, i) {
      if (i === index) {
        header.setAttribute("aria-sort", descending ? "descending" : "ascending");
      } else {
        header.removeAttribute("aria-sort");
      }
    });
  }

  function sortFromHeader(index) {
    var descending = headers[index].getAttribute("aria-sort") === "ascending";
    sortBy(index, descending);
    var fragment = new URLSearchParams({
      sort: headers[index].getAttribute("data-key"), order: descending ? "desc" : "asc"
    });
    try { history.replaceState(null, "", "#" + fragment.toString()); } catch (error) { }
  }

  headers.forEach(function (header, index) {
    header.addEventListener("click", function () { sortFromHeader(index); });
    header.addEventListener("keydown", function (event) {
      if (event.key === "Enter") { sortFromHeader(index); }
    });
  });

  function sortFromFragment() {
    var params = new URLSearchParams(window.location.hash.slice(1));
    var key = params.get("sort");
    if (key === null) { return; }
    var index = headers.findIndex(function (header) {
      return header.getAttribute("data-key") === key;
    });
    if (index >= 0) { sortBy(index, params.get("order") === "desc"); }
  }

  sortFromFragment();
  window.addEventListener("hashchange", sortFromFragment);
})();
"""
