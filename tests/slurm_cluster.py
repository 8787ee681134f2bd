"""A real Slurm cluster on this machine (munged + slurmctld + one slurmd per node), for the tests.

Its nodes (n1, n2, ...) are slurmd daemons on this one machine, each with all of its CPUs, so a
job can span nodes (srun starts one task per node) as on a real cluster.

Needs root and Debian's slurm-wlm + munge (.ci/run installs them). Also usable by hand:
    python tests/slurm_cluster.py /tmp/slurm-dev     # starts one, prints SLURM_CONF, Ctrl-C stops
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")


def available() -> str | None:
    """None when a cluster can be started here, else why not."""
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]
    if missing:
        return f"not installed: {', '.join(missing)} (apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "starting slurmctld/slurmd needs root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_conf(base: Path, nodes: int) -> Path:
    host = socket.gethostname()
    cpus = os.cpu_count() or 1
    ctld = _free_port()
    node_lines = "\n".join(
        f"NodeName=n{i} NodeHostname={host} NodeAddr=127.0.0.1 Port={_free_port()} CPUs={cpus} State=UNKNOWN"
        for i in range(1, nodes + 1)
    )
    conf = base / "slurm.conf"
    conf.write_text(f"""\
ClusterName=cancernet-test
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld}
AuthType=auth/munge
AuthInfo=cred_expire=10
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool-%n
SlurmctldPidFile={base}/slurmctld.pid
SlurmdPidFile={base}/slurmd-%n.pid
SlurmctldLogFile={base}/slurmctld.log
SlurmdLogFile={base}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=30
MpiDefault=none
{node_lines}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")
    (base / "state").mkdir(exist_ok=True)
    for i in range(1, nodes + 1):
        (base / f"spool-n{i}").mkdir(exist_ok=True)
    return conf


class Cluster:
    def __init__(self, base: Path, nodes: int = 2):
        self.base, self.nodes = Path(base), nodes
        self.base.mkdir(parents=True, exist_ok=True)
        self.conf = _write_conf(self.base, nodes)
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: list[subprocess.Popen] = []

    def start(self, timeout: float = 60) -> Cluster:
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        if subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:  # reuse a live munged
            # --force: start even over a stale socket left by a munged that was killed
            key = Path("/etc/munge/munge.key")
            if not key.exists():
                subprocess.run(["mungekey", "--create", "--keyfile", str(key)], check=True)
            os.chmod(key, 0o600)
            subprocess.run(["munged", "--force"], check=True)
        daemons = [("slurmctld", ["-D", "-c", "-i"])] + [
            ("slurmd", ["-D", "-N", f"n{i}"]) for i in range(1, self.nodes + 1)
        ]
        for daemon, args in daemons:
            log = open(self.base / f"{daemon}{args[-1] if daemon == 'slurmd' else ''}.stdout", "w")
            self.procs.append(
                subprocess.Popen(
                    [daemon, "-f", str(self.conf), *args], env=self.env, stdout=log, stderr=subprocess.STDOUT
                )
            )
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True)
            states = out.stdout.split()
            if out.returncode == 0 and len(states) == self.nodes and set(states) <= {"idle", "mixed", "allocated"}:
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"Slurm did not come up in {timeout}s; see {self.base}/slurmctld.log")

    def stop(self) -> None:
        subprocess.run(["scancel", "--full", "--user=root"], env=self.env, capture_output=True)
        for proc in reversed(self.procs):
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()

    def run(self, *cmd: str, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(
            list(cmd), env={**self.env, **kwargs.pop("env", {})}, capture_output=True, text=True, **kwargs
        )

    def job(self, job_id: str) -> dict[str, str]:
        """scontrol show job, parsed into a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(field.split("=", 1) for field in out.split() if "=" in field)

    def wait(
        self,
        job_id: str,
        timeout: float,
        states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"),
    ) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout}s")


if __name__ == "__main__":
    cluster = Cluster(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/slurm-dev")).start()
    print(f"export SLURM_CONF={cluster.conf}", flush=True)
    try:
        signal.pause()
    finally:
        cluster.stop()
