"""Give a benchmark process a fixed share of a core (a Linux cgroup CPU quota).

Why: on a machine with few cores, adding API replicas adds no CPU, so a replica benchmark measures the
machine, not whether the design scales. With each replica held to the same quota (say a quarter
core) and the machine kept below saturation, throughput against replica count shows what adding a
replica adds: linear growth means the replicas share no bottleneck (database locks, the event order,
the broker), which is the question a capacity plan asks.

cgroup v2 (`cpu.max`) where the unified hierarchy has the cpu controller, else v1 (`cpu.cfs_quota_us`).
Needs root (or a delegated cgroup); raises with what to do otherwise.
"""

from __future__ import annotations

from pathlib import Path

PERIOD_US = 100_000
V1 = Path("/sys/fs/cgroup/cpu")
V2 = Path("/sys/fs/cgroup")


class CpuQuota:
    def __init__(self, name: str, cores: float) -> None:
        if not 0 < cores <= 64:
            raise ValueError(f"a CPU quota of {cores} cores makes no sense")
        quota = max(1000, int(cores * PERIOD_US))
        if (V2 / "cgroup.controllers").exists() and "cpu" in (V2 / "cgroup.controllers").read_text().split():
            self.dir = V2 / name
            self.dir.mkdir(exist_ok=True)
            (self.dir / "cpu.max").write_text(f"{quota} {PERIOD_US}")
        elif (V1 / "cpu.cfs_quota_us").exists():
            self.dir = V1 / name
            self.dir.mkdir(exist_ok=True)
            (self.dir / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (self.dir / "cpu.cfs_quota_us").write_text(str(quota))
        else:
            raise RuntimeError("no cgroup CPU controller at /sys/fs/cgroup (cgroup v2 with `cpu`, or v1 cpu): "
                               "run without --replica-cpu")
        self.cores = cores

    def add(self, pid: int) -> None:
        """Move process `pid` (all its threads) into the quota."""
        (self.dir / "cgroup.procs").write_text(str(pid))

    def close(self) -> None:
        """Remove the group (its processes must have exited)."""
        try:
            self.dir.rmdir()
        except OSError:
            pass
