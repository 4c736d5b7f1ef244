"""Adaptive inference: the model pauses only where it asks to (CYB "recipe 2", spec ``docs/method.md`` §5).

Design notes: docs/internals.md, section `cyb_lightning/generation.py`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from cyb_lightning.data.batch import LaidOutBatch
from cyb_lightning.losses import functional as LF
from cyb_lightning.model.spec import Decoder

POLICIES = ("threshold", "sample", "greedy", "fixed", "none")
DEFAULT_POLICY = "threshold"  # the trained rule (spec §5); ``greedy`` is not


@dataclass(frozen=True)
class PausePolicy:
    """When to feed another pause. ``threshold`` is τ for the ``threshold`` policy."""

    kind: str = DEFAULT_POLICY
    threshold: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in POLICIES:
            raise ValueError(f"unknown pause policy {self.kind!r}; choose one of {', '.join(POLICIES)}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold is a probability of DK, in [0, 1]; got {self.threshold}")

    def pause(self, logits: Tensor, dk_id: int, dk_bias: float, generator: torch.Generator | None) -> Tensor:
        """Bool ``[B]`` from the step's logits ``[B, V]``: feed another pause?"""
        z = logits.float()
        log_d = LF.dk_log_prob(z, dk_id, dk_bias)
        if self.kind == "greedy":
            rest = torch.cat((z[:, :dk_id], z[:, dk_id + 1 :]), -1)
            return z[:, dk_id] + dk_bias > rest.amax(-1)
        if self.kind == "threshold":
            return LF.keeps_pausing(log_d, self.threshold)
        if self.kind == "sample":
            u = torch.rand(z.shape[0], generator=generator, device=z.device if generator is None else "cpu")
            return u.to(z.device).log() < log_d
        return torch.full_like(log_d, self.kind == "fixed", dtype=torch.bool)


@dataclass(frozen=True)
class Sampling:
    """How the answer is drawn from the output without DK. ``temperature`` 0: argmax."""

    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"need temperature >= 0, top_k >= 0, 0 < top_p <= 1; got {self}")

    def draw(self, logits: Tensor, dk_id: int, generator: torch.Generator | None) -> Tensor:
        """``[B, V]`` → ``[B]`` token ids, never DK."""
        z = logits.float().clone()
        z[:, dk_id] = -math.inf
        if self.temperature == 0:
            return z.argmax(-1)
        z = z / self.temperature
        if self.top_k:
            kth = z.topk(min(self.top_k, z.shape[-1]), -1).values[:, -1:]
            z = z.masked_fill(z < kth, -math.inf)
        if self.top_p < 1.0:
            sorted_z, order = z.sort(-1, descending=True)
            probs = sorted_z.softmax(-1)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop = probs.cumsum(-1) - probs >= self.top_p
            z = z.scatter(-1, order, sorted_z.masked_fill(drop, -math.inf))
        probs = z.softmax(-1)
        return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@dataclass
class Trace:
    """What one run did, per real token (every row, every position): ``steps`` = 1 + pauses spent."""

    tokens: Tensor  # [B, n + new]: the real tokens (prompt or text, then generated)
    steps: Tensor  # [B, T]: forward steps spent on real token t (1 … W)
    nll: Tensor  # [B, T]: −log p(next token | not DK) at the answering step (the drawn one when generating)
    correct: Tensor  # [B, T] bool: the answering step's argmax over non-DK ids is the next token
    forward_calls: int = 0  # decoder calls (batched): rows run in lockstep, so a batch computes calls × B steps


class AdaptiveRunner:
    """Runs a decoder over real tokens, pausing by ``policy`` (see the module docstring).

    Args:
        decoder: a :class:`~cyb_lightning.model.gpt.GPT` or :class:`~cyb_lightning.model.hf.HFCausalLM`
            (``new_cache`` + ``forward(..., cache, key_mask)``).
        dk_id, pause_ids: the output DK id and the K pause input ids ``P1..PK``.
        dk_bias: the DK logit prior of the loss the model was trained with (``loss.dk_bias(V)``).
        use_cache: False recomputes the whole sequence for every step (the reference; batch size 1 only).
        any_rank: ``bool → bool``, whether any process still has a row pausing (a sharded decoder's ranks
            must make the same decoder calls); None: this process alone decides.
    """

    def __init__(
        self,
        decoder,
        dk_id: int,
        pause_ids: Sequence[int],
        pad_id: int = 0,
        dk_bias: float = 0.0,
        policy: PausePolicy | None = None,
        sampling: Sampling | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        any_rank=None,
    ) -> None:
        if use_cache and not isinstance(decoder, Decoder):
            raise ValueError(
                f"{type(decoder).__name__} has no KV cache (new_cache()); adaptive generation with a cache needs "
                "cyb_lightning.model.GPT or HFCausalLM; use_cache=False recomputes the sequence with any decoder (slow)"
            )
        self.decoder = decoder
        self.dk_id, self.pad_id, self.dk_bias = dk_id, pad_id, dk_bias
        self.pause_ids = tuple(pause_ids)
        self.policy = policy or PausePolicy()
        self.sampling = sampling or Sampling()
        self.use_cache = use_cache
        self.generator = generator
        self.any_rank = any_rank

    @property
    def max_pauses(self) -> int:
        return 0 if self.policy.kind == "none" else len(self.pause_ids)

    @torch.no_grad()
    def run(
        self,
        tokens: Tensor,
        length: int,
        forced: int | None = None,
        stop_ids: Iterable[int] = (),
        may_pause: Tensor | None = None,
        positions: Tensor | None = None,
    ) -> Trace:
        """Real tokens ``tokens [B, n]`` → a trace over ``length`` real tokens.

        The next real token after position t is ``tokens[:, t + 1]`` while t + 1 < ``forced`` (default n),
        otherwise drawn from the model; generation stops early when every row has drawn a ``stop_ids`` id.
        ``may_pause [B, length]`` bool: the tokens the model may pause after (None: every one).
        ``positions [B, length]``: the position index of each token (and of its pauses), as its layout gave
        it (``pause_groups`` shares a token's position with the pauses inside the text); None: t.
        """
        B, n = tokens.shape
        forced = n if forced is None else forced
        device = tokens.device
        if not self.use_cache and B != 1:
            raise ValueError("use_cache=False (full recomputation, the reference) runs one row at a time")
        cache = self.decoder.new_cache() if self.use_cache else None
        history: list[tuple[Tensor, Tensor]] = []
        out = torch.cat((tokens, torch.full((B, max(0, length + 1 - n)), self.pad_id, device=device)), 1)
        steps = torch.zeros(B, length, dtype=torch.long, device=device)
        nll = torch.zeros(B, length, dtype=torch.float64, device=device)
        correct = torch.zeros(B, length, dtype=torch.bool, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        stop_ids = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
        calls = 0

        def feed(ids: Tensor, t: int, visible: Tensor) -> Tensor:
            nonlocal calls
            calls += 1
            if positions is None:
                pos = torch.full((B, 1), t, dtype=torch.long, device=device)
            else:
                pos = positions[:, t : t + 1].to(device)
            if cache is not None:
                mask = None if bool(visible.all()) else visible[:, None]
                return self.decoder(ids[:, None], pos, cache=cache, key_mask=mask)[:, -1]
            history.append((ids[:, None], pos))
            all_ids, all_pos = (torch.cat(x, 1) for x in zip(*history))
            return self.decoder(all_ids, all_pos)[:, -1]

        for t in range(length):
            logits = feed(out[:, t], t, torch.ones(B, dtype=torch.bool, device=device))
            answer = torch.empty_like(logits)
            active = torch.ones(B, dtype=torch.bool, device=device)
            allowed = active if may_pause is None else may_pause[:, t].to(device)
            for i in range(self.max_pauses + 1):
                if i == self.max_pauses:
                    pause = torch.zeros_like(active)
                else:
                    pause = self.policy.pause(logits, self.dk_id, self.dk_bias, self.generator) & allowed
                answering = active & ~pause
                answer[answering] = logits[answering]
                steps[answering, t] = i + 1
                active &= pause
                if i == self.max_pauses:  # the K-th pause was the last on every rank
                    break
                pausing = bool(active.any())
                if not (pausing if self.any_rank is None else self.any_rank(pausing)):
                    break
                ids = torch.where(active, self.pause_ids[i], self.pad_id)
                logits = feed(ids, t, active)
            if t + 1 < forced:
                nxt = out[:, t + 1]
            else:
                nxt = self.sampling.draw(answer, self.dk_id, self.generator)
                nxt = torch.where(done, self.pad_id, nxt)
                out[:, t + 1] = nxt
                done |= torch.isin(nxt, stop_ids)
            nll[:, t] = answer_nll(answer, nxt, self.dk_id)
            correct[:, t] = Sampling(0.0).draw(answer, self.dk_id, None) == nxt
            if t + 1 >= forced and bool(done.all()):
                length = t + 1
                break
        return Trace(
            tokens=out[:, : length + 1],
            steps=steps[:, :length],
            nll=nll[:, :length],
            correct=correct[:, :length],
            forward_calls=calls,
        )

    def generate(
        self, prompt: Sequence[int], max_new_tokens: int, stop_ids: Iterable[int] = (), answers_only: bool = False
    ) -> Trace:
        """One prompt (a list of real token ids) → prompt + up to ``max_new_tokens`` new tokens.

        ``answers_only`` (a model of the ``answer_pauses`` layout): pauses only before the tokens the model
        produces, none within the prompt.
        """
        if len(prompt) < 1:
            raise ValueError("the prompt needs at least one token (e.g. the end-of-text id)")
        device = next(self.decoder.parameters()).device
        tokens = torch.tensor([list(prompt)], dtype=torch.long, device=device)
        length = len(prompt) - 1 + max_new_tokens
        may_pause = None
        if answers_only:
            may_pause = (torch.arange(length, device=device) >= len(prompt) - 1)[None]
        return self.run(tokens, length, stop_ids=stop_ids, may_pause=may_pause)


def answer_nll(logits: Tensor, targets: Tensor, dk_id: int) -> Tensor:
    """−log t = −log p(y | not DK) ``[B]`` in float64."""
    lse_rest, z_y, _ = LF.step_logit_stats(logits.double()[:, None], targets, dk_id)
    return (lse_rest - z_y)[:, 0]


@torch.no_grad()
def adaptive_evaluate(
    runner: AdaptiveRunner,
    batches: Iterable[dict[str, Tensor]],
    max_batches: int | None = None,
    progress: Callable[[str], None] | None = None,
    every_s: float = 10.0,
):
    """Teacher-forced adaptive evaluation over laid-out batches (any layout: only their real tokens are read,
    and where the layout lets a token pause, :attr:`LaidOutBatch.pause_slots`).

    Returns a dict (:func:`~cyb_lightning.metrics.adaptive.readout_summary`): ``ppl`` and ``accuracy`` at the
    answering step, ``steps_per_token`` actually spent per token (1 … W), ``batch_steps_per_token`` (what a
    batch really computes per token: its rows run in lockstep, so a row that has answered waits while another
    pauses), ``fixed_steps`` (W, what fixed-K pausing spends), ``compute_saved`` = 1 − steps/W, ``p_pauses``
    (share of tokens with 0 … K pauses), ``tokens``, and, when the batches carry a per-target ``difficulty``
    (the synthetic tasks), ``by_difficulty``: {level: {tokens, accuracy, steps_per_token, p_pauses}} over the
    levels ≥ 0 and ``spearman`` (difficulty vs pauses taken). ``progress`` (e.g. ``print``) hears how far it
    got every ``every_s`` seconds: a long evaluation on a loaded machine is never silent.
    """
    from cyb_lightning.metrics.adaptive import AdaptiveReadout, readout_summary

    metric = AdaptiveReadout(len(runner.pause_ids) + 1)
    started = last = time.monotonic()
    for b, batch in enumerate(batches):
        if max_batches is not None and b >= max_batches:
            break
        read_batch(runner, LaidOutBatch.of(batch), metric)
        if progress is not None and time.monotonic() - last >= every_s:
            last = time.monotonic()
            total = "" if max_batches is None else f" of {max_batches}"
            progress(
                f"  {runner.policy.kind}: {b + 1}{total} batches, {int(metric.count)} tokens, {last - started:.0f} s"
            )
    return {"policy": runner.policy.kind, **readout_summary(metric.compute())}


def read_batch(runner: AdaptiveRunner, batch: LaidOutBatch, metric) -> Trace:
    """The adaptive reader, teacher-forced on one laid-out batch, into an ``AdaptiveReadout``; returns the trace
    (validation does exactly this on each of its batches, ``CYBModule._evaluation_step``)."""
    device = next(runner.decoder.parameters()).device
    real, mask = batch.real_tokens().to(device), batch.target_mask.to(device)
    trace = runner.run(
        real, real.shape[1] - 1, may_pause=batch.pause_slots.to(device), positions=batch.first_positions.to(device)
    )
    difficulty = None if batch.difficulty_grid is None else batch.difficulty_grid.to(device)
    metric.to(device).update(trace.steps, trace.correct, trace.nll, mask, difficulty, trace.forward_calls)
    return trace


def runner_for(module, policy: PausePolicy, sampling: Sampling | None = None, pause_ids=None, **kw) -> AdaptiveRunner:
    """An :class:`AdaptiveRunner` for a trained ``CYBModule`` (its DK id, prior and K)."""
    hp = module.hparams
    k = hp.steps_per_token - 1
    if pause_ids is None:
        from cyb_lightning.data.tokenizer import standard_vocab

        pause_ids = hp.get("pause_ids") or standard_vocab().pause_ids  # the run's own (linked from its data)
    pause_ids = tuple(pause_ids)[:k]  # W = 1 layouts (tbys_random, tbys_finetune…) insert pauses, none per token
    bias = module.loss_fn.dk_bias(hp.vocab_size) if module.loss_fn.uses_dk else 0.0
    if not module.loss_fn.uses_dk and policy.kind not in ("fixed", "none"):
        policy = PausePolicy("fixed")  # a model without DK never asks: it gets what it was trained with
    return AdaptiveRunner(module.decoder, hp.dk_id, pause_ids, dk_bias=bias, policy=policy, sampling=sampling, **kw)
