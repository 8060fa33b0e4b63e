"""A category copied to a scratch folder with each photo written anew (another bit depth, another colour space),
its ground-truth masks as they are: what a benchmark of how photos are stored scores against the originals."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable


def rewritten(src: Path, dst: Path, write: Callable[[Path, Path], None], folders: tuple[str, ...] | None = None
              ) -> int:
    """``src`` (an MVTec-layout category) copied to ``dst``: each photo passed to ``write(photo, out)``, each mask
    under ``ground_truth`` copied; only the top-level ``folders`` given (None: all). Returns how many photos."""
    from anomaly_service.images import IMAGE_EXTENSIONS

    roots = [src] if folders is None else [src / f for f in folders]
    n = 0
    for path in sorted(p for root in roots for p in root.rglob("*")):
        if not path.is_file() or path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        out = dst / path.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        if "ground_truth" in path.relative_to(src).parts:
            shutil.copy(path, out)
            continue
        write(path, out)
        n += 1
    return n
