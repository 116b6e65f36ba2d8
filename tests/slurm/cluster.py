#!/usr/bin/env python3
"""A real Slurm cluster on one machine, for the launcher tests.

Debian's slurm-wlm (install it with .ci/slurm_setup.sh) + a private munged. The controller runs in the
root network namespace on a bridge; each compute node runs its slurmd in its own network and UTS
namespace, so every node has its own IP address and hostname (gloo/c10d bind to the address the
hostname resolves to: with one shared hostname they would all pick 127.0.0.1 and never connect).

The nodes are declared like GPU nodes (CPUs=32, Gres=gpu:8 without devices) so the launchers' own
#SBATCH defaults are accepted unchanged; the job still runs on the CPU.

Several clusters can coexist (e.g. two test runs at once): each takes a free slot 0..7 under a file
lock, and the slot picks the names, subnet and ports. Everything `up` creates is undone by `down`:
daemons and job processes (by pid), namespaces, bridge, and its own lines in /etc/hosts.

    python tests/slurm/cluster.py up [--slot K]    # prints the SLURM_CONF to export
    python tests/slurm/cluster.py down --slot K
"""
from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

SLOTS = 8
ROOT = Path(os.environ.get("DTRAIN_SLURM_TEST_ROOT", "/tmp/dtrain-slurm"))
HOSTS = Path("/etc/hosts")
TOOLS = ("slurmctld", "slurmd", "sbatch", "munged", "mungekey", "ip", "nsenter", "unshare")


class ClusterUnavailable(RuntimeError):
    """The machine cannot run the cluster (not root, Slurm not installed): tests skip with this reason."""


def unavailable_reason() -> str | None:
    if sys.platform != "linux":
        return "the Slurm test cluster needs Linux network namespaces"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"{', '.join(missing)} not installed (run .ci/slurm_setup.sh as root)"
    if os.geteuid() != 0:
        return "the Slurm test cluster needs root (network namespaces, /etc/hosts, slurmd)"
    return None


def _run(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, check=False, text=True, capture_output=True, **kw)
    if check and out.returncode != 0:
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({out.returncode}): {out.stderr.strip()}")
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _kill_and_wait(pids: list[int], timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL whatever is still there after `timeout`."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        pids = [p for p in pids if _alive(p)]
        if not pids:
            return


class Cluster:
    def __init__(self, slot: int, nodes: int = 2):
        self.slot, self.nodes = slot, nodes
        self.base = ROOT / f"slot{slot}"
        self.tag = f"dt{slot}"                       # names: dt0n1 (node/netns), dt0br (bridge)
        self.subnet = f"10.98.{slot}"
        self.ctld_port = 6917 + 2 * slot             # not 6817: leave a default Slurm on this host alone
        self._lock_fd: int | None = None

    # ---- names ----
    def node(self, i: int) -> str:
        return f"{self.tag}n{i}"

    @property
    def node_names(self) -> list[str]:
        return [self.node(i) for i in range(1, self.nodes + 1)]

    def node_ip(self, i: int) -> str:
        return f"{self.subnet}.{i + 1}"

    @property
    def bridge(self) -> str:
        return f"{self.tag}br"

    @property
    def conf(self) -> Path:
        return self.base / "etc" / "slurm.conf"

    @property
    def hosts_mark(self) -> str:
        return f"# dtrain-slurm-test {self.tag}"

    def env(self) -> dict:
        """Environment for Slurm client commands (sbatch, squeue, ...) talking to this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    # ---- slot lock ----
    @classmethod
    def acquire(cls, nodes: int = 2) -> Cluster:
        """Take the first free slot (its lock is held until release() or process exit)."""
        ROOT.mkdir(parents=True, exist_ok=True)
        for slot in range(SLOTS):
            fd = os.open(ROOT / f"slot{slot}.lock", os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            c = cls(slot, nodes)
            c._lock_fd = fd
            return c
        raise RuntimeError(f"all {SLOTS} Slurm test cluster slots under {ROOT} are in use")

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ---- up ----
    def up(self, timeout: float = 30.0) -> None:
        reason = unavailable_reason()
        if reason:
            raise ClusterUnavailable(reason)
        self.down()                                  # leftovers of a run that died in this slot
        shutil.rmtree(self.base, ignore_errors=True)
        for d in ("etc", "state", "log", "run", *(f"spool/{n}" for n in self.node_names)):
            (self.base / d).mkdir(parents=True, exist_ok=True)
        self._start_munge()
        self._network()
        self._write_conf()
        env = self.env()
        _run("slurmctld", "-i", env=env)
        for n in self.node_names:
            # nsenter --net, not `ip netns exec`: the latter remounts /sys and slurmd then dies with
            # "No filesystem mounted on /sys/fs/cgroup". unshare --uts gives the node its own hostname.
            _run("nsenter", f"--net=/run/netns/{n}", "unshare", "--uts", "sh", "-c",
                 f"hostname {n} && exec slurmd -N {n}", env=env)
        self.wait_idle(timeout)

    def _start_munge(self) -> None:
        key = self.base / "munge.key"
        _run("mungekey", "--create", f"--keyfile={key}")
        _run("munged", f"--socket={self.base / 'munge.sock'}", f"--key-file={key}",
             f"--pid-file={self.base / 'run/munged.pid'}", f"--log-file={self.base / 'log/munged.log'}",
             f"--seed-file={self.base / 'munged.seed'}")

    def _network(self) -> None:
        ip = lambda *a: _run("ip", *a)
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")
        for i, n in enumerate(self.node_names, start=1):
            ip("netns", "add", n)
            ip("link", "add", f"{n}v", "type", "veth", "peer", "name", "eth0", "netns", n)
            ip("link", "set", f"{n}v", "master", self.bridge, "up")
            ip("-n", n, "addr", "add", f"{self.node_ip(i)}/24", "dev", "eth0")
            ip("-n", n, "link", "set", "eth0", "up")
            ip("-n", n, "link", "set", "lo", "up")
        lines = "".join(f"{self.node_ip(i)} {n} {self.hosts_mark}\n"
                        for i, n in enumerate(self.node_names, start=1))
        text = HOSTS.read_text()
        # Rewrite in place (the file may be a bind mount: no rename over it).
        HOSTS.write_text(text + ("" if text.endswith("\n") or not text else "\n") + lines)

    def _write_conf(self) -> None:
        b = self.base
        nodes = "\n".join(f"NodeName={n} NodeAddr={self.node_ip(i)} CPUs=32 Gres=gpu:8 RealMemory=16000 "
                          "State=UNKNOWN" for i, n in enumerate(self.node_names, start=1))
        self.conf.write_text(f"""\
ClusterName=dtrain{self.slot}
SlurmctldHost={os.uname().nodename}({self.subnet}.1)
SlurmctldPort={self.ctld_port}
SlurmdPort={self.ctld_port + 1}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={b / 'munge.sock'},cred_expire=5
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
SchedulerType=sched/backfill
# Schedule often: a requeued job starts seconds after it becomes eligible, not at the next 30-60 s pass.
SchedulerParameters=sched_interval=1,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
# The nodes claim more CPUs and GPUs than the machine has, like the GPU nodes the launchers are for.
SlurmdParameters=config_overrides
ReturnToService=2
# Finished jobs stay visible to scontrol/squeue for the tests (there is no accounting database).
MinJobAge=600
KillWait=10
StateSaveLocation={b / 'state'}
SlurmdSpoolDir={b / 'spool'}/%n
SlurmctldPidFile={b / 'run'}/slurmctld.pid
SlurmdPidFile={b / 'run'}/slurmd-%n.pid
SlurmctldLogFile={b / 'log'}/slurmctld.log
SlurmdLogFile={b / 'log'}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        # Slurm drops GPUs without device files: eight stand-ins for /dev/nvidia0..7 (copies of /dev/null).
        dev = b / "dev"
        dev.mkdir(exist_ok=True)
        for i in range(8):
            os.mknod(dev / f"gpu{i}", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        (self.conf.parent / "gres.conf").write_text(f"Name=gpu File={dev}/gpu[0-7]\n")

    def wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        out = ""
        while time.monotonic() < deadline:
            out = _run("sinfo", "-h", "-N", "-o", "%N %t", env=self.env(), check=False).stdout
            states = {line.split()[1] for line in out.splitlines() if line.strip()}
            if states == {"idle"}:
                return
            time.sleep(0.3)
        raise RuntimeError(f"Slurm nodes not idle after {timeout:.0f}s: {out!r}\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        out = []
        for f in sorted((self.base / "log").glob("*.log")):
            tail = f.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {f} ---\n" + "\n".join(tail))
        return "\n".join(out)

    # ---- down ----
    def _pid(self, name: str) -> int | None:
        try:
            return int((self.base / "run" / name).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def down(self) -> None:
        """Undo everything up() did; safe to call twice and after a partial up()."""
        env = self.env()
        if self.conf.exists() and self._pid("slurmctld.pid"):
            _run("scancel", "--full", "--signal=KILL", "--user=root", env=env, check=False, timeout=15)
        # Everything in the nodes' namespaces (slurmd, job processes), the controller and munged: all at
        # once, each of them takes a second or two to stop.
        netns = _run("ip", "netns", "list", check=False).stdout.split()
        pids = [self._pid(f"slurmd-{n}.pid") for n in self.node_names]
        pids += [self._pid("slurmctld.pid"), self._pid("munged.pid")]
        for n in self.node_names:
            if n in netns:
                pids += [int(p) for p in _run("ip", "netns", "pids", n, check=False).stdout.split()]
        _kill_and_wait(sorted({p for p in pids if p and _alive(p)}))
        for n in self.node_names:
            if n in netns:
                _run("ip", "netns", "del", n, check=False)   # also removes the veth pair
        _run("ip", "link", "del", self.bridge, check=False)
        if HOSTS.exists() and self.hosts_mark in HOSTS.read_text():
            kept = [line for line in HOSTS.read_text().splitlines(keepends=True) if self.hosts_mark not in line]
            HOSTS.write_text("".join(kept))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["up", "down"])
    p.add_argument("--slot", type=int, help="cluster slot (up: default the first free one)")
    args = p.parse_args()
    if args.action == "up":
        c = Cluster(args.slot) if args.slot is not None else Cluster.acquire()
        c.release()  # the CLI user owns the slot from now on; `down` frees it
        c.up()
        print(f"export SLURM_CONF={c.conf}   # slot {c.slot}; nodes {' '.join(c.node_names)}")
    else:
        if args.slot is None:
            p.error("down needs --slot")
        Cluster(args.slot).down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
