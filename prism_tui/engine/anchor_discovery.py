"""Anchor discovery: the spans of a profile that names no anchor, held until one is chosen.

A named anchor that never fires is treated the same way (:class:`AnchorSilence`): an
engine of another version may step through another function (llama.cpp's server
decodes through ``llama_process``, never ``llama_decode``), and the monitor would
otherwise show nothing and say nothing.

A profile may also name several anchors, alternatives for versions or builds of an
engine that step through different functions (``llama_decode`` in llama-cpp-python's
server, ``llama_process`` in llama-server): the spans are held the same way and the
first of them to fire is taken at once; only if none has fired after ``candidates_s``
are the spans ranked, and one of the alternatives firing later still wins over a ranked
choice not made yet.

The monitor holds every span here (no iterations, no verdicts) and, every
``DISCOVERY_CHECK_S``, asks :func:`~prism_tui.engine.anchors.choose_anchor` (the pure
choice) for a probe; once one qualifies the held spans go to the engine cut at it, so
none is lost. Past ``discovery_s`` without one, one notice says why, and only the last
``discovery_s`` of spans are kept: a server idle at attach time gets its anchor once it
serves.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from prism_tui.engine.anchors import AnchorChoice, choose_anchor
from probes.uprobes import Span

DISCOVERY_CHECK_S = 0.5
"""How often the spans held while no anchor is known are ranked."""


class AnchorDiscovery:
    """Spans held while no anchor is known, and the choice once made."""

    def __init__(self, profile_name: str, discovery_s: float, *,
                 notice: Callable[[str], None], candidates: Sequence[str] = (),
                 candidates_s: float = 0.0) -> None:
        """``discovery_s``: how long before the notice that none qualifies yet, and how
        much of the spans is kept after it. ``candidates``: the profile's alternative
        anchors, the first to fire taken; ranking starts ``candidates_s`` after
        :meth:`start` if none has."""
        self.profile_name = profile_name
        self.discovery_s = discovery_s
        self.candidates = tuple(candidates)
        self.candidates_s = candidates_s
        self._notice = notice
        self.held: list[Span] = []
        self.choice: AnchorChoice | None = None
        """The anchor ranked from the spans, with its cycle and reason (None: not yet,
        or one of the candidates fired)."""
        self.chosen: str | None = None
        """The anchor probe, a candidate that fired or the ranked choice (None: not yet)."""
        self._fired: Span | None = None  # the candidates' span that ended first
        self._deadline: float | None = None
        self._rank_from = 0.0
        self._said_none_fired = not self.candidates
        self._next_check = 0.0

    def start(self, now: float, why: str | None = None) -> None:
        """Begin the discovery phase (the loop starts at monotonic ``now``); ``why`` is
        the notice (default: the profile names no anchor; none while candidates may
        still fire)."""
        self._rank_from = now + (self.candidates_s if self.candidates else 0.0)
        self._deadline = self._rank_from + self.discovery_s
        self._next_check = now + DISCOVERY_CHECK_S
        if why is not None or not self.candidates:
            self._notice(why or f"profile {self.profile_name!r} names no iteration anchor: "
                         "choosing one from its spans")

    def hold(self, spans: Sequence[Span]) -> None:
        """Keep ``spans`` until an anchor is chosen."""
        self.held.extend(spans)
        candidates = self.candidates
        if candidates:
            for s in spans:
                if s.probe in candidates and (
                        self._fired is None or s.end_ns < self._fired.end_ns):
                    self._fired = s

    def check(self, now: float) -> list[Span] | None:
        """Take a candidate that fired, else rank the held spans when a check is due;
        the spans to feed (and :attr:`chosen` set) once an anchor is known, else None."""
        if self._fired is not None:
            held, self.held = self.held, []
            self.chosen = probe = self._fired.probe
            others = ", ".join(c for c in self.candidates if c != probe)
            self._notice(f"iteration anchor: {probe}, the first of profile "
                         f"{self.profile_name!r}'s anchors to fire (not {others})")
            return held
        if now < self._next_check:
            return None
        self._next_check = now + DISCOVERY_CHECK_S
        held = self.held
        if now < self._rank_from:
            return None
        if not self._said_none_fired:
            self._said_none_fired = True
            self._notice(f"none of profile {self.profile_name!r}'s iteration anchors "
                         f"({', '.join(self.candidates)}) fired in {self.candidates_s:g} s "
                         f"({len(held)} spans of its other probes): choosing one from the "
                         "spans")
        choice = choose_anchor(held)
        if choice is None:
            if self._deadline is not None and now >= self._deadline:
                self._deadline = None  # say it once
                self._notice(
                    f"no iteration anchor after {self.discovery_s:g} s: no probe of "
                    f"{self.profile_name!r} recurred regularly every >= 1 ms in "
                    f"{len(held)} spans; still looking (or name one with the profile's "
                    "anchor)")
            if self._deadline is None and held:
                horizon = max(s.end_ns for s in held) - int(self.discovery_s * 1e9)
                held[:] = [s for s in held if s.end_ns >= horizon]
            return None
        self.choice, self.chosen, self.held = choice, choice.probe, []
        self._notice(f"iteration anchor: {choice.probe}, chosen from {len(held)} "
                     f"spans: {choice.reason}")
        return held


class AnchorSilence:
    """Whether a named anchor stays silent while the profile's other probes fire.

    :meth:`saw` is called with each batch of spans until the anchor fires once (then it
    is one attribute test); :meth:`silent` says, once, when ``after_s`` went by from
    :meth:`start` with at least ``min_spans`` other spans and no anchor.
    """

    def __init__(self, anchor: str, after_s: float, min_spans: int = 100) -> None:
        self.anchor = anchor
        self.after_s = after_s
        self.min_spans = min_spans
        self.fired = False
        """The anchor fired at least once (or silence was already reported)."""
        self.others = 0
        """Spans of other probes seen while the anchor had not fired."""
        self._since: float | None = None

    def start(self, now: float) -> None:
        """Begin timing the silence at monotonic ``now`` (the loop's start)."""
        self._since = now

    def saw(self, spans: Sequence[Span]) -> None:
        """Count a batch of spans; one of the anchor ends the watch for silence."""
        anchor = self.anchor
        if any(s.probe == anchor for s in spans):
            self.fired = True
        else:
            self.others += len(spans)

    def silent(self, now: float) -> bool:
        """True once: the anchor never fired over ``after_s`` s of ``min_spans`` others."""
        if (self.fired or self._since is None or now - self._since < self.after_s
                or self.others < self.min_spans):
            return False
        self.fired = True  # say it once
        return True
