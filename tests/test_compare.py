"""compare.py: run discovery, the HTML report's content, and the report in a headless browser.

Most tests compare run directories that they write in the formats train.py writes
(config.yaml, run_info.json, summary.json, csv/metrics.csv, samples/*.png and *.txt). One
test compares a real smoke run of train.py. The browser tests open the report in Debian's
headless Chromium, and are skipped where Chromium is not installed.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urlencode

import numpy as np
import pytest
import yaml
from conftest import ROOT, run_train
from PIL import Image

from genlab.report import (
    MAX_CURVE_POINTS,
    PALETTE,
    NoRunFoundError,
    _decimate,
    build_report,
    chromium_command,
    find_chromium,
    find_run_dirs,
    name_runs,
    read_run,
)

HOSTILE_NAME = "<img src=x onerror=alert(1)>"
HOSTILE_VALUE = "</td><script>alert('config')</script>"
HOSTILE_ERROR = "ValueError: <b>bold</b> & <script>alert('error')</script>"
HOSTILE_TEXT = "ROMEO: </pre><script>alert('sample')</script>"


# ----------------------------------------------------------------------------------------
# Run directories in train.py's formats


def png_bytes(color: tuple[int, int, int], size: int = 6) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


def write_metrics_csv(path: Path, rows: list[dict[str, float | int]]) -> None:
    """Write rows as Lightning's CSVLogger does: sorted columns, empty cells for gaps."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = sorted({key for row in rows for key in row})
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def training_rows(
    losses: list[float], val: dict[int, dict[str, float]], lr: float
) -> list[dict[str, float | int]]:
    """Rows of one epoch: learning rate and train/loss at every step, validation at some."""
    rows: list[dict[str, float | int]] = []
    for step, loss in enumerate(losses):
        rows.append({"step": step, "lr-Adam": lr})
        rows.append({"epoch": 0, "step": step, "train/loss": loss})
        if step in val:
            rows.append({"epoch": 0, "step": step, **val[step]})
    return rows


@dataclass
class RunSpec:
    """A run directory to write: its config values, logged metrics, summary and samples."""

    model: dict
    data: dict
    rows: list[dict[str, float | int]] = field(default_factory=list)
    summary: dict | None = None
    samples: dict[str, bytes | str] = field(default_factory=dict)  # file name -> content
    run_info: dict = field(default_factory=dict)


def write_run(run_dir: Path, spec: RunSpec) -> Path:
    run_dir.mkdir(parents=True)

    config = {
        "task_name": f"{spec.model['_target_'].rsplit('.', 1)[-1].lower()}_test",
        "seed": 42,
        "ckpt_path": None,
        "tags": [],
        "data": spec.data,
        "model": spec.model,
        "trainer": {
            "_target_": "lightning.pytorch.trainer.Trainer",
            "default_root_dir": str(run_dir),
            "max_steps": 20,
        },
        "callbacks": {
            "model_checkpoint": {
                "_target_": "lightning.pytorch.callbacks.ModelCheckpoint",
                "dirpath": str(run_dir / "checkpoints"),
            },
        },
        "logger": {
            "csv": {"_target_": "genlab.loggers.CSVLogger", "save_dir": str(run_dir), "name": "csv"}
        },
        "paths": {"log_dir": str(run_dir.parent), "output_dir": str(run_dir)},
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))

    (run_dir / ".hydra").mkdir()
    (run_dir / ".hydra" / "overrides.yaml").write_text("- debug=smoke\n")
    run_info = {"command": ["train.py"], "started_at": "2026-12-04T10:00:00+00:00"}
    (run_dir / "run_info.json").write_text(json.dumps({**run_info, **spec.run_info}))
    (run_dir / "train.log").write_text("[genlab.train][INFO] - Training\n")

    if spec.rows:
        write_metrics_csv(run_dir / "csv" / "metrics.csv", spec.rows)
    if spec.summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(spec.summary, indent=2))

    for name, content in spec.samples.items():
        path = run_dir / "samples" / name
        path.parent.mkdir(exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return run_dir


def vae_spec(lr: float, latent_dim: int, nelbo: float, color: tuple[int, int, int]) -> RunSpec:
    losses = [300.0 - 10 * step + (step % 3) for step in range(20)]
    val = {9: {"val/nelbo": nelbo + 40.0}, 19: {"val/nelbo": nelbo}}
    return RunSpec(
        model={"_target_": "lightning_modules.vae.VAE", "lr": lr, "latent_dim": latent_dim},
        data={"_target_": "datamodules.images.ImageDataModule", "source": "digits"},
        rows=training_rows(losses, val, lr),
        summary={
            "status": "finished",
            "global_step": 20,
            "final": {"train/loss": losses[-1], "val/nelbo": nelbo},
            "best": {"val/nelbo": nelbo},
        },
        samples={
            "samples_generated_epoch000_step000010.png": png_bytes((0, 0, 0)),
            "samples_generated_epoch001_step000020.png": png_bytes(color),
            "samples_reconstructions_epoch001_step000020.png": png_bytes((9, 9, 9)),
        },
    )


GPT_MODEL = {"_target_": "lightning_modules.gpt.GPT", "lr": 3e-3, "n_layer": 1}
TEXT_DATA = {"_target_": "datamodules.text.TextDataModule", "source": "embedded_text"}


def gan_spec() -> RunSpec:
    return RunSpec(
        model={"_target_": "lightning_modules.gan.GAN", "generator_lr": 2e-4, "latent_dim": 4},
        data={"_target_": "datamodules.images.ImageDataModule", "source": "digits"},
        rows=training_rows([2.6, 2.1, 1.9], {}, 2e-4),
        summary={"status": "finished", "global_step": 3, "final": {"train/loss": 1.9}, "best": {}},
        samples={"samples_generated_epoch000_step000003.png": png_bytes((200, 10, 10))},
    )


def failed_gpt_spec() -> RunSpec:
    """A run that diverged: summary.json has only the error, the CSV ends in NaN."""
    rows = training_rows([4.2, 3.9], {}, 1e30)
    rows.append({"epoch": 0, "step": 2, "train/loss": float("nan")})
    error = "NonFiniteMetricError: train/loss is nan at global step 2: training diverged.\nmore"
    return RunSpec(
        model={**GPT_MODEL, "lr": 1e30},
        data=TEXT_DATA,
        rows=rows,
        summary={"status": "failed", "error": error, "traceback": "Traceback ..."},
    )


def running_gpt_spec() -> RunSpec:
    """A run still training: no summary.json yet, a CSV that ends at step 4."""
    val = {3: {"val/loss": 3.5, "val/ppl": 33.1}}
    return RunSpec(
        model=GPT_MODEL,
        data=TEXT_DATA,
        rows=training_rows([4.2, 3.9, 3.7, 3.6, 3.4], val, 3e-3),
        samples={"text_epoch000_step000003.txt": "ROMEO: What light"},
    )


def hostile_spec() -> RunSpec:
    """A failed run whose name, config, error and text sample contain HTML."""
    return RunSpec(
        model=GPT_MODEL,
        data={**TEXT_DATA, "source": "text_file", "path": HOSTILE_VALUE},
        summary={"status": "failed", "error": HOSTILE_ERROR},
        samples={"text_epoch000_step000001.txt": HOSTILE_TEXT},
    )


def make_runs(root: Path) -> dict[str, Path]:
    """Write every kind of run below `root`; return {short name: run directory}."""
    runs = {
        "vae0": write_run(root / "sweep" / "0", vae_spec(2e-3, 4, 251.5, (0, 200, 0))),
        "vae1": write_run(root / "sweep" / "1", vae_spec(1e-3, 16, 98.2, (0, 0, 200))),
        "vae2": write_run(root / "sweep" / "2", vae_spec(5e-4, 32, 1000.3, (200, 200, 0))),
        "gan": write_run(root / "gan_run", gan_spec()),
        "failed": write_run(root / "gpt_failed", failed_gpt_spec()),
        "running": write_run(root / "gpt_running", running_gpt_spec()),
        "incomplete": write_run(root / "gpt_incomplete", running_gpt_spec()),
        "hostile": write_run(root / HOSTILE_NAME, hostile_spec()),
    }
    two_hours_ago = time.time() - 7200
    for path in runs["incomplete"].rglob("*"):
        os.utime(path, (two_hours_ago, two_hours_ago))
    (root / "sweep" / "multirun.yaml").write_text("hydra: {}\n")
    return runs


# ----------------------------------------------------------------------------------------
# Reading the HTML


VOID_TAGS = {"br", "img", "meta", "input", "hr", "link", "source", "wbr"}


@dataclass
class Element:
    tag: str
    attrs: dict[str, str | None]
    children: list[Element | str] = field(default_factory=list)

    def text(self) -> str:
        return "".join(child if isinstance(child, str) else child.text() for child in self.children)

    def find_all(self, tag: str, **attrs: str) -> list[Element]:
        found = []
        for child in self.children:
            if isinstance(child, str):
                continue
            if child.tag == tag and all(child.attrs.get(k) == v for k, v in attrs.items()):
                found.append(child)
            found.extend(child.find_all(tag, **attrs))
        return found

    def find(self, tag: str, **attrs: str) -> Element:
        found = self.find_all(tag, **attrs)
        assert found, f"no <{tag}> with {attrs}"
        return found[0]


class DomBuilder(HTMLParser):
    """Build a tree of Elements from HTML with Python's own parser."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, dict(attrs))
        self.stack[-1].children.append(element)
        if tag not in VOID_TAGS:
            self.stack.append(element)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Element(tag, dict(attrs)))

    def handle_endtag(self, tag: str) -> None:
        for index in range(len(self.stack) - 1, 0, -1):
            if self.stack[index].tag == tag:
                del self.stack[index:]
                return

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse_html(text: str) -> Element:
    builder = DomBuilder()
    builder.feed(text)
    builder.close()
    return builder.root


def table_rows(dom: Element) -> dict[str, dict[str, Element]]:
    """Return {run name: {column key: <td>}} from the run table."""
    table = dom.find("table", id="runs")
    keys = [th.attrs["data-key"] for th in table.find_all("th")]
    rows = {}
    for tr in table.find("tbody").find_all("tr"):
        cells = tr.find_all("td")
        assert len(cells) == len(keys)
        rows[tr.attrs["data-run"]] = dict(zip(keys, cells, strict=True))
    return rows


def row_order(dom: Element) -> list[str]:
    return [tr.attrs["data-run"] for tr in dom.find("table", id="runs").find_all("tr")[1:]]


def figure(dom: Element, metric: str) -> Element:
    return dom.find("figure", **{"data-metric": metric})


def run_compare(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "compare.py"), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """Every kind of run below one folder, and the report compare.py wrote of them."""
    root = tmp_path_factory.mktemp("compare")
    runs = make_runs(root / "logs")
    result = run_compare("logs", "-o", "report.html", cwd=root)
    assert result.returncode == 0, result.stdout + result.stderr
    html = (root / "report.html").read_text()
    return root, runs, result, html, parse_html(html)


# ----------------------------------------------------------------------------------------
# Finding runs


def test_find_run_dirs_searches_below_paths(tmp_path):
    spec = vae_spec(1e-3, 4, 100.0, (0, 0, 0))
    for job in ("10", "2", "1"):
        write_run(tmp_path / "sweep" / job, spec)
    single = write_run(tmp_path / "single", spec)
    (tmp_path / "sweep" / "notes").mkdir()

    found = find_run_dirs([tmp_path / "sweep", single, tmp_path / "sweep" / "2"])

    assert [path.name for path in found] == ["1", "2", "10", "single"]


def test_find_run_dirs_follows_links_once(tmp_path):
    run = write_run(tmp_path / "runs" / "a", vae_spec(1e-3, 4, 100.0, (0, 0, 0)))
    (tmp_path / "picked").mkdir()
    (tmp_path / "picked" / "a").symlink_to(run)
    (tmp_path / "picked" / "loop").symlink_to(tmp_path / "picked")

    found = find_run_dirs([tmp_path / "picked", tmp_path / "runs"])

    assert found == [tmp_path / "picked" / "a"]


def test_find_run_dirs_rejects_paths_without_runs(tmp_path):
    empty = tmp_path / "empty"
    (empty / "wandb").mkdir(parents=True)
    missing = tmp_path / "missing"
    with pytest.raises(NoRunFoundError) as raised:
        find_run_dirs([empty, missing])
    message = str(raised.value)
    assert f"{empty}: contains no run directory" in message
    assert f"{missing}: no such file or directory" in message


def test_bare_config_is_no_run(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.yaml").write_text("a: 1\n")
    with pytest.raises(NoRunFoundError):
        find_run_dirs([tmp_path])


# ----------------------------------------------------------------------------------------
# The report's content


def test_report_names_runs_by_relative_path(compared):
    _, _, _, _, dom = compared
    assert set(table_rows(dom)) == {
        "sweep/0", "sweep/1", "sweep/2", "gan_run", "gpt_failed", "gpt_running",
        "gpt_incomplete", HOSTILE_NAME,
    }  # fmt: skip


def test_report_shows_each_status(compared):
    _, _, _, _, dom = compared
    rows = table_rows(dom)
    status = {name: row["status"].find("span").text() for name, row in rows.items()}
    assert status["sweep/0"] == "finished"
    assert status["gan_run"] == "finished"
    assert status["gpt_failed"] == "failed"
    assert status["gpt_running"] == "running"
    assert status["gpt_incomplete"] == "incomplete"
    failed_cell = rows["gpt_failed"]["status"].text()
    assert "NonFiniteMetricError: train/loss is nan at global step 2" in failed_cell
    assert "more" not in failed_cell, "only the error's first line belongs in the table"
    assert "last write 2 h ago" in rows["gpt_incomplete"]["status"].text()
    assert "no summary.json" in rows["gpt_running"]["status"].text()


def test_report_lists_only_differing_hyperparameters(compared):
    _, _, _, _, dom = compared
    keys = [th.attrs["data-key"] for th in dom.find("table", id="runs").find_all("th")]
    for differing in ("model._target_", "model.lr", "model.latent_dim", "data.source"):
        assert differing in keys
    for same in ("seed", "logger.csv.name", "trainer.max_steps"):
        assert same not in keys
    for location in ("paths.output_dir", "trainer.default_root_dir", "logger.csv.save_dir"):
        assert location not in keys
    assert "callbacks.model_checkpoint.dirpath" not in keys
    # Keys on which runs disagree come before keys that only some runs have.
    assert keys.index("model.latent_dim") < keys.index("model.n_layer")
    assert keys.index("model.lr") < keys.index("model.generator_lr")


def test_report_shows_hyperparameter_values(compared):
    _, _, _, _, dom = compared
    rows = table_rows(dom)
    assert rows["sweep/0"]["model.lr"].text() == "0.002"
    assert rows["sweep/0"]["model.lr"].attrs["data-value"] == "0.002"
    assert rows["sweep/2"]["model.latent_dim"].text() == "32"
    assert rows["gan_run"]["model.lr"].text() == "-"
    assert rows["gan_run"]["model.lr"].attrs["class"] == "missing"
    assert rows["gan_run"]["model.generator_lr"].text() == "0.0002"


def test_report_metrics_from_summary(compared):
    _, _, _, _, dom = compared
    rows = table_rows(dom)
    assert rows["sweep/1"]["val/nelbo final"].text() == "98.2"
    assert rows["sweep/1"]["val/nelbo best"].text() == "98.2"
    assert rows["sweep/1"]["step"].text() == "19"  # the last step of metrics.csv
    assert rows["gan_run"]["val/nelbo final"].text() == "-"
    assert rows["gan_run"]["train/loss final"].text() == "1.9"


def test_report_metrics_from_csv_without_summary(compared):
    _, _, _, _, dom = compared
    rows = table_rows(dom)
    running = rows["gpt_running"]
    assert running["train/loss final"].text() == "3.4"
    assert running["val/ppl final"].text() == "33.1"
    assert running["val/ppl best"].text() == "33.1"
    assert running["step"].text() == "4"
    assert "metrics from csv/metrics.csv" in running["status"].attrs["title"]
    # The NaN that made the run fail is not a final value: the last finite one is.
    assert rows["gpt_failed"]["train/loss final"].text() == "3.9"


def test_report_plots_every_metric(compared):
    _, _, _, _, dom = compared
    metrics = [
        element.attrs["data-metric"] for element in dom.find_all("figure", **{"class": "plot"})
    ]
    assert metrics == ["val/loss", "val/nelbo", "val/ppl", "train/loss", "lr-Adam"]
    train_loss = figure(dom, "train/loss")
    # Every run with a CSV log has a train/loss curve; the hostile run has no CSV.
    assert len(train_loss.find_all("polyline")) == 7
    legend = [item.text() for item in train_loss.find("ul").find_all("li")]
    assert "gan_run" in legend
    assert "sweep/0" in legend
    assert HOSTILE_NAME not in legend


def test_report_plot_colors_match_table_swatches(compared):
    _, _, _, _, dom = compared
    rows = table_rows(dom)
    swatch = rows["sweep/2"]["run"].find("line").attrs["stroke"]
    curves = figure(dom, "val/nelbo").find_all("polyline")
    titles = {curve.find("title").text(): curve.attrs["stroke"] for curve in curves}
    assert titles["sweep/2"] == swatch


def test_report_embeds_last_sample_of_each_key(compared):
    _, runs, _, _, dom = compared
    sections = {
        section.find("h3").text(): section
        for section in dom.find_all("section", **{"class": "sample-key"})
    }
    assert set(sections) == {"samples_generated", "samples_reconstructions", "text"}
    images = sections["samples_generated"].find_all("img")
    assert len(images) == 4  # three VAE runs and the GAN
    expected = (runs["vae2"] / "samples" / "samples_generated_epoch001_step000020.png").read_bytes()
    sources = [image.attrs["src"] for image in images]
    assert all(source.startswith("data:image/png;base64,") for source in sources)
    decoded = [base64.b64decode(source.split(",", 1)[1]) for source in sources]
    assert expected in decoded
    texts = [pre.text() for pre in sections["text"].find_all("pre")]
    assert "ROMEO: What light" in texts


def test_report_escapes_text_from_runs(compared):
    _, _, _, html, dom = compared
    assert len(dom.find_all("script")) == 1, "text from a run became a <script> element"
    assert not [img for img in dom.find_all("img") if "onerror" in img.attrs]
    assert HOSTILE_NAME not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    row = table_rows(dom)[HOSTILE_NAME]
    assert row["data.path"].text() == HOSTILE_VALUE
    assert HOSTILE_ERROR in row["status"].text()
    assert HOSTILE_TEXT in [pre.text() for pre in dom.find_all("pre")]


def test_report_references_no_other_file(compared):
    _, _, _, html, dom = compared
    assert "http://" not in html
    assert "https://" not in html
    assert not dom.find_all("link")
    assert all("src" not in script.attrs for script in dom.find_all("script"))
    assert all(img.attrs["src"].startswith("data:") for img in dom.find_all("img"))


def test_compare_prints_where_it_wrote(compared):
    root, _, result, _, _ = compared
    assert "Compared 8 runs" in result.stderr
    assert "report.html" in result.stderr


def test_report_is_not_overwritten(compared):
    root, _, _, html, _ = compared
    result = run_compare("logs", "-o", "report.html", cwd=root)
    assert result.returncode == 1
    assert "report.html already exists. Pass --force to overwrite it" in result.stderr
    assert (root / "report.html").read_text() == html


def test_force_overwrites_report(tmp_path):
    write_run(tmp_path / "run", vae_spec(1e-3, 4, 100.0, (0, 0, 0)))
    (tmp_path / "report.html").write_text("old")
    result = run_compare("run", "-o", "report.html", "--force", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "report.html").read_text().startswith("<!DOCTYPE html>")


def test_compare_rejects_path_without_runs(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_compare("empty", cwd=tmp_path)
    assert result.returncode == 2
    assert "No runs to compare" in result.stderr
    assert "empty: contains no run directory" in result.stderr
    assert not (tmp_path / "compare_report.html").exists()


def test_compare_rejects_invalid_window_size(tmp_path):
    write_run(tmp_path / "run", vae_spec(1e-3, 4, 100.0, (0, 0, 0)))
    result = run_compare(
        "run", "--screenshot", "shot.png", "--window-size", "800x600", cwd=tmp_path
    )
    assert result.returncode == 2
    assert "invalid window size '800x600': expected WIDTH,HEIGHT" in result.stderr


def test_sweep_job_with_rejected_config(tmp_path):
    # train.py rejected the job's config before writing config.yaml or run_info.json.
    job = tmp_path / "sweep" / "0"
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "config.yaml").write_text(
        "task_name: ${hydra:runtime.choices.model}\ndata:\n  batch_size: 0\n"
    )
    error = (
        "ConfigError: Invalid configuration (1 problem):\n"
        "  1. data.batch_size=0 is invalid: it must be an integer >= 1."
    )
    (job / "summary.json").write_text(json.dumps({"status": "failed", "error": error}))

    assert find_run_dirs([tmp_path]) == [job]
    run = read_run(job)
    assert run.status == "failed"
    assert run.status_detail == (
        "ConfigError: Invalid configuration (1 problem): "
        "1. data.batch_size=0 is invalid: it must be an integer >= 1."
    )
    assert run.config["data.batch_size"] == 0
    assert any("no config.yaml" in problem for problem in run.problems)


def test_resumed_run_ignores_summary_of_earlier_start(tmp_path):
    spec = running_gpt_spec()
    spec.summary = {"status": "stopped", "global_step": 2, "final": {"train/loss": 9.0}}
    spec.run_info = {"resumed": [{"at": "2999-01-01T00:00:00+00:00", "from": "last.ckpt"}]}
    run = read_run(write_run(tmp_path / "run", spec))
    assert run.status == "running"
    assert run.final["train/loss"] == 3.4
    assert run.metrics_source == "csv/metrics.csv"


def test_half_written_csv_line_is_skipped(tmp_path):
    run_dir = write_run(tmp_path / "run", running_gpt_spec())
    metrics = run_dir / "csv" / "metrics.csv"
    header = metrics.read_text().splitlines()[0].split(",")
    partial = ",".join("5" if name == "step" else "0.1" for name in header)[:-2]
    metrics.write_text(metrics.read_text() + partial)
    run = read_run(run_dir)
    assert run.steps == 4
    assert run.final["train/loss"] == 3.4


def test_step_from_summary_without_csv_log(tmp_path):
    spec = gan_spec()
    spec.rows = []
    spec.summary["global_step"] = 6
    run = read_run(write_run(tmp_path / "run", spec))
    assert run.steps == 6
    assert run.curves == {}
    assert run.final == {"train/loss": 1.9}


def test_unreadable_summary_is_reported_not_raised(tmp_path):
    run_dir = write_run(tmp_path / "run", running_gpt_spec())
    (run_dir / "summary.json").write_text('{"status": "fini')
    run = read_run(run_dir)
    assert run.status == "running"
    assert any("summary.json could not be read" in problem for problem in run.problems)


def test_single_run_has_no_hyperparameter_columns(tmp_path):
    run = read_run(write_run(tmp_path / "only", vae_spec(1e-3, 4, 100.0, (0, 0, 0))))
    name_runs([run])
    dom = parse_html(build_report([run], [str(tmp_path)], "now"))
    assert run.name == "only"
    assert "There is one run" in dom.text()
    assert "model.lr" not in [th.attrs["data-key"] for th in dom.find_all("th")]


@pytest.mark.parametrize(
    ("values", "log_scale"),
    [([1e-4, 1e-2, 1.0], True), ([1.0, 2.0, 5.0], False), ([-1.0, 10.0, 1000.0], False)],
)
def test_plot_log_scale_for_wide_positive_ranges(tmp_path, values, log_scale):
    spec = running_gpt_spec()
    spec.rows = [{"epoch": 0, "step": step, "train/loss": v} for step, v in enumerate(values)]
    run = read_run(write_run(tmp_path / "run", spec))
    name_runs([run])
    caption = figure(parse_html(build_report([run], [], "now")), "train/loss").find("figcaption")
    assert caption.text() == "train/loss" + (" (log scale)" if log_scale else "")


def test_decimate_keeps_spikes_and_ends():
    points = [(step, float(step % 7)) for step in range(10_000)]
    points[5_003] = (5_003, 1e6)
    kept = _decimate(points, MAX_CURVE_POINTS)
    assert len(kept) <= MAX_CURVE_POINTS
    assert (5_003, 1e6) in kept
    assert kept[0] == points[0]
    assert kept[-1] == points[-1]
    assert kept == sorted(kept)


def test_report_of_real_training_run(tmp_path):
    result = run_train(["debug=smoke", "logger=csv", "seed=0"], tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = next((tmp_path / "logs" / "vae_digits" / "runs").iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())

    compared = run_compare("logs", "-o", "report.html", cwd=tmp_path)

    assert compared.returncode == 0, compared.stderr
    dom = parse_html((tmp_path / "report.html").read_text())
    row = table_rows(dom)[run_dir.name]
    assert row["status"].find("span").text() == "finished"
    assert row["val/nelbo final"].text() == f"{summary['final']['val/nelbo']:.5g}"
    assert row["val/nelbo best"].attrs["title"] == repr(summary["best"]["val/nelbo"])
    assert figure(dom, "train/loss").find_all("polyline")
    keys = {section.find("h3").text() for section in dom.find_all("section")}
    assert keys == {"samples_generated", "samples_reconstructions"}


# ----------------------------------------------------------------------------------------
# The report in a headless browser

CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Chromium is not installed (no chromium on PATH); .ci/install_chromium installs it",
)


def open_in_chromium(url: str, tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    command = chromium_command(CHROMIUM, url, tmp_path / "chromium-profile", flags)
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@needs_chromium
@pytest.mark.parametrize(
    ("order", "expected"),
    [("asc", ["sweep/1", "sweep/0", "sweep/2"]), ("desc", ["sweep/2", "sweep/0", "sweep/1"])],
)
def test_browser_sorts_table_from_fragment(compared, tmp_path, order, expected):
    root, _, _, _, original = compared
    fragment = urlencode({"sort": "val/nelbo final", "order": order})
    url = f"{(root / 'report.html').as_uri()}#{fragment}"

    dom = parse_html(open_in_chromium(url, tmp_path, "--dump-dom").stdout)

    # Numbers sort by value (1000.3 is not before 251.5), runs without val/nelbo come last.
    rows = row_order(dom)
    assert rows[:3] == expected
    assert sorted(rows[3:]) == sorted(set(row_order(original)) - set(expected))
    header = dom.find("th", **{"data-key": "val/nelbo final"})
    assert header.attrs["aria-sort"] == ("ascending" if order == "asc" else "descending")
    assert "val/nelbo final" in [th.text() for th in dom.find_all("th")]


@needs_chromium
def test_browser_renders_table_and_plots(tmp_path):
    # Curves longer than MAX_MARKED_POINTS have no markers, so only lines carry the colour.
    for job, lr in enumerate((1e-3, 2e-3)):
        spec = vae_spec(lr, 4, 100.0, (0, 0, 0))
        losses = [200.0 / (1 + step) + job for step in range(100)]
        spec.rows = training_rows(losses, {99: {"val/nelbo": 100.0}}, lr)
        write_run(tmp_path / "sweep" / str(job), spec)
    report = tmp_path / "sweep.html"
    result = run_compare(tmp_path / "sweep", "-o", report, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    png = tmp_path / "screenshot.png"

    open_in_chromium(report.as_uri(), tmp_path, f"--screenshot={png}", "--window-size=1200,1400")

    pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
    first_run_color = np.array([int(PALETTE[0][i : i + 2], 16) for i in (1, 3, 5)])
    matches = np.abs(pixels - first_run_color).sum(axis=2) <= 30
    columns = np.unique(np.nonzero(matches)[1])
    # Swatches are 18 pixels wide; only a curve across a plot covers this many columns.
    assert len(columns) >= 150, f"the first run's colour is in {len(columns)} columns"
    dom = parse_html(open_in_chromium(report.as_uri(), tmp_path, "--dump-dom").stdout)
    headers = [th.text() for th in dom.find("table", id="runs").find_all("th")]
    assert headers[:2] == ["run", "status"]
    assert "model.lr" in headers
    assert "val/nelbo final" in headers


@needs_chromium
def test_compare_saves_screenshot(tmp_path):
    write_run(tmp_path / "run", vae_spec(1e-3, 4, 100.0, (0, 0, 0)))
    result = run_compare(
        "run", "--screenshot", "shot.png", "--window-size", "640,480", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert "Saved a screenshot to shot.png" in result.stderr
    assert Image.open(tmp_path / "shot.png").size == (640, 480)
