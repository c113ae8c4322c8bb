"""Finding and loading profiles: ``$PRISM_PROFILE_PATH``, the user's directory, the built-ins.

The first directory holding ``NAME.toml`` wins; a profile found by name (or a built-in)
must call itself by its file stem.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from probes.catalog.model import Profile
from probes.catalog.parser import parse_profile, suggest
from probes.errors import CatalogError

BUILTIN_DIR: Path = Path(__file__).resolve().parent
"""Directory of the profiles shipped with the package (searched last)."""

USER_PROFILE_DIR = Path(".config") / "latencyprism" / "profiles"
"""Per-user profile directory, relative to the home directory."""


def profile_dirs() -> tuple[Path, ...]:
    """Directories searched for profiles, first wins: $PRISM_PROFILE_PATH, user, built-in."""
    dirs: list[Path] = []
    for entry in os.environ.get("PRISM_PROFILE_PATH", "").split(os.pathsep):
        if entry.strip():
            try:
                dirs.append(Path(entry).expanduser())
            except RuntimeError:  # ~user that does not exist
                dirs.append(Path(entry))
    with contextlib.suppress(RuntimeError):  # no home directory to expand
        dirs.append(Path.home() / USER_PROFILE_DIR)
    dirs.append(BUILTIN_DIR)
    return tuple(dirs)


def available_profiles() -> dict[str, str]:
    """Profile name (file stem) -> path, over :func:`profile_dirs`; earlier dirs win."""
    found: dict[str, str] = {}
    for directory in profile_dirs():
        try:
            entries = sorted(directory.glob("*.toml"))
        except OSError:
            continue
        for entry in entries:
            if entry.is_file():
                found.setdefault(entry.stem, str(entry))
    return found


def _read(path: Path) -> str:
    """The UTF-8 text of a profile file, or CatalogError naming the file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CatalogError(f"{path}: cannot read profile: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise CatalogError(f"{path}:{line}: profile is not UTF-8 text") from None


def load_profile(name_or_path: str) -> Profile:
    """Load a profile by path (contains ``/`` or ends ``.toml``) or by name.

    Names are searched in :func:`profile_dirs`; the ``[profile]`` name of a profile found
    by name (or a built-in) must equal its file stem. Unknown names list those available.
    """
    if "/" in name_or_path or name_or_path.endswith(".toml"):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise CatalogError(f"{path}: no such profile file")
        builtin = path.resolve().parent == BUILTIN_DIR
        return parse_profile(_read(path), str(path),
                             expected_name=path.stem if builtin else None)
    profiles = available_profiles()
    found = profiles.get(name_or_path)
    if found is None:
        names = ", ".join(sorted(profiles)) or "none"
        searched = os.pathsep.join(str(d) for d in profile_dirs())
        raise CatalogError(f"unknown profile {name_or_path!r}{suggest(name_or_path, profiles)}"
                           f"; available: {names} (searched {searched})")
    path = Path(found)
    return parse_profile(_read(path), str(path), expected_name=path.stem)
