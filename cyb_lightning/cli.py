"""``python -m cyb_lightning {fit,validate,test,predict} --config conf/<name>.yaml`` (LightningCLI).

The data module decides the vocabulary (reserved ids included) and the layout's steps per token; the
CLI links those into the model, so a config never states them twice. A pretrained model's tokenizer
(``HFTokenizer``) that adds new pause ids adds exactly ``data.num_pauses`` of them (plus one DK id).
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path

from jsonargparse import ArgumentError
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from cyb_lightning.callbacks.final_checkpoint import FinalCheckpoint
from cyb_lightning.callbacks.skipped_data import SkippedDataReport
from cyb_lightning.checkpoint import AtomicCheckpointIO
from cyb_lightning.datamodule import CYBDataModule
from cyb_lightning.module import CYBModule
from cyb_lightning.resume import load_metadata, pick_checkpoint, resolved_differences

LIGHTNING_CKPT_KEYWORDS = ("best", "last", "hpc", "registry")
CONF = Path(__file__).resolve().parent.parent / "conf"  # the shipped configs (a source checkout)


class ConfigError(SystemExit):
    """A setting that cannot work, said in one message on stderr (no traceback, no usage dump): the exit of
    ``python -m cyb_lightning`` for a bad config. Exit status 1; ``message`` holds the text."""

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(f"error: {message}")


class CYBLightningCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        for name in ("vocab_size", "dk_id", "steps_per_token", "pause_ids", "reserved_ids", "pause_filler_ids"):
            parser.link_arguments(f"data.{name}", f"model.{name}", apply_on="instantiate")
        parser.link_arguments("data.seq_len", "model.seq_len")
        # K, stated once: an HFTokenizer that adds pause ids adds the K the run uses (ignored when repurposing).
        parser.link_arguments("data.num_pauses", "data.tokenizer.init_args.num_pauses")

    def _parse_ckpt_path(self) -> None:
        """Resolve an automatic resume with our picker, then merge the checkpoint's model settings, saying
        which of this run's settings differ (Lightning merges silently, and only for single files)."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        ckpt_path = config.get("ckpt_path")
        if subcommand == "fit" and (ckpt_path == "last" or (ckpt_path is None and SLURMEnvironment.detect())):
            # "last", and Lightning's own resume under SLURM (the newest hpc_ckpt_<n>.ckpt, unchecked).
            run_dir = config.trainer.get("default_root_dir") or os.getcwd()
            picked = pick_checkpoint(run_dir)
            rank_zero_info(f"automatic resume in {run_dir}: {picked or 'no checkpoint, a fresh start'}")
            ckpt_path = config["ckpt_path"] = None if picked is None else str(picked)
        if not ckpt_path or ckpt_path in LIGHTNING_CKPT_KEYWORDS or not Path(ckpt_path).exists():
            return  # Lightning resolves its keywords (and reports a missing path) itself
        meta = load_metadata(ckpt_path)
        model, data = config.get("model"), config.get("data")
        lines = resolved_differences(
            ckpt_path, model.as_dict() if model is not None else {}, data.as_dict() if data is not None else {}, meta
        )
        if lines:
            rank_zero_warn("\n".join(lines))
        hparams = dict(meta.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:  # Lightning's own format for a subclass-mode model
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

    def before_instantiate_classes(self) -> None:
        """One model path: an HF tokenizer whose ``name_or_path`` is unset reads the HF decoder's model."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        tokenizer, decoder = config.get("data.tokenizer"), config.get("model.decoder")
        if not tokenizer or not decoder or not str(decoder.get("class_path", "")).endswith("HFDecoder"):
            return
        if tokenizer.get("init_args") is not None and tokenizer.init_args.get("name_or_path") is None:
            for key in ("name_or_path", "gguf_file", "revision"):
                if tokenizer.init_args.get(key) is None:
                    tokenizer.init_args[key] = decoder.init_args.get(key)

    def instantiate_classes(self) -> None:
        # Our classes check their settings when built and say what is wrong and how to fix it: that message is
        # the whole answer a user needs, not a traceback through jsonargparse.
        try:
            super().instantiate_classes()
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(str(e)) from None

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        # Checkpoint files written atomically in their own folder (see cyb_lightning.checkpoint); a custom
        # checkpoint IO from the config is left alone.
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def before_fit(self) -> None:
        self._fit_started = (time.time(), cpu_time(), machine_busy())

    def after_fit(self) -> None:
        text = summary(self.trainer)  # trainer.log_dir is a broadcast: every rank must take part
        if self.trainer.is_global_zero:
            wall, cpu, busy = getattr(self, "_fit_started", (time.time(), cpu_time(), machine_busy()))
            # A resumed fit starts at its checkpoint's step (restored inside fit, after before_fit).
            first = load_metadata(self.trainer.ckpt_path).get("global_step", 0) if self.trainer.ckpt_path else 0
            now = machine_busy()
            others = None if now is None or busy is None else now - busy
            print(text + "\n" + pace(time.time() - wall, cpu_time() - cpu, self.trainer.global_step - first, others))


def cpu_time() -> float:
    """CPU seconds used by this process and its child processes (the DataLoader workers that make the batches
    on other cores): finished children from ``os.times``, running ones from ``/proc`` where there is one."""
    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    for children in Path("/proc/self/task").glob("*/children"):
        for pid in children.read_text().split():
            try:  # utime and stime: fields 14 and 15, after the parenthesised command name
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except (OSError, IndexError, ValueError):  # the child ended meanwhile
                pass
    return total


def machine_busy() -> float | None:
    """CPU seconds the whole machine has been busy since boot (every core; time the hypervisor took counts as
    busy): ``/proc/stat``, or None where there is none."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def pace(seconds: float, cpu_seconds: float, steps: int, busy_seconds: float | None) -> str:
    """How long the fit took, its steps per second, and whether other work shared the CPU meanwhile: the CPU
    time the machine was busy (``busy_seconds``, :func:`machine_busy`) beyond what this process and its
    DataLoader workers used (``cpu_seconds``, :func:`cpu_time`), in cores over the fit's wall time."""
    line = f"fit: {steps} steps in {seconds:.0f} s ({steps / max(seconds, 1e-9):.1f} steps/s)"
    others = None if busy_seconds is None else (busy_seconds - cpu_seconds) / max(seconds, 1e-9)
    if others is not None and others > 0.3:
        line += (
            f"; the machine was loaded (other processes kept about {others:.1f} of its {os.cpu_count()} cores busy "
            "meanwhile), so this is slower than on an idle machine"
        )
    return line


def summary(trainer) -> str:
    """A few lines for the terminal: where the logs are, what the adaptive reader did (the model a user
    deploys), and the pause distribution of the full layout."""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    lines = [f"logs and checkpoints: {trainer.log_dir}", f"  tensorboard --logdir {trainer.log_dir}"]
    if "val/adaptive/accuracy" in metrics:
        lines.append(
            f"adaptive reader (validation; each token gets only the pauses it asks for, d < 0.5 answers): accuracy "
            f"{100 * metrics['val/adaptive/accuracy']:.1f} %, perplexity {metrics['val/adaptive/ppl']:.2f}, "
            f"{metrics['val/adaptive/steps_per_token']:.2f} forward steps per token"
        )
    levels = sorted(
        {int(k.split("/")[3]) for k in metrics if k.startswith("val/adaptive/difficulty/") and k.count("/") == 4}
    )
    if levels:  # data that labels the difficulty of its targets (the synthetic tasks)
        lines += [
            "per difficulty level:            adaptive reader         full layout (every token keeps its pauses)",
            "  level   accuracy   pauses taken   accuracy   expected pauses",
        ]
        for k in levels:
            a, f = f"val/adaptive/difficulty/{k}/", f"val/full_layout/difficulty/{k}/"
            lines.append(
                f"  {k:5d}   {100 * metrics[a + 'accuracy']:7.1f} %   {metrics[a + 'steps_per_token'] - 1:12.2f}"
                f"   {100 * metrics.get(f + 'accuracy', float('nan')):7.1f} %   "
                f"{metrics.get(f + 'extra_pauses', float('nan')):15.2f}"
            )
        if "val/adaptive/difficulty/spearman_pauses" in metrics:
            lines.append(
                f"Spearman(difficulty, pauses taken) = {metrics['val/adaptive/difficulty/spearman_pauses']:.2f}; "
                "histograms per level: val/adaptive/pauses_by_difficulty/<level>"
            )
    if "val/ppl" in metrics:
        lines.append(f"full layout: perplexity of the step mixture {metrics['val/ppl']:.2f}")
    p_stop = [metrics[k] for k in sorted(m for m in metrics if m.startswith("val/p_stop/step"))]
    if p_stop:
        dist = " / ".join(f"{p:.2f}" for p in p_stop)
        lines.append(
            f"  P(0..{len(p_stop) - 1} extra pauses) = {dist}; mean {metrics['val/extra_pauses']:.2f} per token"
        )
    return "\n".join(lines)


def main(args: list[str] | None = None) -> CYBLightningCLI:
    try:
        return _cli(args)
    except ArgumentError as e:  # a value the parser refuses: its message, not a 75-line usage dump first
        first, _, rest = str(e).partition("\n")
        hint = missing_fragment_hint(str(e), sys.argv[1:] if args is None else args)
        raise ConfigError(
            first + ("\n" + rest if rest else "") + (f"\n{hint}" if hint else "") + "\n(`python -m cyb_lightning "
            "fit --help` lists every setting; `--print_config` shows the resolved config)"
        ) from None


def missing_fragment_hint(message: str, args: list[str]) -> str | None:
    """Where a config fragment (``trainer: trainer/gpu.yaml``) was looked for and how to mend it: jsonargparse
    reads a fragment relative to the folder of the config that names it, so a config copied out of ``conf/``
    loses its fragments."""
    found = re.search(r"Unable to load config ['\"]([^'\"]+)['\"]", message)
    if not found:
        return None
    fragment = found.group(1)
    configs = [Path(args[i + 1]) for i, a in enumerate(args[:-1]) if a == "--config"]
    configs += [Path(a.split("=", 1)[1]) for a in args if a.startswith("--config=")]
    naming = [c for c in configs if c.is_file() and fragment in c.read_text()]
    where = (
        f"looked for it beside {naming[0]}, in {naming[0].resolve().parent / fragment}"
        if naming
        else "a fragment is read relative to the folder of the config that names it"
    )
    shipped = CONF / fragment
    mend = (
        f"copy {shipped} there too, or write its full path"
        if shipped.is_file()
        else "write its path relative to that config's folder"
    )
    return f"the config fragment '{fragment}' was not found: {where}; {mend}."


def _cli(args: list[str] | None) -> CYBLightningCLI:
    return CYBLightningCLI(
        CYBModule,
        CYBDataModule,
        args=args,
        seed_everything_default=1234,
        parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False},
        # A requeued or restarted job writes its config again: overwriting it must not fail the run.
        save_config_kwargs={"overwrite": True},
        # Whatever the config: the end of fit is checkpointed even off the checkpoint interval, and what the
        # data pipeline skipped is logged.
        trainer_defaults={"callbacks": [FinalCheckpoint(), SkippedDataReport()]},
    )
