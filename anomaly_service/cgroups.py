"""The control groups this process is in, read where the kernel keeps them: every level of one controller's
hierarchy, from the process's own group up to the root of what is mounted.

Why every level: a limit can sit on any of them. A systemd unit's ``CPUQuota=`` or ``MemoryMax=`` is set on the
unit's own group, a slice's above it, and a container runtime shows the container's group at the mount's root
(where the path ``/proc/self/cgroup`` names is then not found). Reading only the mount's root, as a library that
asks about containers does, misses a unit's limit on a plant PC.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

PROC = Path("/proc")
CGROUPS = Path("/sys/fs/cgroup")


def read(path: Path) -> str | None:
    """A kernel file's text, None where it is not there or cannot be read."""
    try:
        return path.read_text()
    except (OSError, ValueError):
        return None


def levels(controller: str, proc: Path = PROC, cgroups: Path = CGROUPS) -> Iterator[tuple[Path, bool]]:
    """Each directory of ``controller``'s groups this process is in, its own first, with whether it is cgroup v2
    (one hierarchy for every controller, mounted at ``cgroups``) or v1 (one per controller, under its name)."""
    for line in (read(proc / "self" / "cgroup") or "").splitlines():
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # v2
            base, v2 = cgroups, True
        elif controller in controllers.split(","):  # v1
            base, v2 = cgroups / controller, False
        else:
            continue
        here = base / path.strip().lstrip("/")
        if not here.is_dir():
            here = base
        while True:
            yield here, v2
            if here == base or base not in here.parents:
                break
            here = here.parent


def cpu_limit(proc: Path = PROC, cgroups: Path = CGROUPS) -> float | None:
    """The CPUs' worth of time per period the tightest CPU quota of this process's groups allows (``cpu.max`` in
    v2, ``cpu.cfs_quota_us`` over ``cpu.cfs_period_us`` in v1), None where no level sets one."""
    limits: list[float] = []
    for here, v2 in levels("cpu", proc, cgroups):
        if v2:
            fields = (read(here / "cpu.max") or "").split()
            quota, period = (fields + ["", ""])[:2]
        else:
            quota, period = ((read(here / name) or "").strip() for name in ("cpu.cfs_quota_us", "cpu.cfs_period_us"))
        if quota.isdigit() and period.isdigit() and int(quota) > 0 and int(period) > 0:  # "max" or -1: no quota
            limits.append(int(quota) / int(period))
    return min(limits) if limits else None
