"""Whether a scheduler's writes into the param groups undo the hyper-steps.

A scheduler stepped every step writes a value that moves by a shift ``Δ`` (in ``φ``'s units:
log, or logit for a fraction) from one step to the next.  On the step after a hyper-step moved
a value from ``a`` to ``b``, a chainable scheduler (StepLR, ExponentialLR, CosineAnnealingLR)
writes about ``b + Δ`` — it scales what it finds, so the move stays — and an absolute one
(OneCycleLR, CyclicLR, LambdaLR) about ``a + Δ``, its own value, which undoes it.  ``Δ`` is
the schedule's own shift, extrapolated from the two steps before; it is known only from steps
without a hyper-step, so with ``update_interval=1`` nothing is judged.  A write much nearer one
of the two (four times) decides; one in between, or a schedule that turns as fast as the move,
decides nothing; no write at all means the move stayed.

:class:`WriteWatch` keeps that evidence per learned value, says which values :data:`UNDONE`
hyper-steps in a row were undone, and while every one is, which hyper-steps to skip: all but
probes after 2, 4, 8, ... skipped ones (up to 64), which see whether the writes still undo
them.
"""

from __future__ import annotations

from ._learned import LearnedValue, to_unconstrained

__all__ = ["PROBE_AFTER", "PROBE_MAX", "UNDONE", "WriteWatch"]

Key = tuple[int, str]
"""A learned value: (param group index, name)."""

UNDONE = 3
"""Hyper-steps in a row undone by a write on the next step after which a learned value counts
as overridden by an absolute schedule."""

PROBE_AFTER, PROBE_MAX = 2, 64
"""While every learned value is overridden, a hyper-step is taken after ``PROBE_AFTER``
skipped ones, then after twice as many each time, up to ``PROBE_MAX``."""


def _unconstrained(value: float, lv: LearnedValue) -> float:
    lo, hi = lv.bounds
    return to_unconstrained(min(max(value, lo), hi), lv.fraction)


class WriteWatch:
    """The evidence, per learned value, that writes from outside undo the hyper-steps."""

    def __init__(self) -> None:
        self.reset()
        self.warned: set[Key] = set()  # said once per value, for the optimizer's life

    def reset(self) -> None:
        """Forget what the writes looked like (a state dict was loaded)."""
        # the shown value before and after the last hyper-step that moved it, until the next step
        self._moved: dict[Key, tuple[float, float]] = {}
        self._undone: dict[Key, int] = {}  # hyper-steps in a row the next write undid
        self._shift: dict[Key, tuple[float, float]] = {}  # the schedule's last two shifts
        self._wrote: set[Key] = set()  # written from outside at least once
        self._skipped, self._next_probe = 0, PROBE_AFTER

    def moved(self, key: Key, before: float, after: float) -> None:
        """A hyper-step moved ``key``'s shown value."""
        self._moved[key] = (before, after)

    def judge(self, key: Key, lv: LearnedValue, value: float | None) -> None:
        """The write ``value`` (``None``: none) to ``key`` at the start of a step."""
        move = self._moved.pop(key, None)
        written = None if value is None else _unconstrained(value, lv)
        if written is not None:
            self._wrote.add(key)
        if move is None:  # no hyper-step just before: the schedule's own shift
            if written is not None:
                self._note_shift(key, written - _unconstrained(lv.shown, lv))
            elif key in self._wrote:  # it wrote before and stands still now
                self._note_shift(key, 0.0)
            else:  # nothing written yet: its shift is not known
                self._shift.pop(key, None)
            return
        if written is None:  # the move stayed
            self._undone[key] = 0
            self._note_shift(key, 0.0)
            return
        a, b = (_unconstrained(x, lv) for x in move)
        known = self._shift.pop(key, None)
        if known is None:  # no step without a move told the shift (update_interval=1)
            return
        before, last = known
        shift = 2 * last - before  # the schedule's shift on this step, extrapolated
        off_a, off_b = abs(written - a - shift), abs(written - b - shift)
        if abs(last - before) * 2 > abs(b - a):  # the schedule turns as fast as the move:
            return  # the extrapolation cannot tell them apart
        if off_a * 4 < off_b:  # undone: the schedule went on from a
            self._undone[key] = self._undone.get(key, 0) + 1
            self._note_shift(key, written - a)
        elif off_b * 4 < off_a:  # kept: the schedule went on from b
            self._undone[key] = 0
            self._note_shift(key, written - b)

    def _note_shift(self, key: Key, shift: float) -> None:
        """The schedule's shift on this step (the first one known after an unknown one stands
        for the one before it too)."""
        last = self._shift.get(key, (shift, shift))[1]
        self._shift[key] = (last, shift)

    def newly_overridden(self) -> list[Key]:
        """The values whose last :data:`UNDONE` judged hyper-steps were undone and that were
        not named before (each is named once)."""
        keys = [k for k, n in self._undone.items() if n >= UNDONE and k not in self.warned]
        self.warned.update(keys)
        return keys

    def skip(self, keys: list[Key]) -> bool:
        """Whether to skip a due hyper-step: every learned value in ``keys`` is overridden, and
        this is not a probe."""
        if not keys or any(self._undone.get(k, 0) < UNDONE for k in keys):
            self._skipped, self._next_probe = 0, PROBE_AFTER
            return False
        self._skipped += 1
        if self._skipped < self._next_probe:
            return True
        # a probe: the hyper-step is taken, to see whether the writes still undo it (they may
        # have stopped, or a chainable schedule may have looked absolute); the next probe comes
        # twice as many hyper-steps later, so probes cost a logarithmic share
        self._skipped, self._next_probe = 0, min(2 * self._next_probe, PROBE_MAX)
        return False
