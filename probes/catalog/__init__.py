"""Probe catalog: TOML profiles naming libraries, probes, argument captures and features.

A profile says which libraries to look for (soname globs on a mapped file's basename),
which functions to probe in them (exact name or glob), the stage each call belongs to,
whether its return is probed, and which arguments to capture as workload features.
Users add profiles without touching code: :func:`load_profile` searches
``$PRISM_PROFILE_PATH``, then ``~/.config/latencyprism/profiles``, then the built-ins.

Every malformed profile raises :class:`~probes.errors.CatalogError` whose message is
``FILE:LINE: context: reason``, so the command line prints one line a user can act on.

The modules, each usable alone: :mod:`~probes.catalog.model` (the immutable profile),
:mod:`~probes.catalog.expressions` (derived-feature arithmetic),
:mod:`~probes.catalog.parser` (TOML text to a profile) and :mod:`~probes.catalog.loader`
(the search path); the names below are the package's public interface.
"""

from probes.catalog.expressions import MAX_EXPR_CHARS, feature_names
from probes.catalog.loader import (
    BUILTIN_DIR,
    USER_PROFILE_DIR,
    available_profiles,
    load_profile,
    profile_dirs,
)
from probes.catalog.model import (
    LEVELS,
    MAX_STACK_BYTES,
    STACK_TYPES,
    Capture,
    DerivedFeature,
    LibrarySpec,
    ProbeSpec,
    Profile,
)
from probes.catalog.parser import parse_profile

__all__ = [
    "BUILTIN_DIR",
    "LEVELS",
    "MAX_EXPR_CHARS",
    "MAX_STACK_BYTES",
    "STACK_TYPES",
    "USER_PROFILE_DIR",
    "Capture",
    "DerivedFeature",
    "LibrarySpec",
    "ProbeSpec",
    "Profile",
    "available_profiles",
    "feature_names",
    "load_profile",
    "parse_profile",
    "profile_dirs",
]
