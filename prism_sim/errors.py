"""Typed errors of the simulator (one base per package, docs/architecture.md §Rules 4).

``exit_code`` follows the CLI's convention (docs/architecture.md §Command line): 2 for
bad input, 1 for anything else, so ``prism sim`` prints one clear line instead of a traceback.
"""

from __future__ import annotations

EXIT_USAGE = 2
EXIT_OTHER = 1


class SimError(Exception):
    """Base of every error raised by :mod:`prism_sim`; ``exit_code`` is for the CLI."""

    exit_code: int = EXIT_OTHER


class SimDeviceError(SimError):
    """The fake accelerator runtime failed: a CUDA/NCCL-shaped call returned an error
    (a collective whose peer died or timed out, a bad argument), or the runtime library
    is missing or stale.

    ``code`` is the CUDA (``cudaError_t``) or NCCL (``ncclResult_t``) result, 0 when the
    error did not come from a call; ``call`` names the function.
    """

    def __init__(self, message: str, *, code: int = 0, call: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.call = call


class ScenarioError(SimError):
    """A scenario file is invalid; the message reads ``file: key: reason``."""

    exit_code = EXIT_USAGE
