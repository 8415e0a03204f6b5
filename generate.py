"""Generate images or text from a checkpoint written by train.py.

    python generate.py ckpt_path=<run dir>/checkpoints/last.ckpt    # 64 images, or 4 texts
    python generate.py ckpt_path=<ckpt> num_images=100 seed=1 'interpolation.seeds=[[0,1],[2,3]]'
    python generate.py ckpt_path=<VAE ckpt> reconstruct=path/to/images
    python generate.py ckpt_path=<GPT ckpt> prompt=ROMEO: max_new_tokens=1000 top_k=40
    python generate.py ckpt_path=<ckpt> weights=raw    # not the EMA weights of an EMA run

The model comes from the checkpoint, and conf/generate.yaml documents every setting. Each
call writes a new folder, <run dir>/generated/<timestamp>/, with the outputs and
manifest.json, and never overwrites earlier outputs. Invalid settings and unusable
checkpoints stop it with exit status 2 before anything is written.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torchvision.utils import save_image

from genlab.checkpoints import CheckpointError, load_checkpoint
from genlab.config_check import ConfigError, added_key_problems
from genlab.generation import (
    HYDRA_FILES,
    IMAGE_BATCH_SIZE,
    GenerationSettings,
    ProgressCallback,
    check_output_dir_unused,
    decode_latents,
    generate_texts,
    image_files,
    interpolation_latents,
    model_problems,
    pick_device,
    read_images,
    read_settings,
    reconstruct_images,
    reconstruction_grid,
    sample_latents,
)
from genlab.samples import image_grid
from lightning_modules.gan import GAN
from lightning_modules.gpt import GPT
from lightning_modules.vae import VAE

log = logging.getLogger("genlab.generate")

MANIFEST_NAME = "manifest.json"


def generation_root(ckpt_path: str | None) -> str:
    """Return the default output_root for `ckpt_path`: the generated/ folder of its run.

    A checkpoint in <run dir>/checkpoints/ gives <run dir>/generated; a checkpoint
    elsewhere gives generated/ next to it. For a missing ckpt_path, or one that is not a
    file, the folder is ./generated: main() then reports the error and removes the folder
    that Hydra created there.
    """
    path = Path(ckpt_path).expanduser().absolute() if ckpt_path else None
    if path is None or not path.is_file():
        return str(Path.cwd() / "generated")
    folder = path.parent
    run_dir = folder.parent if folder.name == "checkpoints" else folder
    return str(run_dir / "generated")


# Hydra resolves hydra.run.dir, which uses this resolver, before it calls main().
OmegaConf.register_new_resolver("genlab_generation_root", generation_root)


def generate(cfg: DictConfig, output_dir: Path) -> None:
    """Check the settings, load the checkpoint and write the outputs into `output_dir`."""
    problems = added_key_problems(HydraConfig.get().overrides.task, "generate")
    if problems:
        raise ConfigError(problems)
    settings = read_settings(cfg)
    device = pick_device(settings.device)
    check_output_dir_unused(output_dir)

    log.info("Loading %s (weights=%s) on %s", settings.ckpt_path, settings.weights, device)
    checkpoint = load_checkpoint(settings.ckpt_path, weights=settings.weights, map_location=device)
    model = checkpoint.model
    model_class = f"{type(model).__module__}.{type(model).__qualname__}"
    log.info(
        "Model <%s> after epoch %s, step %s, with its %s weights",
        model_class,
        checkpoint.epoch,
        checkpoint.global_step,
        checkpoint.weights,
    )

    problems = model_problems(model, settings, given_keys(HydraConfig.get().overrides.task))
    if problems:
        raise ConfigError(problems)
    # Read the images to reconstruct before writing anything, so that a bad path or file
    # leaves no partial outputs. model_problems rejects reconstruct for other models.
    originals = None
    if isinstance(model, VAE) and settings.reconstruct is not None:
        originals = read_originals(model, settings)

    log.info("Writing into %s", output_dir)
    if isinstance(model, GPT):
        outputs = write_texts(model, settings, output_dir)
    else:
        outputs = write_images(model, settings, output_dir, originals)

    manifest = {
        "checkpoint": str(checkpoint.path.resolve()),
        "model": model_class,
        "weights": checkpoint.weights,
        "epoch": checkpoint.epoch,
        "global_step": checkpoint.global_step,
        "seed": settings.seed,
        "device": str(device),
        "settings": settings.for_model(model),
        "outputs": outputs,
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    manifest_path = output_dir / MANIFEST_NAME
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    log.info("Wrote %s", manifest_path)


def write_images(
    model: GAN | VAE,
    settings: GenerationSettings,
    output_dir: Path,
    originals: Originals | None,
) -> list[dict[str, Any]]:
    """Write the sample, interpolation and reconstruction grids that `settings` ask for.

    `originals` are the images to reconstruct, None for none. Returns one manifest entry
    per file.
    """
    # cuDNN picks among convolution algorithms, some of them non-deterministic; this keeps
    # it to deterministic ones. NOTE: bit-identical images for one seed are tested on the
    # CPU only.
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    latent_dim = model.hparams.latent_dim
    outputs = []

    if settings.num_images > 0:
        latents = sample_latents(settings.num_images, latent_dim, settings.seed)
        with progress_bar("Sampling images", len(latents), IMAGE_BATCH_SIZE) as progress:
            images = decode_latents(model, latents, progress)
        content = f"{settings.num_images} images from the latents of seed={settings.seed}"
        outputs.append(write_grid(image_grid(images), output_dir / "samples.png", content))

    if settings.interpolation_seeds:
        steps = settings.interpolation_steps
        latents = interpolation_latents(
            settings.interpolation_seeds, steps, settings.interpolation_method, latent_dim
        )
        with progress_bar("Interpolating", len(latents), IMAGE_BATCH_SIZE) as progress:
            images = decode_latents(model, latents, progress)
        pairs = ", ".join(f"{a}->{b}" for a, b in settings.interpolation_seeds)
        content = (
            f"{settings.interpolation_method} interpolations in {steps} steps, one row per "
            f"seed pair: {pairs}"
        )
        path = output_dir / "interpolations.png"
        outputs.append(write_grid(image_grid(images, nrow=steps), path, content))

    if originals is not None:
        with progress_bar("Reconstructing", len(originals.files), IMAGE_BATCH_SIZE) as progress:
            reconstructions = reconstruct_images(model, originals.images, progress)
        grid = reconstruction_grid(originals.images, reconstructions)
        content = f"{len(originals.files)} images, each followed by its reconstruction"
        entry = write_grid(grid, output_dir / "reconstructions.png", content)
        entry["inputs"] = [str(file.resolve()) for file in originals.files]
        outputs.append(entry)
    return outputs


@dataclass
class Originals:
    """Images to reconstruct: the files and their pixels, (N, C, H, W) in [0, 1]."""

    files: list[Path]
    images: torch.Tensor


def read_originals(model: VAE, settings: GenerationSettings) -> Originals:
    """Read up to max_reconstructions images of `settings.reconstruct` as the model's inputs."""
    files = image_files(Path(settings.reconstruct).expanduser())
    if len(files) > settings.max_reconstructions:
        log.info(
            "Reconstructing the first %d of the %d images in %s (max_reconstructions)",
            settings.max_reconstructions,
            len(files),
            settings.reconstruct,
        )
        files = files[: settings.max_reconstructions]
    images = read_images(files, model.hparams.image_size, model.hparams.channels)
    return Originals(files, images)


def write_grid(grid: torch.Tensor, path: Path, content: str) -> dict[str, Any]:
    """Write an image grid as a PNG file; returns its manifest entry."""
    save_image(grid, path)
    log.info("Wrote %s: %s", path, content)
    return {"file": path.name, "content": content}


def write_texts(model: GPT, settings: GenerationSettings, output_dir: Path) -> list[dict[str, Any]]:
    """Generate the texts, print them and write each to text_<i>.txt; returns manifest entries."""
    start = time.perf_counter()
    with progress_bar("Generating tokens", settings.max_new_tokens) as progress:
        texts = generate_texts(model, settings, progress)
    seconds = time.perf_counter() - start
    num_tokens = settings.num_texts * settings.max_new_tokens
    log.info(
        "Generated %d texts of %d new tokens in %.2f s (%.0f tokens/s, kv_cache=%s)",
        settings.num_texts,
        settings.max_new_tokens,
        seconds,
        num_tokens / seconds,
        settings.kv_cache,
    )

    width = max(2, len(str(len(texts) - 1)))
    outputs = []
    for index, text in enumerate(texts):
        path = output_dir / f"text_{index:0{width}d}.txt"
        print(f"\n----- {path.name} -----\n{text}", flush=True)
        path.write_text(text, encoding="utf-8")
        log.info("Wrote %s", path)
        content = f"the prompt and {settings.max_new_tokens} new tokens"
        outputs.append({"file": path.name, "content": content})
    return outputs


@contextmanager
def progress_bar(description: str, total: int, min_total: int = 0) -> Iterator[ProgressCallback]:
    """Show a rich progress bar on stderr for a task of `total` steps, when total > min_total.

    Yields the callback that advances it.
    """
    if total <= min_total:
        yield lambda steps: None
        return
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as progress:
        task = progress.add_task(description, total=total)
        yield lambda steps: progress.advance(task, steps)


def given_keys(overrides: Sequence[str]) -> set[str]:
    """Return the config keys that command-line overrides set, such as "interpolation.seeds"."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return {override.key_or_group for override in parsed}


def remove_unused_output_dir(output_dir: Path) -> None:
    """Delete the output folder if it contains only Hydra's files, and generated/ above it if
    that is left empty.

    NOTE: an existing folder named with hydra.run.dir is deleted too when it contains
    nothing else, and Hydra has already replaced its .hydra/ files.
    """
    if not output_dir.is_dir() or not {path.name for path in output_dir.iterdir()} <= HYDRA_FILES:
        return
    logging.shutdown()
    shutil.rmtree(output_dir)
    parent = output_dir.parent
    if parent.name == "generated" and not any(parent.iterdir()):
        parent.rmdir()


@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    """Run one generation; exit with status 2 on invalid settings or an unusable checkpoint."""
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        generate(cfg, output_dir)
    except (ConfigError, CheckpointError) as error:
        log.error("%s", error)
        remove_unused_output_dir(output_dir)
        sys.exit(2)


if __name__ == "__main__":
    main()
