"""Evaluate a checkpoint: the test metrics of a trained model on a validation or test split.

    python eval.py ckpt_path=logs/vae_digits/runs/<run>/checkpoints/last.ckpt
    python eval.py ckpt_path=<ckpt> iwae_samples=5000              # VAE: a tighter NLL bound
    python eval.py ckpt_path=<ckpt> fid.extractor=inception fid.num_samples=10000
    python eval.py ckpt_path=<mnist run ckpt> split=test           # MNIST's test set
    python eval.py ckpt_path=<ckpt> data=fashion_mnist split=test  # other data, same shapes

Metrics: FID and KID for the image models, negative ELBO and the importance-weighted bound
for the VAE, loss, bits per token and perplexity for the GPT, all under `<split>/<name>`.
The test hooks of the modules reuse the validation code, so evaluating the checkpoint a
run ended with, on split=val with the run's settings, gives the metrics the run logged.

Each evaluation appends one JSON line to `<checkpoint stem>.eval.jsonl` next to the
checkpoint, and writes its own files (eval.json, eval.log, .hydra/, csv/, wandb/) to
`<run dir>/eval/<timestamp>/`. Invalid settings and unusable checkpoints exit with status 2
and write nothing.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.loggers import Logger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from datamodules.images import TORCHVISION_SOURCES
from genlab.checkpoints import WEIGHTS_CHOICES, CheckpointError, LoadedCheckpoint, load_checkpoint
from genlab.config_check import ConfigError, added_key_problems
from genlab.ddp import distributed_job, is_global_zero
from genlab.fid import EXTRACTORS, FIDSettings, KIDSettings
from genlab.loggers import build_loggers, finish_wandb_run, log_config, wandb_identity

log = logging.getLogger("genlab.eval")

SPLITS = ("val", "test")
# k of the importance-weighted bound when iwae_samples is null.
DEFAULT_IWAE_SAMPLES = 100
# Folder of Hydra's files for an evaluation whose ckpt_path is not a file. eval.py deletes
# them when it rejects the evaluation.
REJECTED_EVAL_ROOT = Path(tempfile.gettempdir()) / "genlab-eval-rejected"
CONF_DIR = Path(__file__).resolve().parent / "conf"


def eval_root(ckpt_path: str | None) -> str:
    """Return the folder that contains the eval directories of a checkpoint's evaluations.

    It is <run dir>/eval for ckpt_path = <run dir>/checkpoints/<file>, and <folder>/eval
    for a checkpoint in any other folder. A ckpt_path that is unset or not a file gives
    REJECTED_EVAL_ROOT, so that Hydra creates no folder beside a mistyped path.
    """
    if ckpt_path is None or not Path(ckpt_path).expanduser().is_file():
        return str(REJECTED_EVAL_ROOT)
    folder = Path(ckpt_path).expanduser().resolve().parent
    run_dir = folder.parent if folder.name == "checkpoints" else folder
    return str(run_dir / "eval")


# Hydra resolves hydra.run.dir before it calls main(), so the resolver is registered on import.
OmegaConf.register_new_resolver("genlab_eval_root", eval_root, replace=True)


class MissingInputError(Exception):
    """A file the evaluation needs (data, Inception weights) is missing; the message names it."""


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Check the settings, load the checkpoint and its data, test, record; return the metrics."""
    check_settings(cfg)

    log.info("Loading checkpoint %s (weights=%s)", Path(cfg.ckpt_path).expanduser(), cfg.weights)
    loaded = load_checkpoint(cfg.ckpt_path, weights=cfg.weights)
    model = loaded.model
    log.info(
        "Model <%s>, %s weights, epoch %s, global step %s",
        type(model).__qualname__,
        loaded.weights,
        loaded.epoch,
        loaded.global_step,
    )
    test_settings = model_test_settings(cfg, model)
    configure_model(model, test_settings)

    data_cfg = data_config(cfg, loaded)
    log.info("Building datamodule <%s>, split=%s", data_cfg["_target_"], cfg.split)
    datamodule = build_datamodule(cfg, data_cfg, model)

    log.info("Building loggers")
    loggers = build_eval_loggers(cfg, loaded)
    precision = eval_precision(cfg, loaded)
    log.info("Building trainer <%s>, precision %s", cfg.trainer._target_, precision)
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, precision=precision, logger=loggers or False
    )
    record = {
        "checkpoint": str(loaded.path.resolve()),
        "weights": loaded.weights,
        "epoch": loaded.epoch,
        "global_step": loaded.global_step,
        "split": cfg.split,
        "data": data_cfg,
        "settings": describe_settings(test_settings, precision, cfg.trainer.limit_test_batches),
    }
    log_config(trainer.loggers, record)

    log.info("Testing on split=%s", cfg.split)
    results = trainer.test(model, datamodule=SplitAsTest(datamodule, cfg.split))
    metrics = {key: float(value) for key, value in results[0].items()}

    if trainer.is_global_zero:
        record["metrics"] = metrics
        record["timestamp"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        record["eval_dir"] = str(Path(cfg.paths.output_dir).resolve())
        wandb_loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        record["wandb"] = wandb_identity(wandb_loggers[0]) if wandb_loggers else None
        save_record(record, loaded.path, Path(cfg.paths.output_dir))
    return metrics


def configure_model(model: L.LightningModule, test_settings: dict[str, Any]) -> None:
    """Pass the test settings to the model, which builds its metrics (the FID network)."""
    try:
        model.configure_test(**test_settings)
    except ValueError as error:
        raise ConfigError([str(error)]) from error
    except FileNotFoundError as error:  # Inception weights neither cached nor downloadable
        raise MissingInputError(str(error)) from error


def build_datamodule(
    cfg: DictConfig, data_cfg: dict[str, Any], model: L.LightningModule
) -> L.LightningDataModule:
    """Instantiate the data, check that it fits the model and has the split, prepare its files."""
    datamodule: L.LightningDataModule = hydra.utils.instantiate(data_cfg, _convert_="all")
    check_modality(model, datamodule)
    check_split(cfg.split, datamodule, data_cfg)
    try:
        # Image datamodules read no data for model_inputs, so a wrong size fails before
        # any download.
        check_model_inputs(datamodule.model_inputs(), model.hparams, cfg.get("data") is not None)
        datamodule.prepare_data()
    except FileNotFoundError as error:
        raise MissingInputError(str(error)) from error
    return datamodule


def eval_precision(cfg: DictConfig, loaded: LoadedCheckpoint) -> str:
    """Return trainer.precision, or when it is null the run's ("32-true" without its config)."""
    precision = cfg.trainer.precision
    if precision is None and loaded.run_config is not None:
        precision = OmegaConf.select(loaded.run_config, "trainer.precision")
    return str(precision or "32-true")


# ---------------------------------------------------------------------- settings


def check_settings(cfg: DictConfig) -> None:
    """Raise ConfigError listing every invalid setting that can be judged without the checkpoint."""
    problems = []
    if HydraConfig.initialized():
        overrides = HydraConfig.get().overrides.task
        problems += added_key_problems(overrides, "eval", ("trainer", "logger", "data", "paths"))
    if OmegaConf.is_missing(cfg, "ckpt_path"):
        raise ConfigError(
            [
                "ckpt_path is missing: set it to the checkpoint to evaluate, e.g. "
                "ckpt_path=logs/vae_digits/runs/<run>/checkpoints/last.ckpt."
            ]
        )
    if cfg.split not in SPLITS:
        problems.append(
            f"split={cfg.split!r} is invalid: use split=val (the run's validation split) or "
            "split=test (the test split of mnist, fashion_mnist or cifar10)."
        )
    if cfg.weights not in WEIGHTS_CHOICES:
        problems.append(
            f"weights={cfg.weights!r} is invalid: use one of {', '.join(WEIGHTS_CHOICES)}."
        )

    fid, kid = cfg.get("fid"), cfg.get("kid")
    if fid is not None:
        if fid.extractor is not None and fid.extractor not in EXTRACTORS:
            problems.append(
                f"fid.extractor={fid.extractor!r} is invalid: use one of {', '.join(EXTRACTORS)}, "
                "or null for the checkpoint's extractor."
            )
        if fid.num_samples is not None and not _is_int_at_least(fid.num_samples, 2):
            problems.append(
                f"fid.num_samples={fid.num_samples!r} is invalid: it must be an integer >= 2 "
                "(a covariance needs two samples), or null for the checkpoint's number."
            )
    if kid is not None:
        if kid.subsets is not None and not _is_int_at_least(kid.subsets, 1):
            problems.append(
                f"kid.subsets={kid.subsets!r} is invalid: it must be an integer >= 1, or null "
                "for 100."
            )
        if kid.subset_size is not None and not _is_int_at_least(kid.subset_size, 2):
            problems.append(
                f"kid.subset_size={kid.subset_size!r} is invalid: it must be an integer >= 2 "
                "(the unbiased estimate needs two samples), or null for the default."
            )
    iwae_samples = cfg.get("iwae_samples")
    if iwae_samples is not None and not _is_int_at_least(iwae_samples, 1):
        problems.append(
            f"iwae_samples={iwae_samples!r} is invalid: k must be an integer >= 1 (k = 1 is "
            "the ELBO), or null for 100."
        )
    if problems:
        raise ConfigError(problems)


def model_test_settings(cfg: DictConfig, model: L.LightningModule) -> dict[str, Any]:
    """Return the keyword arguments of `model.configure_test` from the eval settings.

    Raises ConfigError when a setting does not apply to the model (FID on a GPT, an IWAE
    bound on a GAN) or the model would have nothing to compute.
    """
    accepted = inspect.signature(model.configure_test).parameters
    name = type(model).__name__
    problems = []
    settings: dict[str, Any] = {"split": cfg.split}

    fid_node, kid_node = cfg.get("fid"), cfg.get("kid")
    fid_requested = _set_values(fid_node, "fid")
    kid_requested = _set_values(kid_node, "kid")
    if "fid" in accepted:
        fid = kid = None
        if fid_node is not None:
            fid, problem = _fid_settings(fid_node, getattr(model, "fid_settings", None))
            problems += problem
        if fid is not None and kid_node is not None:
            kid = KIDSettings(
                subsets=kid_node.subsets if kid_node.subsets is not None else KIDSettings.subsets,
                subset_size=kid_node.subset_size,
            )
            if kid.subset_size is not None and kid.subset_size > fid.num_samples:
                problems.append(
                    f"kid.subset_size={kid.subset_size} is larger than fid.num_samples="
                    f"{fid.num_samples}, the number of samples a subset is drawn from. Lower "
                    f"kid.subset_size or raise fid.num_samples."
                )
        settings["fid"], settings["kid"] = fid, kid
    else:
        problems += [
            f"{key}={value!r} is set, but {name} is a {model.modality} model and computes no "
            f"FID or KID. Remove {key} from the command line."
            for key, value in {**fid_requested, **kid_requested}.items()
        ]

    iwae_samples = cfg.get("iwae_samples")
    if "iwae_samples" in accepted:
        settings["iwae_samples"] = DEFAULT_IWAE_SAMPLES if iwae_samples is None else iwae_samples
    elif iwae_samples is not None:
        problems.append(
            f"iwae_samples={iwae_samples!r} is set, but only the VAE has an importance-weighted "
            f"bound, and the checkpoint holds a {name}. Remove iwae_samples."
        )

    if problems:
        raise ConfigError(problems)
    return settings


def _fid_settings(
    node: DictConfig, checkpoint_settings: FIDSettings | None
) -> tuple[FIDSettings | None, list[str]]:
    """Return the FID settings of the evaluation: the checkpoint's, with the node's overrides."""
    base = checkpoint_settings or FIDSettings()
    extractor = node.extractor or base.extractor
    if node.inception_weights_path is not None and extractor != "inception":
        return None, [
            f"fid.inception_weights_path={node.inception_weights_path!r} is only read by the "
            f"inception extractor, but the evaluation uses {extractor!r}. Add "
            "fid.extractor=inception, or remove fid.inception_weights_path."
        ]
    settings = base.with_overrides(
        extractor=node.extractor,
        num_samples=node.num_samples,
        inception_weights_path=node.inception_weights_path,
    )
    return settings, []


def _set_values(node: DictConfig | None, prefix: str) -> dict[str, Any]:
    if node is None:
        return {}
    return {f"{prefix}.{key}": value for key, value in node.items() if value is not None}


def _is_int_at_least(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def describe_settings(settings: dict[str, Any], precision: str, limit_batches: Any) -> dict:
    """Return the settings that define the metric values, as plain JSON values."""
    described: dict[str, Any] = {"precision": str(precision), "limit_test_batches": limit_batches}
    if "fid" in settings:
        fid, kid = settings["fid"], settings["kid"]
        described["fid"] = None
        described["kid"] = None
        if fid is not None:
            described["fid"] = {
                "extractor": fid.extractor,
                "num_samples": fid.num_samples,
                "inception_weights_path": fid.inception_weights_path,
            }
        if kid is not None:
            described["kid"] = {
                "subsets": kid.subsets,
                "subset_size": kid.resolved_subset_size(fid.num_samples),
            }
    if "iwae_samples" in settings:
        described["iwae_samples"] = settings["iwae_samples"]
    return described


# ---------------------------------------------------------------------- data


def data_config(cfg: DictConfig, loaded: LoadedCheckpoint) -> dict[str, Any]:
    """Return the data config: data=<preset> when given, else the run's saved data config."""
    if cfg.get("data") is not None:
        return OmegaConf.to_container(cfg.data, resolve=True)
    run_data = None if loaded.run_config is None else loaded.run_config.get("data")
    if run_data is None:
        raise ConfigError(
            [
                f"the data to evaluate on is unknown: {loaded.run_dir / 'config.yaml'} is "
                "missing, so the run's data config cannot be read. Choose the data with "
                "data=<preset> (a file of conf/data/), with the image size, channels or "
                "tokenizer the model was trained with."
            ]
        )
    return OmegaConf.to_container(run_data, resolve=True)


def check_modality(model: L.LightningModule, datamodule: L.LightningDataModule) -> None:
    """Raise ConfigError when the data is not of the kind (image, text) the model takes."""
    model_modality = getattr(model, "modality", None)
    data_modality = getattr(datamodule, "modality", None)
    if model_modality == data_modality:
        return
    raise ConfigError(
        [
            f"the data ({type(datamodule).__name__}) provides {data_modality} data, but the "
            f"checkpoint holds a {type(model).__name__}, a {model_modality} model. Pick "
            f"{model_modality} data with data=<preset>, or leave out data= to use the run's data."
        ]
    )


def check_split(split: str, datamodule: L.LightningDataModule, data_cfg: dict) -> None:
    """Raise ConfigError when the datamodule has no such split."""
    available = getattr(datamodule, "available_splits", lambda: ("val",))()
    if split in available:
        return
    presets = ", ".join(f"data={name}" for name in presets_with_test_split())
    source = data_cfg.get("source", data_cfg["_target_"])
    raise ConfigError(
        [
            f"split={split} is not available for data.source={source!r}, which has only "
            f"{' and '.join(f'split={name}' for name in available)}. Use split=val, or "
            f"a data preset with a test split ({presets}) when the model fits its images."
        ]
    )


def presets_with_test_split() -> list[str]:
    """Names of the data presets in conf/data/ whose source has a test split."""
    return [
        path.stem
        for path in sorted((CONF_DIR / "data").glob("*.yaml"))
        if OmegaConf.load(path).get("source") in TORCHVISION_SOURCES
    ]


def check_model_inputs(inputs: dict[str, Any], hparams: Any, data_overridden: bool) -> None:
    """Raise ConfigError unless the data provides what the model was built for.

    Images must have the model's size and channels. Text must use the model's tokenizer
    (the same ids for the same characters) and a context no longer than the model's.
    """
    source = "data=<preset>" if data_overridden else "the run's data config"
    problems = []
    for key in ("image_size", "channels"):
        if key in inputs and inputs[key] != hparams[key]:
            problems.append(
                f"data.{key}={inputs[key]} (from {source}) differs from the checkpoint's "
                f"{key}={hparams[key]}. Add data.{key}={hparams[key]} to the command line."
            )
    if "tokenizer" in inputs and inputs["tokenizer"] != dict(hparams["tokenizer"]):
        theirs, ours = inputs["tokenizer"], dict(hparams["tokenizer"])
        problems.append(
            f"the tokenizer of {source} ({theirs['kind']}, {inputs['vocab_size']} tokens) maps "
            f"text to other ids than the checkpoint's ({ours['kind']}, "
            f"{hparams['vocab_size']} tokens). Set data.tokenizer={ours['kind']}; a char "
            "tokenizer also needs the characters of the text the model was trained on."
        )
    if "block_size" in inputs and inputs["block_size"] > hparams["block_size"]:
        problems.append(
            f"data.block_size={inputs['block_size']} (from {source}) is longer than the "
            f"model's context of {hparams['block_size']} tokens. Add "
            f"data.block_size={hparams['block_size']} to the command line."
        )
    if problems:
        raise ConfigError(problems)


class SplitAsTest(L.LightningDataModule):
    """The `split` ("val" or "test") of a datamodule, served as the data of `Trainer.test`.

    The inner datamodule is set up inside `Trainer.test`, once the trainer has started its
    processes, so that under DDP each process reads its own part of the split.
    """

    def __init__(self, datamodule: L.LightningDataModule, split: str) -> None:
        super().__init__()
        self.datamodule = datamodule
        self.split = split

    def prepare_data(self) -> None:
        self.datamodule.prepare_data()

    def setup(self, stage: str) -> None:
        self.datamodule.trainer = self.trainer
        self.datamodule.setup("validate" if self.split == "val" else "test")

    def test_dataloader(self):
        if self.split == "val":
            return self.datamodule.val_dataloader()
        return self.datamodule.test_dataloader()


# ---------------------------------------------------------------------- loggers and results


def build_eval_loggers(cfg: DictConfig, loaded: LoadedCheckpoint) -> list[Logger]:
    """Build the loggers; the W&B run joins the training run's project and group as job type eval.

    The training run's W&B project and group come from its summary.json, or else the group
    is the run config's task_name. A group or name set in logger.wandb is kept.
    """
    logger_cfg = cfg.get("logger")
    wandb_node = None if not logger_cfg else logger_cfg.get("wandb")
    if wandb_node is not None and "_target_" in wandb_node:
        training = training_wandb_identity(loaded)
        wandb_node.job_type = "eval"
        if training.get("project") and not _is_overridden("logger.wandb.project"):
            wandb_node.project = training["project"]
        wandb_node.group = wandb_node.group or training.get("group")
        wandb_node.name = wandb_node.name or f"eval-{cfg.split}-{loaded.path.stem}"
    task_name = None if loaded.run_config is None else loaded.run_config.get("task_name")
    return build_loggers(logger_cfg, task_name or "eval")


def _is_overridden(key: str) -> bool:
    """Return whether the command line sets `key` (only known when Hydra runs the job)."""
    if not HydraConfig.initialized():
        return False
    overrides = HydraConfig.get().overrides.task
    return any(override.lstrip("+~").split("=", 1)[0] == key for override in overrides)


def training_wandb_identity(loaded: LoadedCheckpoint) -> dict[str, Any]:
    """Return the training run's W&B {"project", "group", "name", "id"} as far as known."""
    summary_path = loaded.run_dir / "summary.json"
    if summary_path.is_file():
        try:
            identity = json.loads(summary_path.read_text()).get("wandb")
        except (json.JSONDecodeError, AttributeError) as error:
            log.warning("Could not read the W&B identity from %s: %s", summary_path, error)
            identity = None
        if isinstance(identity, dict):
            return identity
    task_name = None if loaded.run_config is None else loaded.run_config.get("task_name")
    return {"group": task_name} if task_name else {}


def save_record(record: dict[str, Any], ckpt_path: Path, eval_dir: Path) -> None:
    """Write `record` to <eval dir>/eval.json and append it to <ckpt stem>.eval.jsonl.

    The record is appended as one line in a single write to a file opened with O_APPEND,
    so earlier lines are never rewritten, and evaluations running at the same time on a
    local file system do not interleave.
    """
    # NOTE: NFS does not make O_APPEND writes atomic; concurrent evaluations of one
    # checkpoint on NFS can interleave their lines.
    eval_dir.mkdir(parents=True, exist_ok=True)
    (eval_dir / "eval.json").write_text(json.dumps(record, indent=2) + "\n")
    results_path = ckpt_path.resolve().with_name(f"{ckpt_path.stem}.eval.jsonl")
    line = (json.dumps(record) + "\n").encode()
    descriptor = os.open(results_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = 0
        while written < len(line):
            written += os.write(descriptor, line[written:])
    finally:
        os.close(descriptor)
    log.info("Results appended to %s", results_path)
    for key, value in sorted(record["metrics"].items()):
        log.info("  %s = %.6g", key, value)


# ---------------------------------------------------------------------- entry point


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    """Run one evaluation; exit with status 2 on invalid settings, 1 on missing files."""
    eval_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        with distributed_job():
            evaluate(cfg)
    except (ConfigError, CheckpointError, MissingInputError) as error:
        log.error("%s", error)
        finish_wandb_run(exit_code=1)
        _remove_rejected_eval_dir(eval_dir)
        sys.exit(1 if isinstance(error, MissingInputError) else 2)
    finish_wandb_run(exit_code=0)


def _remove_rejected_eval_dir(eval_dir: Path) -> None:
    """Delete the eval directory of a rejected evaluation, and its parent when left empty.

    Only a directory that contains nothing but Hydra's files (.hydra/, eval.log) is deleted.
    """
    if not is_global_zero() or not eval_dir.is_dir():
        return
    if not {path.name for path in eval_dir.iterdir()} <= {".hydra", "eval.log"}:
        return
    logging.shutdown()
    shutil.rmtree(eval_dir)
    parent = eval_dir.parent
    if parent.name in ("eval", REJECTED_EVAL_ROOT.name) and not any(parent.iterdir()):
        parent.rmdir()


if __name__ == "__main__":
    main()
