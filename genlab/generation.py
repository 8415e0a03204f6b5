"""Samples, reconstructions, latent interpolations and text from trained genlab models.

generate.py reads its settings with `read_settings`, restores the model with
genlab.checkpoints.load_checkpoint, checks the settings against the model with
`model_problems`, and calls the functions below.

Latents are drawn on the CPU from torch.Generator objects seeded with the settings' seed,
so the same seed gives the same latents on every device. The latent of one seed (used by
the interpolations) is `latent_of_seed`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image, UnidentifiedImageError
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension
from torchvision.transforms import v2

from datamodules.images import ConvertMode
from datamodules.tokenizers import CharTokenizer, Tokenizer
from genlab.checkpoints import WEIGHTS_CHOICES
from genlab.config_check import ConfigError
from genlab.samples import image_grid
from lightning_modules.gan import GAN
from lightning_modules.gpt import GPT
from lightning_modules.vae import VAE

log = logging.getLogger(__name__)

DEVICE_CHOICES = ("auto", "cpu", "cuda")
INTERPOLATION_METHODS = ("slerp", "lerp")

# Settings that only the image models (GAN, VAE) read, only the VAE reads, and only the
# language model (GPT) reads. Nested settings are named by their top-level key.
IMAGE_SETTINGS = ("num_images", "reconstruct", "max_reconstructions", "interpolation")
VAE_SETTINGS = ("reconstruct", "max_reconstructions")
TEXT_SETTINGS = (
    "prompt",
    "max_new_tokens",
    "num_texts",
    "temperature",
    "top_k",
    "top_p",
    "kv_cache",
)

# Latents decoded per forward pass. The images do not depend on it: all latents are drawn
# before decoding.
IMAGE_BATCH_SIZE = 256

# Original and reconstruction pairs per row of the reconstruction grid.
PAIRS_PER_ROW = 8

# Hydra's config folder and log file (named after the script), which Hydra writes into the
# output folder before it calls the main() of generate.py.
HYDRA_FILES = frozenset({".hydra", "generate.log"})

# Called with the number of images or tokens just produced, to advance a progress bar.
ProgressCallback = Callable[[int], None]


@dataclass(frozen=True)
class GenerationSettings:
    """The settings of conf/generate.yaml, checked; that file documents each of them."""

    ckpt_path: str
    weights: str
    seed: int
    device: str
    num_images: int
    reconstruct: str | None
    max_reconstructions: int
    # Pairs of seeds, each one row of the interpolation grid.
    interpolation_seeds: tuple[tuple[int, int], ...]
    interpolation_steps: int
    interpolation_method: str
    prompt: str
    max_new_tokens: int
    num_texts: int
    temperature: float
    top_k: int | None
    top_p: float | None
    kv_cache: bool

    def for_model(self, model: L.LightningModule) -> dict[str, Any]:
        """Return the settings that `model` reads, by their config keys, for the manifest."""
        values = asdict(self)
        if isinstance(model, GPT):
            return {key: values[key] for key in TEXT_SETTINGS}
        settings = {
            "num_images": self.num_images,
            "interpolation": {
                "seeds": [list(pair) for pair in self.interpolation_seeds],
                "steps": self.interpolation_steps,
                "method": self.interpolation_method,
            },
        }
        if isinstance(model, VAE):
            settings["reconstruct"] = self.reconstruct
            settings["max_reconstructions"] = self.max_reconstructions
        return settings


# ---------------------------------------------------------------------- settings


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_seed_pairs(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(pair, list) and len(pair) == 2 and all(_is_int(s) and s >= 0 for s in pair)
        for pair in value
    )


# (key, test, what the key expects) for every setting but ckpt_path and prompt.
SETTING_RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("weights", lambda v: v in WEIGHTS_CHOICES, f"one of {', '.join(WEIGHTS_CHOICES)}"),
    ("seed", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    ("device", lambda v: v in DEVICE_CHOICES, f"one of {', '.join(DEVICE_CHOICES)}"),
    ("num_images", lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    (
        "reconstruct",
        lambda v: v is None or isinstance(v, str),
        "the path of an image file or a folder of images, or null",
    ),
    ("max_reconstructions", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    (
        "interpolation.seeds",
        _is_seed_pairs,
        "a list of seed pairs, each two integers >= 0, such as interpolation.seeds=[[0,1],[2,3]]",
    ),
    ("interpolation.steps", lambda v: _is_int(v) and v >= 2, "an integer >= 2"),
    (
        "interpolation.method",
        lambda v: v in INTERPOLATION_METHODS,
        f"one of {', '.join(INTERPOLATION_METHODS)}",
    ),
    ("max_new_tokens", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    ("num_texts", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    ("temperature", lambda v: _is_number(v) and v >= 0, "a number >= 0 (0: greedy)"),
    ("top_k", lambda v: v is None or (_is_int(v) and v >= 1), "an integer >= 1, or null"),
    (
        "top_p",
        lambda v: v is None or (_is_number(v) and 0 < v <= 1),
        "a number in (0, 1], or null",
    ),
    ("kv_cache", lambda v: isinstance(v, bool), "true or false"),
)


def read_settings(cfg: DictConfig) -> GenerationSettings:
    """Check every setting of the composed generate config and return them.

    Raises ConfigError with every problem found, each naming its key, the value received
    and what is expected.
    """
    if OmegaConf.is_missing(cfg, "ckpt_path"):
        raise ConfigError(
            [
                "ckpt_path is missing. Set it to a checkpoint written by train.py, e.g. "
                "ckpt_path=logs/vae_digits/runs/<run>/checkpoints/last.ckpt."
            ]
        )
    values = OmegaConf.to_container(cfg, resolve=True)
    values.update({f"interpolation.{key}": value for key, value in values["interpolation"].items()})

    problems = [
        f"{key}={values[key]!r} is invalid: expected {expected}."
        for key, is_valid, expected in SETTING_RULES
        if not is_valid(values[key])
    ]
    prompt = values["prompt"]
    if not isinstance(prompt, str):
        problems.append(
            f"prompt={prompt!r} is not text: Hydra reads unquoted numbers, true, false and "
            f"null as such. Quote the prompt: \"prompt='{prompt}'\"."
        )
    elif not prompt:
        problems.append(
            "prompt is empty, but the model needs at least one token to continue. Give some "
            "text, or a newline (the default) to start a new passage."
        )
    if problems:
        raise ConfigError(problems)

    return GenerationSettings(
        ckpt_path=str(values["ckpt_path"]),
        weights=values["weights"],
        seed=values["seed"],
        device=values["device"],
        num_images=values["num_images"],
        reconstruct=values["reconstruct"],
        max_reconstructions=values["max_reconstructions"],
        interpolation_seeds=tuple((a, b) for a, b in values["interpolation.seeds"]),
        interpolation_steps=values["interpolation.steps"],
        interpolation_method=values["interpolation.method"],
        prompt=prompt,
        max_new_tokens=values["max_new_tokens"],
        num_texts=values["num_texts"],
        temperature=float(values["temperature"]),
        top_k=values["top_k"],
        top_p=None if values["top_p"] is None else float(values["top_p"]),
        kv_cache=values["kv_cache"],
    )


def model_problems(
    model: L.LightningModule, settings: GenerationSettings, given_keys: Collection[str]
) -> list[str]:
    """Return the problems of `settings` for `model`, each naming its setting.

    `given_keys` are the keys set on the command line, such as "interpolation.seeds". A
    setting that the model does not read is a problem when it was given, and
    `reconstruct` for a GAN also when it is set in a config file.
    """
    kind = type(model).__name__
    if isinstance(model, GPT):
        not_read, reader = IMAGE_SETTINGS, "the image models (GAN, VAE)"
    elif isinstance(model, (GAN, VAE)):
        not_read, reader = TEXT_SETTINGS, "the language model (GPT)"
    else:
        return [
            f"ckpt_path={settings.ckpt_path!r} is a checkpoint of "
            f"{type(model).__module__}.{kind}, but generate.py generates from GAN, VAE and "
            "GPT checkpoints only."
        ]

    problems = [
        f"{key} is a setting of {reader}, but ckpt_path is a {kind} checkpoint. Remove {key}=."
        for key in sorted(given_keys)
        if key.split(".")[0] in not_read
    ]
    if isinstance(model, GAN):
        vae_keys = {key for key in given_keys if key in VAE_SETTINGS}
        if settings.reconstruct is not None:
            vae_keys.add("reconstruct")
        problems += [
            f"{key} is a setting of the VAE, but ckpt_path is a GAN checkpoint, and a GAN has "
            f"no encoder to reconstruct images with. Remove {key}=."
            for key in sorted(vae_keys)
        ]
    if (
        isinstance(model, (GAN, VAE))
        and settings.num_images == 0
        and not settings.interpolation_seeds
        and settings.reconstruct is None
    ):
        problems.append(
            "num_images=0 with no interpolation.seeds and no reconstruct leaves nothing to "
            "generate. Set num_images >= 1, interpolation.seeds or reconstruct."
        )
    if isinstance(model, GPT):
        problems += prompt_problems(model.tokenizer, settings.prompt)
    return problems


def prompt_problems(tokenizer: Tokenizer, prompt: str) -> list[str]:
    """Return a problem naming the characters of `prompt` that `tokenizer` cannot encode."""
    if not isinstance(tokenizer, CharTokenizer):
        return []  # The byte tokenizer encodes any text.
    unknown = sorted(set(prompt) - set(tokenizer.chars))
    if not unknown:
        return []
    return [
        f"prompt={prompt!r} contains {len(unknown)} character(s) that are not in the "
        f"vocabulary of the checkpoint's character tokenizer: "
        f"{', '.join(repr(c) for c in unknown)}. The vocabulary is the "
        f"{tokenizer.vocab_size} characters of its training text: {tokenizer.chars!r}. "
        "Remove or replace the others."
    ]


def pick_device(device: str) -> torch.device:
    """Return the torch device for the `device` setting (auto, cpu or cuda)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            [
                f"device=cuda, but torch {torch.__version__} sees no CUDA device on this "
                "machine. Use device=cpu, or device=auto to take a GPU when there is one."
            ]
        )
    return torch.device(device)


# ---------------------------------------------------------------------- images


def latent_of_seed(seed: int, latent_dim: int) -> torch.Tensor:
    """Return the latent (latent_dim,) of `seed`: standard normal draws of a CPU generator."""
    return torch.randn(latent_dim, generator=torch.Generator().manual_seed(seed))


def sample_latents(num_latents: int, latent_dim: int, seed: int) -> torch.Tensor:
    """Return `num_latents` standard normal latents (num_latents, latent_dim) drawn with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_latents, latent_dim, generator=generator)


def lerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Interpolate along the straight line from a to b (D,) at fractions t (N,); returns (N, D)."""
    t = t[:, None]
    return (1 - t) * a + t * b


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Interpolate along the great circle from a to b (D,) at fractions t (N,); returns (N, D).

    Most of the mass of a high-dimensional standard normal lies near the sphere of radius
    sqrt(D). Points on the straight line between two latents lie inside that sphere, where
    the model saw few latents in training. Spherical interpolation keeps the norm close to
    that of the ends (White, 2016, "Sampling Generative Networks").
    """
    cos_angle = torch.dot(a / a.norm(), b / b.norm()).clamp(-1.0, 1.0)
    angle = torch.arccos(cos_angle)
    if torch.sin(angle) < 1e-6:
        # Parallel or opposite latents: the great circle is not defined.
        return lerp(a, b, t)
    t = t[:, None]
    return (torch.sin((1 - t) * angle) * a + torch.sin(t * angle) * b) / torch.sin(angle)


def interpolation_latents(
    seed_pairs: Sequence[tuple[int, int]], steps: int, method: str, latent_dim: int
) -> torch.Tensor:
    """Return `steps` latents per seed pair, from the latent of its first seed to that of its
    second, both included: (len(seed_pairs) * steps, latent_dim), one pair after the other."""
    interpolate = slerp if method == "slerp" else lerp
    fractions = torch.linspace(0.0, 1.0, steps)
    rows = [
        interpolate(latent_of_seed(a, latent_dim), latent_of_seed(b, latent_dim), fractions)
        for a, b in seed_pairs
    ]
    return torch.cat(rows)


@torch.inference_mode()
def decode_latents(
    model: GAN | VAE, latents: torch.Tensor, progress: ProgressCallback | None = None
) -> torch.Tensor:
    """Return the images (N, C, H, W) in [0, 1], on the CPU, that `model` makes of `latents`.

    The VAE's image is the mean of p(x | z). Latents are decoded IMAGE_BATCH_SIZE at a time.
    """
    decode = model.decode_mean if isinstance(model, VAE) else model
    images = []
    for batch in latents.split(IMAGE_BATCH_SIZE):
        images.append(decode(batch.to(model.device)).float().cpu())
        if progress is not None:
            progress(len(batch))
    return torch.cat(images)


@torch.inference_mode()
def reconstruct_images(
    model: VAE, images: torch.Tensor, progress: ProgressCallback | None = None
) -> torch.Tensor:
    """Return the VAE's reconstructions (N, C, H, W), on the CPU: the mean of p(x | z) at the
    posterior mean z of each image."""
    reconstructions = []
    for batch in images.split(IMAGE_BATCH_SIZE):
        reconstructions.append(model(batch.to(model.device)).float().cpu())
        if progress is not None:
            progress(len(batch))
    return torch.cat(reconstructions)


def image_files(path: Path) -> list[Path]:
    """Return `path` itself if it is a file, or the image files below the folder `path`,
    sorted by path. Raises ConfigError when there are none."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ConfigError([f"reconstruct={str(path)!r}: file or folder not found."])
    files = sorted(
        file
        for file in path.rglob("*")
        if file.is_file() and has_file_allowed_extension(file.name, IMG_EXTENSIONS)
    )
    if not files:
        raise ConfigError(
            [
                f"reconstruct={str(path)!r} is a folder without images: no file in it or its "
                f"subfolders ends with one of {', '.join(IMG_EXTENSIONS)}."
            ]
        )
    return files


def read_images(files: Sequence[Path], image_size: int, channels: int) -> torch.Tensor:
    """Read image files as the model's inputs (N, channels, image_size, image_size) in [0, 1].

    Each image is converted to grey (1 channel) or RGB (3), its shorter side resized to
    image_size, and its centre cropped to a square: the preprocessing of ImageDataModule
    (datamodules/images.py) for image files.
    """
    transform = v2.Compose(
        [
            ConvertMode("L" if channels == 1 else "RGB"),
            v2.Resize(image_size, antialias=True),
            v2.CenterCrop(image_size),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.ToPureTensor(),
        ]
    )
    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                images.append(transform(image))
        except (UnidentifiedImageError, OSError) as error:
            raise ConfigError(
                [f"reconstruct: {str(file)!r} could not be read as an image ({error})."]
            ) from error
    return torch.stack(images)


def reconstruction_grid(originals: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Return a grid with each original image directly followed by its reconstruction."""
    pairs = torch.stack([originals, reconstructions], dim=1).flatten(0, 1)  # (2N, C, H, W)
    return image_grid(pairs, nrow=2 * min(len(originals), PAIRS_PER_ROW))


# ---------------------------------------------------------------------- text


def generate_texts(
    model: GPT, settings: GenerationSettings, progress: ProgressCallback | None = None
) -> list[str]:
    """Return `settings.num_texts` texts, each the prompt and `settings.max_new_tokens` tokens.

    The texts are generated as one batch with one torch.Generator seeded with
    `settings.seed` on the model's device, so the same seed, device and settings give the
    same texts.
    """
    prompt_ids = model.tokenizer.encode(settings.prompt)
    block_size = model.hparams.block_size
    if len(prompt_ids) > block_size:
        log.warning(
            "The prompt has %d tokens, and only its last block_size=%d fit the context.",
            len(prompt_ids),
            block_size,
        )
    idx = torch.tensor([prompt_ids] * settings.num_texts, device=model.device)  # (B, T)
    generator = torch.Generator(device=model.device).manual_seed(settings.seed)

    new_ids = []
    for next_ids in model.net.stream(
        idx,
        settings.max_new_tokens,
        temperature=settings.temperature,
        top_k=settings.top_k,
        top_p=settings.top_p,
        generator=generator,
        use_cache=settings.kv_cache,
    ):
        new_ids.append(next_ids)
        if progress is not None:
            progress(1)
    ids = torch.cat([idx, *new_ids], dim=1).tolist()
    return [model.tokenizer.decode(row) for row in ids]


# ---------------------------------------------------------------------- output folder


def check_output_dir_unused(output_dir: Path) -> None:
    """Raise ConfigError when `output_dir` contains files besides Hydra's, e.g. earlier outputs."""
    existing = sorted(path.name for path in output_dir.iterdir() if path.name not in HYDRA_FILES)
    if existing:
        raise ConfigError(
            [
                f"hydra.run.dir={str(output_dir)!r} already contains {', '.join(existing)}, "
                "and generate.py never overwrites files. Leave hydra.run.dir unset to get a "
                "new timestamped folder, or name an empty one."
            ]
        )
