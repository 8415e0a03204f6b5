"""Validation of the composed config before any data is read or any model is built.

Every problem is collected first and reported in one `ConfigError`, so that a user fixes a
config in one pass instead of one error per run. Each problem names the key, the value
received and what to change.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

# Keys that train.py reads at the top level of the config.
TOP_LEVEL_KEYS = (
    "task_name",
    "seed",
    "ckpt_path",
    "resume",
    "optimized_metric",
    "validate_best",
    "tags",
    "model",
    "data",
    "trainer",
    "logger",
    "callbacks",
    "paths",
)

# Model constructor arguments that train.py fills in from the datamodule's model_inputs().
DATA_PROVIDED_KEYS = ("image_size", "channels", "vocab_size", "block_size", "tokenizer")

TRAINER_ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
TRAINER_PRECISIONS = (
    "64",
    "64-true",
    "32",
    "32-true",
    "16",
    "16-mixed",
    "16-true",
    "bf16",
    "bf16-mixed",
    "bf16-true",
    "transformer-engine",
)


class ConfigError(ValueError):
    """The composed config is invalid; the message lists every problem found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        count = f"{len(problems)} problem" + ("s" if len(problems) != 1 else "")
        lines = "\n".join(f"  {i}. {problem}" for i, problem in enumerate(problems, start=1))
        super().__init__(f"Invalid configuration ({count}):\n{lines}")


@dataclass(frozen=True)
class Rule:
    """A constraint on every config value whose key ends with `name`."""

    name: str
    is_valid: Callable[[Any], bool]
    requirement: str


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Constraints by argument name, applied inside model, data and callbacks. A rule for a name
# applies wherever an argument of that name appears, so a new model gets them for free.
VALUE_RULES = (
    Rule("lr", lambda v: _number(v) and v > 0, "a number > 0"),
    Rule("generator_lr", lambda v: _number(v) and v > 0, "a number > 0"),
    Rule("discriminator_lr", lambda v: _number(v) and v > 0, "a number > 0"),
    Rule("min_lr", lambda v: _number(v) and v >= 0, "a number >= 0"),
    Rule("weight_decay", lambda v: _number(v) and v >= 0, "a number >= 0"),
    Rule("batch_size", lambda v: _int(v) and v >= 1, "an integer >= 1"),
    Rule("val_batch_size", lambda v: v is None or (_int(v) and v >= 1), "an integer >= 1 or null"),
    Rule("num_workers", lambda v: _int(v) and v >= 0, "an integer >= 0"),
    Rule("val_fraction", lambda v: _number(v) and 0 < v < 1, "a number between 0 and 1"),
    Rule("dropout", lambda v: _number(v) and 0 <= v < 1, "a number in [0, 1)"),
    Rule("beta", lambda v: _number(v) and v >= 0, "a number >= 0"),
    Rule(
        "betas",
        lambda v: (
            isinstance(v, (list, tuple))
            and len(v) == 2
            and all(_number(b) and 0 <= b < 1 for b in v)
        ),
        "two numbers in [0, 1), e.g. [0.9, 0.99]",
    ),
    Rule("warmup_steps", lambda v: _int(v) and v >= 0, "an integer >= 0"),
    Rule("kl_warmup_steps", lambda v: _int(v) and v >= 0, "an integer >= 0"),
    Rule("lr_decay_steps", lambda v: v is None or (_int(v) and v >= 1), "an integer >= 1 or null"),
    Rule("image_size", lambda v: _int(v) and v >= 1, "an integer >= 1"),
    Rule("channels", lambda v: v in (1, 3), "1 (grey) or 3 (RGB)"),
    Rule("block_size", lambda v: _int(v) and v >= 1, "an integer >= 1"),
    Rule("latent_dim", lambda v: _int(v) and v >= 1, "an integer >= 1"),
    Rule("n_layer", lambda v: _int(v) and v >= 1, "an integer >= 1"),
    Rule("n_head", lambda v: _int(v) and v >= 1, "an integer >= 1"),
    Rule("n_embd", lambda v: _int(v) and v >= 1, "an integer >= 1"),
    Rule("num_samples", lambda v: _int(v) and v >= 2, "an integer >= 2"),
    Rule("every_n_epochs", lambda v: _int(v) and v >= 1, "an integer >= 1"),
    Rule("width", lambda v: _int(v) and v >= 1, "an integer >= 1"),
    Rule("generator_width", lambda v: _int(v) and v >= 1, "an integer >= 1"),
    Rule("discriminator_width", lambda v: _int(v) and v >= 1, "an integer >= 1"),
    Rule("num_grid_samples", lambda v: _int(v) and v >= 1, "an integer >= 1"),
    Rule("sample_length", lambda v: _int(v) and v >= 0, "an integer >= 0"),
    Rule("sample_temperature", lambda v: _number(v) and v > 0, "a number > 0"),
    Rule("sample_top_k", lambda v: v is None or (_int(v) and v >= 1), "an integer >= 1 or null"),
)

TRAINER_RULES = (
    Rule(
        "max_epochs",
        lambda v: v is None or (_int(v) and v >= -1),
        "an integer >= 1, or -1 for no limit",
    ),
    Rule(
        "max_steps",
        lambda v: _int(v) and (v == -1 or v >= 1),
        "an integer >= 1, or -1 for no limit",
    ),
    Rule(
        "accelerator",
        lambda v: v in TRAINER_ACCELERATORS,
        f"one of {', '.join(TRAINER_ACCELERATORS)}",
    ),
    Rule(
        "precision",
        lambda v: str(v) in TRAINER_PRECISIONS,
        f"one of {', '.join(TRAINER_PRECISIONS)}",
    ),
    Rule(
        "gradient_clip_val", lambda v: v is None or (_number(v) and v > 0), "a number > 0 or null"
    ),
    Rule("log_every_n_steps", lambda v: _int(v) and v >= 1, "an integer >= 1"),
    Rule(
        "check_val_every_n_epoch",
        lambda v: v is None or (_int(v) and v >= 1),
        "an integer >= 1 or null",
    ),
)


def check_config(cfg: DictConfig, choices: dict[str, str] | None = None) -> None:
    """Raise ConfigError listing every problem of `cfg`; return None when it is valid.

    `choices` maps config groups to the option the user picked (Hydra's runtime choices,
    e.g. {"model": "gpt", "data": "digits"}); it only makes messages more specific.
    """
    choices = choices or {}
    problems: list[str] = []

    missing = sorted(_missing_keys(cfg))
    for key in missing:
        problems.append(
            f"{key} is missing: this value is mandatory (??? in the config). "
            f"Set it on the command line, e.g. {key}=<value>."
        )
    if missing:
        # The rest of the checks need a resolvable config; the pairing of model and data
        # only needs the two targets, so it is still reported.
        model_cls = _import_target(_plain_target(cfg, "model"), "model", problems)
        data_cls = _import_target(_plain_target(cfg, "data"), "data", problems)
        if model_cls is not None and data_cls is not None:
            problems += _check_pairing(model_cls, data_cls, choices)
        raise ConfigError(problems)

    try:
        container = OmegaConf.to_container(cfg, resolve=True)
    except (InterpolationResolutionError, MissingMandatoryValue) as error:
        raise ConfigError([f"the config cannot be resolved: {error}"]) from None

    problems += _check_top_level(container)
    problems += _check_seed(container.get("seed"))
    problems += _check_ckpt_path(container.get("ckpt_path"))
    problems += _check_resume(container.get("resume"))

    model_cls = _import_target(container.get("model"), "model", problems)
    data_cls = _import_target(container.get("data"), "data", problems)
    if model_cls is not None and data_cls is not None:
        problems += _check_pairing(model_cls, data_cls, choices)

    for group in ("model", "data"):
        node = container.get(group)
        if isinstance(node, dict):
            problems += _check_arguments(
                node, group, ignore=DATA_PROVIDED_KEYS if group == "model" else ()
            )
            problems += _check_rules(node, group, VALUE_RULES)
    for group, cls in (("model", model_cls), ("data", data_cls)):
        # Constraints that tie several arguments together live with the class itself.
        check = getattr(cls, "config_problems", None)
        if check is not None:
            problems += [f"{group}.{problem}" for problem in check(container[group])]
    if model_cls is not None:
        problems += optimized_metric_problems(
            container.get("optimized_metric"), model_cls, container["model"]
        )
        problems += [
            f"model.{key} is set in the config, but it comes from the datamodule; "
            f"remove model.{key} and set it under data instead."
            for key in DATA_PROVIDED_KEYS
            if key in container["model"]
        ]

    trainer = container.get("trainer")
    if isinstance(trainer, dict):
        problems += _check_arguments(trainer, "trainer")
        problems += _check_rules(trainer, "trainer", TRAINER_RULES, recurse=False)
        problems += _check_validation_schedule(trainer)
        problems += _check_strategy(trainer, model_cls)

    for group in ("callbacks", "logger"):
        for name, node in (container.get(group) or {}).items():
            if isinstance(node, dict) and "_target_" in node:
                problems += _check_arguments(node, f"{group}.{name}")

    if problems:
        raise ConfigError(problems)


def _plain_target(cfg: DictConfig, group: str) -> dict:
    """Return {"_target_": ...} of a config group without resolving the rest of it."""
    node = cfg.get(group)
    if isinstance(node, DictConfig) and "_target_" in node:
        return {"_target_": node._target_}
    return {}


def _missing_keys(cfg: DictConfig | ListConfig, prefix: str = "") -> Iterator[str]:
    keys = range(len(cfg)) if isinstance(cfg, ListConfig) else cfg.keys()
    for key in keys:
        full_key = f"{prefix}{key}" if isinstance(cfg, DictConfig) else f"{prefix[:-1]}[{key}]."
        if OmegaConf.is_missing(cfg, key):
            yield full_key.rstrip(".")
            continue
        node = cfg._get_node(key)
        if isinstance(node, (DictConfig, ListConfig)) and not node._is_interpolation():
            yield from _missing_keys(
                node, f"{full_key}." if isinstance(cfg, DictConfig) else full_key
            )


def _check_top_level(container: dict) -> list[str]:
    problems = []
    for key in container:
        if key in TOP_LEVEL_KEYS or key == "hydra":
            continue
        problems.append(
            f"{key} is not a known top-level key{_suggest(key, TOP_LEVEL_KEYS)}. "
            f"Remove it or correct its spelling."
        )
    return problems


def _check_seed(seed: Any) -> list[str]:
    if seed is None or (_int(seed) and seed >= 0):
        return []
    return [f"seed={seed!r} is invalid: use an integer >= 0 (0 included), or null for no seed."]


def _check_ckpt_path(ckpt_path: Any) -> list[str]:
    if ckpt_path is None or Path(str(ckpt_path)).is_file():
        return []
    return [
        f"ckpt_path={ckpt_path!r}: no such file. Point ckpt_path at a .ckpt file of an "
        f"earlier run (<run dir>/checkpoints/last.ckpt) or set ckpt_path=null."
    ]


def _check_resume(resume: Any) -> list[str]:
    if resume in (None, "auto"):
        return []
    return [
        f"resume={resume!r} is invalid: use resume=auto to continue from the latest checkpoint "
        "in the run directory (hydra.run.dir), or resume=null to start fresh."
    ]


def optimized_metric_problems(key: Any, model_cls: type | None, model_node: dict) -> list[str]:
    """Reject a metric name the model never logs, listing the ones it does."""
    metric_keys = getattr(model_cls, "metric_keys", None)
    if key is None or metric_keys is None:
        return []
    available = metric_keys(model_node)
    if key in available:
        return []
    return [
        f"optimized_metric={key!r} is not a metric that {model_cls.__name__} logs"
        f"{_suggest(str(key), available)}. Choose one of: {', '.join(available)}."
    ]


def _check_strategy(trainer: dict, model_cls: type | None) -> list[str]:
    """Reject strategies that fail once the processes have started."""
    strategy = trainer.get("strategy", "auto")
    target = strategy.get("_target_", "") if isinstance(strategy, dict) else ""
    # Models that step their optimizers themselves declare it in a class attribute.
    manual = getattr(model_cls, "manual_optimization", False)
    problems = []
    if manual and strategy in ("ddp", "ddp_spawn"):
        problems.append(
            f"trainer.strategy={strategy} cannot train {model_cls.__name__}: each of its "
            "optimizer steps leaves the other network without gradients, which plain DDP "
            f"rejects. Set trainer.strategy={strategy}_find_unused_parameters_true."
        )
    if manual and trainer.get("gradient_clip_val") is not None:
        problems.append(
            f"trainer.gradient_clip_val={trainer['gradient_clip_val']} cannot apply to "
            f"{model_cls.__name__}, which steps its optimizers itself (Lightning clips only "
            "automatically optimized models). Set trainer.gradient_clip_val=null."
        )
    uses_fsdp = strategy == "fsdp" or target.endswith("FSDPStrategy")
    if uses_fsdp and trainer.get("accelerator") == "cpu":
        problems.append(
            "trainer.strategy is FSDP, which needs GPUs, but trainer.accelerator=cpu. Use "
            "trainer=ddp_cpu to test distributed training on the CPU."
        )
    return problems


def _check_validation_schedule(trainer: dict) -> list[str]:
    """Reject a step-based validation interval that the run never reaches."""
    interval = trainer.get("val_check_interval")
    max_steps = trainer.get("max_steps", -1)
    if not (_int(interval) and _int(max_steps) and max_steps > 0 and interval > max_steps):
        return []
    return [
        f"trainer.val_check_interval={interval} is larger than trainer.max_steps={max_steps}, "
        f"so the run would never validate and no best checkpoint could be chosen. Set "
        f"trainer.val_check_interval to at most {max_steps}."
    ]


def _import_target(node: Any, group: str, problems: list[str]) -> type | None:
    if not isinstance(node, dict) or "_target_" not in node:
        problems.append(
            f"{group} has no _target_: pick a {group} config, e.g. {group}=<name> "
            f"with a file from conf/{group}/."
        )
        return None
    try:
        return _resolve_callable(node["_target_"])
    except (ImportError, AttributeError) as error:
        problems.append(
            f"{group}._target_={node['_target_']!r} cannot be imported ({error}). "
            f"Check the module path and class name."
        )
        return None


def _resolve_callable(path: str) -> Any:
    module_name, _, attribute = path.rpartition(".")
    return getattr(importlib.import_module(module_name), attribute)


def _check_pairing(model_cls: type, data_cls: type, choices: dict[str, str]) -> list[str]:
    model_modality = getattr(model_cls, "modality", None)
    data_modality = getattr(data_cls, "modality", None)
    if model_modality is None or data_modality is None or model_modality == data_modality:
        return []
    model_name = choices.get("model", model_cls.__name__)
    data_name = choices.get("data", data_cls.__name__)
    fitting_data = _group_options("data", model_modality)
    fitting_models = _group_options("model", data_modality)
    article = "an" if model_modality[0] in "aeiou" else "a"
    return [
        f"model={model_name} cannot train on data={data_name}: {model_cls.__name__} is "
        f"{article} {model_modality} model and {data_cls.__name__} provides {data_modality} data. "
        f"Pick {model_modality} data ({', '.join(f'data={n}' for n in fitting_data)}) "
        f"or a model for {data_modality} data "
        f"({', '.join(f'model={n}' for n in fitting_models)})."
    ]


def _group_options(group: str, modality: str) -> list[str]:
    """Names of the configs in conf/<group>/ whose target has the given modality."""
    names = []
    for path in sorted((CONF_DIR / group).glob("*.yaml")):
        target = OmegaConf.load(path).get("_target_")
        try:
            if target and getattr(_resolve_callable(target), "modality", None) == modality:
                names.append(path.stem)
        except (ImportError, AttributeError):
            continue
    return names


def _check_arguments(node: dict, prefix: str, ignore: tuple[str, ...] = ()) -> list[str]:
    """Check the keys and value types of a `_target_` node against the target's signature."""
    target = node.get("_target_")
    if target is None:
        return []
    try:
        target_callable = _resolve_callable(target)
        signature = inspect.signature(target_callable)
        hints = typing.get_type_hints(
            target_callable.__init__ if inspect.isclass(target_callable) else target_callable
        )
    except (ImportError, AttributeError, ValueError, TypeError, NameError):
        # An unimportable target is reported by _import_target; unresolvable hints are skipped.
        return []

    parameters = signature.parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    known = [name for name in parameters if name not in ("self", "args", "kwargs")]
    problems = []
    for key, value in node.items():
        if key.startswith("_") and key.endswith("_") or key in ignore:
            continue
        if key not in parameters:
            if not accepts_any:
                problems.append(
                    f"{prefix}.{key} is not an argument of {target}"
                    f"{_suggest(key, known)}. Remove it or correct its spelling."
                )
            continue
        hint = hints.get(key)
        if hint is not None and not _matches(value, hint):
            problems.append(f"{prefix}.{key}={value!r} is invalid: expected {_describe(hint)}.")
    return problems


def _check_rules(
    node: dict, prefix: str, rules: tuple[Rule, ...], recurse: bool = True
) -> list[str]:
    problems = []
    by_name = {rule.name: rule for rule in rules}
    for key, value in node.items():
        if recurse and isinstance(value, dict):
            problems += _check_rules(value, f"{prefix}.{key}", rules)
            continue
        rule = by_name.get(key)
        if rule is not None and not rule.is_valid(value):
            problems.append(
                f"{prefix}.{key}={value!r} is invalid: it must be {rule.requirement}. "
                f"Set {prefix}.{key} to such a value."
            )
    return problems


def _matches(value: Any, hint: Any) -> bool:
    """Return whether a plain config value fits a type hint; an unknown hint accepts anything."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return _int(value)
    if hint is float:
        return _number(value)
    if hint is str:
        return isinstance(value, str)
    return True


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(arg) for arg in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def added_key_problems(
    overrides: typing.Sequence[str], config_name: str, open_nodes: tuple[str, ...] = ()
) -> list[str]:
    """Return a problem for each `+key=value` override of a key not in conf/<config_name>.yaml.

    Hydra only rejects unknown keys given without "+", and its own message suggests adding
    the "+". A misspelt setting would then be added and silently ignored. Keys under
    `open_nodes` (such as "trainer", whose node takes any Trainer argument) and config
    groups (`+experiment=...`) may be added.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    conf_dir = Path(__file__).resolve().parent.parent / "conf"
    known = OmegaConf.load(conf_dir / f"{config_name}.yaml")
    known_keys = set(_flat_keys(OmegaConf.to_container(known)))
    problems = []
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if not override.is_add() or key.split(".")[0] in ("hydra", *open_nodes):
            continue
        if key in known_keys or (conf_dir / key.replace(".", "/")).is_dir():
            continue
        problems.append(
            f"+{key} is not a setting of {config_name}.py{_suggest(key, known_keys)}. "
            f"conf/{config_name}.yaml lists the settings; set one without the '+'."
        )
    return problems


def _flat_keys(node: Any, prefix: str = "") -> Iterator[str]:
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        if key == "defaults":
            continue
        yield f"{prefix}{key}"
        yield from _flat_keys(value, f"{prefix}{key}.")


def _suggest(key: str, candidates: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
