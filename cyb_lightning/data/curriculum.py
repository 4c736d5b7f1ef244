"""A difficulty curriculum: the hardest level the training stream may draw, as a function of the step.

The levels open linearly: at optimizer step s the stream draws rows of level ≤ ``start + ⌊(top − start + 1)
· s / ramp_steps⌋`` (capped at the source's top level), so every level is open from ``ramp_steps`` on.
The stream applies it to sources with one problem per row (:attr:`SyntheticSource.one_example_per_document`)
by skipping rows above the cap, in order: row i of the stream goes to a batch whose step is a function of
i alone (``stream.PackedStream.step_of``), so which rows are skipped — and so the data — is the same
whatever the workers, and a resumed run draws exactly the rows an uninterrupted one does. Among the rows
kept, the levels stay as the source draws them (uniform over the open levels for :class:`DigitSum`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Curriculum:
    """``start``: the hardest level open at step 0; ``ramp_steps``: the step from which every level is open."""

    start: int = 1
    ramp_steps: int = 1000

    def __post_init__(self) -> None:
        if self.start < 0 or self.ramp_steps < 1:
            raise ValueError(f"curriculum needs start >= 0 and ramp_steps >= 1, got {self.start}, {self.ramp_steps}")

    def level_cap(self, step: int, top: int) -> int:
        """The hardest level open at optimizer step ``step`` when the source's hardest is ``top``."""
        return min(top, self.start + (top - self.start + 1) * step // self.ramp_steps)
