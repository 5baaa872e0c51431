"""A real one-node Slurm (Debian's 22.05 packages) for tests: a private folder, daemons started by hand, stopped after.

Everything the cluster owns lives under one folder (config, munge key and socket, state, spool, logs), so it runs
beside anything else on the machine, and every client finds it through `SLURM_CONF` (jobs inherit it, so Lightning's
`scontrol requeue` inside a job reaches this cluster). The daemons run in the foreground as children of the test
process, so stopping them needs nothing but their pids. Settings are the ones measured in ../shared/DESIGN.md.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
DAEMONS = {"munged": "/usr/sbin/munged", "slurmctld": "/usr/sbin/slurmctld", "slurmd": "/usr/sbin/slurmd"}
NODE_CPUS = 8  # declared, not detected (config_overrides): several 2-task jobs fit on a 2-core machine

# cred_expire=10 + 2 s scheduler intervals: a requeued job runs again after ~16 s instead of 120-180 s.
SLURM_CONF = """\
ClusterName=genlightning
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
MailProg=/bin/true
JobRequeue=1
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
KillWait=10
InactiveLimit=0
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def missing_reason() -> str | None:
    """Why a cluster cannot be started here (None when it can): installs the Debian packages when they are missing."""
    if all(Path(path).exists() for path in DAEMONS.values()) and shutil.which("sbatch"):
        return None
    if os.geteuid() != 0:
        return "Slurm is not installed and installing it needs root (apt-get install " + " ".join(PACKAGES) + ")"
    if shutil.which("apt-get") is None:
        return "Slurm is not installed and there is no apt-get to install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]
    if subprocess.run(install, env=env, capture_output=True).returncode != 0:  # a stale package index: refresh once
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True)
        done = subprocess.run(install, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            return f"apt-get install {' '.join(PACKAGES)} failed: {done.stderr[-500:]}"
    return None


def hostname() -> str:
    """The node is this machine under its own name, as on a real cluster (Lightning resolves MASTER_ADDR from it)."""
    return socket.gethostname().split(".")[0]


def free_ports(count: int) -> list[int]:
    """Ports free now, distinct (held open together while the OS picks them)."""
    with contextlib.ExitStack() as stack:
        probes = [stack.enter_context(socket.socket()) for _ in range(count)]
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]


@dataclass
class SlurmCluster:
    root: Path
    env: dict[str, str]  # os.environ + SLURM_CONF: pass to every client command (and so to the jobs)
    daemons: dict[str, subprocess.Popen] = field(default_factory=dict)

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(command, env=self.env, capture_output=True, text=True, check=check, timeout=60)

    def sbatch(self, *args: str, cwd: Path, env: dict[str, str] | None = None) -> str:
        """Submits and returns the job id."""
        done = subprocess.run(
            ["sbatch", "--parsable", *args], cwd=cwd, env={**self.env, **(env or {})}, capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(f"sbatch failed: {done.stderr}\n{self.logs()}")
        return done.stdout.strip().split(";")[0]

    def job_state(self, job_id: str) -> str | None:
        """PENDING, RUNNING, ... while the job is queued (a requeued job stays in the queue); None once it has left."""
        done = self.run("squeue", "-h", "-j", job_id, "-o", "%T", check=False)
        if done.returncode != 0 and "Invalid job id" not in done.stderr:
            return "UNKNOWN"  # slurmctld did not answer: not a sign that the job is gone
        return done.stdout.strip() or None

    def job_info(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); kept MinJobAge (300 s) after the end."""
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def wait_until_gone(self, job_id: str, timeout: float) -> bool:
        """Polls the queue (`sbatch --wait` returns late); True when the job has finished."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.job_state(job_id) is None:
                return True
            time.sleep(1.0)
        return False

    def logs(self) -> str:
        """The daemons' logs, for a diagnosable failure."""
        parts = [f"--- {path.name} ---\n{path.read_text(errors='replace')[-6000:]}" for path in self.log_files()]
        return "\n".join(parts)

    def job_env(self) -> dict[str, str]:
        """Environment for a DDP job: Lightning's SLURM port is 15000 + the job id's last digits, and every fresh
        cluster numbers jobs from 1, so two clusters (or another test's DDP run) on one machine would collide; a free
        port is passed instead. A machine whose own name does not resolve gets the loopback address."""
        env = {"MASTER_PORT": str(free_ports(1)[0])}
        try:
            socket.gethostbyname(hostname())
        except OSError:
            env["MASTER_ADDR"] = "127.0.0.1"
        return env

    def log_files(self) -> list[Path]:
        return sorted((self.root / "log").glob("*.log"))


def write_config(root: Path) -> Path:
    for folder in ("state", "spool", "log", "munge"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    (root / "munge").chmod(0o711)  # munged refuses a socket folder others can write to
    host = hostname()
    ctld_port, slurmd_port = free_ports(2)
    text = SLURM_CONF.format(root=root, host=host, cpus=NODE_CPUS, ctld_port=ctld_port, slurmd_port=slurmd_port)
    conf = root / "slurm.conf"
    conf.write_text(text)
    return conf


def start_daemon(cluster: SlurmCluster, name: str, *args: str) -> None:
    log = open(cluster.root / "log" / f"{name}.stdout.log", "w")  # noqa: SIM115 (kept open for the daemon's life)
    cluster.daemons[name] = subprocess.Popen(
        [DAEMONS[name], *args], env=cluster.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )


def start_munge(cluster: SlurmCluster) -> None:
    munge = cluster.root / "munge"
    key = munge / "munge.key"
    subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
    key.chmod(0o600)
    start_daemon(
        cluster,
        "munged",
        "--foreground",
        "--force",
        f"--key-file={key}",
        f"--socket={munge}/munge.socket",
        f"--pid-file={munge}/munged.pid",
        f"--seed-file={munge}/munged.seed",
        f"--log-file={cluster.root}/log/munged.log",
    )
    wait_for(lambda: (munge / "munge.socket").exists(), 10, "munged did not create its socket", cluster)


def wait_for(ready, timeout: float, what: str, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        for name, process in cluster.daemons.items():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}\n{cluster.logs()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} within {timeout} s\n{cluster.logs()}")
        time.sleep(0.2)


def node_idle(cluster: SlurmCluster) -> bool:
    out = cluster.run("sinfo", "-h", "-n", hostname(), "-o", "%T", check=False).stdout.strip()
    return out == "idle"


def start(root: Path) -> SlurmCluster:
    conf = write_config(root)
    cluster = SlurmCluster(root, {**os.environ, "SLURM_CONF": str(conf)})
    try:
        start_munge(cluster)
        start_daemon(cluster, "slurmctld", "-D", "-i")
        start_daemon(cluster, "slurmd", "-D", "-N", hostname())
        wait_for(lambda: node_idle(cluster), 30, "the node did not become idle", cluster)
    except BaseException:
        stop(cluster)
        raise
    return cluster


def cancel_all_jobs(cluster: SlurmCluster, timeout: float = 30) -> None:
    jobs = cluster.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
    if jobs:
        cluster.run("scancel", *jobs, check=False)
    deadline = time.monotonic() + timeout
    while jobs and time.monotonic() < deadline:
        jobs = cluster.run("squeue", "-h", "-o", "%i", check=False).stdout.split()
        time.sleep(0.5)


def processes_of(conf: str) -> list[int]:
    """Pids of processes that carry this cluster's SLURM_CONF (job steps, slurmstepd) other than ours."""
    marker = f"SLURM_CONF={conf}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
    return pids


def stop(cluster: SlurmCluster) -> None:
    """Cancels the jobs, stops the daemons (slurmd first, munged last) and ends any step process left behind."""
    if "slurmctld" in cluster.daemons:
        cancel_all_jobs(cluster)
    for name in ("slurmd", "slurmctld", "munged"):
        process = cluster.daemons.get(name)
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    for pid in processes_of(cluster.env["SLURM_CONF"]):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def running(root: Path) -> Iterator[SlurmCluster]:
    cluster = start(root)
    try:
        yield cluster
    finally:
        stop(cluster)
