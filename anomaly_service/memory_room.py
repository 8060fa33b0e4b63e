"""How much more memory this process may take before it is refused or killed, read where the kernel keeps it.

Why: on a small inspection PC (a few GB shared with the camera software, no swap) or in a container with a memory
limit, the default pixel budget admits photos whose decoding and scoring take more memory than is there. The
kernel's OOM killer then ends the service with no word in its log, and under ``ulimit -v`` the allocation fails
inside a decode. The service asks this module at start-up (to fit its pixel budget to the room left once its
models are loaded) and for each photo it admits (to refuse one that does not fit now with a 503), so that a photo
too large for the machine is refused and the service keeps serving.
"""

from __future__ import annotations

import resource
from pathlib import Path

from .cgroups import levels, read

# Peak bytes one pixel of a photo in flight costs on its way through the service (decoded copies, the anomaly map,
# the heatmap and its PNG): measured, docs/service.md "The memory bound".
PEAK_BYTES_PER_PIXEL = 37

# cgroup v1 reports "no limit" as a huge page-rounded number; anything above this is no limit
_NO_LIMIT = 1 << 60


def free_bytes(proc: Path = Path("/proc"), cgroups: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes this process may still allocate: the least of the machine's available memory, its memory cgroups'
    limits less their use (v1 and v2, every level up), and its address-space limit (``ulimit -v``) less its size;
    None where none of them is known."""
    rooms = [_available(proc), _address_space(proc), *_cgroup_rooms(proc, cgroups)]
    known = [r for r in rooms if r is not None]
    return max(0, min(known)) if known else None


def resident_bytes(proc: Path = Path("/proc")) -> int | None:
    """This process's resident memory (``/proc/self/statm``), None where it cannot be read: what it holds now
    beyond what it held when idle is memory its photos in flight took and give back."""
    fields = (read(proc / "self" / "statm") or "").split()
    if len(fields) < 2 or not fields[1].isdigit():
        return None
    return int(fields[1]) * resource.getpagesize()


def _fields(text: str | None) -> dict[str, int]:
    """``name value`` lines (``/proc/meminfo``, ``memory.stat``) as a dict of ints; values in kB stay in kB."""
    out: dict[str, int] = {}
    for line in (text or "").splitlines():
        parts = line.replace(":", " ").split()
        if len(parts) >= 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _available(proc: Path) -> int | None:
    kb = _fields(read(proc / "meminfo")).get("MemAvailable")
    return None if kb is None else kb * 1024


def _address_space(proc: Path) -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    size_kb = _fields(read(proc / "self" / "status")).get("VmSize")
    if soft == resource.RLIM_INFINITY or size_kb is None:
        return None
    return soft - size_kb * 1024


def _int(text: str | None) -> int | None:
    text = (text or "").strip()
    return int(text) if text.isdigit() else None


def _cgroup_rooms(proc: Path, cgroups: Path) -> list[int]:
    """Limit less use of each memory cgroup this process is in, from its own up to the root of the mounted
    hierarchy (a container sees its own cgroup at the mount's root), plus what the kernel reclaims there before it
    kills (:func:`_reclaimable`)."""
    rooms: list[int] = []
    for here, v2 in levels("memory", proc, cgroups):
        limit_file, used_file = ("memory.max", "memory.current") if v2 else ("memory.limit_in_bytes",
                                                                               "memory.usage_in_bytes")
        limit, used = _int(read(here / limit_file)), _int(read(here / used_file))
        if limit is not None and used is not None and limit < _NO_LIMIT:
            rooms.append(limit - used + min(used, _reclaimable(here, v2)))
    return rooms


def _reclaimable(here: Path, v2: bool) -> int:
    """Bytes of a cgroup's use the kernel takes back before it kills: the file cache (a tmpfs's files stay, since
    without swap they cannot go) and the kernel's reclaimable caches, chiefly the names and inodes of files looked
    up. Why the caches: a cgroup's use grows to its limit with them as the service reads photos and writes records,
    and the kernel frees them only when it must, so counted as used they had every large photo refused on a
    machine that had the room (v1 tells no reclaimable part of its kernel memory: all of it counts, the rest being
    page tables and stacks, small beside a photo)."""
    stat = _fields(read(here / "memory.stat"))
    if v2:
        return max(0, stat.get("file", 0) - stat.get("shmem", 0)) + stat.get("slab_reclaimable", 0)
    kernel = _int(read(here / "memory.kmem.usage_in_bytes")) or 0
    return max(0, stat.get("total_cache", 0) - stat.get("total_shmem", 0)) + kernel
