"""A one-node Slurm cluster on localhost for the tests: munged, slurmctld and slurmd.

Installs Debian's ``slurm-wlm`` and ``munge`` when missing (needs root and the package
mirror), writes a slurm.conf with state and spool under a scratch folder, starts the three
daemons in the foreground (their process ids are ours) and stops them by process id.
Verified with slurm-wlm 22.05: ``ProctrackType=proctrack/linuxproc``, ``TaskPlugin=task/none``
and ``SlurmUser=root`` need no cgroups; munged needs /run/munge owned by munge and
``--force``.

A requeued job is held by Slurm itself (``BeginTime`` = requeue + credential lifetime + 1 s):
slurmd revokes the old launch credential at the requeue, with a one-second timestamp, and
refuses a new one that is not strictly newer ("Job N already killed, do not launch batch
job"; slurmctld then logs "Killing non-startable batch JobId=N: Job credential revoked" and
the job ends FAILED 1:0 without running). The tests keep that guard and only shorten it, with
``AuthInfo=cred_expire`` (Slurm's minimum is 5 s; the default 120 s would add two minutes
per requeue). Forcing ``StartTime=now`` instead, as the preemption test once did, let the
restart land in the revocation's second about one run in ten.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")
#: Launch-credential lifetime: a requeued job waits this + 1 s before Slurm starts it again.
#: Long enough for a launch on a loaded 2-core machine (the credential is checked when slurmd
#: receives the launch, milliseconds after slurmctld signs it), short enough for a test.
CRED_EXPIRE_S = 10
#: The full scheduling pass: nothing else wakes the scheduler when a requeued job's BeginTime
#: passes, and the default 60 s would leave it pending for up to a minute more.
SCHED_INTERVAL_S = 2


def ensure_installed() -> str | None:
    """None when sbatch/slurmctld/slurmd/munged are there (installed now if needed), or why not."""
    needed = ("sbatch", "scontrol", "scancel", "slurmctld", "slurmd", "munged")
    if all(shutil.which(b) or Path("/usr/sbin", b).exists() for b in needed):
        return None
    if os.geteuid() != 0:
        return "slurm-wlm/munge are not installed and installing them needs root"
    if not shutil.which("apt-get"):
        return "slurm-wlm/munge are not installed and there is no apt-get"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], env=env, check=True, timeout=600,
                   capture_output=True)
    subprocess.run(["apt-get", "install", "-y", "-qq", *PACKAGES], env=env, check=True,
                   timeout=900, capture_output=True)
    return None


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _free_rendezvous_port() -> int:
    """A free port in 20001..39999 (pretrain.sh's range), so job ids can be chosen to hit it."""
    import random

    for _ in range(200):
        port = random.randint(20001, 39990)
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    return 20001


class LocalSlurm:
    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.procs: list[subprocess.Popen] = []
        self.conf = scratch / "slurm.conf"
        self.host = socket.gethostname().split(".")[0]
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    # ---------------------------------------------------------------- start / stop
    def start(self) -> None:
        s = self.scratch
        for d in ("state", "spool", "log"):
            (s / d).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        # the tests' jobs are 2 tasks of 1 CPU: a 1-CPU machine declares 2 (config_overrides
        # keeps slurmd from draining a node that has fewer than configured)
        cpus = max(2, os.cpu_count() or 2)
        ctld_port, d_port = _free_port(), _free_port()
        # pretrain.sh's rendezvous port is 20000 + job id % 20000: start the ids at a free one
        first_id = _free_rendezvous_port() - 20000
        self.conf.write_text(f"""\
ClusterName=gptdisttest
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={d_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation={s}/state
SlurmdSpoolDir={s}/spool
SlurmctldPidFile={s}/slurmctld.pid
SlurmdPidFile={s}/slurmd.pid
SlurmctldLogFile={s}/log/slurmctld.log
SlurmdLogFile={s}/log/slurmd.log
ProctrackType=proctrack/linuxproc
SlurmdParameters=config_overrides
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval={SCHED_INTERVAL_S}
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
AuthInfo=cred_expire={CRED_EXPIRE_S}
FirstJobId={first_id}
KillWait=30
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=60
InactiveLimit=0
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
""")
        self.procs.append(subprocess.Popen(
            [_sbin("slurmctld"), "-D", "-i", "-f", str(self.conf)], env=self.env,
            stdout=open(s / "log" / "slurmctld.stdout", "w"), stderr=subprocess.STDOUT))  # noqa: SIM115 - the daemon holds it
        self.procs.append(subprocess.Popen(
            [_sbin("slurmd"), "-D", "-f", str(self.conf), "-N", self.host], env=self.env,
            stdout=open(s / "log" / "slurmd.stdout", "w"), stderr=subprocess.STDOUT))  # noqa: SIM115 - the daemon holds it
        deadline = time.time() + 60
        while time.time() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited with {p.returncode}:\n{self.logs()}")
            out = self.scontrol("show", "node", self.host, check=False)
            if "State=IDLE" in out:
                return
            time.sleep(0.5)
        raise RuntimeError(f"the node never became idle:\n{out}\n{self.logs()}")

    def _start_munge(self) -> None:
        run = Path("/run/munge")
        run.mkdir(parents=True, exist_ok=True)
        shutil.chown(run, "munge", "munge")
        key = Path("/etc/munge/munge.key")
        if not key.exists():
            subprocess.run([_sbin("mungekey"), "--create"], check=True, timeout=60)
            shutil.chown(key, "munge", "munge")
        sock = self.scratch / "munge.socket"
        self.env["MUNGE_SOCKET"] = str(sock)  # not read by slurm; our own socket is the default
        # munged in the foreground (-F) so its pid is ours; --force takes over a stale socket
        self.procs.append(subprocess.Popen(
            ["runuser", "-u", "munge", "--", _sbin("munged"), "-F", "--force"],
            stdout=open(self.scratch / "munged.log", "w"), stderr=subprocess.STDOUT))  # noqa: SIM115 - the daemon holds it
        deadline = time.time() + 20
        while time.time() < deadline:
            if subprocess.run(["munge", "-n"], capture_output=True, check=False).returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError("munged did not come up: " + (self.scratch / "munged.log").read_text())

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()

    # ---------------------------------------------------------------- client commands
    def scontrol(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run(["scontrol", *args], env=self.env, capture_output=True, text=True,
                              timeout=30, check=False)
        if check and proc.returncode != 0:
            raise RuntimeError(f"scontrol {' '.join(args)}: {proc.stderr}")
        return proc.stdout + proc.stderr

    def job(self, job_id: int) -> dict[str, str]:
        out = self.scontrol("show", "job", "-o", str(job_id), check=False)
        fields: dict[str, str] = {}
        for item in out.split():
            if "=" in item:
                k, _, v = item.partition("=")
                fields.setdefault(k, v)
        return fields

    def logs(self) -> str:
        parts = []
        for name in ("log/slurmctld.log", "log/slurmd.log", "log/slurmctld.stdout", "log/slurmd.stdout"):
            path = self.scratch / name
            if path.exists():
                parts.append(f"--- {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-25:]))
        return "\n".join(parts)
