"""The positive-control comparison: does a model trained here pause where pausing helps, read by the reader
that really skips compute?

    python scripts/positive_control.py                    # the plan conf/experiments/positive_control.yaml
    python scripts/positive_control.py --page-only        # rewrite docs/positive_control.{md,json} from results
    python scripts/positive_control.py --seeds 0 --steps 300 --out runs/pc_quick --page ''   # a quick look

The plan fixes the design before any run: the methods (a layer of ``conf/positive_control/`` each on the
same base config), the seeds, the steps, the learning rates of the sweep and the easy and hard levels.

1. **Learning-rate sweep**: every method at every rate of ``lr_sweep`` on its seeds; each method keeps the
   rate whose runs answer the hard levels best on the *validation* split, read by the method's own reader.
2. **Comparison**: every method at its rate on every seed (sweep runs at that rate are reused), evaluated
   on the *test* split, which no choice reads. A method with ``init_from`` fine-tunes the run of another
   method of the same seed (its steps are counted too).
3. **Page**: ``docs/positive_control.md`` and ``.json`` from the result files (a hand-written reading
   between the markers of an existing page is kept).

Each run is a ``python -m cyb_lightning fit`` subprocess, one thread, ``jobs`` at a time; it leaves
``result.json`` in its folder, keyed by its spec (config, seed, rate, steps): a rerun skips finished runs,
so the command resumes run by run. Two readers are measured for every run (``docs/method.md`` §5c):
``adaptive`` (each token gets only the pauses it asks for, compute really skipped: the model a user
deploys; a model without DK gets its fixed pauses) and ``full_layout`` (the trained rule read where every
earlier token keeps its K pauses). Pauses are the extra steps taken (adaptive) or expected (full layout).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
PLAN = REPO / "conf" / "experiments" / "positive_control.yaml"
KEEP_START, KEEP_END = "<!-- reading: kept when the page is regenerated -->", "<!-- end of reading -->"
READERS = ("adaptive", "full_layout")


# -- the plan and its runs -------------------------------------------------------------------------------


def load_plan(path: Path, seeds: list[int] | None = None, steps: int | None = None) -> dict:
    plan = yaml.safe_load(path.read_text())
    plan["base"] = str((path.parent / plan["base"]).resolve().relative_to(REPO))
    layer_dir = REPO / "conf" / "positive_control"
    for m in plan["methods"].values():
        m["layers"] = [str((layer_dir / layer).relative_to(REPO)) for layer in m["layers"]]
    if seeds is not None:
        plan["seeds"] = seeds
        plan["lr_sweep"]["seeds"] = [s for s in plan["lr_sweep"]["seeds"] if s in seeds] or seeds[:1]
    if steps is not None:
        plan["steps"] = steps
    return plan


def run_name(method: str, lr: float, seed: int) -> str:
    return f"{method}-lr{lr:g}-s{seed}"


def fit_command(plan: dict, method: str, lr: float, seed: int, out: Path, init_from: Path | None) -> list[str]:
    cmd = [sys.executable, "-m", "cyb_lightning", "fit", "--config", plan["base"]]
    for layer in plan["methods"][method]["layers"]:
        cmd += ["--config", layer]
    name = run_name(method, lr, seed)
    cmd += ["--seed_everything", str(seed), "--data.source.init_args.seed", str(seed), "--model.lr", str(lr),
            "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(out / "runs"),
            "--trainer.logger.init_args.name", name, "--trainer.logger.init_args.version", "run"]  # fmt: skip
    if "init_from" not in plan["methods"][method]:  # a fine-tuning stage keeps its own (shorter) schedule
        ramp = max(1, plan["steps"] // 2)
        cmd += ["--trainer.max_steps", str(plan["steps"]), "--data.curriculum.ramp_steps", str(ramp),
                "--trainer.val_check_interval", str(min(3000, plan["steps"]))]  # fmt: skip
    if init_from is not None:
        cmd += ["--model.init_from", str(init_from)]
    return cmd


def spec_hash(cmd: list[str]) -> str:
    """What makes a run: its command (configs, seed, rate, steps) and the text of every config file it reads."""
    files = [a for a in cmd if a.endswith(".yaml")]
    blob = json.dumps([cmd[1:], [(REPO / f).read_text() for f in files]])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def execute(plan: dict, out: Path, method: str, lr: float, seed: int, split: str, chosen: dict) -> dict:
    """Train (unless its result exists) and evaluate one run; returns its result. One thread per run at a time
    (a fine-tuning stage may ask for its parent while another thread trains it)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.setdefault(run_name(method, lr, seed), threading.Lock())
    with lock:
        return _execute(plan, out, method, lr, seed, split, chosen)


def _execute(plan: dict, out: Path, method: str, lr: float, seed: int, split: str, chosen: dict) -> dict:
    rdir = out / "runs" / run_name(method, lr, seed) / "run"
    init = plan["methods"][method].get("init_from")
    init_ckpt = None
    if init is not None:
        parent = execute(plan, out, init, chosen[init], seed, split, chosen)
        init_ckpt = Path(parent["checkpoint"])
    cmd = fit_command(plan, method, lr, seed, out, init_ckpt)
    spec = spec_hash(cmd)
    result_path = rdir.parent / "result.json"
    if result_path.is_file():
        result = json.loads(result_path.read_text())
        if result["spec"] == spec and split in result["evaluation"]:
            return result
    else:
        result = None
    if result is None or result["spec"] != spec:
        print(f"=== fit {run_name(method, lr, seed)}", flush=True)
        rdir.parent.mkdir(parents=True, exist_ok=True)
        log = rdir.parent / "fit.log"
        t0 = time.time()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        with open(log, "w") as f:
            proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
        if proc.returncode:
            raise SystemExit(f"positive_control: {run_name(method, lr, seed)} failed (exit {proc.returncode}); see {log}")
        steps = plan["steps"] if init is None else None
        result = {"method": method, "seed": seed, "lr": lr, "spec": spec, "command": " ".join(cmd[1:]),
                  "checkpoint": str(rdir / "checkpoints" / "last.ckpt"), "fit_s": round(time.time() - t0, 1),
                  "load": round(os.getloadavg()[0], 2), "steps": steps, "evaluation": {}}  # fmt: skip
        if init is not None:
            parent = json.loads((out / "runs" / run_name(init, chosen[init], seed) / "result.json").read_text())
            result["steps"] = fit_steps(rdir) + parent["steps"]
            result["fit_s"] += parent["fit_s"]
            result["init_from"] = run_name(init, chosen[init], seed)
    t0 = time.time()
    result["evaluation"][split] = evaluate(Path(result["checkpoint"]), split, plan)
    result["evaluation"][split]["eval_s"] = round(time.time() - t0, 1)
    tmp = result_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, result_path)
    return result


def fit_steps(rdir: Path) -> int:
    config = yaml.safe_load((rdir / "config.yaml").read_text())
    return int(config["trainer"]["max_steps"])


# -- evaluation ------------------------------------------------------------------------------------------


def weighted(levels: dict, keys, field: str) -> float:
    """The token-weighted mean of ``field`` over the difficulty levels ``keys`` (those present)."""
    n = sum(levels[k]["tokens"] for k in keys if k in levels)
    return sum(levels[k][field] * levels[k]["tokens"] for k in keys if k in levels) / max(n, 1)


def evaluate(ckpt: Path, split: str, plan: dict) -> dict:
    """Both readers on ``split`` ("validation" or "test"), per level and in the plan's easy / hard groups."""
    import torch

    from cyb_lightning.evaluation import report as R
    from cyb_lightning.commands.loading import load_run
    from cyb_lightning.generation import PausePolicy, Sampling, adaptive_evaluate, runner_for

    torch.set_num_threads(1)
    module, dm = load_run(str(ckpt), overrides=["--data.val_documents", str(plan["eval_documents"])])
    batches = dm.val_dataloader if split == "validation" else dm.test_dataloader
    easy, hard = plan["easy"], plan["hard"]
    with torch.no_grad():
        full = R.evaluate(module, batches())["metrics"]
        readers = {}
        for kind in ("threshold", "fixed", "none"):
            readers[kind] = adaptive_evaluate(runner_for(module, PausePolicy(kind), Sampling(0.0)), batches())
    adaptive = readers["threshold"]  # a model without DK gets its fixed pauses (runner_for)
    by = {int(k): {"tokens": v["tokens"], "accuracy": v["accuracy"], "pauses": v["steps_per_token"] - 1}
          for k, v in adaptive["by_difficulty"].items()}  # fmt: skip
    fl = {int(k): {"tokens": v["tokens"], "accuracy": v["accuracy"], "pauses": v["extra_pauses"]}
          for k, v in full["by_difficulty"]["levels"].items()}  # fmt: skip

    def summary(levels: dict, spearman, steps_per_token: float) -> dict:
        return {"easy_accuracy": weighted(levels, easy, "accuracy"), "hard_accuracy": weighted(levels, hard, "accuracy"),
                "easy_pauses": weighted(levels, easy, "pauses"), "hard_pauses": weighted(levels, hard, "pauses"),
                "spearman": spearman, "steps_per_token": steps_per_token, "levels": levels}  # fmt: skip

    return {
        "adaptive": summary(by, adaptive.get("spearman"), adaptive["steps_per_token"]),
        "full_layout": summary(fl, full["by_difficulty"]["spearman"], 1.0 + full["extra_pauses"]),
        "readers": {kind: {k: r[k] for k in ("accuracy", "steps_per_token", "batch_steps_per_token", "p_pauses")}
                    | {"hard_accuracy": weighted({int(l): v for l, v in r["by_difficulty"].items()}, hard, "accuracy")}
                    for kind, r in readers.items()},  # fmt: skip
        "p_stop": full["p_stop"],
        "tokens": adaptive["tokens"],
    }


# -- the two stages --------------------------------------------------------------------------------------


def parallel(jobs: int, calls: list) -> list:
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(lambda call: call(), calls))


def sweep(plan: dict, out: Path) -> dict[str, float]:
    """Each method's rate: the best mean validation hard accuracy of its own reader over the sweep's seeds."""
    lrs, seeds = plan["lr_sweep"]["lrs"], plan["lr_sweep"]["seeds"]
    chosen: dict[str, float] = {}
    table: dict[str, dict[float, float]] = {}
    first = [m for m, spec in plan["methods"].items() if "init_from" not in spec]
    for group in (first, [m for m in plan["methods"] if m not in first]):  # fine-tuning stages need their parent
        calls = [lambda m=m, lr=lr, s=s: execute(plan, out, m, lr, s, "validation", chosen)
                 for m in group for lr in lrs for s in seeds]  # fmt: skip
        for r in parallel(plan["jobs"], calls):
            table.setdefault(r["method"], {}).setdefault(r["lr"], []).append(
                r["evaluation"]["validation"]["adaptive"]["hard_accuracy"])
        for m in group:
            means = {lr: float(np.mean(v)) for lr, v in table[m].items()}
            chosen[m] = max(means, key=lambda lr: (means[lr], -abs(np.log(lr / 3e-3))))  # ties: nearest 3e-3
    (out / "sweep.json").write_text(json.dumps({"chosen": chosen, "validation_hard_accuracy": {
        m: {str(lr): v for lr, v in t.items()} for m, t in table.items()}}, indent=1))  # fmt: skip
    return chosen


def compare(plan: dict, out: Path, chosen: dict[str, float]) -> list[dict]:
    """Every method at its rate on every seed, method by method in the plan's order (an interrupted comparison
    has whole methods; a fine-tuning stage finds its parent's runs done or waits for them)."""
    calls = [lambda m=m, s=s: execute(plan, out, m, chosen[m], s, "test", chosen)
             for m in plan["methods"] for s in plan["seeds"]]  # fmt: skip
    return parallel(plan["jobs"], calls)


# -- the page --------------------------------------------------------------------------------------------


def spread(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    v = np.asarray(values, dtype=float) * scale
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}" if v.size > 1 else f"{v.mean():.{digits}f}"


def gate_lines(plan: dict, by: dict[str, list[dict]]) -> list[str]:
    """The plan's gates, judged on the test split with each method's own (adaptive) reader."""
    g1, g2 = plan["gates"]["gate1"], plan["gates"]["gate2"]
    lines = []

    def test(r: dict, reader: str = "adaptive") -> dict:
        return r["evaluation"]["test"][reader]

    def paired(a: str, b: str) -> list[tuple[dict, dict]]:  # runs of two methods with the same seed
        seeds = {r["seed"]: r for r in by[b]}
        return [(r, seeds[r["seed"]]) for r in by[a] if r["seed"] in seeds]

    if g1["pause"] in by and g1["baseline"] in by:
        pairs = paired(g1["pause"], g1["baseline"])
        pause, base = [p for p, _ in pairs], [b for _, b in pairs]
        gaps = [test(p)["hard_accuracy"] - test(b)["hard_accuracy"] for p, b in pairs]
        easy = min(test(r)["easy_accuracy"] for r in pause + base)
        met = float(np.mean(gaps)) >= g1["gap"] and min(gaps) > 0 and easy >= g1["easy"]
        lines.append(f"- **Gate 1** ({plan['methods'][g1['pause']]['label']} ≥ {100 * g1['gap']:.0f} points above "
                     f"{plan['methods'][g1['baseline']]['label']} on hard answers on the mean, ahead on every seed, both "
                     f"≥ {100 * g1['easy']:.0f} % on easy ones): gap per seed "
                     f"{', '.join(f'{100 * g:+.1f}' for g in gaps)} points (mean {100 * np.mean(gaps):+.1f}); lowest easy "
                     f"accuracy {100 * easy:.1f} % → **{'met' if met else 'not met'}**.")  # fmt: skip
    for m in g2["methods"]:
        if m not in by or g2["reference"] not in by:
            continue
        pairs = paired(m, g2["reference"])
        rows = [r for r, _ in pairs]
        close = [test(r)["hard_accuracy"] - test(t)["hard_accuracy"] for r, t in pairs]
        rho = [test(r)["spearman"] if test(r)["spearman"] is not None else float("nan") for r in rows]
        easy_p = [test(r)["easy_pauses"] for r in rows]
        k = max(len(r["evaluation"]["test"]["readers"]["fixed"]["p_pauses"]) - 1 for r in rows)
        extra = [(test(r)["steps_per_token"] - 1) / k for r in rows]
        checks = {"hard accuracy within 2 points of the reference": min(close) >= -g2["within"],
                  f"Spearman ≥ {g2['spearman']}": all(x >= g2["spearman"] for x in rho),
                  f"≤ {g2['easy_pauses']} pauses on easy answers": max(easy_p) <= g2["easy_pauses"],
                  f"≤ {100 * g2['extra_steps']:.0f} % of fixed-K's extra steps": max(extra) <= g2["extra_steps"]}  # fmt: skip
        missed = [name for name, ok in checks.items() if not ok]
        lines.append(f"- **Gate 2**, {plan['methods'][m]['label']}: hard accuracy minus "
                     f"{plan['methods'][g2['reference']]['label']}'s {', '.join(f'{100 * c:+.1f}' for c in close)} points; "
                     f"Spearman {', '.join(f'{x:.2f}' for x in rho)}; easy pauses {', '.join(f'{x:.2f}' for x in easy_p)}; "
                     f"extra steps {', '.join(f'{100 * x:.0f} %' for x in extra)} of fixed-K's → "
                     + ("**met**." if not missed else f"**not met** ({'; '.join(missed)})."))  # fmt: skip
    return lines


def page(plan: dict, results: list[dict], meta: dict, images: list[str], old: str | None) -> str:
    by = {m: sorted([r for r in results if r["method"] == m], key=lambda r: r["seed"]) for m in plan["methods"]}
    by = {m: rows for m, rows in by.items() if rows}
    levels = sorted({int(k) for r in results for k in r["evaluation"]["test"]["adaptive"]["levels"]})
    L = [f"# {plan['title']}", "",
         f"Generated by `{meta['command']}` from the result files in `{meta['out']}` ({meta['machine']}; commit "
         f"{meta['commit']}). {meta['timing']} Every number is in `docs/positive_control.json`; mean ± standard "
         f"deviation over seeds {plan['seeds']}, on {meta['tokens']} held-out test rows per run.", "",
         "The task, decoder and training are `conf/positive_control.yaml`; the plan (methods, seeds, steps, "
         "rates, easy and hard levels, gates) is `conf/experiments/positive_control.yaml`, fixed before the runs. "
         f"Easy answers: levels {plan['easy']}; hard: {plan['hard']}. **Adaptive reader**: each token gets only "
         "the pauses it asks for (the trained rule, d < 0.5 answers) and the rest of the compute is skipped — the "
         "model a user deploys; a model without DK gets the pauses its layout always gives. **Full layout**: "
         "the trained rule read where every earlier token keeps its K pauses (an upper bound).", "",
         "## Summary (test split, adaptive reader)", "",
         "| method | lr | easy accuracy % | hard accuracy % | pauses, easy | pauses, hard | Spearman | steps / answer "
         "| full layout: hard accuracy % |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for m, rows in by.items():
        t = [r["evaluation"]["test"] for r in rows]
        rho = [x["adaptive"]["spearman"] for x in t]
        L.append(f"| {plan['methods'][m]['label']} | {rows[0]['lr']:g} | "
                 f"{spread([x['adaptive']['easy_accuracy'] for x in t])} | {spread([x['adaptive']['hard_accuracy'] for x in t])} | "
                 f"{spread([x['adaptive']['easy_pauses'] for x in t], 1, 2)} | {spread([x['adaptive']['hard_pauses'] for x in t], 1, 2)} | "
                 + (spread(rho, 1, 2) if all(x is not None for x in rho) else "–")
                 + f" | {spread([x['adaptive']['steps_per_token'] for x in t], 1, 2)} | "
                 f"{spread([x['full_layout']['hard_accuracy'] for x in t])} |")  # fmt: skip
    L += ["", "## Gates (as measured)", ""] + gate_lines(plan, by)
    L += ["", "## Per seed (test split)", "",
          "| method | seed | adaptive: easy / hard accuracy % | pauses easy / hard | Spearman | full layout: easy / hard % "
          "| fixed-K reader: hard % | no pauses: hard % | steps | fit s | load |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for m, rows in by.items():
        for r in rows:
            t = r["evaluation"]["test"]
            a, f, rd = t["adaptive"], t["full_layout"], t["readers"]
            rho = "–" if a["spearman"] is None else f"{a['spearman']:.2f}"
            L.append(f"| {m} | {r['seed']} | {100 * a['easy_accuracy']:.1f} / {100 * a['hard_accuracy']:.1f} | "
                     f"{a['easy_pauses']:.2f} / {a['hard_pauses']:.2f} | {rho} | {100 * f['easy_accuracy']:.1f} / "
                     f"{100 * f['hard_accuracy']:.1f} | {100 * rd['fixed']['hard_accuracy']:.1f} | "
                     f"{100 * rd['none']['hard_accuracy']:.1f} | {r['steps']} | {r['fit_s']:.0f} | {r['load']:.1f} |")  # fmt: skip
    L += ["", "## Per level (test split, mean over seeds)", "",
          "| method | reader | " + " | ".join(f"acc {k}" for k in levels) + " | " + " | ".join(f"pauses {k}" for k in levels)
          + " |", "|---|---|" + "---|" * (2 * len(levels))]  # fmt: skip
    for m, rows in by.items():
        for reader in READERS:
            lv = [r["evaluation"]["test"][reader]["levels"] for r in rows]
            acc = [np.mean([x[str(k)]["accuracy"] if str(k) in x else x[k]["accuracy"] for x in lv]) for k in levels]
            pau = [np.mean([x[str(k)]["pauses"] if str(k) in x else x[k]["pauses"] for x in lv]) for k in levels]
            L.append(f"| {m} | {reader} | " + " | ".join(f"{100 * a:.1f}" for a in acc) + " | "
                     + " | ".join(f"{p:.2f}" for p in pau) + " |")  # fmt: skip
    sw = meta.get("sweep")
    if sw:
        lrs = sorted({float(lr) for t in sw["validation_hard_accuracy"].values() for lr in t})
        L += ["", "## Learning-rate sweep (validation split, hard accuracy %, mean over the sweep's seeds "
              f"{plan['lr_sweep']['seeds']})", "", "| method | " + " | ".join(f"{lr:g}" for lr in lrs) + " | chosen |",
              "|---|" + "---|" * (len(lrs) + 1)]  # fmt: skip
        for m, t in sw["validation_hard_accuracy"].items():
            cells = [f"{100 * np.mean(t[str(lr)] if str(lr) in t else t[lr]):.1f}" if (str(lr) in t or lr in t) else "–"
                     for lr in lrs]  # fmt: skip
            L.append(f"| {m} | " + " | ".join(cells) + f" | {sw['chosen'][m]:g} |")
    L += ["", "## Plots", ""] + [f"![{i}](img/positive_control/{i})" for i in images]
    L += ["", "## Reading", "", KEEP_START, old or "(to be written after the run)", KEEP_END, ""]
    return "\n".join(L)


def plots(plan: dict, results: list[dict], img: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img.mkdir(parents=True, exist_ok=True)
    names = []
    for field, ylabel, fname in (("accuracy", "accuracy, adaptive reader (test)", "accuracy.png"),
                                 ("pauses", "pauses taken, adaptive reader (test)", "pauses.png")):  # fmt: skip
        fig, ax = plt.subplots(figsize=(7, 4))
        for m in plan["methods"]:
            rows = [r for r in results if r["method"] == m]
            if not rows:
                continue
            lv = [r["evaluation"]["test"]["adaptive"]["levels"] for r in rows]
            levels = sorted(int(k) for k in lv[0])
            v = np.array([[x[str(k)][field] if str(k) in x else x[k][field] for k in levels] for x in lv])
            ax.errorbar(levels, v.mean(0), yerr=v.std(0, ddof=1) if len(rows) > 1 else None, marker="o", capsize=3,
                        label=m)  # fmt: skip
        ax.set_xlabel("difficulty (digits n)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(img / fname, dpi=110)
        plt.close(fig)
        names.append(fname)
    return names


def write_page(plan: dict, out: Path, results: list[dict], doc: Path, command: str) -> None:
    from cyb_lightning.provenance import git_commit, machine

    fits = [r["fit_s"] for r in results]
    loads = [r["load"] for r in results]
    meta = {"command": command, "out": str(out.relative_to(REPO) if out.is_relative_to(REPO) else out),
            "machine": machine().split(", 1 torch")[0], "commit": git_commit(REPO),
            "timing": f"Each fit ran as one process with one thread, {plan['jobs']} at a time; fit wall time "
                      f"{min(fits):.0f}–{max(fits):.0f} s per run; the 1-minute load average as each fit ended "
                      f"{min(loads):.1f}–{max(loads):.1f} ({plan['jobs']} fits at a time on the 2 cores).",
            "tokens": results[0]["evaluation"]["test"]["tokens"], "date": time.strftime("%Y-%m-%d", time.gmtime())}  # fmt: skip
    sweep_file = out / "sweep.json"
    meta["sweep"] = json.loads(sweep_file.read_text()) if sweep_file.is_file() else None
    old = None
    if doc.is_file() and KEEP_START in doc.read_text():
        old = doc.read_text().split(KEEP_START, 1)[1].split(KEEP_END, 1)[0].strip()
    images = plots(plan, results, doc.parent / "img" / "positive_control")
    doc.write_text(page(plan, results, meta, images, old))
    keep = ("method", "seed", "lr", "steps", "fit_s", "load", "command", "init_from")
    runs = [{k: r[k] for k in keep if k in r} | {"test": r["evaluation"]["test"]} | (
        {"validation": r["evaluation"]["validation"]} if "validation" in r["evaluation"] else {}) for r in results]
    for run in runs:  # the fields the gates are computed from, per reader, at the top of each run
        run.update({reader: {k: v for k, v in run["test"][reader].items() if k != "levels"} for reader in READERS})
    doc.with_suffix(".json").write_text(json.dumps({"meta": meta, "plan": plan, "runs": runs}, indent=1))
    print(f"wrote {doc} and {doc.with_suffix('.json')}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", default=str(PLAN))
    parser.add_argument("--out", default="runs/positive_control_cmp")
    parser.add_argument("--page", default="docs/positive_control.md", help="the page to write ('' = none)")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the plan's seeds (a quick look)")
    parser.add_argument("--steps", type=int, help="override the plan's steps (a quick look)")
    parser.add_argument("--page-only", action="store_true", help="rewrite the page from the result files")
    args = parser.parse_args(argv)
    plan = load_plan(Path(args.plan), args.seeds, args.steps)
    out = (REPO / args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.page_only:  # whatever finished (an interrupted comparison is published as far as it got)
        chosen = json.loads((out / "sweep.json").read_text())["chosen"]
        paths = [out / "runs" / run_name(m, chosen[m], s) / "result.json" for m in plan["methods"] for s in plan["seeds"]]
        results = [r for r in (json.loads(p.read_text()) for p in paths if p.is_file()) if "test" in r["evaluation"]]
    else:
        chosen = sweep(plan, out)
        print("chosen learning rates: " + ", ".join(f"{m} {lr:g}" for m, lr in chosen.items()), flush=True)
        results = compare(plan, out, chosen)
    if args.page:
        command = "python scripts/positive_control.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_page(plan, out, results, REPO / args.page, command.strip())


if __name__ == "__main__":
    main()
