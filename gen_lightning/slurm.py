"""Start-up checks for jobs launched by SLURM: a wrong launch must fail in seconds with a message, not hang.

Lightning trusts SLURM's variables: a batch script that runs `gen-lightning fit` without `srun` under
`--ntasks-per-node=2` starts ONE process that Lightning sizes as a world of 2, and it waits for the missing rank
until the job's time runs out. Tasks per node ≠ trainer.devices (or nodes ≠ num_nodes) is checked too, before
the model is built, in the CLI's terms.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Mapping

log = logging.getLogger("gen_lightning")


def _as_count(devices: object) -> int | None:
    """trainer.devices as a number of processes per node; None when Lightning decides ("auto", -1)."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str) and "," in devices:
        return len([d for d in devices.split(",") if d.strip()])
    try:
        count = int(devices)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        return None
    return count if count > 0 else None


def slurm_launch_error(env: Mapping[str, str], devices: object, num_nodes: int) -> str | None:
    """Why this SLURM launch cannot work, or None (also None outside SLURM and in `salloc`/interactive shells)."""
    if "SLURM_JOB_ID" not in env or env.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    ntasks = int(env.get("SLURM_NTASKS", "1"))
    if ntasks > 1 and "SLURM_STEP_ID" not in env:
        return (
            f"SLURM job {env['SLURM_JOB_ID']} has {ntasks} tasks but this process was started by the batch script, "
            "not by srun, so the other ranks never start and training would hang. Launch it as "
            "`srun gen-lightning fit ...` (see slurm/single_node.sbatch)."
        )
    per_node = env.get("SLURM_NTASKS_PER_NODE")
    if ntasks > 1 and per_node is None:
        return (
            f"SLURM job {env['SLURM_JOB_ID']} was submitted with --ntasks={ntasks} but no --ntasks-per-node: ranks "
            "cannot be mapped to devices. Submit with --nodes=M --ntasks-per-node=N (N = GPUs per node)."
        )
    count = _as_count(devices)
    if per_node is not None and count is not None and int(per_node) != count:
        return (
            f"--trainer.devices={devices} but SLURM runs {per_node} task(s) per node (--ntasks-per-node): every "
            f"task is one device. Set --trainer.devices={per_node}, or submit with --ntasks-per-node={count}."
        )
    nodes = env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES")
    if nodes is not None and int(nodes) != int(num_nodes):
        return (
            f"--trainer.num_nodes={num_nodes} but the SLURM job has {nodes} node(s). Set --trainer.num_nodes={nodes}, "
            f"or submit with --nodes={num_nodes}."
        )
    return None


def slurm_job_id(env: dict[str, str] | os._Environ = os.environ) -> str | None:
    """The id `scontrol requeue` takes: `ARRAYJOB_TASK` for an array task, else the job id; None outside a batch job
    (also in `salloc` shells, which Lightning does not treat as SLURM either)."""
    if "SLURM_JOB_ID" not in env or env.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    if "SLURM_ARRAY_JOB_ID" in env and "SLURM_ARRAY_TASK_ID" in env:
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env["SLURM_JOB_ID"]


def requeue(job_id: str) -> bool:
    try:
        done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    except FileNotFoundError:  # SLURM_JOB_ID set by hand, or a container without Slurm's client tools
        done = subprocess.CompletedProcess([], returncode=127, stderr="scontrol not found")
    if done.returncode != 0:
        log.warning("scontrol requeue %s failed (%s): resubmit the same command to resume", job_id, done.stderr.strip())
        return False
    log.warning("requeued SLURM job %s", job_id)
    return True
