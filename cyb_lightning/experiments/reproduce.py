"""``python -m cyb_lightning experiment``: the CYB comparison at a scale 2 CPU cores finish in under 2 hours.

What it runs (corpus, pretraining, the fine-tuning comparison, data efficiency, the learning-rate sweep), how it
resumes run by run and how the results page is written: docs/experiments.md.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from cyb_lightning.data.quickstart import unit_hash
from cyb_lightning.provenance import git_commit, machine

# The plans live in a checkout's conf/experiments (they stack the repository's configs), read from the
# working directory like every `--config`: run the command from the checkout, or pass --plan.
USAGE = """usage examples:
  python -m cyb_lightning experiment --budget-check        # planned runs + estimated time (measured steps/s)
  python -m cyb_lightning experiment                       # everything, into runs/cyb_repro (resumable)
  python -m cyb_lightning experiment --results docs/results.md   # ... then write the results page
  python -m cyb_lightning experiment --reduced --out /tmp/cyb_reduced --results /tmp/cyb_reduced/results.md
  python -m cyb_lightning experiment --only 'ft-cyb_ap-*'  # a subset (shell-style pattern on run names)
  python -m cyb_lightning experiment --results-only --out runs/cyb_repro --results docs/results.md
"""
PLAN = Path("conf") / "experiments" / "cyb_repro.yaml"
REDUCED_PLAN = Path("conf") / "experiments" / "cyb_repro_reduced.yaml"
APT_HINT = (
    "install Debian's Python documentation: `apt-get update && apt-get install -y python3.11-doc` (its "
    "reStructuredText sources land in /usr/share/doc/python3.11/html/_sources), or point --python-doc-dir at "
    "a copy of them, or run without them with --no-python-doc (a smaller corpus)"
)
RESULT = "result.json"


# -- the plan ----------------------------------------------------------------------------------------------


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_plan(path: str | os.PathLike) -> dict:
    """The plan YAML, merged onto its ``base`` (key by key), with its folder kept for relative config paths."""
    path = Path(path).resolve()
    plan = yaml.safe_load(path.read_text())
    if "base" in plan:
        plan = _merge(load_plan(path.parent / plan.pop("base")), plan)
    plan["plan_dir"] = str(path.parent)
    return plan


def _yaml_file(plan: dict, rel: str) -> Path:
    return (Path(plan["plan_dir"]) / rel).resolve()


def steps_per_token(plan: dict, configs: list[str]) -> int:
    """W of a config stack (later files win), as its layout class states it; unset keys take the data
    module's defaults."""
    import inspect

    from cyb_lightning.data.layout import LAYOUT_CLASSES
    from cyb_lightning.datamodule import CYBDataModule

    defaults = {k: p.default for k, p in inspect.signature(CYBDataModule).parameters.items()}
    data: dict = {}
    for rel in configs + plan["layers"]:
        data.update((yaml.safe_load(_yaml_file(plan, rel).read_text()) or {}).get("data") or {})
    layout = LAYOUT_CLASSES[data.get("layout", defaults["layout"])]
    return data.get("num_pauses", defaults["num_pauses"]) + 1 if layout.per_token_groups else 1


def plan_runs(plan: dict) -> list[dict]:
    """Every run, in the order they run: pretrain (unless the plan fine-tunes a pretrained model, ``pretrain:
    null``), the main comparison (seed by seed), data efficiency, the learning-rate sweep."""
    s = plan["sizes"]
    seeds = list(plan["seeds"])
    runs = []
    if plan.get("pretrain"):
        runs.append(
            {
                "name": "pretrain",
                "kind": "pretrain",
                "method": "pretrain",
                "label": "pretrained, no finetuning",
                "configs": plan["pretrain"]["configs"],
                "seed": 0,
                "epochs": 1,
                "data": 0,
                "steps": s["pretrain_steps"],
            }
        )
    stage = (plan.get("finetune") or {}).get("configs", [])  # the fine-tuning layers, after each method's

    def finetune(name: str, method: str, seed: int, epochs: int = 1, data: int = 1, **extra) -> dict:
        m = plan["methods"][method]
        return {
            "name": name,
            "kind": "finetune",
            "method": method,
            "label": m["label"],
            "configs": m["configs"] + stage,
            "seed": seed,
            "epochs": epochs,
            "data": data,
            "steps": s["finetune_steps"] * epochs * data,
            **extra,
        }

    for seed in seeds:
        runs += [finetune(f"ft-{method}-s{seed}", method, seed) for method in plan["methods"]]
    de = plan.get("data_efficiency") or {}
    for method in de.get("methods", []):
        for epochs, data in de["factors"] + (de.get("extra") or {}).get(method, []):
            runs.append(finetune(f"de-{method}-{epochs}x{data}-s{seeds[0]}", method, seeds[0], epochs, data))
    sweep = plan.get("lr_sweep") or {}
    for method in sweep.get("methods", []):
        runs += [finetune(f"lr-{method}-{lr:.0e}-s{seeds[0]}", method, seeds[0], lr=float(lr)) for lr in sweep["lrs"]]
    for r in runs:
        r["W"] = steps_per_token(plan, r["configs"])
    return runs


# -- the corpus --------------------------------------------------------------------------------------------


def _pieces(text: str, limit: int) -> list[str]:
    """``text`` cut at blank lines into pieces of at most ``limit`` characters (a longer paragraph stays whole)."""
    out, cur = [], ""
    for para in re.split(r"\n[ \t]*\n", text):
        if cur and len(cur) + 2 + len(para) > limit:
            out.append(cur)
            cur = para
        else:
            cur = f"{cur}\n\n{para}" if cur else para
    if cur:
        out.append(cur)
    return out


def collect_documents(corpus: dict) -> tuple[list[str], dict]:
    """All documents (deduplicated, cut to ``max_doc_chars``) and a count per source."""
    from cyb_lightning.data import quickstart as qs

    sources: dict[str, list[str]] = {}
    if corpus.get("include_topics", True):
        sources["pydoc topics"] = qs.topic_documents()
    if corpus.get("include_stdlib", True):
        sources["stdlib docstrings"] = qs.stdlib_documents(corpus.get("max_stdlib_files"))
    doc_dir = corpus.get("python_doc_dir")
    if doc_dir:
        if not Path(doc_dir).is_dir() or not any(Path(doc_dir).rglob("*.txt")):
            raise SystemExit(f"experiment: no python3.11-doc reST sources in {doc_dir}: {APT_HINT}")
        sources["python3.11-doc reST"] = qs.folder_documents(doc_dir)
    for d in corpus.get("extra_dirs") or []:
        sources[f"extra {d}"] = qs.folder_documents(d)
    seen: set[str] = set()
    docs, counts = [], {}
    for name, texts in sources.items():
        n = 0
        for text in texts:
            for piece in _pieces(text.strip(), corpus["max_doc_chars"]):
                piece = piece.strip()
                if len(piece) >= corpus["min_chars"] and piece not in seen:
                    seen.add(piece)
                    docs.append(piece)
                    n += 1
        counts[name] = n
    return docs, counts


def _write_set(folder: Path, train: list[str], validation: list[str], shards: int) -> None:
    from cyb_lightning.data.quickstart import shard_name, write_shard

    folder.mkdir(parents=True, exist_ok=True)
    n = max(1, min(shards, len(train)))
    for i in range(n):
        write_shard(folder / shard_name("train", i, n), train[i::n])
    write_shard(folder / shard_name("validation", 0, 1), validation)


def build_corpus(out: Path, plan: dict) -> dict:
    """Build (or reuse) ``out/corpus``: the parts, the tokenizer; returns the manifest."""
    from cyb_lightning.data.tokenizer import CYBTokenizer

    corpus, s = plan["corpus"], plan["sizes"]
    per_set = s["finetune_steps"] * s["batch_size"] * s["seq_len"] + 1
    de = plan.get("data_efficiency") or {}
    sets = max([1] + [d for _, d in de.get("factors", []) + sum((de.get("extra") or {}).values(), [])])
    pretrained = plan_tokenizer(plan)  # a pretrained model's tokenizer (from the layers), or None: our BPE
    params = {
        "format": 1,
        "corpus": corpus,
        "per_set_tokens": per_set,
        "sets": sets,
        "python": platform.python_version(),
        **({"tokenizer": pretrained} if pretrained else {}),
    }
    root = out / "corpus"
    manifest_path = root / "manifest.json"
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("params") == json.loads(json.dumps(params)):
            return manifest
        shutil.rmtree(root)
    started = time.time()
    docs, counts = collect_documents(corpus)
    docs.sort(key=unit_hash)
    pool = [d for d in docs if unit_hash(d) < corpus["pool_fraction"]]
    pretrain = [d for d in docs if unit_hash(d) >= corpus["pool_fraction"]]
    if (plan.get("pretrain") and not pretrain) or not pool:
        raise SystemExit(f"experiment: corpus too small ({len(docs)} documents) to split; add text (--extra-dir)")
    tmp = out / ".corpus.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    if pretrained:  # token counts in the pretrained model's own tokens; every run reads its tokenizer config
        from lightning.pytorch.cli import instantiate_class

        tok = instantiate_class((), pretrained)  # class_path + init_args, as LightningCLI builds it
    else:
        tok = CYBTokenizer.train(pretrain, corpus["bpe_vocab_size"])
        tok.save(tmp / "tokenizer")  # no manifest beside it: every run loads it as supplied, never retrains it
    lengths = [len(x) + 1 for x in tok.encode_batch_np(pool)]  # + <eot> after every document
    parts: list[list[str]] = [[]]
    tokens = [0]
    needs = [corpus["eval_tokens"]] + [per_set] * sets
    for doc, n in zip(pool, lengths):
        if tokens[-1] >= needs[len(parts) - 1]:
            if len(parts) == len(needs):
                break
            parts.append([])
            tokens.append(0)
        parts[-1].append(doc)
        tokens[-1] += n
    if len(parts) < len(needs) or tokens[-1] < needs[-1]:
        have = sum(lengths)
        raise SystemExit(
            f"experiment: the held-out pool has {have:,} tokens but the plan needs {sum(needs):,} (held-out "
            f"{needs[0]:,} + {sets} fine-tuning sets of {per_set:,}); raise corpus.pool_fraction, add text "
            "(--extra-dir, python3.11-doc) or lower sizes.finetune_steps"
        )
    heldout, ft = parts[0], parts[1:]
    pre_tokens = sum(len(x) + 1 for x in tok.encode_batch_np(pretrain)) if plan.get("pretrain") else 0
    if plan.get("pretrain"):
        _write_set(tmp / "pretrain", pretrain, heldout, corpus["num_shards"])
    for k in range(1, sets + 1):
        _write_set(tmp / f"finetune-{k}x", [d for part in ft[:k] for d in part], heldout, corpus["num_shards"])
    manifest = {
        "params": params,
        "sources": counts,
        "documents": len(docs),
        "parts": {
            **({"pretrain": {"documents": len(pretrain), "tokens": pre_tokens}} if plan.get("pretrain") else {}),
            "heldout": {"documents": len(heldout), "tokens": tokens[0]},
            **{
                f"finetune set {chr(64 + k)}": {"documents": len(ft[k - 1]), "tokens": tokens[k]}
                for k in range(1, sets + 1)
            },
            "unused (pool)": {"documents": len(pool) - sum(map(len, parts)), "tokens": sum(lengths) - sum(tokens)},
        },
        "vocab_size": tok.vocab.size,
        "build_s": round(time.time() - started, 1),
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, root)
    return manifest


def plan_tokenizer(plan: dict) -> dict | None:
    """``data.tokenizer`` (class_path + init_args) as the plan's shared layers set it, or None (our BPE)."""
    found = None
    for rel in plan["layers"]:
        data = (yaml.safe_load(_yaml_file(plan, rel).read_text()) or {}).get("data") or {}
        found = data.get("tokenizer", found)
    return found


# -- one run -----------------------------------------------------------------------------------------------


def _data_dir(out: Path, run: dict) -> Path:
    return out / "corpus" / ("pretrain" if run["kind"] == "pretrain" else f"finetune-{run['data']}x")


def run_layer(out: Path, plan: dict, run: dict) -> dict:
    """The per-run LightningCLI layer (stacked last)."""
    s = plan["sizes"]
    rdir = (out / "runs" / run["name"]).resolve()
    layer = {
        "seed_everything": 1234 + run["seed"],
        "trainer": {
            "max_steps": run["steps"],
            "val_check_interval": min(s["eval_every"], run["steps"]),
            "limit_val_batches": s["eval_batches"],
            "default_root_dir": str(rdir),
            "logger": {
                "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(rdir), "name": "", "version": ""},
            },
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"save_last": True, "save_top_k": 0},
                },
                {
                    "class_path": "cyb_lightning.experiments.recorder.ExperimentRecorder",
                    "init_args": {"path": str(rdir / "curve.json"), "every": max(1, min(10, run["steps"] // 20))},
                },
            ],
        },
        "data": {
            "source": {
                "class_path": "cyb_lightning.data.sources.LocalShards",
                "init_args": {"path": str(_data_dir(out, run).resolve())},
            },
            "seed": 1234 + run["seed"],
            "seq_len": s["seq_len"],
            "batch_size": s["batch_size"],
        },
    }
    if not plan_tokenizer(plan):  # our BPE, trained once with the corpus
        layer["data"]["tokenizer_dir"] = str((out / "corpus" / "tokenizer").resolve())
    if run["kind"] == "finetune" and plan.get("pretrain"):
        layer["model"] = {"init_from": str((out / "runs" / "pretrain" / "checkpoints" / "last.ckpt").resolve())}
    if "lr" in run:  # the learning-rate sweep: this run's rate instead of the fine-tuning layer's
        layer.setdefault("model", {})["lr"] = run["lr"]
    return layer


def run_spec(out: Path, plan: dict, run: dict, corpus: dict) -> dict:
    """What decides a run's result: its configs (parsed, comments ignored), its layer, the corpus."""
    configs = {rel: yaml.safe_load(_yaml_file(plan, rel).read_text()) for rel in run["configs"] + plan["layers"]}
    layer = run_layer(out, plan, run)
    return {
        "run": {
            k: run[k] for k in ("name", "kind", "method", "seed", "epochs", "data", "steps", "W", "lr") if k in run
        },
        "configs": configs,
        "layer": layer,
        "corpus": corpus["params"],
    }


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fit_command(plan: dict, run: dict, layer_path: Path) -> list[str]:
    configs = [_yaml_file(plan, rel) for rel in run["configs"] + plan["layers"]]
    args = ["fit"]
    for c in configs + [layer_path]:
        args += ["--config", os.path.relpath(c) if c.is_relative_to(Path.cwd()) else str(c)]
    return args


def execute(out: Path, plan: dict, run: dict, corpus: dict, force: bool = False) -> tuple[dict, bool]:
    """Run (or skip) one run; returns (result, ran)."""
    rdir = out / "runs" / run["name"]
    spec = run_spec(out, plan, run, corpus)
    spec_hash = _hash(spec)
    result_path = rdir / RESULT
    if result_path.is_file():
        result = json.loads(result_path.read_text())
        if result.get("spec_hash") == spec_hash:
            return result, False
        if not force:
            raise SystemExit(
                f"experiment: {result_path} was made with another plan (configs, sizes or corpus changed). Use a "
                "new --out, or --force to rerun the runs whose plan changed"
            )
    if rdir.exists():
        shutil.rmtree(rdir)  # an interrupted run (or --force): start it again from scratch
    rdir.mkdir(parents=True)
    layer_path = rdir / "run.yaml"
    layer_path.write_text(yaml.safe_dump(spec["layer"], sort_keys=False))
    args = fit_command(plan, run, layer_path)
    from cyb_lightning.cli import main as cli_main

    print(f"\n=== {run['name']}: {run['label']}, {run['steps']} steps, W = {run['W']}", flush=True)
    t0 = time.time()
    cli_main(args)
    fit_s = time.time() - t0
    ckpt = rdir / "checkpoints" / "last.ckpt"
    curve = json.loads((rdir / "curve.json").read_text())
    if curve["steps"] != run["steps"] or not ckpt.is_file():
        # e.g. Lightning's graceful shutdown on Ctrl-C returns normally: never record a partial run
        raise SystemExit(
            f"experiment: {run['name']} stopped at step {curve['steps']} of {run['steps']}; rerun to redo it"
        )
    lr = (yaml.safe_load((rdir / "config.yaml").read_text()).get("model") or {}).get("lr")  # as the fit resolved it
    t1 = time.time()
    report = evaluate_run(rdir, ckpt, run, plan)
    eval_s = time.time() - t1
    a = report["token_analysis"]
    result = {
        "name": run["name"],
        "kind": run["kind"],
        "method": run["method"],
        "label": run["label"],
        "seed": run["seed"],
        "epochs": run["epochs"],
        "data": run["data"],
        "steps": curve["steps"],
        "lr": lr,
        "W": run["W"],
        "num_pauses": run["W"] - 1,
        "real_tokens": curve["real_tokens"],
        "laid_out_tokens": curve["laid_out_tokens"],
        "train_wall_s": curve["train_wall_s"],
        "fit_wall_s": round(fit_s, 2),
        "eval_wall_s": round(eval_s, 2),
        "eval": report["metrics"],
        "adaptive": report["adaptive"],
        "quadrants": {
            q: [{k: t[k] for k in ("text", "median", "variance", "count")} for t in rows]
            for q, rows in a["quadrants"].items()
        },
        "tokens_analysed": len(a["tokens"]),
        "curve": {"train": curve["train"], "val": curve["val"]},
        "command": "python -m cyb_lightning " + shlex.join(args),
        "report_dir": os.path.relpath(rdir / "report", out),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "spec_hash": spec_hash,
    }
    tmp = rdir / (RESULT + ".tmp")
    tmp.write_text(json.dumps(result, indent=1, allow_nan=True))
    os.replace(tmp, result_path)
    m = result["eval"]
    print(
        f"=== {run['name']}: held-out ppl {m['ppl']:.3f}, {m['extra_pauses']:.2f} pauses/token, "
        f"fit {fit_s:.0f} s, eval {eval_s:.0f} s",
        flush=True,
    )
    return result, True


def evaluate_run(rdir: Path, ckpt: Path, run: dict, plan: dict) -> dict:
    """The ``report`` command's analyses on the whole held-out part, written to ``rdir/report``."""
    import torch

    from cyb_lightning.evaluation import report as R
    from cyb_lightning.commands.loading import load_run
    from cyb_lightning.generation import PausePolicy, Sampling, adaptive_evaluate, runner_for

    module, dm = load_run(str(ckpt), str(rdir / "config.yaml"))
    result = R.evaluate(module, dm.val_dataloader())
    metrics = result["metrics"]
    out = {
        "checkpoint": str(ckpt),
        "global_step": run["steps"],
        "loss": type(module.loss_fn).__name__,
        "steps_per_token": run["W"],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "metrics": metrics,
        "token_analysis": R.token_analysis(result["table"], dm.tokenizer, 5, 10),
        "adaptive": {},
    }
    if run["W"] > 1 and module.loss_fn.uses_dk:
        with torch.no_grad():
            for kind in ("threshold", "sample", "fixed", "none"):  # the trained rule, then the comparators
                runner = runner_for(
                    module, PausePolicy(kind), Sampling(0.0), dm.pause_ids, generator=torch.Generator().manual_seed(0)
                )
                out["adaptive"][kind] = adaptive_evaluate(
                    runner, dm.val_dataloader(), plan["sizes"]["adaptive_batches"]
                )
    R.write_report(rdir / "report", out, result, dm.tokenizer)
    return out


# -- budget ------------------------------------------------------------------------------------------------


class _StepTimer:
    """Times every training step after ``warmup`` steps (a Lightning callback, built lazily)."""

    def __new__(cls, warmup: int):
        import lightning as L

        class Timer(L.Callback):
            def __init__(self):
                self.times: list[float] = []
                self.t = 0.0

            def on_train_batch_start(self, trainer, *args):
                self.t = time.perf_counter()

            def on_train_batch_end(self, trainer, *args):
                if trainer.global_step > warmup:
                    self.times.append(time.perf_counter() - self.t)

        return Timer()


def measure_rates(out: Path, plan: dict, runs: list[dict], rounds: int = 2, steps: int = 6) -> dict[int, float]:
    """Training steps per second for each W of the plan, measured on this machine: short real fits with the
    plan's model, loss, data and trainer (so whatever path training takes is what is timed). Each W is
    fitted ``rounds`` times in turns (2 warm-up steps, then ``steps`` timed) and the median step is kept, so
    other jobs' load spreads over all W alike."""
    from cyb_lightning.cli import CYBLightningCLI
    from cyb_lightning.datamodule import CYBDataModule
    from cyb_lightning.module import CYBModule

    first: dict[int, dict] = {}
    for run in runs:
        first.setdefault(run["W"], run)
    times: dict[int, list[float]] = {w: [] for w in first}
    for _ in range(rounds):
        for w, run in first.items():
            layer = run_layer(out, plan, run)
            layer["model"] = {"init_from": None}
            layer["trainer"].update(
                logger=False, callbacks=None, max_steps=steps + 2, limit_val_batches=0, enable_checkpointing=False
            )
            path = out / f".budget-{w}.yaml"
            path.write_text(yaml.safe_dump(layer))
            timer = _StepTimer(2)
            cli = CYBLightningCLI(
                CYBModule,
                CYBDataModule,
                args=fit_command(plan, run, path)[1:],
                run=False,
                save_config_callback=None,
                parser_kwargs={"parser_mode": "omegaconf"},
                trainer_defaults={"callbacks": [timer]},
            )
            path.unlink()
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
            times[w] += timer.times
    return {w: 1.0 / statistics.median(ts) for w, ts in times.items()}


def estimate(plan: dict, runs: list[dict], rates: dict[int, float], overhead_s: float = 12.0) -> list[dict]:
    """Seconds per run: training steps at the measured rate (+ 10 % for logging and held-out checks),
    the final evaluation (forward only, ≈ 1/3 of a training step per batch), adaptive evaluation and a fixed
    overhead per run (building the run, checkpoint, report pictures)."""
    s = plan["sizes"]
    eval_batches = math.ceil(plan["corpus"]["eval_tokens"] / (s["batch_size"] * s["seq_len"]))
    rows = []
    for r in runs:
        rate = rates[r["W"]]
        checks = r["steps"] // max(1, s["eval_every"]) * s["eval_batches"]
        train = r["steps"] / rate * 1.1 + checks / (3 * rate)
        ev = eval_batches / (3 * rate)
        if r["W"] > 1 and r["method"].startswith("cyb"):
            # step-by-step decoding with a KV cache: ~3 policies x T x up-to-W calls per batch
            ev += 3 * s["adaptive_batches"] * s["seq_len"] * r["W"] * 0.004
        rows.append({**r, "estimate_s": train + ev + overhead_s})
    return rows


def budget_report(plan: dict, rows: list[dict], rates: dict[int, float], corpus: dict) -> str:
    s = plan["sizes"]
    lines = [
        f"measured training steps/s (B = {s['batch_size']}, T = {s['seq_len']}): "
        + ", ".join(f"W={w}: {r:.2f}" for w, r in sorted(rates.items())),
        "",
    ]
    lines.append(f"{'run':32s} {'W':>2s} {'steps':>6s} {'real tokens':>12s} {'laid-out':>12s} {'est. s':>7s}")
    for r in rows:
        real = r["steps"] * s["batch_size"] * s["seq_len"]
        lines.append(
            f"{r['name']:32s} {r['W']:>2d} {r['steps']:>6d} {real:>12,d} {real * r['W']:>12,d} {r['estimate_s']:>7.0f}"
        )
    total = sum(r["estimate_s"] for r in rows) + corpus.get("build_s", 0)
    lines += [
        "",
        f"{len(rows)} runs; corpus {corpus['documents']:,} documents: "
        + ", ".join(f"{k} {v['tokens']:,} tokens" for k, v in corpus["parts"].items()),
        f"estimated total: {total / 60:.1f} min ({total / 3600:.2f} h) on this machine"
        + ("" if total < 7200 else "  -- OVER the 2 h budget: lower sizes.* in the plan"),
    ]
    return "\n".join(lines)


# -- command -----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> list[dict]:
    """``python -m cyb_lightning experiment [--reduced] [--budget-check] [--out DIR] …`` (module docstring)."""
    p = argparse.ArgumentParser(
        prog="python -m cyb_lightning experiment",
        description=__doc__,
        epilog=USAGE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--plan", help=f"plan YAML (default {PLAN}; --reduced: {REDUCED_PLAN}; from a checkout)")
    p.add_argument("--reduced", action="store_true", help="the minutes-long version (tiny model, few steps, one seed)")
    p.add_argument("--out", help="where corpus, runs and results go (default runs/cyb_repro[_reduced])")
    p.add_argument(
        "--budget-check",
        "--dry-run",
        dest="budget",
        action="store_true",
        help="build the corpus, measure steps/s, print the planned runs and the estimated time; train nothing",
    )
    p.add_argument(
        "--only",
        action="append",
        help="run only runs matching this pattern (repeatable; pretrain always runs first when a fine-tune needs it)",
    )
    p.add_argument("--seeds", type=int, nargs="+", help="override the plan's seeds")
    p.add_argument("--finetune-steps", type=int, help="override sizes.finetune_steps (1x1 steps; sizes the sets)")
    p.add_argument("--pretrain-steps", type=int, help="override sizes.pretrain_steps")
    p.add_argument("--python-doc-dir", help="the python3.11-doc reST sources (default: the plan's)")
    p.add_argument("--no-python-doc", action="store_true", help="build the corpus without python3.11-doc")
    p.add_argument("--extra-dir", action="append", default=[], help="a folder of *.txt/*.md/*.rst text to add")
    p.add_argument("--force", action="store_true", help="rerun runs whose plan changed since their result")
    p.add_argument("--results", help="write the results markdown here at the end (PNGs into img/results/ beside it)")
    p.add_argument("--results-only", action="store_true", help="only write --results from OUT's result files")
    args = p.parse_args(argv)
    if args.results_only:
        if not (args.results and args.out):
            p.error("--results-only needs --out (the experiment folder) and --results (the markdown file)")
        from cyb_lightning.experiments.results import write_results

        print(f"results: {write_results(Path(args.out), Path(args.results))}")
        return []

    plan_path = Path(args.plan or (REDUCED_PLAN if args.reduced else PLAN))
    if not plan_path.is_file():
        raise SystemExit(
            f"experiment: no plan at {plan_path.resolve()}; run from a checkout of cyb_lightning (the "
            "plans are conf/experiments/*.yaml there) or pass --plan PATH"
        )
    plan = load_plan(plan_path)
    if args.seeds:
        plan["seeds"] = args.seeds
    if args.finetune_steps:
        plan["sizes"]["finetune_steps"] = args.finetune_steps
    if args.pretrain_steps:
        plan["sizes"]["pretrain_steps"] = args.pretrain_steps
    if args.python_doc_dir:
        plan["corpus"]["python_doc_dir"] = args.python_doc_dir
    if args.no_python_doc:
        plan["corpus"]["python_doc_dir"] = None
    plan["corpus"]["extra_dirs"] = [str(Path(d).resolve()) for d in plan["corpus"].get("extra_dirs") or []] + [
        str(Path(d).resolve()) for d in args.extra_dir
    ]
    out = Path(args.out or Path("runs") / ("cyb_repro_reduced" if args.reduced else "cyb_repro"))
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    corpus = build_corpus(out, plan)
    runs = plan_runs(plan)
    if args.budget:
        rates = measure_rates(out, plan, runs)
        print(budget_report(plan, estimate(plan, runs, rates), rates, corpus))
        return []
    selected = [
        r
        for r in runs
        if not args.only or r["kind"] == "pretrain" or any(fnmatch.fnmatch(r["name"], pat) for pat in args.only)
    ]
    meta_path = out / "experiment.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {"invocations": []}
    command = "python -m cyb_lightning experiment " + shlex.join(list(sys.argv[1:] if argv is None else argv))
    invocation = {
        "command": command,
        "commit": git_commit(plan["plan_dir"]),
        "machine": machine(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "ran": [],
        "skipped": [],
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    meta["invocations"].append(invocation)
    meta.update(plan={k: v for k, v in plan.items() if k != "plan_dir"}, corpus=corpus)
    results = []
    for run in selected:
        result, ran = execute(out, plan, run, corpus, force=args.force)
        (invocation["ran"] if ran else invocation["skipped"]).append(run["name"])
        results.append(result)
        invocation["wall_s"] = round(time.time() - started, 1)
        invocation["load_average_now"] = [round(x, 2) for x in os.getloadavg()]
        meta_path.write_text(json.dumps(meta, indent=1))
    invocation["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    invocation["wall_s"] = round(time.time() - started, 1)
    meta_path.write_text(json.dumps(meta, indent=1))
    print(
        f"experiment: {len(invocation['ran'])} runs done, {len(invocation['skipped'])} skipped (already finished); "
        f"{invocation['wall_s'] / 60:.1f} min; results in {out}/runs/*/{RESULT}"
    )
    if args.results:
        from cyb_lightning.experiments.results import write_results

        print(f"results: {write_results(out, Path(args.results))}")
    return results


if __name__ == "__main__":
    main()
