"""Which steps of a run save a frame: step 0, every ``save_every`` steps, optionally log-spaced steps, and the
run's last step.

Coarsening is read on log-log axes (L(t) ~ t^alpha over decades), where frames every ``save_every``
steps leave the early decades almost empty: with the papers' ``save_every=250`` the first frame
after the quench is at t = 12.5, and 90 of 101 frames lie in the last decade. ``per_decade = k > 0``
adds the frames at steps round(10^(j/k)), j = 0, 1, 2, ... (1, 2, 3, 6, 10, 18, 32, ... for k = 4):
k per decade from step 1 on. The rule does not depend on the run's length, so a run extended on
resume (a larger ``dynamics.steps``) keeps the frames it already has.

The last step of the run (``final`` = ``dynamics.steps``) is saved too, so the final state is always in the
trajectory: ``steps=210, save_every=20`` saves 0, 20, ..., 200, 210 (not only up to 200), and a
``save_every`` beyond ``steps`` saves step 0 and the last step. A run stopped early (``stop_after_steps``,
Ctrl-C) saves no frame where it stopped, so its resume stays identical to an uninterrupted run; a run
extended on resume keeps the frame of its earlier end, one frame among the others (its step and time are
recorded: the analysis reads the saved times, it assumes no spacing).
"""

from __future__ import annotations

import math


class SaveSchedule:
    """The saved steps of a run (``step in schedule``) and how many fall in a range (disk estimates).

    ``final``: the run's last step (``dynamics.steps``), saved whatever ``save_every``; None: only the rule
    that does not depend on the run's length (the steps every run of any length saves)."""

    def __init__(self, save_every: int, per_decade: int = 0, final: int | None = None):
        self.save_every, self.per_decade = int(save_every), int(per_decade)
        self.final = None if final is None else int(final)
        self._log_steps: set[int] = set()
        self._log_upto = 0  # log-spaced steps are known up to this step

    def _extend(self, upto: int) -> None:
        """Know the log-spaced steps up to ``upto`` (those that are not multiples of ``save_every``)."""
        if upto <= self._log_upto:
            return
        if self.per_decade > 0:
            j_max = math.ceil(self.per_decade * math.log10(max(upto, 1))) + 1
            for j in range(j_max + 1):
                s = round(10 ** (j / self.per_decade))
                if s <= upto and s % self.save_every:
                    self._log_steps.add(s)
        self._log_upto = upto

    def log_steps(self, upto: int) -> set[int]:
        """The log-spaced saved steps <= ``upto`` that are not multiples of ``save_every``."""
        self._extend(upto)
        return {s for s in self._log_steps if s <= upto}

    def __contains__(self, step: int) -> bool:
        if step % self.save_every == 0 or step == self.final:
            return True
        if step > self._log_upto:  # once per doubling of the steps asked about
            self._extend(max(step, 2 * self._log_upto))
        return step in self._log_steps

    def count(self, after: int, upto: int) -> int:
        """Frames saved at steps ``after < s <= upto``."""
        regular = upto // self.save_every - after // self.save_every
        log_steps = self.log_steps(upto)
        last = self.final
        extra = last is not None and after < last <= upto and last % self.save_every != 0 and last not in log_steps
        return regular + sum(1 for s in log_steps if s > after) + int(extra)
