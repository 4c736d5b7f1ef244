"""``python -m cyb_lightning report --ckpt_path RUN/checkpoints/last.ckpt``: one command, every analysis
(``evaluation/report.py`` computes and writes them; this module reads the arguments, the run and its
comparators)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from cyb_lightning.commands.loading import load_run
from cyb_lightning.evaluation.report import evaluate, token_analysis, write_report
from cyb_lightning.generation import PausePolicy, Sampling, adaptive_evaluate, runner_for
from cyb_lightning.provenance import machine


def comparators(report: dict, module, datamodule, args) -> dict:
    """What an adaptive reader is measured against (spec §5), on the same held-out tokens as the adaptive
    runs: the same model's step mixture in its training context (every token given all K pauses), and, with
    ``--baseline_ckpt``, a no-pause model (its perplexity at 1 forward step per token)."""
    # On the very tokens the adaptive runs read (their first --adaptive_batches batches).
    m = evaluate(module, datamodule.val_dataloader(), max_batches=args.adaptive_batches)["metrics"]
    out = {
        "step_mixture": {
            "ppl": m["ppl"],
            "steps_per_token": float(module.hparams.steps_per_token),
            "expected_steps_per_token": 1.0 + m["extra_pauses"],
            "tokens": m["tokens"],
        }
    }
    if args.baseline_ckpt:
        base, base_dm = load_run(args.baseline_ckpt)
        if base.hparams.steps_per_token != 1 or base_dm.tokenizer.vocab != datamodule.tokenizer.vocab:
            raise ValueError(
                f"--baseline_ckpt {args.baseline_ckpt} must be a no-pause run (layout none) with this run's "
                f"tokenizer; it has {base.hparams.steps_per_token} steps per token and "
                f"{'the same' if base_dm.tokenizer.vocab == datamodule.tokenizer.vocab else 'another'} vocabulary"
            )
        runner = runner_for(base, PausePolicy("none"), Sampling(0.0), datamodule.pause_ids)
        # This run's validation batches: the very same tokens; the runner reads only their real tokens.
        r = adaptive_evaluate(runner, datamodule.val_dataloader(), args.adaptive_batches)
        out["baseline"] = {
            "checkpoint": str(args.baseline_ckpt),
            "ppl": r["ppl"],
            "accuracy": r["accuracy"],
            "steps_per_token": r["steps_per_token"],
            "tokens": r["tokens"],
        }
        if "by_difficulty" in r:
            out["baseline"]["by_difficulty"] = {
                k: {"tokens": v["tokens"], "accuracy": v["accuracy"]} for k, v in r["by_difficulty"].items()
            }
    return out


def level_table(levels: dict, baseline: dict | None = None) -> str:
    """Per difficulty level: the adaptive reader's accuracy and pauses taken, beside a no-pause model's accuracy."""
    lines = ["    level   accuracy   pauses taken" + ("   no-pause model" if baseline else "")]
    for level, r in levels.items():
        line = f"    {level:5}   {100 * r['accuracy']:6.1f} %   {r['steps_per_token'] - 1:12.2f}"
        if baseline and level in baseline:
            line += f"   {100 * baseline[level]['accuracy']:12.1f} %"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """``python -m cyb_lightning report --ckpt_path RUN/checkpoints/last.ckpt [--out DIR] [--data.* …]``."""
    parser = argparse.ArgumentParser(prog="python -m cyb_lightning report", description=main.__doc__)
    parser.add_argument("--ckpt_path", required=True)
    parser.add_argument("--config", help="the run's config.yaml (default: found next to the checkpoint)")
    parser.add_argument("--out", help="report folder (default: RUN/report next to the checkpoint folder)")
    parser.add_argument("--max_batches", type=int, default=None, help="validation batches to read (default: all)")
    parser.add_argument("--min_count", type=int, default=5, help="token analysis: minimum occurrences")
    parser.add_argument("--top", type=int, default=10, help="tokens listed per quadrant")
    parser.add_argument(
        "--adaptive",
        default="threshold,sample,greedy,fixed,none",
        help="comma-separated pause policies for the teacher-forced adaptive evaluation ('' = skip); "
        "threshold and sample follow the trained stopping rule, greedy does not",
    )
    parser.add_argument("--threshold", type=float, default=0.5, help="τ of the threshold policy")
    parser.add_argument("--adaptive_batches", type=int, default=2, help="validation batches the adaptive runs read")
    parser.add_argument(
        "--baseline_ckpt",
        help="a no-pause checkpoint (layout none) to compare with: its perplexity "
        "on the same held-out tokens, at 1 forward step per token",
    )
    args, overrides = parser.parse_known_args(argv)

    started = time.time()
    module, datamodule = load_run(args.ckpt_path, args.config, overrides)
    ckpt = torch.load(args.ckpt_path, map_location="cpu", weights_only=False)
    result = evaluate(module, datamodule.val_dataloader(), min_count=args.min_count, max_batches=args.max_batches)
    report = {
        "checkpoint": str(args.ckpt_path),
        "global_step": int(ckpt.get("global_step", 0)),
        "loss": type(module.loss_fn).__name__,
        "steps_per_token": module.hparams.steps_per_token,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "metrics": result["metrics"],
        "token_analysis": token_analysis(result["table"], datamodule.tokenizer, args.min_count, args.top),
        "adaptive": {},
    }
    for kind in [k for k in args.adaptive.split(",") if k]:
        runner = runner_for(
            module,
            PausePolicy(kind, args.threshold),
            Sampling(0.0),
            datamodule.pause_ids,
            generator=torch.Generator().manual_seed(0),
        )  # ``sample``: the same draws every run
        report["adaptive"][kind] = adaptive_evaluate(
            runner,
            datamodule.val_dataloader(),
            args.adaptive_batches,
            progress=lambda line: print(line, file=sys.stderr, flush=True),
        )
    report["comparators"] = comparators(report, module, datamodule, args)
    out = Path(args.out) if args.out else Path(args.ckpt_path).resolve().parent.parent / "report"
    write_report(out, report, result, datamodule.tokenizer)
    report["seconds"] = round(time.time() - started, 1)
    m = report["metrics"]
    print(f"report: {out}/report.md")
    base = report["comparators"].get("baseline", {})
    for kind, r in report["adaptive"].items():
        print(
            f"  adaptive {kind:9s} accuracy {r['accuracy']:.3f}, ppl {r['ppl']:.3f} at {r['steps_per_token']:.2f} "
            f"steps/token ({r['batch_steps_per_token']:.2f} computed by the batch)"
        )
        if r.get("by_difficulty"):
            print(level_table(r["by_difficulty"], base.get("by_difficulty")))
    print(
        f"  full layout (every token keeps its K pauses): step-mixture ppl {m['ppl']:.3f}, {m['extra_pauses']:.3f} "
        f"expected pauses/token, P(0..K) = {' / '.join(f'{p:.2f}' for p in m['p_stop'])}, accuracy of the trained rule "
        f"{m['accuracy']:.3f}"
    )
    if "baseline" in report["comparators"]:
        b = report["comparators"]["baseline"]
        print(f"  no-pause baseline ppl {b['ppl']:.3f} at 1.00 steps/token on the same tokens")
    return report
