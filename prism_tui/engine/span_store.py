"""The recent spans kept for trace export, in fixed columns rather than objects.

A ring of the last ``capacity`` spans in two typed arrays (``array.array``), one row a
span: probe and argument layout as small interned ids in one, pid, tid, start, end and
the argument values (a fixed number of 64-bit slots) in the other. Nothing per span is
a Python object: the deque of 200,000 flat tuples it replaced held ~70 MiB of tuples and
the integers in them (``tracemalloc`` on a soak run), and the cyclic GC has nothing here
to walk.
"""

from __future__ import annotations

import struct
from array import array
from collections.abc import Iterable, Mapping, Sequence
from types import MappingProxyType

from prism_tui.engine.iterations import SpanLike
from probes.pairing import ArgValue, Span

_FLOAT = struct.Struct("<d")
_INT = struct.Struct("<q")
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_NO_ARGS: Mapping[str, ArgValue] = MappingProxyType({})
FIXED = 4
"""Leading 64-bit fields of a row: pid, tid, start, end; the argument slots follow."""

_Layout = tuple[tuple[str, bool], ...]
"""The arguments of a span: (name, stored as a float) in order."""


class SpanStore:
    """The last ``capacity`` spans, oldest overwritten first, read back as spans.

    Argument values keep their type (int or float); an int outside 64 bits, which no
    register or stack capture produces, comes back as the nearest float.
    """

    def __init__(self, capacity: int) -> None:
        """An empty store for ``capacity`` spans (the arrays grow to it as spans come;
        0: keep none)."""
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.capacity = capacity
        self._ids = array("H")  # probe, layout
        self._rows = array("q")  # pid, tid, start, end, slots...
        self._slots = 0
        self._held = 0
        self._next = 0  # the row the next span overwrites once full
        self._probe_ids: dict[str, int] = {}
        self._probes: list[str] = []
        self._int_layouts: dict[tuple[str, ...], int] = {}
        self._any_layouts: dict[_Layout, int] = {}
        self._layouts: list[_Layout] = [()]  # 0: no arguments

    def __len__(self) -> int:
        """Spans held."""
        return self._held

    def extend(self, spans: Iterable[SpanLike]) -> None:
        """Keep ``spans`` (in order), overwriting the oldest once full.

        One pass builds both arrays' rows for the batch, then they go in as at most
        two slice assignments each: about as fast as the tuples this replaced.
        """
        if not self.capacity:
            return
        batch = spans if isinstance(spans, Sequence) else list(spans)
        if len(batch) > self.capacity:
            batch = batch[-self.capacity:]
        if not batch:
            return
        try:
            ids, rows = self._encode(batch, exact=False)
        except (TypeError, OverflowError):  # a float or a wide int: typed one by one
            ids, rows = self._encode(batch, exact=True)
        n = len(batch)
        grow = min(self.capacity - self._held, n)
        at = 0 if grow else self._next
        _put(self._ids, ids, 2, grow, at, self.capacity)
        _put(self._rows, rows, FIXED + self._slots, grow, at, self.capacity)
        self._held += grow
        if n > grow:
            self._next = (at + n - grow) % self.capacity

    def recent(self, horizon_ns: int) -> list[SpanLike]:
        """The spans that ended at or after ``horizon_ns``, oldest first."""
        n, width, rows = self._held, FIXED + self._slots, self._rows
        order = range(n) if n < self.capacity else ((self._next + k) % n for k in range(n))
        out: list[SpanLike] = []
        for i in order:
            base = i * width
            if rows[base + 3] < horizon_ns:
                continue
            out.append(Span(self._probes[self._ids[2 * i]], rows[base], rows[base + 1],
                            rows[base + 2], rows[base + 3],
                            self._args(self._ids[2 * i + 1], base + FIXED)))
        return out

    # ------------------------------------------------------------------ parts

    def _encode(self, batch: Sequence[SpanLike], *, exact: bool
                ) -> tuple[array[int], array[int]]:
        """The batch's id pairs and rows as arrays. Not ``exact``: every value is
        taken as a 64-bit int (the array raises if one is not); ``exact``: each value
        is typed, floats and wide ints stored as float bits."""
        probe_ids, int_layouts = self._probe_ids, self._int_layouts
        pad = (0,) * self._slots
        probes: list[int] = []
        layouts: list[int] = []
        rows: list[ArgValue] = []
        add_probe, add_layout, add_row = probes.append, layouts.append, rows.extend
        for s in batch:
            probe = probe_ids.get(s.probe)
            add_probe(self._probe_id(s.probe) if probe is None else probe)
            args = s.args
            if not args:
                add_layout(0)
                add_row((s.pid, s.tid, s.start_ns, s.end_ns, *pad))
                continue
            names = tuple(args)
            if len(names) > self._slots:  # rare: every row widens, then the batch again
                self._widen(len(names))
                return self._encode(batch, exact=exact)
            if exact:
                layout, vals = self._typed(names, tuple(args.values()))
            else:
                layout = int_layouts.get(names) or self._int_layout(names)
                vals = args.values()  # type: ignore[assignment]
            add_layout(layout)
            add_row((s.pid, s.tid, s.start_ns, s.end_ns, *vals, *pad[len(names):]))
        ids = array("H", bytes(4 * len(probes)))
        ids[0::2] = array("H", probes)
        ids[1::2] = array("H", layouts)
        return ids, array("q", rows)  # type: ignore[arg-type]

    def _typed(self, names: tuple[str, ...], vals: tuple[ArgValue, ...]
               ) -> tuple[int, tuple[int, ...]]:
        shape = tuple((name, type(v) is float or not INT64_MIN <= v <= INT64_MAX)
                      for name, v in zip(names, vals, strict=True))
        layout = self._any_layouts.get(shape)
        if layout is None:
            layout = self._any_layouts[shape] = self._new_layout(shape)
        return layout, tuple(_float_bits(v) if is_float else int(v)
                             for v, (_, is_float) in zip(vals, shape, strict=True))

    def _int_layout(self, names: tuple[str, ...]) -> int:
        layout = self._int_layouts[names] = self._new_layout(
            tuple((name, False) for name in names))
        return layout

    def _new_layout(self, shape: _Layout) -> int:
        if len(self._layouts) > 0xFFFF:
            raise ValueError("more than 65,536 argument layouts")
        self._layouts.append(shape)
        return len(self._layouts) - 1

    def _probe_id(self, name: str) -> int:
        if len(self._probes) > 0xFFFF:
            raise ValueError("more than 65,536 probe names")
        probe = self._probe_ids[name] = len(self._probes)
        self._probes.append(name)
        return probe

    def _widen(self, slots: int) -> None:
        """Give every row ``slots`` argument slots (a span with more arguments came)."""
        old, before, after = self._rows, FIXED + self._slots, FIXED + slots
        wide = array("q", bytes(8 * after * self._held))
        for i in range(self._held):
            wide[i * after:i * after + before] = old[i * before:(i + 1) * before]
        self._rows, self._slots = wide, slots

    def _args(self, layout_id: int, at: int) -> Mapping[str, ArgValue]:
        layout = self._layouts[layout_id]
        if not layout:
            return _NO_ARGS
        rows = self._rows
        return MappingProxyType({
            name: _FLOAT.unpack(_INT.pack(rows[at + k]))[0] if is_float else rows[at + k]
            for k, (name, is_float) in enumerate(layout)})


def _put(column: array[int], items: array[int], width: int, grow: int, at: int,
         capacity: int) -> None:
    """Write a batch's rows (``width`` items each): the first ``grow`` appended, the
    rest over the oldest from row ``at``, wrapping at ``capacity``."""
    if grow:
        column.extend(items[:grow * width] if grow * width < len(items) else items)
    if grow * width >= len(items):
        return
    rest = items[grow * width:]
    first = min(len(rest), (capacity - at) * width)
    column[at * width:at * width + first] = rest[:first]
    if len(rest) > first:
        column[0:len(rest) - first] = rest[first:]


def _float_bits(value: ArgValue) -> int:
    """A float (or an int beyond 64 bits, as the nearest float) as its IEEE bits."""
    return int(_INT.unpack(_FLOAT.pack(float(value)))[0])
