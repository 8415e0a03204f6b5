"""Distributed data parallel (DDP) with Hydra: child processes that run exactly their job.

With ``strategy="ddp"`` Lightning starts the processes of local ranks 1..N-1 itself, by
running the training script again as subprocesses. When Hydra is in use, Lightning 2.6.6
builds their command from ``sys.argv[1:]`` plus ``hydra.run.dir=<HydraConfig.run.dir>``
(``_hydra_subprocess_cmd`` in lightning/fabric/strategies/launchers/subprocess_script.py).
Inside a multirun that command is wrong twice: ``-m`` and the sweep lists are in
``sys.argv``, so each child starts the whole sweep again, and ``hydra.run.dir`` is the
single-run pattern, which names a new timestamped directory instead of the job's.

`distributed_job` wraps one Hydra job. While it runs, children are started with

- the job's own overrides (``HydraConfig.get().overrides.task``), which in a multirun are
  the values of this job, and the Hydra overrides of the command line except those that
  select the mode, the sweep, the launcher or the output directories;
- ``hydra.mode=RUN``, ``hydra.run.dir=<this job's output dir>`` and
  ``hydra.output_subdir=null``, so they write into the job's directory and leave its
  ``.hydra`` folder to rank 0;
- ``hydra.job.name=<job name>_ddp_process_<local rank>``, and, when the job logging
  config has a ``file`` handler, a log file of that name in the job's directory.

When the job ends, it destroys the process group and restores the environment variables
that the launcher set (MASTER_ADDR, LOCAL_RANK, ...). Otherwise the next job of a multirun,
which runs in the same process, would find LOCAL_RANK set, take itself for a child that
an outside launcher started, and wait for processes that never come.

Why the hook is a replacement of ``_hydra_subprocess_cmd``: Lightning's launcher calls
that module-level function through the global name that
``lightning.pytorch.strategies.launchers.subprocess_script`` imports, and only uses what
it returns, ``(command, cwd)``. Replacing it for the duration of the job keeps the rest of
the launcher as Lightning maintains it: the environment variables, the process observer
that stops all ranks when one fails, and the signal handling. The alternatives touch more
private code. A ``DDPStrategy`` subclass with its own launcher overrides the private
``_configure_launcher`` and has to copy ``_call_children_scripts``. Starting the children
ourselves would re-implement the launcher. The function is private, so `distributed_job`
checks that it exists and raises, naming the Lightning version this module was checked
against, instead of silently falling back to the broken command. A Lightning that keeps
the name but stops calling it makes the multirun test of tests/test_ddp.py fail.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import lightning as L
import torch
import torch.distributed
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import to_absolute_path
from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from lightning.pytorch.strategies.launchers import subprocess_script
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import Dataset

# The Lightning release whose launcher this module was read against and tested with.
CHECKED_LIGHTNING_VERSION = "2.6.6"

# Environment variables that Lightning's subprocess launcher sets in the launching process
# (MASTER_ADDR ... WORLD_SIZE) or that it sets when they are unset (OMP_NUM_THREADS).
LAUNCHER_ENV_VARS = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "NODE_RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "OMP_NUM_THREADS",
)

# Hydra overrides that a child must not inherit: the mode, the sweep and the launcher
# belong to the parent, and the child's output directory, output subdirectory and job
# name are set by `child_command`.
PARENT_ONLY_OVERRIDES = (
    "hydra.mode",
    "hydra.run",
    "hydra.sweep",
    "hydra.output_subdir",
    "hydra.job.name",
    "hydra/sweeper",
    "hydra.sweeper",
    "hydra/launcher",
    "hydra.launcher",
)


@contextlib.contextmanager
def distributed_job() -> Iterator[None]:
    """Run one Hydra job so that DDP children run this job alone, and clean up after it.

    Without DDP or without Hydra it has no effect.
    """
    if not hasattr(subprocess_script, "_hydra_subprocess_cmd"):
        raise RuntimeError(
            f"lightning {L.__version__} has no "
            f"lightning.pytorch.strategies.launchers.subprocess_script._hydra_subprocess_cmd, "
            f"the function genlab.ddp replaces so that DDP child processes run the current "
            f"Hydra job (checked against lightning {CHECKED_LIGHTNING_VERSION}). Install "
            f"lightning {CHECKED_LIGHTNING_VERSION}, or update genlab/ddp.py to the new "
            f"launcher."
        )
    saved_env = {name: os.environ.get(name) for name in LAUNCHER_ENV_VARS}
    saved_threads = torch.get_num_threads()
    lightning_command = subprocess_script._hydra_subprocess_cmd
    subprocess_script._hydra_subprocess_cmd = child_command
    try:
        yield
    finally:
        subprocess_script._hydra_subprocess_cmd = lightning_command
        _release_children()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        torch.set_num_threads(saved_threads)


def _release_children(timeout_s: float = 30) -> None:
    """Wait for the DDP children of the job that ended, and stop watching them.

    Lightning's observer thread SIGKILLs this process as soon as a child exits with a
    non-zero status. A child exits so when its job fails, and in a multirun that would kill
    the sweep with it. So the observer is given no more children to watch, and a child
    still running after `timeout_s` (waiting for rank 0 in a collective, say) is killed.
    """
    for thread in threading.enumerate():
        if not isinstance(thread, _ChildProcessObserver):
            continue
        children, thread._child_processes = thread._child_processes, []
        for child in children:
            try:
                child.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def child_command(local_rank: int) -> tuple[list[str], str]:
    """Return the command and working directory of the DDP child with this local rank.

    It has the signature and contract of Lightning's ``_hydra_subprocess_cmd``.
    """
    hydra_cfg = HydraConfig.get()
    output_dir = hydra_cfg.runtime.output_dir
    job_name = f"{hydra_cfg.job.name}_ddp_process_{local_rank}"

    overrides = [
        *hydra_cfg.overrides.task,
        *inherited_hydra_overrides(hydra_cfg.overrides.hydra),
        "hydra.mode=RUN",
        f"hydra.run.dir={quote_override_value(output_dir)}",
        "hydra.output_subdir=null",
        f"hydra.job.name={job_name}",
    ]
    job_logging = hydra_cfg.job_logging or {}
    file_handler = job_logging.get("handlers", {}).get("file") or {}
    if "filename" in file_handler:
        log_file = str(Path(output_dir) / f"{job_name}.log")
        overrides.append(
            f"hydra.job_logging.handlers.file.filename={quote_override_value(log_file)}"
        )
    return [*script_command(), *overrides], hydra_cfg.runtime.cwd


def inherited_hydra_overrides(overrides: Sequence[str]) -> list[str]:
    """Return the Hydra overrides a child keeps: all but those in PARENT_ONLY_OVERRIDES."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    return [
        override.input_line
        for override in parsed
        if not any(
            override.key_or_group == key or override.key_or_group.startswith(f"{key}.")
            for key in PARENT_ONLY_OVERRIDES
        )
    ]


def script_command() -> list[str]:
    """Return the interpreter and script (or ``-m module``) that started this process."""
    import __main__

    # NOTE: in a job that a launcher plugin runs in a process of its own (submitit),
    # __main__ is the plugin's entry point, and the children would not run train.py. Under
    # SLURM, SLURM starts one task per device instead (conf/hydra/launcher/slurm.yaml), and
    # Lightning starts no children.
    if __main__.__spec__ is None:
        # Relative to the directory Hydra was started from, in case the job changed it.
        return [sys.executable, to_absolute_path(sys.argv[0])]
    return [sys.executable, "-m", __main__.__spec__.name]


def quote_override_value(value: str) -> str:
    """Quote a string for a Hydra override, so that commas, spaces and '=' stay literal."""
    for quote in ('"', "'"):
        if quote not in value:
            return f"{quote}{value}{quote}"
    raise ValueError(
        f"cannot pass {value!r} to a DDP child process as a Hydra override, because it "
        f"contains both kinds of quotes. Use a path without quotes for hydra.run.dir or "
        f"hydra.sweep.dir."
    )


def is_global_zero() -> bool:
    """Return whether this process is, or will be, global rank 0 of its run.

    It reads the environment, so it also works before the Trainer exists: Lightning sets
    LOCAL_RANK for the children it starts, torchrun sets RANK, SLURM sets SLURM_PROCID, and
    each node of a multi-node run started by hand has its NODE_RANK.
    """
    node_rank = os.environ.get("NODE_RANK", os.environ.get("GROUP_RANK", "0"))
    return rank_zero_only.rank == 0 and int(node_rank) == 0


def validation_sampler(
    dataset: Dataset, trainer: L.Trainer | None
) -> UnrepeatedDistributedSampler | None:
    """Return a sampler that splits `dataset` over the processes without repeating any item.

    Process r reads the items r, r + W, r + 2W, ... of a world of W processes, so the
    processes together read every item exactly once, and metrics summed over the
    processes equal those of one process. Lightning's default DistributedSampler would
    repeat items to give every process the same number. Lightning keeps a sampler that is
    already a DistributedSampler, as this one is. Returns None for a single process.
    """
    if trainer is None or trainer.world_size <= 1:
        return None
    if len(dataset) < trainer.world_size:
        # A process without a validation batch skips the validation loop, and the others
        # then wait for it forever in the collective operations of the epoch end.
        raise ValueError(
            f"the validation split has {len(dataset)} item(s), fewer than the "
            f"{trainer.world_size} processes, but every process needs at least one. "
            f"Enlarge data.val_fraction or lower trainer.devices."
        )
    return UnrepeatedDistributedSampler(
        dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False
    )
