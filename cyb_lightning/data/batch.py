"""A collated batch of laid-out examples, and the one gather from the laid-out sequence onto groups.

Every layout (``data/layout.py``) yields ``input_ids``/``position_ids`` ``[B, L]`` and ``targets``/
``target_mask`` ``[B, T]``; the variable-pause layout adds ``step_index``/``step_mask`` ``[B, T, W]``
(where step i of group t sits in the packed sequence; which steps the world granted), the synthetic
tasks ``difficulty`` ``[B, T]``. :class:`LaidOutBatch` takes that dict once and answers what the model,
the metrics and generation ask, in the order of the counted groups (``target_mask`` True, row-major):
the outputs of each group's W steps (:meth:`LaidOutBatch.groups`), their targets, granted steps, inputs
and difficulty. The model, the metrics, ``report`` and generation read batches only through it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property

import torch
from torch import Tensor


@dataclass
class LaidOutBatch:
    input_ids: Tensor  # [B, L] long
    position_ids: Tensor  # [B, L] long
    target_grid: Tensor  # [B, T] long: the target of every group
    target_mask: Tensor  # [B, T] bool: groups that count
    step_index: Tensor | None = None  # [B, T, W] long (variable pauses): packed position of each step
    step_mask_grid: Tensor | None = None  # [B, T, W] bool (variable pauses): steps the world granted
    difficulty_grid: Tensor | None = None  # [B, T] long (synthetic tasks): difficulty of each target

    @classmethod
    def of(cls, batch: dict[str, Tensor] | LaidOutBatch) -> LaidOutBatch:
        if isinstance(batch, LaidOutBatch):
            return batch
        out = cls(
            batch["input_ids"],
            batch["position_ids"],
            batch["targets"],
            batch["target_mask"].bool(),
            batch.get("step_index"),
            batch.get("step_mask"),
            batch.get("difficulty"),
        )
        return out._trimmed()

    def _trimmed(self) -> LaidOutBatch:
        """Without the trailing input columns no group reads. The packed layouts (``variable``,
        ``answer_pauses``) pad every row to T·W; under causal attention the outputs of the columns kept do
        not depend on those dropped, so the numbers are the same (``answer_pauses`` on one-problem rows:
        T + K columns instead of T·W)."""
        if self.step_index is None:
            return self
        used = int(self.step_index.max()) + 1
        if used >= self.input_ids.shape[1]:
            return self
        return replace(self, input_ids=self.input_ids[:, :used], position_ids=self.position_ids[:, :used])

    @property
    def shape(self) -> tuple[int, int]:
        """(B, T): rows and groups per row."""
        return tuple(self.target_grid.shape)

    def groups(self, x: Tensor) -> Tensor:
        """Per-position values ``[B, L, ...]`` (hidden states, logits) → the counted groups' ``[N, W, ...]``."""
        B, T = self.shape
        if self.step_index is not None:  # variable pauses: packed groups, gathered onto the [T, W] grid
            index = self.step_index.reshape(B, -1, *([1] * (x.dim() - 2)))
            x = x.gather(1, index.expand(-1, -1, *x.shape[2:]))
        return x.reshape(B, T, -1, *x.shape[2:])[self.target_mask]

    @cached_property
    def targets(self) -> Tensor:
        """``[N]``: the next real token of every counted group."""
        return self.target_grid[self.target_mask]

    @cached_property
    def step_mask(self) -> Tensor | None:
        """``[N, W]`` granted steps of every counted group (variable pauses), else None (all W granted)."""
        return None if self.step_mask_grid is None else self.step_mask_grid[self.target_mask].bool()

    @cached_property
    def difficulty(self) -> Tensor | None:
        """``[N]`` difficulty of every counted target (synthetic tasks), else None."""
        return None if self.difficulty_grid is None else self.difficulty_grid[self.target_mask]

    def first_steps(self, x: Tensor) -> Tensor:
        """Per-position values ``[B, L]`` → ``[B, T]``: those of every group's first step (its real input)."""
        B, T = self.shape
        if self.step_index is not None:
            return x.gather(1, self.step_index[:, :, 0])
        return x.view(B, T, -1)[:, :, 0]

    @cached_property
    def first_inputs(self) -> Tensor:
        """``[B, T]``: the real input token x_t of every group (the group's first step)."""
        return self.first_steps(self.input_ids)

    @cached_property
    def first_positions(self) -> Tensor:
        """``[B, T]``: the position index of every group's real input (its pauses share it)."""
        return self.first_steps(self.position_ids)

    @property
    def group_inputs(self) -> Tensor:
        """``[N]``: the real input token x_t of every counted group (what the model pauses after)."""
        return self.first_inputs[self.target_mask]

    @property
    def pause_slots(self) -> Tensor:
        """``[B, T]`` bool: the real tokens the layout lets pause (a group of more than one step). Evaluation
        batches: every token of ``cyb`` (and ``variable``, evaluated as ``cyb``), the scored ones of
        ``answer_pauses``, none of a layout without per-token pauses. The adaptive reader pauses only there."""
        B, T = self.shape
        if self.step_mask_grid is not None:
            return self.step_mask_grid[..., 1:].any(-1)
        return torch.full((B, T), self.input_ids.shape[1] > T, dtype=torch.bool, device=self.input_ids.device)

    def real_tokens(self) -> Tensor:
        """``[B, T + 1]``: each row's real tokens, x_0 … x_T (inputs, then the last target)."""
        return torch.cat((self.first_inputs, self.target_grid[:, -1:]), 1)
