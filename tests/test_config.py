"""The composed Hydra config: presets compose, and invalid configs fail with one clear message."""

from __future__ import annotations

import pytest
from conftest import CONF_DIR, job_config
from omegaconf import OmegaConf

from genlab.config_check import ConfigError, check_config

EXPERIMENTS = sorted(path.stem for path in (CONF_DIR / "experiment").glob("*.yaml"))


def problems_of(cfg) -> list[str]:
    choices = dict(cfg.hydra.runtime.choices)
    with pytest.raises(ConfigError) as info:
        check_config(job_config(cfg), choices)
    return info.value.problems


def test_expected_experiment_presets_exist():
    for name in ("digits_vae", "mnist_gan", "mnist_vae", "shakespeare_char", "embedded_gpt"):
        assert name in EXPERIMENTS


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_preset_composes_and_validates(compose, experiment):
    overrides = [f"experiment={experiment}"]
    cfg = compose(*overrides)
    job = job_config(cfg)
    if "path" in job.data and OmegaConf.is_missing(job.data, "path"):
        # Presets on a user's own files leave the path mandatory; fill it to validate the rest.
        cfg = compose(*overrides, "data.path=/tmp/any")
        job = job_config(cfg)
    check_config(job, dict(cfg.hydra.runtime.choices))


def test_default_config_is_vae_on_digits(compose):
    cfg = compose()
    assert cfg.hydra.runtime.choices["experiment"] == "digits_vae"
    assert cfg.model._target_.endswith(".VAE")
    assert cfg.data.source == "digits"


def test_shakespeare_char_matches_nanogpt_cpu_recipe(compose):
    cfg = job_config(compose("experiment=shakespeare_char"))
    assert cfg.model.n_layer == 4
    assert cfg.model.n_head == 4
    assert cfg.model.n_embd == 128
    assert cfg.data.block_size == 64
    assert cfg.data.batch_size == 12
    assert cfg.trainer.max_steps == 2000
    assert cfg.model.lr == pytest.approx(1e-3)
    assert cfg.model.min_lr == pytest.approx(1e-4)
    assert cfg.model.warmup_steps == 100
    assert list(cfg.model.betas) == pytest.approx([0.9, 0.99])
    assert cfg.model.dropout == 0.0
    assert cfg.trainer.gradient_clip_val == pytest.approx(1.0)


def test_seed_zero_is_kept(compose):
    cfg = job_config(compose("seed=0"))
    assert cfg.seed == 0


def test_language_model_on_image_data_is_rejected(compose):
    problems = problems_of(compose("model=gpt", "data=digits"))
    assert len(problems) == 1
    assert "model=gpt cannot train on data=digits" in problems[0]
    assert "data=embedded_text" in problems[0]
    assert "model=vae" in problems[0]


def test_image_model_on_text_data_is_rejected(compose):
    problems = problems_of(compose("model=vae", "data=embedded_text"))
    assert any("model=vae cannot train on data=embedded_text" in p for p in problems)


def test_missing_mandatory_value_is_named(compose):
    problems = problems_of(compose("data=text_file", "model=gpt"))
    assert len(problems) == 1
    assert "data.path is missing" in problems[0]
    assert "data.path=<value>" in problems[0]


def test_missing_value_and_wrong_pairing_listed_together(compose):
    problems = problems_of(compose("data=text_file"))
    assert len(problems) == 2
    assert "data.path is missing" in problems[0]
    assert "model=vae cannot train on data=text_file: VAE is an image model" in problems[1]


def test_validation_interval_beyond_max_steps_is_rejected(compose):
    problems = problems_of(compose("experiment=embedded_gpt", "trainer.max_steps=200"))
    assert len(problems) == 1
    assert "trainer.val_check_interval=250" in problems[0]
    assert "trainer.max_steps=200" in problems[0]
    assert "at most 200" in problems[0]


def test_negative_learning_rate_is_rejected(compose):
    problems = problems_of(compose("model.lr=-0.001"))
    assert len(problems) == 1
    assert "model.lr=-0.001" in problems[0]
    assert "> 0" in problems[0]


def test_zero_batch_size_is_rejected(compose):
    problems = problems_of(compose("data.batch_size=0"))
    assert len(problems) == 1
    assert "data.batch_size=0" in problems[0]
    assert ">= 1" in problems[0]


def test_misspelled_model_key_is_named_with_suggestion(compose):
    problems = problems_of(compose("+model.lrr=0.01"))
    assert len(problems) == 1
    assert "model.lrr" in problems[0]
    assert "did you mean 'lr'" in problems[0]


def test_misspelled_top_level_key_is_named_with_suggestion(compose):
    problems = problems_of(compose("+sed=3"))
    assert len(problems) == 1
    assert "sed" in problems[0]
    assert "did you mean 'seed'" in problems[0]


def test_misspelled_trainer_key_is_named(compose):
    problems = problems_of(compose("+trainer.max_step=10"))
    assert len(problems) == 1
    assert "trainer.max_step" in problems[0]
    assert "did you mean 'max_steps'" in problems[0]


def test_wrong_value_type_is_rejected(compose):
    problems = problems_of(compose("data.batch_size=abc"))
    assert any("data.batch_size='abc'" in p for p in problems)


def test_negative_seed_is_rejected(compose):
    problems = problems_of(compose("seed=-1"))
    assert len(problems) == 1
    assert "seed=-1" in problems[0]


def test_missing_checkpoint_file_is_rejected(compose, tmp_path):
    missing = tmp_path / "nowhere" / "last.ckpt"
    problems = problems_of(compose(f"ckpt_path={missing}"))
    assert len(problems) == 1
    assert str(missing) in problems[0]
    assert "no such file" in problems[0]


def test_every_problem_is_listed_at_once(compose):
    problems = problems_of(
        compose(
            "model=gpt",
            "data=digits",
            "data.batch_size=0",
            "model.lr=-1",
            "+model.lrr=2",
            "seed=-5",
        )
    )
    assert len(problems) == 5
    joined = "\n".join(problems)
    for fragment in ("cannot train on", "data.batch_size=0", "model.lr=-1", "model.lrr", "seed=-5"):
        assert fragment in joined


def test_error_message_counts_problems():
    error = ConfigError(["a is wrong", "b is wrong"])
    assert str(error).startswith("Invalid configuration (2 problems):")
    assert "  1. a is wrong" in str(error)
    assert "  2. b is wrong" in str(error)


def test_heads_not_dividing_width_is_rejected(compose):
    problems = problems_of(compose("experiment=embedded_gpt", "model.n_embd=130", "model.n_head=4"))
    assert len(problems) == 1
    assert "model.n_embd=130 is not divisible by n_head=4" in problems[0]


def test_min_lr_above_lr_is_rejected(compose):
    problems = problems_of(compose("experiment=embedded_gpt", "model.lr=1e-4", "model.min_lr=1e-3"))
    assert len(problems) == 1
    assert "model.min_lr=0.001 is larger than lr=0.0001" in problems[0]


def test_bad_fid_extractor_is_rejected(compose):
    problems = problems_of(compose("model.fid.extractor=clip"))
    assert len(problems) == 1
    assert "model.fid.extractor" in problems[0]
    assert "'clip'" in problems[0]


def test_gan_with_plain_ddp_is_rejected(compose):
    problems = problems_of(compose("experiment=digits_gan", "trainer=ddp_cpu"))
    assert any(
        "trainer.strategy=ddp cannot train GAN" in p
        and "trainer.strategy=ddp_find_unused_parameters_true" in p
        for p in problems
    ), problems
    strategy = "trainer.strategy=ddp_find_unused_parameters_true"
    cfg = compose("experiment=digits_gan", "trainer=ddp_cpu", strategy)
    check_config(job_config(cfg), dict(cfg.hydra.runtime.choices))


def test_gan_with_gradient_clipping_is_rejected(compose):
    problems = problems_of(compose("experiment=digits_gan", "trainer.gradient_clip_val=1.0"))
    assert any("Set trainer.gradient_clip_val=null" in p for p in problems), problems


def test_fsdp_on_cpu_is_rejected(compose):
    problems = problems_of(
        compose("experiment=embedded_gpt", "trainer=fsdp", "trainer.accelerator=cpu")
    )
    assert any("FSDP, which needs GPUs" in p for p in problems), problems


def test_unknown_optimized_metric_lists_the_model_metrics(compose):
    problems = problems_of(compose("model=gpt", "data=embedded_text", "optimized_metric=val/pplx"))
    assert any(
        "optimized_metric='val/pplx' is not a metric that GPT logs (did you mean 'val/ppl'?)" in p
        and "val/loss, val/bpt, val/ppl" in p
        for p in problems
    ), problems


def test_resume_accepts_auto_only(compose):
    cfg = compose("resume=auto")
    check_config(job_config(cfg), dict(cfg.hydra.runtime.choices))
    problems = problems_of(compose("resume=last"))
    assert any("resume='last' is invalid" in p for p in problems), problems
