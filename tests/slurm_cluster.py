"""A one-node SLURM cluster on 127.0.0.1 for tests that submit real jobs.

`local_slurm_cluster(tmp_dir)` starts munged, slurmctld and slurmd as child processes and
keeps every file they write (MUNGE key and socket, slurm.conf, state, spool, logs, pid files)
under `tmp_dir`. Nothing under /etc, /run or /var is read for configuration or written, so a
second cluster can start after the first. Clients reach the cluster through the SLURM_CONF
variable in `SlurmCluster.env`.

It needs the Debian packages slurm-wlm and munge (.ci/install_slurm installs them) and root,
because slurmd starts each job under the submitting user's uid. When either is missing, or
the node is not idle within START_TIMEOUT_S, the caller is skipped with the reason and the
tail of the daemon logs.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

PARTITION = "debug"
START_TIMEOUT_S = 30.0

# Seconds between the SIGTERM and the SIGKILL that end a cancelled or requeued job
# (SLURM's default is 30). Short here so that teardown and requeue tests are quick.
KILL_WAIT_S = 5

# Lifetime of a job credential in seconds. SLURM also keeps a requeued job pending for this
# long before it may start again (slurm.conf(5), AuthInfo cred_expire, default 120).
CRED_EXPIRE_S = 10

# Job states (squeue(1), JOB STATE CODES) from which a job can still run or is running.
_UNFINISHED_JOB_STATES = {
    "PENDING",
    "CONFIGURING",
    "RUNNING",
    "COMPLETING",
    "REQUEUED",
    "REQUEUE_FED",
    "REQUEUE_HOLD",
    "RESV_DEL_HOLD",
    "RESIZING",
    "SUSPENDED",
    "STOPPED",
    "SIGNALING",
    "STAGE_OUT",
}

DAEMON_PROGRAMS = ("munged", "slurmctld", "slurmd")
CLIENT_PROGRAMS = ("sbatch", "srun", "squeue", "sinfo", "scontrol", "scancel")

# Daemons live in sbin, which is not on every PATH.
_SBIN_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin")

# A Unix socket path has at most 107 bytes on Linux. slurmd puts one socket per job step in
# its spool directory, named <node>_<job id>.<step id>.
_MAX_SOCKET_PATH = 107
_STEP_SOCKET_NAME_MAX = len("_4294967295.4294967295")


@dataclass(frozen=True)
class SlurmCluster:
    """A running cluster. Pass `env` to every subprocess that talks to it."""

    root: Path
    conf_path: Path
    env: dict[str, str]
    partition: str
    node_name: str
    log_dir: Path

    def run(self, *command: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run a SLURM client command (sbatch, squeue, ...) and raise if it fails."""
        return subprocess.run(
            list(command),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """Return `scontrol show job` fields of a job, one dict per array task.

        Finished jobs are listed for MinJobAge (300 s by default) after they end. An unknown
        job id raises CalledProcessError.
        """
        output = self.run("scontrol", "show", "job", "--oneliner", job_id).stdout
        return [_parse_scontrol_line(line) for line in output.splitlines() if line.strip()]

    def wait_until_ended(self, job_id: str, timeout_s: float = 30) -> list[dict[str, str]]:
        """Wait until every task of a job has ended, and return their `jobs` fields.

        A job is still RUNNING for a moment after submitit wrote its result, because the
        batch script exits after the Python process. Raises TimeoutError after `timeout_s`.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            tasks = self.jobs(job_id)
            if all(task["JobState"] not in _UNFINISHED_JOB_STATES for task in tasks):
                return tasks
            if time.monotonic() > deadline:
                states = [task["JobState"] for task in tasks]
                raise TimeoutError(f"job {job_id} has not ended after {timeout_s} s: {states}")
            time.sleep(0.2)

    def log_tail(self, lines: int = 20) -> str:
        """Return the last lines of each daemon's log, for failure messages."""
        return _log_tails(self.log_dir, DAEMON_PROGRAMS, lines)


@contextmanager
def local_slurm_cluster(tmp_dir: Path) -> Iterator[SlurmCluster]:
    """Start a one-node cluster under `tmp_dir`, yield it, and stop every daemon and job after.

    Calls pytest.skip when a program is missing, the user is not root, or the node is not
    idle within START_TIMEOUT_S.
    """
    programs = _find_programs()
    if os.geteuid() != 0:
        pytest.skip(
            "a local SLURM cluster needs root: slurmd starts each job under the submitting "
            f"user's uid, and this process runs as uid {os.geteuid()}"
        )
    layout = _Layout(Path(tmp_dir).resolve())
    layout.check_socket_paths(_node_name())
    layout.create()

    daemons = _Daemons(layout)
    try:
        cluster = _start(programs, layout, daemons)
        yield cluster
    finally:
        daemons.stop()


def _find_programs() -> dict[str, str]:
    search_path = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN_DIRS])
    found = {name: shutil.which(name, path=search_path) for name in DAEMON_PROGRAMS}
    found.update({name: shutil.which(name) for name in CLIENT_PROGRAMS})
    missing = sorted(name for name, path in found.items() if path is None)
    if missing:
        pytest.skip(
            f"SLURM or MUNGE programs not found: {', '.join(missing)}. Install the Debian "
            "packages slurm-wlm and munge (.ci/install_slurm does it when run as root)."
        )
    return found


def _node_name() -> str:
    # slurmd finds its node in slurm.conf by the short host name.
    return socket.gethostname().split(".")[0]


class _Layout:
    """Paths of every file the cluster writes, all under one root directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.munge_dir = root / "munge"
        # munged requires a socket directory that every user may enter (mode 0755).
        self.munge_socket_dir = root / "munge-socket"
        self.munge_socket = self.munge_socket_dir / "munge.socket"
        self.munge_key = self.munge_dir / "munge.key"
        self.state_dir = root / "state"
        self.spool_dir = root / "spool"
        self.log_dir = root / "log"
        self.conf_path = root / "slurm.conf"
        self.plugstack_path = root / "plugstack.conf"

    def check_socket_paths(self, node_name: str) -> None:
        longest = max(
            len(str(self.munge_socket)),
            len(str(self.spool_dir / node_name)) + _STEP_SOCKET_NAME_MAX,
        )
        if longest > _MAX_SOCKET_PATH:
            pytest.skip(
                f"the cluster directory {self.root} is too deep for Unix socket paths "
                f"({longest} > {_MAX_SOCKET_PATH} bytes); run pytest with a shorter "
                "--basetemp, e.g. --basetemp=/tmp/pytest"
            )

    def create(self) -> None:
        for directory in (self.munge_dir, self.state_dir, self.spool_dir, self.log_dir):
            directory.mkdir(mode=0o700, parents=True)
        self.munge_socket_dir.mkdir(mode=0o755)
        self.munge_socket_dir.chmod(0o755)  # mkdir's mode is reduced by the umask
        # munged rejects a key that other users can read.
        key_fd = os.open(self.munge_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(key_fd, "wb") as key_file:
            key_file.write(os.urandom(1024))
        # An empty SPANK plugin list, so that /etc/slurm/plugstack.conf is not read.
        self.plugstack_path.write_text("")

    def log_path(self, daemon: str) -> Path:
        return _log_path(self.log_dir, daemon)

    def output_path(self, daemon: str) -> Path:
        return _output_path(self.log_dir, daemon)


def _start(programs: dict[str, str], layout: _Layout, daemons: _Daemons) -> SlurmCluster:
    node_name = _node_name()
    env = _client_env(layout.conf_path)
    daemons.start(
        "munged",
        [
            programs["munged"],
            "--foreground",
            # Without --force, munged exits when other users cannot enter a parent of the
            # socket directory (pytest's basetemp is mode 0700). With it, munged warns.
            "--force",
            f"--key-file={layout.munge_key}",
            f"--socket={layout.munge_socket}",
            f"--pid-file={layout.munge_dir / 'munged.pid'}",
            f"--log-file={layout.log_path('munged')}",
            f"--seed-file={layout.munge_dir / 'munged.seed'}",
        ],
        env,
    )
    daemons.wait_for(lambda: layout.munge_socket.exists(), "the MUNGE socket")

    hardware = _node_hardware(programs["slurmd"])
    ctld_port, slurmd_port = _free_loopback_ports(2)
    layout.conf_path.write_text(
        _slurm_conf(layout, node_name, hardware, ctld_port, slurmd_port, shutil.which("true"))
    )
    conf = str(layout.conf_path)
    daemons.start("slurmctld", [programs["slurmctld"], "-D", "-f", conf], env)
    daemons.start("slurmd", [programs["slurmd"], "-D", "-f", conf, "-N", node_name], env)

    cluster = SlurmCluster(
        root=layout.root,
        conf_path=layout.conf_path,
        env=env,
        partition=PARTITION,
        node_name=node_name,
        log_dir=layout.log_dir,
    )
    daemons.cluster = cluster
    daemons.wait_for(lambda: _node_state(cluster) == "idle", f"node {node_name} to be idle")
    return cluster


def _client_env(conf_path: Path) -> dict[str, str]:
    """Return the environment of this process for SLURM clients, with SLURM_CONF set.

    Variables of an enclosing SLURM job (when pytest itself runs in one) are dropped, because
    submitit and Lightning would read them as describing the jobs of this cluster.
    """
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "SUBMITIT_"))
    }
    env["SLURM_CONF"] = str(conf_path)
    return env


def _node_hardware(slurmd: str) -> str:
    """Return this machine's CPU and memory layout as slurm.conf node fields, from `slurmd -C`."""
    result = subprocess.run([slurmd, "-C"], capture_output=True, text=True, timeout=30)
    first_line = result.stdout.splitlines()[0] if result.stdout else ""
    fields = [field for field in first_line.split() if not field.startswith("NodeName=")]
    if result.returncode != 0 or not any(field.startswith("CPUs=") for field in fields):
        pytest.skip(
            f"`slurmd -C` did not report the node hardware (exit code {result.returncode}): "
            f"{result.stdout.strip()} {result.stderr.strip()}"
        )
    return " ".join(fields)


def _free_loopback_ports(count: int) -> list[int]:
    """Return ports that were free on 127.0.0.1 a moment ago, held together so they differ."""
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


def _slurm_conf(
    layout: _Layout,
    node_name: str,
    hardware: str,
    ctld_port: int,
    slurmd_port: int,
    true_program: str | None,
) -> str:
    return f"""\
# One-node test cluster written by tests/slurm_cluster.py. Every path is under {layout.root}.
ClusterName=genlab
SlurmctldHost={node_name}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
# Listen on 127.0.0.1 (the address in SlurmctldHost and NodeAddr), not on every interface.
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny

AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={layout.munge_socket},cred_expire={CRED_EXPIRE_S}

StateSaveLocation={layout.state_dir}
SlurmdSpoolDir={layout.spool_dir}
SlurmctldPidFile={layout.root / "slurmctld.pid"}
SlurmdPidFile={layout.root / "slurmd.pid"}
SlurmctldLogFile={layout.log_path("slurmctld")}
SlurmdLogFile={layout.log_path("slurmd")}
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={layout.plugstack_path}
MailProg={true_program or "/bin/true"}

# Process tracking through the process tree, without cgroups, so that it works in
# containers. There is no accounting database, so sacct has nothing to report.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none

# Cores are scheduled, memory is not, so that several jobs share the node.
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
KillWait={KILL_WAIT_S}

NodeName={node_name} NodeAddr=127.0.0.1 {hardware} State=UNKNOWN
PartitionName={PARTITION} Nodes={node_name} Default=YES MaxTime=INFINITE State=UP
"""


def _node_state(cluster: SlurmCluster) -> str | None:
    """Return the node's state as sinfo prints it ("idle", "down*", ...), or None if unknown.

    sinfo retries while slurmctld starts, so one call can take a few seconds.
    """
    try:
        result = subprocess.run(
            ["sinfo", "--noheader", "--Node", f"--nodes={cluster.node_name}", "--format=%T"],
            env=cluster.env,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except subprocess.TimeoutExpired:
        return None
    return result.stdout.strip() if result.returncode == 0 else None


class _Daemons:
    """The daemon processes of one cluster, started in order and stopped in reverse."""

    def __init__(self, layout: _Layout) -> None:
        self.layout = layout
        self.processes: dict[str, subprocess.Popen] = {}
        self.cluster: SlurmCluster | None = None
        self.started_at = time.monotonic()

    def start(self, name: str, command: list[str], env: dict[str, str]) -> None:
        with open(self.layout.output_path(name), "wb") as output:
            self.processes[name] = subprocess.Popen(
                command,
                cwd=self.layout.root,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_for(self, condition: Callable[[], bool], description: str) -> None:
        """Poll `condition` until it is true. Skip when a daemon exits or START_TIMEOUT_S passes."""
        while True:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    pytest.skip(
                        f"the local SLURM cluster did not start: {name} exited with code "
                        f"{process.returncode} while waiting for {description}.\n{self._logs()}"
                    )
            if condition():
                return
            if time.monotonic() - self.started_at > START_TIMEOUT_S:
                pytest.skip(
                    f"the local SLURM cluster did not start: timed out after "
                    f"{START_TIMEOUT_S:.0f} s waiting for {description}.\n{self._logs()}"
                )
            time.sleep(0.2)

    def stop(self) -> None:
        """Cancel every job, stop the daemons, and kill what remains of the jobs."""
        controller = self.processes.get("slurmctld")
        try:
            if self.cluster is not None and controller is not None and controller.poll() is None:
                _cancel_all_jobs(self.cluster)
        finally:
            for name in reversed(list(self.processes)):
                _terminate(self.processes[name])
            _kill_leftover_job_processes(self.layout)

    def _logs(self) -> str:
        return _log_tails(self.layout.log_dir, list(self.processes), lines=20)


def _cancel_all_jobs(cluster: SlurmCluster) -> None:
    """Cancel every job and wait until none is left running or completing."""
    subprocess.run(
        ["scancel", "--quiet", f"--partition={cluster.partition}"],
        env=cluster.env,
        capture_output=True,
        timeout=30,
    )
    deadline = time.monotonic() + KILL_WAIT_S + 15
    while time.monotonic() < deadline:
        result = subprocess.run(
            ["squeue", "--noheader", "--format=%i"],
            env=cluster.env,
            capture_output=True,
            text=True,
            timeout=10,
        )
        if result.returncode != 0 or not result.stdout.strip():
            return
        time.sleep(0.5)


def _terminate(process: subprocess.Popen, grace_s: float = 10) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=grace_s)


def _kill_leftover_job_processes(layout: _Layout) -> None:
    """SIGKILL this cluster's slurmstepd and job processes that outlived the daemons.

    slurmstepd detaches from slurmd and blocks SIGTERM, so it survives a stopped slurmd when
    a job was still running. It is recognised by its working directory, inherited from
    slurmd (the cluster root). Job processes are recognised by this cluster's SLURM_CONF in
    their environment.
    """
    conf_entry = f"SLURM_CONF={layout.conf_path}".encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            command = (proc / "cmdline").read_bytes()
            is_step_daemon = command.startswith(b"slurmstepd") and (
                Path(os.readlink(proc / "cwd")) == layout.root
            )
            is_job_process = conf_entry in (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue  # the process ended, or is not ours to inspect
        if is_step_daemon or is_job_process:
            try:
                os.kill(int(proc.name), signal.SIGKILL)
            except ProcessLookupError:
                pass


def _parse_scontrol_line(line: str) -> dict[str, str]:
    # Fields are Key=Value pairs separated by spaces, and a value may itself contain spaces.
    return dict(re.findall(r"(\S+?)=(.*?)(?=\s+\S+?=|\s*$)", line.strip()))


def _log_path(log_dir: Path, daemon: str) -> Path:
    return log_dir / f"{daemon}.log"


def _output_path(log_dir: Path, daemon: str) -> Path:
    """File for a daemon's stdout and stderr.

    In the foreground, slurmctld and slurmd write each line both to their log file and to
    stderr, and munged writes to stderr only. Errors from before the log file is open, such as
    slurm.conf parse errors, are only here.
    """
    return log_dir / f"{daemon}.out"


def _log_tails(log_dir: Path, daemons: Iterable[str], lines: int) -> str:
    """Return the last lines of each daemon's log file, or of its output if it has none."""
    tails = []
    for daemon in daemons:
        path = _log_path(log_dir, daemon)
        if not path.exists():
            path = _output_path(log_dir, daemon)
        if not path.exists():
            tails.append(f"--- {daemon}: no log written")
            continue
        text = path.read_text(errors="replace").splitlines()[-lines:]
        tails.extend([f"--- last {len(text)} lines of {path}", *text])
    return "\n".join(tails)
