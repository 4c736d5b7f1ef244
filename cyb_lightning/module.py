"""The LightningModule: the decoder on a laid-out batch, a pluggable pause loss, its metrics.

One path for training, validation, test and ``report``: the decoder runs the output head inside its
``forward`` through :func:`~cyb_lightning.losses.head.head_loss` on the counted groups
(:class:`~cyb_lightning.data.batch.LaidOutBatch`), which returns the loss and the per-step statistics
every metric reads (:func:`~cyb_lightning.metrics.head_statistics`). ``loss_chunk_size`` only changes how
many logit rows are live at once (0: all, the plain loss on full logits); the numbers are the same.

Reduction follows torchtitan: each rank sums its per-token losses and divides by the *global* number of
real tokens (times the world size, which the data-parallel gradient average divides out again), so every
real token weighs the same whatever the split of tokens between ranks.
"""

from __future__ import annotations

import math
import warnings

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torchmetrics import MeanMetric

from cyb_lightning.data.batch import LaidOutBatch
from cyb_lightning.generation import PausePolicy, Sampling, read_batch, runner_for
from cyb_lightning.losses import PauseLoss
from cyb_lightning.losses.head import HeadLoss, OutputHead, head_loss
from cyb_lightning.metrics import (
    CalibrationSpearman,
    DifficultyStats,
    ReadoutAccuracy,
    StoppingStats,
    head_statistics,
)
from cyb_lightning.metrics.adaptive import AdaptiveReadout
from cyb_lightning.metrics.stopping import TokenStats
from cyb_lightning.model import DecoderSpec
from cyb_lightning.model.init_from import (
    TRAINED_ROWS,
    decoder_state_dict,
    filler_rows,
    read_checkpoint,
    redraw_rows,
    set_decoder_state_dict,
    trained_rows_of,
)
from cyb_lightning.model.spec import missing_methods


def warmup_cosine(step: int, warmup_steps: int, decay_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1, cosine down to ``min_ratio`` at ``decay_steps``, then flat."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class CYBModule(L.LightningModule):
    """Decoder + pause loss.

    Args:
        decoder: the decoder spec (``class_path``), built in ``configure_model``.
        loss: the pause loss (``class_path``): CrossEntropy, TBYSPerToken, CYBAP, CYBVA, CYBDP.
        lr, weight_decay, betas: AdamW; weight decay applies to matrices only.
        warmup_steps, min_lr_ratio: linear warm-up, then cosine decay to ``min_lr_ratio``·lr (CYB: 1 %).
        decay_steps: where the cosine ends; defaults to ``trainer.max_steps``, which must then be set.
        vocab_size, dk_id, steps_per_token, seq_len: filled in from the data module by the CLI.
        pause_ids: the pause ids the layout inserts; reserved_ids: DK and every pause id of the vocabulary
            (both from the data module, by the CLI). ``init_from`` draws the reserved rows that the
            checkpoint's runs never trained afresh.
        activation_checkpointing: recompute each transformer block in the backward pass (any strategy).
        loss_chunk_size: logit rows live at once in the loss (``losses.head.head_loss``, inside the decoder's
            forward, so under FSDP2 too): None picks ``auto_chunk_size`` (never ``[N·W, V]`` logits); 0 puts
            every row in one chunk (the plain loss on full logits). The numbers are the same either way.
        chunked_loss: read from configs and checkpoints of earlier versions, which had a second, plain loss
            path and read ``loss_chunk_size: 0`` as automatic: with it set, ``true`` keeps their chunk size (0 →
            automatic) and ``false`` means ``loss_chunk_size: 0`` (the same numbers). Leave it unset.
        init_from: a checkpoint of one of our own runs (a Lightning ``.ckpt`` file or a distributed
            checkpoint folder) whose decoder weights initialise this run's decoder before fitting, e.g. a
            ``baseline.yaml`` run fine-tuned with a CYB or TBYS config. Loaded at ``on_fit_start``, after the
            strategy has built (and sharded) the model; never when resuming (``ckpt_path``), whose weights win.
            DK and pause rows that checkpoint's runs never trained are drawn afresh from the statistics of
            the embedding (``model/init_from.py``: in pretraining they collapse onto one direction).
        pause_filler_ids: from the data module (``data.pause_fillers``): pause ``i``'s input row starts as a
            copy of row ``pause_filler_ids[i]`` instead of a draw, for the pause rows a pretrained model
            never read (rows the HF backend adds, untrained rows at ``init_from``). Empty: drawn.
        adaptive_eval_batches: validation and test batches also read by the adaptive reader (the trained rule,
            teacher-forced: each token gets only the pauses it asks for, and the rest of the compute is
            skipped), logged as ``<stage>/adaptive/*``: the model a user deploys. None: every batch; 0: off.
            It costs up to W decoder calls per real token (a KV cache; a tiny model's validation barely
            notices, a long-context one may want a few batches).

    Evaluation logs two readers. ``<stage>/adaptive/*``: the adaptive reader (accuracy, perplexity, forward
    steps per token, per difficulty level). ``<stage>/full_layout/*``: the trained rule read on the
    training layout, where every earlier token keeps its K pauses — an upper bound that credits the
    model with context adaptive inference never creates. ``<stage>/ppl`` and the latency distribution
    (``p_stop``, ``extra_pauses``) are the step mixture s on the full layout, as the CYB paper reports them.
    """

    def __init__(
        self,
        decoder: DecoderSpec,
        loss: PauseLoss,
        lr: float = 3e-4,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.95),
        warmup_steps: int = 100,
        decay_steps: int | None = None,
        min_lr_ratio: float = 0.01,
        vocab_size: int = 0,
        dk_id: int = -1,
        steps_per_token: int = 1,
        seq_len: int = 0,
        activation_checkpointing: bool = False,
        init_from: str | None = None,
        loss_chunk_size: int | None = None,
        chunked_loss: bool | None = None,
        pause_ids: tuple[int, ...] = (),
        reserved_ids: tuple[int, ...] = (),
        pause_filler_ids: tuple[int, ...] = (),
        adaptive_eval_batches: int | None = None,
    ) -> None:
        super().__init__()
        with warnings.catch_warnings():
            # The loss holds no parameters, so it is *not* in the state dict: hparams is how it is restored.
            warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`.*")
            self.save_hyperparameters()
        if vocab_size < 2 or dk_id < 0 or dk_id >= vocab_size:
            raise ValueError(
                f"vocab_size={vocab_size}, dk_id={dk_id}: these come from the data module; run through "
                "`python -m cyb_lightning` (which links data.vocab_size/dk_id into the model) or pass them"
            )
        loss.check_steps(steps_per_token)
        if chunked_loss is not None:  # an earlier version's config: there 0 meant automatic, false full logits
            loss_chunk_size = (loss_chunk_size or None) if chunked_loss else 0
            self.hparams.loss_chunk_size = loss_chunk_size
        if adaptive_eval_batches is not None and adaptive_eval_batches < 0:
            raise ValueError(
                f"adaptive_eval_batches must be >= 0 (0: off) or None (every batch), got {adaptive_eval_batches}"
            )
        if loss_chunk_size is not None and loss_chunk_size < 0:
            raise ValueError(f"loss_chunk_size must be >= 0 (0: one chunk, None: automatic), got {loss_chunk_size}")
        max_position = decoder.max_position
        if max_position is not None and seq_len > max_position:
            raise ValueError(
                f"data.seq_len={seq_len} real tokens needs position indices up to {seq_len - 1}, but "
                f"model.decoder.max_position={max_position}; raise max_position or lower seq_len"
            )
        self.decoder_spec = decoder
        self.loss_fn = loss
        self.decoder: torch.nn.Module | None = None
        self._init_from_done = False
        # Reserved rows this run trains (pause inputs, DK when the loss reads it), plus those of the runs
        # its weights came from; saved in every checkpoint for a later ``init_from``.
        self.trained_rows = set(pause_ids) | ({dk_id} if loss.uses_dk else set())
        self.val_stats = StoppingStats(steps_per_token)
        self.val_loss = MeanMetric()
        self.val_accuracy = ReadoutAccuracy(steps_per_token)
        self.test_stats = StoppingStats(steps_per_token)
        self.test_loss = MeanMetric()
        self.test_accuracy = ReadoutAccuracy(steps_per_token)
        # Per difficulty level, for data that labels its targets (the synthetic tasks); idle otherwise.
        self.val_difficulty = DifficultyStats(steps_per_token)
        self.test_difficulty = DifficultyStats(steps_per_token)
        self.val_adaptive = AdaptiveReadout(steps_per_token)
        self.test_adaptive = AdaptiveReadout(steps_per_token)
        calibrated = loss.uses_dk and steps_per_token > 1
        self.val_calibration = CalibrationSpearman(steps_per_token) if calibrated else None
        self.test_calibration = CalibrationSpearman(steps_per_token) if calibrated else None

    # -- model ---------------------------------------------------------------------------------
    def configure_model(self) -> None:
        # Called by the trainer under the strategy's init context; idempotent. Under FSDP2 (a device mesh
        # from ModelParallelStrategy) every rank builds the full decoder (same seed → same weights as one
        # process), then ``parallelize`` shards it per block + root with bf16 params / fp32 reduction.
        if self.decoder is None:
            self.decoder = self.decoder_spec.build(self.hparams.vocab_size)
            missing = missing_methods(self.decoder)
            if missing:
                raise TypeError(
                    f"{type(self.decoder).__name__}, built by {type(self.decoder_spec).__name__}, is not a "
                    f"Decoder (cyb_lightning/model/spec.py): it lacks {', '.join(missing)}"
                )
            if self.hparams.get("pause_filler_ids"):  # before sharding; a resumed checkpoint overwrites it
                state = filler_rows(
                    self.decoder, self.decoder.state_dict(), self.hparams.pause_ids, self.hparams.pause_filler_ids
                )
                set_decoder_state_dict(self.decoder, state)
            self._parallelize()

    def _parallelize(self) -> None:
        from cyb_lightning.parallel import parallelize

        trainer = self._trainer
        parallelize(
            self.decoder,
            self.decoder_spec.block_types(),
            device_mesh=self._device_mesh,
            precision=str(trainer.precision) if trainer is not None else None,
            activation_checkpointing=self.hparams.get("activation_checkpointing", False),
        )

    def on_fit_start(self) -> None:
        if self.hparams.get("init_from") and not self._init_from_done and not self.trainer.ckpt_path:
            self.load_decoder_weights(self.hparams.init_from)
        self._init_from_done = True

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Resuming (or load_from_checkpoint): the checkpoint's own weights win over ``init_from``.
        self._init_from_done = True
        self.trained_rows |= trained_rows_of(checkpoint)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[TRAINED_ROWS] = sorted(self.trained_rows)

    def load_decoder_weights(self, path: str) -> None:
        """Copy the decoder weights of one of our checkpoints into ``self.decoder`` (sharded or not); the
        DK and pause rows that checkpoint never trained are drawn afresh (see ``model/init_from.py``)."""
        checkpoint = read_checkpoint(path)
        trained = trained_rows_of(checkpoint)
        reserved = {self.hparams.dk_id} | set(self.hparams.pause_ids) | set(self.hparams.reserved_ids)
        untrained = reserved - trained
        state = redraw_rows(self.decoder, decoder_state_dict(checkpoint, path), untrained, reserved)
        fillers = self.hparams.get("pause_filler_ids") or ()
        if fillers:  # untrained pause rows start as their fillers instead
            pairs = [(p, f) for p, f in zip(self.hparams.pause_ids, fillers) if p in untrained]
            state = filler_rows(self.decoder, state, [p for p, _ in pairs], [f for _, f in pairs])
        set_decoder_state_dict(self.decoder, state)
        self.trained_rows |= trained
        rank_zero_info(f"init_from: decoder weights loaded from {path}; rows {sorted(untrained)} drawn afresh")

    def forward(self, input_ids: Tensor, position_ids: Tensor) -> Tensor:
        """Logits ``[B, L, V]`` (generation, tests); training and evaluation go through :meth:`head_outputs`."""
        return self.decoder(input_ids, position_ids)

    def head_outputs(self, batch: LaidOutBatch, with_argmax: bool) -> HeadLoss:
        """The loss and per-step statistics of the counted groups, computed by the decoder's own forward:
        its final hidden states, gathered onto the groups, meet its output head chunk by chunk."""

        def head_fn(hidden: Tensor, head: OutputHead) -> HeadLoss:
            return head_loss(
                batch.groups(hidden),
                head,
                batch.targets,
                self.loss_fn,
                self.hparams.dk_id,
                chunk_size=self.hparams.get("loss_chunk_size"),
                step_mask=batch.step_mask,
                with_argmax=with_argmax,
            )

        return self.decoder(batch.input_ids, batch.position_ids, head_fn=head_fn)

    def statistics(self, out: HeadLoss, batch: LaidOutBatch) -> TokenStats:
        stats = head_statistics(
            out.lse_rest, out.z_y, out.z_dk, out.best_id, batch.targets, self.loss_fn, out.vocab_size, batch.step_mask
        )
        stats.inputs = batch.group_inputs
        return stats

    # -- steps ---------------------------------------------------------------------------------
    def reduce_tokens(self, total: Tensor, count: int) -> Tensor:
        """Σ local losses · world / global token count: the global token mean once DDP averages gradients."""
        world = self._trainer.world_size if self._trainer is not None else 1
        n = torch.tensor(float(count), device=total.device)
        if world > 1:
            n = self.trainer.strategy.reduce(n, reduce_op="sum")
        return total * world / n.clamp_min(1)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor | TokenStats]:
        batch = LaidOutBatch.of(batch)
        logging = self._logging_step()
        head = self.head_outputs(batch, with_argmax=logging)
        loss = self.reduce_tokens(head.total, head.per_token.numel())
        stats = self.statistics(head, batch) if logging else None
        out: dict[str, Tensor | TokenStats] = {"loss": loss}
        if stats is not None:  # Lightning writes step metrics every log_every_n_steps; logging costs ms per call
            self.log("train/loss", loss, prog_bar=True, sync_dist=True)
            out["stats"] = stats
            self.log("train/ppl", stats.nll.mean().exp(), sync_dist=True)
            self.log("train/extra_pauses", stats.extra_pauses.mean(), sync_dist=True)
            if stats.log_d is not None:
                for i, rate in enumerate(stats.log_d.exp().mean(0)):
                    self.log(f"train/dk_rate/step{i + 1}", rate, sync_dist=True)
        return out

    def _logging_step(self) -> bool:
        every = self._trainer.log_every_n_steps if self._trainer is not None else 1
        return every > 0 and self.global_step % every == 0

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor | TokenStats]:
        return self._evaluation_step("val", batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self._evaluation_epoch_end("val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor | TokenStats]:
        return self._evaluation_step("test", batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        self._evaluation_epoch_end("test")

    def evaluation_outputs(self, batch: dict[str, Tensor] | LaidOutBatch) -> tuple[Tensor, TokenStats]:
        """Per-token loss ``[N]`` and statistics of a batch, as validation computes them (reports reuse it)."""
        batch = LaidOutBatch.of(batch)
        out = self.head_outputs(batch, with_argmax=True)
        return out.per_token, self.statistics(out, batch)

    def _evaluation_step(self, stage: str, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor | TokenStats]:
        batch = LaidOutBatch.of(batch)
        per_token, stats = self.evaluation_outputs(batch)
        getattr(self, f"{stage}_stats").update(stats)
        getattr(self, f"{stage}_accuracy").update(stats)
        calibration = getattr(self, f"{stage}_calibration")
        if calibration is not None:
            calibration.update(stats)
        loss_metric = getattr(self, f"{stage}_loss")
        loss_metric.update(per_token)  # a torchmetrics mean: exact token weighting across batches and ranks
        self.log(f"{stage}/loss", loss_metric)
        out: dict[str, Tensor | TokenStats] = {"stats": stats}
        if batch.difficulty is not None:
            getattr(self, f"{stage}_difficulty").update(stats, batch.difficulty)
            out["difficulty"] = batch.difficulty
        limit = self.hparams.get("adaptive_eval_batches")
        if limit is None or batch_idx < limit:  # the same batches on every rank (they run as many)
            trace = read_batch(self.adaptive_reader(), batch, getattr(self, f"{stage}_adaptive"))
            out["adaptive_steps"] = trace.steps[batch.target_mask]
        return out

    def adaptive_reader(self, policy: str = "threshold"):
        """The reader that really skips compute (``generation.AdaptiveRunner``) over this model: the trained
        rule by default; under several processes the ranks agree on when every row has answered."""
        any_rank = None
        if self._trainer is not None and self.trainer.world_size > 1:
            any_rank = lambda pausing: self.trainer.strategy.reduce_boolean_decision(pausing, all=False)
        return runner_for(self, PausePolicy(policy), Sampling(0.0), any_rank=any_rank)

    def _evaluation_epoch_end(self, stage: str) -> None:
        """Log the reduced metrics (torchmetrics syncs across ranks in ``compute``; no second sync here)."""
        stats, accuracy = getattr(self, f"{stage}_stats"), getattr(self, f"{stage}_accuracy")
        result, acc = stats.compute(), accuracy.compute()
        stats.reset()
        accuracy.reset()
        self.log(f"{stage}/ppl", result["ppl"].float(), prog_bar=True, sync_dist=False)
        self.log(f"{stage}/extra_pauses", result["extra_pauses"].float(), sync_dist=False)
        self.log(f"{stage}/full_layout/accuracy", acc["accuracy"].float(), sync_dist=False)
        self.log(f"{stage}/full_layout/sampled_accuracy", acc["sampled_accuracy"].float(), sync_dist=False)
        self.log(f"{stage}/full_layout/readout_steps", acc["readout_steps"].float(), sync_dist=False)
        self._log_adaptive(stage)
        # reshape: with W = 1 the per-step states come back 0-dim from the metric
        p_stop, dk_rate = result["p_stop"].reshape(-1), result["dk_rate"].reshape(-1)
        for i in range(self.hparams.steps_per_token):
            self.log(f"{stage}/p_stop/step{i + 1}", p_stop[i].float(), sync_dist=False)
            if self.loss_fn.uses_dk:
                self.log(f"{stage}/dk_rate/step{i + 1}", dk_rate[i].float(), sync_dist=False)
        self._log_difficulty(stage)
        calibration = getattr(self, f"{stage}_calibration")
        if calibration is not None:
            rho = calibration.compute()
            calibration.reset()
            for i, r in enumerate(rho):
                self.log(f"{stage}/calibration/step{i + 1}", r.float(), sync_dist=False)

    def _log_difficulty(self, stage: str) -> None:
        """``<stage>/full_layout/difficulty/<level>/*`` and the Spearman of expected pauses vs difficulty
        (synthetic tasks)."""
        metric = getattr(self, f"{stage}_difficulty")
        if metric.update_count == 0:  # the data labels no difficulty (every rank reads the same data kind)
            return
        result = metric.compute()
        metric.reset()
        for level in torch.nonzero(result["tokens"] > 0).flatten().tolist():
            for key in ("accuracy", "sampled_accuracy", "last_step_accuracy", "extra_pauses", "readout_steps"):
                self.log(f"{stage}/full_layout/difficulty/{level}/{key}", result[key][level].float(), sync_dist=False)
        if not torch.isnan(result["spearman"]):
            self.log(f"{stage}/full_layout/difficulty/spearman_pauses", result["spearman"].float(), sync_dist=False)

    def _log_adaptive(self, stage: str) -> None:
        """``<stage>/adaptive/*``: what the adaptive reader did, overall and per difficulty level."""
        metric = getattr(self, f"{stage}_adaptive")
        if metric.update_count == 0:
            return
        result = metric.compute()
        metric.reset()
        for key in ("accuracy", "ppl", "steps_per_token", "batch_steps_per_token"):
            self.log(f"{stage}/adaptive/{key}", result[key].float(), sync_dist=False)
        for level in torch.nonzero(result["level_tokens"] > 0).flatten().tolist():
            self.log(
                f"{stage}/adaptive/difficulty/{level}/accuracy",
                result["level_accuracy"][level].float(),
                sync_dist=False,
            )
            self.log(
                f"{stage}/adaptive/difficulty/{level}/steps_per_token",
                result["level_steps"][level].float(),
                sync_dist=False,
            )
        if not torch.isnan(result["spearman"]):
            self.log(f"{stage}/adaptive/difficulty/spearman_pauses", result["spearman"].float(), sync_dist=False)

    # -- optimisation ------------------------------------------------------------------------
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip by the global norm through one DTensor-aware path under every strategy; logs ``train/grad_norm``.

        ``cyb_lightning.parallel.clip_grad_norm_`` reduces the norm of FSDP2's sharded gradients to a full
        tensor explicitly, instead of depending on how a given torch version's ``clip_grad_norm_`` treats
        DTensors (Lightning's default path calls that through its precision plugin).
        """
        if not gradient_clip_val or gradient_clip_algorithm not in (None, "norm"):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        from cyb_lightning.parallel import clip_grad_norm_

        params = [p for group in optimizer.param_groups for p in group["params"]]
        norm = clip_grad_norm_(params, float(gradient_clip_val))
        if self._logging_step():
            self.log("train/grad_norm", norm, on_step=True, on_epoch=False)

    def configure_optimizers(self):
        hp = self.hparams
        decay_steps = hp.decay_steps or self.trainer.max_steps
        if decay_steps is None or decay_steps <= 0:
            raise ValueError("the LR schedule needs an explicit length: set trainer.max_steps (or model.decay_steps)")
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": hp.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), foreach=_foreach(params))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, hp.warmup_steps, decay_steps, hp.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def _foreach(params: list[Tensor]) -> bool | None:
    """AdamW's multi-tensor path for plain CPU tensors too (torch picks it by itself only on accelerators):
    one kernel per step and state, not one per parameter. None (torch's choice) for sharded DTensors."""
    return True if params and all(type(p) is torch.nn.Parameter and p.device.type == "cpu" for p in params) else None
