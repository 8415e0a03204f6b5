"""generate.py end to end, and the generation code it uses.

Three tiny models are trained once per module with train.py, and generate.py runs on
their checkpoints in a subprocess, as users run it. The VAE is trained by 2 DDP processes
(trainer=ddp_cpu) with EMA weights (callbacks=ema), the GAN and the GPT by one process.
The KV cache, the samplers, the interpolation and the image reading are tested in-process
on small networks.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import conftest
import numpy as np
import pytest
import torch
from conftest import CONF_DIR
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig
from PIL import Image

from datamodules.tokenizers import ByteTokenizer, CharTokenizer
from genlab.checkpoints import load_checkpoint
from genlab.config_check import ConfigError
from genlab.generation import (
    check_output_dir_unused,
    generate_texts,
    interpolation_latents,
    latent_of_seed,
    prompt_problems,
    read_images,
    read_settings,
    slerp,
)
from lightning_modules.nets.transformer import (
    KVCache,
    Transformer,
    TransformerConfig,
    sample_next_token,
)

SMOKE = ["debug=smoke", "logger=none", "seed=0"]
TINY_GPT = [
    "experiment=embedded_gpt",
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=32",
    "model.sample_length=20",
    "data.block_size=16",
]
# The VAE's images are 16 x 16, which genlab.samples.image_grid enlarges to 32 x 32 tiles
# with 2 pixels of padding around each.
TILE = 32 + 2
# Seconds a train.py or generate.py run may take; then its processes, DDP ranks included,
# are killed.
SCRIPT_TIMEOUT_S = 300


# The models are tiny, and their operations take microseconds. With several torch threads,
# each operation also waits for every thread to be scheduled, which takes far longer when
# other processes share the cores, so one thread keeps the tests fast.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def run_script(script: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run `python SCRIPT ARGS` in a subprocess from `cwd` on one thread, as a user would."""
    return conftest.run_script(script, args, cwd, timeout=SCRIPT_TIMEOUT_S, env=ONE_THREAD)


def run_generate(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return run_script("generate.py", args, cwd)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Run the in-process tests on one thread too, for the reason given at ONE_THREAD."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def train_checkpoint(cwd: Path, args: list[str], task_name: str) -> Path:
    """Train with train.py from `cwd` and return the run's last.ckpt."""
    result = run_script("train.py", [*SMOKE, *args], cwd)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return last_checkpoint(cwd, task_name)


def train_ddp_checkpoint(cwd: Path, args: list[str], task_name: str) -> Path:
    """Train with train.py and trainer=ddp_cpu from `cwd`; return the run's last.ckpt."""
    return train_checkpoint(cwd, ["trainer=ddp_cpu", *args], task_name)


def last_checkpoint(cwd: Path, task_name: str) -> Path:
    (run_dir,) = (cwd / "logs" / task_name / "runs").iterdir()
    return run_dir / "checkpoints" / "last.ckpt"


def output_dir_of(result: subprocess.CompletedProcess) -> Path:
    """Return the output folder that generate.py logged."""
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    (line,) = [line for line in output.splitlines() if "Writing into " in line]
    return Path(line.split("Writing into ", 1)[1].strip())


def compose_generate_config(overrides: list[str]) -> DictConfig:
    """Compose conf/generate.yaml with `overrides`, as generate.py does."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name="generate", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


def output_dirs(ckpt: Path) -> list[Path]:
    """Return the output folders in the generated/ folder of the run of `ckpt`."""
    generated = ckpt.parent.parent / "generated"
    return sorted(generated.iterdir()) if generated.is_dir() else []


def manifest_of(output_dir: Path) -> dict:
    return json.loads((output_dir / "manifest.json").read_text())


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        return image.size


def write_png(path: Path, shape: tuple[int, ...], seed: int) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


# ---------------------------------------------------------------------- trained models


@pytest.fixture(scope="module")
def vae_ckpt(tmp_path_factory) -> Path:
    """last.ckpt of a VAE trained by 2 processes with callbacks=ema.

    The average starts as a copy of the weights after the first step, and after 3 more
    steps with decay 0.999 it is still close to them, so the averaged and the trained
    weights differ.
    """
    cwd = tmp_path_factory.mktemp("vae")
    return train_ddp_checkpoint(cwd, ["callbacks=ema"], "vae_digits")


@pytest.fixture(scope="module")
def gan_ckpt(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("gan")
    return train_checkpoint(cwd, ["model=gan", "model.fid=null"], "gan_digits")


@pytest.fixture(scope="module")
def gpt_ckpt(tmp_path_factory) -> Path:
    """last.ckpt of a 2-layer GPT with block_size 16 and the character tokenizer."""
    cwd = tmp_path_factory.mktemp("gpt")
    return train_checkpoint(cwd, TINY_GPT, "gpt_embedded_text")


@pytest.fixture(scope="module")
def images_to_reconstruct(tmp_path_factory) -> Path:
    """A folder of three images: grey and RGB, of sizes other than the model's."""
    folder = tmp_path_factory.mktemp("originals")
    write_png(folder / "b_grey.png", (20, 24), seed=1)
    write_png(folder / "nested" / "c_rgb.png", (30, 30, 3), seed=2)
    write_png(folder / "a_rgb.png", (12, 9, 3), seed=3)
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def vae_generation(vae_ckpt, images_to_reconstruct):
    """One generate.py run on the VAE with every kind of image output."""
    args = [
        f"ckpt_path={vae_ckpt}",
        "num_images=16",
        "seed=3",
        "interpolation.seeds=[[1,2],[3,4]]",
        "interpolation.steps=5",
        f"reconstruct={images_to_reconstruct}",
    ]
    result = run_generate(args, vae_ckpt.parent)
    return result, output_dir_of(result)


# ---------------------------------------------------------------------- VAE


def test_vae_output_folder_is_in_run_dir(vae_ckpt, vae_generation):
    _, output_dir = vae_generation
    run_dir = vae_ckpt.parent.parent
    assert output_dir.parent == run_dir / "generated"
    assert (output_dir / ".hydra" / "config.yaml").is_file()
    assert (output_dir / "generate.log").is_file()


def test_vae_writes_grids_of_expected_size(vae_generation):
    _, output_dir = vae_generation
    # 16 samples: 4 x 4 tiles. 2 seed pairs of 5 steps: 2 rows of 5. 3 originals, each
    # followed by its reconstruction: 1 row of 6.
    assert png_size(output_dir / "samples.png") == (4 * TILE + 2, 4 * TILE + 2)
    assert png_size(output_dir / "interpolations.png") == (5 * TILE + 2, 2 * TILE + 2)
    assert png_size(output_dir / "reconstructions.png") == (6 * TILE + 2, TILE + 2)


def test_vae_manifest_records_inputs_and_settings(vae_ckpt, vae_generation, images_to_reconstruct):
    _, output_dir = vae_generation
    manifest = manifest_of(output_dir)
    assert manifest["checkpoint"] == str(vae_ckpt.resolve())
    assert manifest["model"] == "lightning_modules.vae.VAE"
    assert manifest["weights"] == "ema"
    assert manifest["seed"] == 3
    assert manifest["settings"]["interpolation"]["seeds"] == [[1, 2], [3, 4]]
    files = [entry["file"] for entry in manifest["outputs"]]
    assert files == ["samples.png", "interpolations.png", "reconstructions.png"]
    inputs = manifest["outputs"][2]["inputs"]
    folder = images_to_reconstruct.resolve()
    names = ["a_rgb.png", "b_grey.png", "nested/c_rgb.png"]
    assert inputs == [str(folder / name) for name in names]


def test_vae_logs_each_written_file(vae_generation):
    result, output_dir = vae_generation
    for name in ("samples.png", "interpolations.png", "reconstructions.png", "manifest.json"):
        assert f"Wrote {output_dir / name}" in result.stdout


def test_same_seed_gives_identical_png(vae_ckpt, vae_generation):
    _, first_dir = vae_generation
    first_bytes = (first_dir / "samples.png").read_bytes()

    result = run_generate([f"ckpt_path={vae_ckpt}", "num_images=16", "seed=3"], vae_ckpt.parent)
    second_dir = output_dir_of(result)

    assert second_dir != first_dir
    assert (second_dir / "samples.png").read_bytes() == first_bytes
    assert (first_dir / "samples.png").read_bytes() == first_bytes
    assert (first_dir / "reconstructions.png").is_file()


def test_ema_and_raw_weights_give_different_images(vae_ckpt, vae_generation, images_to_reconstruct):
    _, ema_dir = vae_generation
    single_image = images_to_reconstruct / "a_rgb.png"
    args = [f"ckpt_path={vae_ckpt}", "num_images=16", "seed=3", "weights=raw"]

    result = run_generate([*args, f"reconstruct={single_image}"], vae_ckpt.parent)
    raw_dir = output_dir_of(result)

    assert manifest_of(raw_dir)["weights"] == "raw"
    raw_bytes = (raw_dir / "samples.png").read_bytes()
    assert raw_bytes != (ema_dir / "samples.png").read_bytes()
    assert png_size(raw_dir / "reconstructions.png") == (2 * TILE + 2, TILE + 2)
    assert manifest_of(raw_dir)["outputs"][1]["inputs"] == [str(single_image.resolve())]


def test_output_folder_with_files_is_rejected(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / "generate.log").write_text("")
    check_output_dir_unused(tmp_path)

    (tmp_path / "samples.png").write_bytes(b"")
    with pytest.raises(ConfigError, match="already contains samples.png"):
        check_output_dir_unused(tmp_path)


# ---------------------------------------------------------------------- GAN


def test_gan_writes_samples_and_interpolations(gan_ckpt):
    args = [f"ckpt_path={gan_ckpt}", "num_images=9", "interpolation.seeds=[[5,6]]"]
    result = run_generate([*args, "interpolation.method=lerp"], gan_ckpt.parent)
    output_dir = output_dir_of(result)

    manifest = manifest_of(output_dir)
    assert manifest["model"] == "lightning_modules.gan.GAN"
    assert manifest["weights"] == "raw"
    assert png_size(output_dir / "samples.png") == (3 * TILE + 2, 3 * TILE + 2)
    assert png_size(output_dir / "interpolations.png") == (8 * TILE + 2, TILE + 2)
    assert "reconstruct" not in manifest["settings"]


def test_ema_weights_without_average_fail(gan_ckpt):
    before = output_dirs(gan_ckpt)
    result = run_generate([f"ckpt_path={gan_ckpt}", "weights=ema"], gan_ckpt.parent)

    output = result.stdout + result.stderr
    assert result.returncode == 2
    assert "weights=ema" in output
    assert "callbacks=ema" in output
    assert "Traceback" not in output
    assert output_dirs(gan_ckpt) == before


def test_gan_rejects_settings_of_other_models(gan_ckpt, images_to_reconstruct):
    before = output_dirs(gan_ckpt)
    args = [f"ckpt_path={gan_ckpt}", f"reconstruct={images_to_reconstruct}", "prompt=hi"]
    result = run_generate([*args, "top_k=3"], gan_ckpt.parent)

    output = result.stdout + result.stderr
    assert result.returncode == 2
    assert "Invalid configuration (3 problems)" in output
    assert "reconstruct is a setting of the VAE" in output
    assert "prompt is a setting of the language model" in output
    assert "top_k is a setting of the language model" in output
    assert "Traceback" not in output
    assert output_dirs(gan_ckpt) == before


# ---------------------------------------------------------------------- GPT


GPT_ARGS = [
    "prompt='The ki'",
    "num_texts=3",
    # Beyond block_size=16, so that generation goes on after the cache is full.
    "max_new_tokens=40",
    "temperature=0.8",
    "top_k=20",
    "top_p=0.9",
    "seed=1",
]


@pytest.fixture(scope="module")
def gpt_generation(gpt_ckpt):
    result = run_generate([f"ckpt_path={gpt_ckpt}", *GPT_ARGS], gpt_ckpt.parent)
    return result, output_dir_of(result)


def test_gpt_writes_one_file_per_text(gpt_generation):
    _, output_dir = gpt_generation
    texts = [(output_dir / f"text_{i:02d}.txt").read_text() for i in range(3)]
    assert not (output_dir / "text_03.txt").exists()
    for text in texts:
        assert text.startswith("The ki")
        assert len(text) == len("The ki") + 40
    assert len(set(texts)) == 3


def test_gpt_prints_texts(gpt_generation):
    result, output_dir = gpt_generation
    for index in range(3):
        name = f"text_{index:02d}.txt"
        assert f"----- {name} -----\n{(output_dir / name).read_text()}" in result.stdout


def test_gpt_manifest_records_sampling_settings(gpt_generation):
    _, output_dir = gpt_generation
    manifest = manifest_of(output_dir)
    assert manifest["model"] == "lightning_modules.gpt.GPT"
    assert manifest["settings"]["top_p"] == 0.9
    assert manifest["settings"]["kv_cache"] is True
    assert [entry["file"] for entry in manifest["outputs"]] == [
        "text_00.txt",
        "text_01.txt",
        "text_02.txt",
    ]


def test_gpt_without_cache_gives_same_texts(gpt_ckpt, gpt_generation, tmp_path):
    _, cached_dir = gpt_generation
    overrides = [f"ckpt_path={gpt_ckpt}", *GPT_ARGS, "kv_cache=false", f"output_root={tmp_path}"]
    settings = read_settings(compose_generate_config(overrides))
    model = load_checkpoint(gpt_ckpt).model

    texts = generate_texts(model, settings)

    assert settings.kv_cache is False
    for index, text in enumerate(texts):
        assert text == (cached_dir / f"text_{index:02d}.txt").read_text()


def test_gpt_rejects_unknown_characters_and_image_settings(gpt_ckpt):
    before = output_dirs(gpt_ckpt)
    args = [f"ckpt_path={gpt_ckpt}", "prompt='Xerxes ü'", "num_images=4"]
    result = run_generate(args, gpt_ckpt.parent)

    output = result.stdout + result.stderr
    assert result.returncode == 2
    assert "prompt='Xerxes ü'" in output
    assert "not in the vocabulary of the checkpoint's character tokenizer: 'X', 'ü'" in output
    assert "The vocabulary is the 62 characters" in output
    assert "num_images is a setting of the image models" in output
    assert "Traceback" not in output
    assert output_dirs(gpt_ckpt) == before


# ---------------------------------------------------------------------- checkpoint errors


def test_missing_checkpoint_fails_without_writing(tmp_path):
    missing = tmp_path / "run" / "checkpoints" / "last.ckpt"
    result = run_generate([f"ckpt_path={missing}"], tmp_path)

    output = result.stdout + result.stderr
    assert result.returncode == 2
    assert f"ckpt_path='{missing}' does not exist" in output
    assert "Traceback" not in output
    assert list(tmp_path.iterdir()) == []


def test_misspelt_added_setting_fails_without_writing(gan_ckpt):
    before = output_dirs(gan_ckpt)
    result = run_generate([f"ckpt_path={gan_ckpt}", "+temprature=0.8"], gan_ckpt.parent)

    output = result.stdout + result.stderr
    assert result.returncode == 2
    assert "+temprature is not a setting of generate.py (did you mean 'temperature'?)" in output
    assert output_dirs(gan_ckpt) == before


def test_missing_ckpt_path_is_reported():
    cfg = compose_generate_config([])
    with pytest.raises(ConfigError, match="ckpt_path is missing"):
        read_settings(cfg)


# ---------------------------------------------------------------------- KV cache


def tiny_transformer(block_size: int = 8) -> Transformer:
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=11, block_size=block_size, n_layer=2, n_head=2, n_embd=16)
    return Transformer(config).eval()


SAMPLERS = {
    "greedy": {"temperature": 0.0},
    "sampled": {"temperature": 1.0},
    "top_k": {"temperature": 1.2, "top_k": 3},
    "top_p": {"temperature": 1.2, "top_p": 0.7},
}


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("prompt_length", [1, 5, 8, 11])
def test_cached_generation_matches_uncached(sampler, prompt_length):
    net = tiny_transformer(block_size=8)
    prompt = torch.randint(0, 11, (3, prompt_length), generator=torch.Generator().manual_seed(1))

    tokens = {}
    for use_cache in (True, False):
        generator = torch.Generator().manual_seed(7)
        tokens[use_cache] = net.generate(
            prompt, 20, generator=generator, use_cache=use_cache, **SAMPLERS[sampler]
        )

    assert tokens[True].shape == (3, prompt_length + 20)
    assert torch.equal(tokens[True], tokens[False])


def test_cached_chunks_match_full_forward():
    net = tiny_transformer(block_size=8)
    idx = torch.randint(0, 11, (2, 8), generator=torch.Generator().manual_seed(2))
    cache = KVCache(net.config)

    with torch.no_grad():
        full, _ = net(idx)
        bounds = ((0, 3), (3, 5), (5, 6), (6, 8))
        chunks = [net(idx[:, start:end], kv_cache=cache)[0] for start, end in bounds]

    assert cache.length == 8
    assert torch.allclose(torch.cat(chunks, dim=1), full, atol=1e-5)


def test_kv_cache_rejects_overflow():
    net = tiny_transformer(block_size=8)
    cache = KVCache(net.config)
    with torch.no_grad():
        net(torch.zeros(1, 6, dtype=torch.int64), kv_cache=cache)
        with pytest.raises(ValueError, match="after 6 cached positions exceeds block_size 8"):
            net(torch.zeros(1, 3, dtype=torch.int64), kv_cache=cache)


def fed_lengths(net: Transformer, prompt_length: int, steps: int, use_cache: bool) -> list[int]:
    """Return the number of positions the network runs at each step of a generation."""
    lengths = []
    hook = net.token_embedding.register_forward_hook(
        lambda module, inputs, output: lengths.append(inputs[0].shape[1])
    )
    try:
        prompt = torch.zeros(1, prompt_length, dtype=torch.int64)
        net.generate(prompt, steps, use_cache=use_cache)
    finally:
        hook.remove()
    return lengths


def test_cached_step_runs_only_new_token():
    net = tiny_transformer(block_size=8)

    # A prompt of 3 tokens and 8 new ones: the context reaches block_size=8 at step 6,
    # and from step 7 on the last 8 tokens are re-encoded.
    cached = fed_lengths(net, prompt_length=3, steps=8, use_cache=True)
    uncached = fed_lengths(net, prompt_length=3, steps=8, use_cache=False)

    assert cached == [3, 1, 1, 1, 1, 1, 8, 8]
    assert uncached == [3, 4, 5, 6, 7, 8, 8, 8]


# ---------------------------------------------------------------------- sampling


def test_temperature_zero_picks_most_likely_token():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 2.9]])
    assert sample_next_token(logits, temperature=0).tolist() == [[1], [0]]


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log().expand(2000, 4)
    generator = torch.Generator().manual_seed(0)

    nucleus_80 = sample_next_token(logits, top_p=0.8, generator=generator)
    nucleus_50 = sample_next_token(logits, top_p=0.5, generator=generator)
    everything = sample_next_token(logits, top_p=1.0, generator=generator)

    assert set(nucleus_80.flatten().tolist()) == {0, 1}
    assert set(nucleus_50.flatten().tolist()) == {0}
    assert set(everything.flatten().tolist()) == {0, 1, 2, 3}


def test_top_k_keeps_k_most_likely():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).expand(500, 4)
    tokens = sample_next_token(logits, top_k=2, generator=torch.Generator().manual_seed(0))
    assert set(tokens.flatten().tolist()) == {2, 3}


# ---------------------------------------------------------------------- settings and inputs


def test_prompt_problems_name_unknown_characters():
    tokenizer = CharTokenizer.from_text("abc ")

    (problem,) = prompt_problems(tokenizer, "a bz!")

    assert problem.startswith("prompt='a bz!'")
    assert "character tokenizer: '!', 'z'." in problem
    assert "The vocabulary is the 4 characters of its training text: ' abc'." in problem


def test_byte_tokenizer_accepts_any_prompt():
    assert prompt_problems(ByteTokenizer(), "Zürich {€}") == []


def test_slerp_keeps_ends_and_norm():
    a = torch.tensor([3.0, 0.0])
    b = torch.tensor([0.0, 3.0])

    path = slerp(a, b, torch.linspace(0, 1, 5))

    assert torch.equal(path[0], a)
    assert torch.allclose(path[-1], b)
    assert torch.allclose(path.norm(dim=1), torch.full((5,), 3.0))


def test_interpolation_rows_start_and_end_at_seed_latents():
    latents = interpolation_latents([(1, 2), (3, 4)], steps=4, method="slerp", latent_dim=6)

    assert latents.shape == (8, 6)
    assert torch.allclose(latents[0], latent_of_seed(1, 6))
    assert torch.allclose(latents[3], latent_of_seed(2, 6))
    assert torch.allclose(latents[4], latent_of_seed(3, 6))
    assert torch.allclose(latents[7], latent_of_seed(4, 6))


def test_read_images_converts_channels_and_size(images_to_reconstruct):
    files = [images_to_reconstruct / "b_grey.png", images_to_reconstruct / "a_rgb.png"]

    grey = read_images(files, image_size=16, channels=1)
    rgb = read_images(files, image_size=16, channels=3)

    assert grey.shape == (2, 1, 16, 16)
    assert rgb.shape == (2, 3, 16, 16)
    assert grey.dtype == torch.float32
    assert grey.min() >= 0.0
    assert grey.max() <= 1.0
