"""A real single-node SLURM cluster on this machine for the tests: munged, slurmctld and slurmd, all started
from a private directory (its own munge key and socket, its own slurm.conf via SLURM_CONF), stopped by pid file."""

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol")


def missing_reason() -> str:
    """Why a cluster can't start here ("" when it can)."""
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return f"SLURM/munge binaries not installed ({', '.join(missing)}): apt-get install slurm-wlm munge"
    if os.geteuid() != 0:
        return "starting slurmctld/slurmd/munged needs root"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no 'munge' user (the munge package creates it)"
    return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_conf(root: Path, host: str) -> str:
    """One node, this host, all its CPUs; no accounting daemon. cred_expire=5: a requeued job may start again
    after 5 s instead of SLURM's default 120 s."""
    cpus = os.cpu_count() or 1
    memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 // 2
    return f"""\
ClusterName=runnertest
SlurmctldHost={host}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SchedulerParameters=sched_interval=1
NodeName={host} CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="runner-slurm-"))
        self.root.chmod(0o755)  # the munge user must reach its socket dir
        self.env = {"SLURM_CONF": str(self.root / "slurm.conf")}  # what clients (sbatch, squeue) need to find it
        self.pid_files = []

    def start(self):
        host = socket.gethostname()
        (self.root / "slurm.conf").write_text(slurm_conf(self.root, host))
        for d in ("state", "spool"):
            (self.root / d).mkdir()
        self.start_munge()
        for daemon in ("slurmctld", "slurmd"):
            args = [daemon, "-c"] if daemon == "slurmctld" else [daemon]
            subprocess.run(args, env=dict(os.environ, **self.env), check=True, capture_output=True, timeout=30)
            self.pid_files.append(self.root / f"{daemon}.pid")
        self.wait_idle(host)

    def start_munge(self):
        munge = pwd.getpwnam("munge")
        d = self.root / "munge"
        d.mkdir(mode=0o755)  # munged requires its socket dir to be searchable by all
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        for p in (d, key):
            os.chown(p, munge.pw_uid, munge.pw_gid)
        subprocess.run(["runuser", "-u", "munge", "--", "munged", f"--key-file={key}", f"--socket={d}/munge.socket",
                        f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log", f"--seed-file={d}/munged.seed"],
                       check=True, capture_output=True, timeout=30)
        self.pid_files.append(d / "munged.pid")

    def wait_idle(self, host: str, timeout: float = 60):
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            state = self.run("sinfo", "-h", "-n", host, "-o", "%t").stdout.strip()
            if state == "idle":
                return
            time.sleep(0.5)
        raise RuntimeError(f"SLURM node {host} not idle after {timeout} s (state {state!r}); logs in {self.root}")

    def run(self, *args, check=False):
        return subprocess.run(args, env=dict(os.environ, **self.env), capture_output=True, text=True, timeout=60,
                              check=check)

    def stop(self):
        # all three told at once, then waited for: each takes a second or two to exit (5 s one after the other)
        pids = []
        for pid_file in reversed(self.pid_files):  # slurmd, slurmctld, then munged
            try:
                pid = int(pid_file.read_text())
                os.kill(pid, signal.SIGTERM)
            except (OSError, ValueError):
                continue
            pids.append(pid)
        for pid in pids:
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except OSError:
                    break
                time.sleep(0.1)
        shutil.rmtree(self.root, ignore_errors=True)
