"""The LightningModule: decoder on the laid-out batch → ``[B, T, W, V]`` → a pluggable pause loss.

Batch contract (from ``cyb_lightning.data.layout``): ``input_ids``/``position_ids`` ``[B, L]``,
``targets``/``target_mask`` ``[B, T]``, ``L = T·W``; the W outputs of group t all predict ``targets[t]``.

Reduction follows torchtitan: each rank sums its per-token losses and divides by the *global* number of
real tokens (times the world size, which the data-parallel gradient average divides out again), so every
real token weighs the same whatever the split of tokens between ranks.
"""

from __future__ import annotations

import math
import warnings

import lightning as L
import torch
from torch import Tensor
from torchmetrics import MeanMetric

from cyb_lightning.losses import PauseLoss
from cyb_lightning.metrics import StoppingStats, step_statistics
from cyb_lightning.metrics.stopping import TokenStats
from cyb_lightning.model import DecoderSpec


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
        max_position = getattr(decoder, "max_position", None)
        if max_position is not None and seq_len > max_position:
            raise ValueError(
                f"data.seq_len={seq_len} real tokens needs position indices up to {seq_len - 1}, but "
                f"model.decoder.max_position={max_position}; raise max_position or lower seq_len"
            )
        self.decoder_spec = decoder
        self.loss_fn = loss
        self.decoder: torch.nn.Module | None = None
        self.val_stats = StoppingStats(steps_per_token)
        self.val_loss = MeanMetric()

    # -- model ---------------------------------------------------------------------------------
    def configure_model(self) -> None:
        # Called by the trainer under the strategy's init context (meta device under FSDP2); idempotent.
        if self.decoder is None:
            self.decoder = self.decoder_spec.build(self.hparams.vocab_size)

    def forward(self, input_ids: Tensor, position_ids: Tensor) -> Tensor:
        return self.decoder(input_ids, position_ids)

    def grouped_logits(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """Logits of the real tokens that count, ``[N, W, V]``, and their targets ``[N]``."""
        logits = self(batch["input_ids"], batch["position_ids"])
        B, T = batch["targets"].shape
        logits = logits.view(B, T, -1, logits.shape[-1])
        mask = batch["target_mask"]
        return logits[mask], batch["targets"][mask]

    # -- steps ---------------------------------------------------------------------------------
    def reduce_tokens(self, per_token: Tensor) -> Tensor:
        """Σ local losses · world / global token count: the global token mean once DDP averages gradients."""
        world = self._trainer.world_size if self._trainer is not None else 1
        n = torch.tensor(float(per_token.numel()), device=per_token.device)
        if world > 1:
            n = self.trainer.strategy.reduce(n, reduce_op="sum")
        return per_token.sum() * world / n.clamp_min(1)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor | TokenStats]:
        logits, targets = self.grouped_logits(batch)
        loss = self.reduce_tokens(self.loss_fn(logits, targets, self.hparams.dk_id))
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)
        out: dict[str, Tensor | TokenStats] = {"loss": loss}
        if self._logging_step():
            stats = step_statistics(logits.detach(), targets, self.hparams.dk_id, self.loss_fn)
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

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, TokenStats]:
        logits, targets = self.grouped_logits(batch)
        per_token = self.loss_fn(logits, targets, self.hparams.dk_id)
        stats = step_statistics(logits, targets, self.hparams.dk_id, self.loss_fn)
        self.val_stats.update(stats)
        self.val_loss.update(per_token)  # a torchmetrics mean: exact token weighting across batches and ranks
        self.log("val/loss", self.val_loss)
        return {"stats": stats}

    def on_validation_epoch_end(self) -> None:
        result = self.val_stats.compute()
        self.val_stats.reset()
        self.log("val/ppl", result["ppl"].float(), prog_bar=True, sync_dist=False)
        self.log("val/extra_pauses", result["extra_pauses"].float(), sync_dist=False)
        for i in range(self.hparams.steps_per_token):
            self.log(f"val/p_stop/step{i + 1}", result["p_stop"][i].float(), sync_dist=False)
            if self.loss_fn.uses_dk:
                self.log(f"val/dk_rate/step{i + 1}", result["dk_rate"][i].float(), sync_dist=False)

    # -- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        decay_steps = hp.decay_steps or self.trainer.max_steps
        if decay_steps is None or decay_steps <= 0:
            raise ValueError(
                "the LR schedule needs an explicit length: set trainer.max_steps (or model.decay_steps)"
            )
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": hp.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, hp.warmup_steps, decay_steps, hp.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
