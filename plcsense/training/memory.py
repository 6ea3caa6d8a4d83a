"""Memory a training run may still take. The selection's caches (photos at a resolution, every flipped copy's
activations) grow with the photos' count and size; sized against what is available, a few thousand large photos
skip a candidate with the reason instead of having the run killed by the kernel."""

from __future__ import annotations

from pathlib import Path

CACHE_SHARE = 0.5
"""Largest share of the available memory one new cache may take: fine-tuning's batches, Keras and the export
need the rest."""

_CGROUP_FILES = (  # (limit, usage): cgroup v2, then v1
    (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory.current")),
    (Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"), Path("/sys/fs/cgroup/memory/memory.usage_in_bytes")),
)


def available_bytes(meminfo: Path = Path("/proc/meminfo"), cgroups=_CGROUP_FILES) -> int | None:
    """The machine's MemAvailable, capped by a container's memory limit less its usage; None where neither can be
    read (not Linux): no cap then."""
    found: list[int] = []
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in cgroups:
        try:
            limit, usage = limit_file.read_text().strip(), int(usage_file.read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max" (v2) or a huge number (v1): no limit
            found.append(max(int(limit) - usage, 0))
        break
    return min(found) if found else None


def too_big(need: int) -> str | None:
    """Why a cache of ``need`` bytes is refused, or None when it fits."""
    free = available_bytes()
    if free is None or need <= CACHE_SHARE * free:
        return None
    return f"would hold ~{need / 1e9:.1f} GB of the {free / 1e9:.1f} GB of memory available"
