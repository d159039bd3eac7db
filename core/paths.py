"""Where maven-edge writes when the user did not say where: a per-user cache directory.

Nothing is ever written beside the code (an installed package's folder may be read-only, and
is shared by every user of the environment). Defaults resolve to

    $MAVEN_EDGE_CACHE                  when set (tests and CI point it at a temporary folder), else
    platformdirs.user_cache_dir("maven-edge")   e.g. ~/.cache/maven-edge on Linux

and the commands print the location they used. Every default can be replaced by an explicit
argument (``--artifacts``, ``--cache-dir``, ``--out``).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_CACHE = "MAVEN_EDGE_CACHE"


def cache_root() -> Path:
    """The per-user cache directory (not created)."""
    env = os.environ.get(ENV_CACHE)
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("maven-edge", appauthor=False))


def cache_dir(*parts: str) -> Path:
    """A folder under :func:`cache_root` (not created: the writer creates what it writes)."""
    return cache_root().joinpath(*parts)


def shown_path(path: str | Path) -> str:
    """A path as reports and printed commands show it: relative to the working directory when
    inside it (so a pasted command works from there), else as given."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
