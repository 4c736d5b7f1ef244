"""Cost of the CYB losses vs cross-entropy, model throughput vs litgpt, adaptive generation speed (issue 7 B).

    python bench/loss_bench.py loss         # head + loss step time and peak memory, V = 32k and 256k, K = 3
    python bench/loss_bench.py step         # a whole training step (decoder + loss + AdamW) per loss, same batch
    python bench/loss_bench.py model        # training tokens/s: our no-pause baseline vs litgpt's GPT
    python bench/loss_bench.py generation   # adaptive generation tokens/s vs fixed-K pausing vs no KV cache
    python bench/loss_bench.py fsdp2        # the training step under FSDP2 (2 gloo ranks), V = 32k and 128k
    python bench/loss_bench.py all --out docs/benchmarks.md   # all three, tables appended to the file

Every case: warm-up steps, then timed steps; the tables give the median and the spread (min–max), the
machine (``lscpu`` model name, cores), date, 1-minute load average before the run and torch version.

**loss** — one step = forward + backward of the output head and the loss w.r.t. the final hidden states
``[N, W, d]`` and the head weight ``[V, d]`` (fp32), on the same laid-out batch (N real tokens, W = K + 1).
The reference is the usual TBYS cross-entropy: full logits ``[N·W, V]`` = ``hidden @ weight.T``, then
``F.cross_entropy`` with ``ignore_index`` on every step but the last. Each loss is measured plain (full
logits, ``PauseLoss.forward``) and chunked (``cyb_lightning.losses.head``). Peak memory: each case runs
in a fresh subprocess, and we report its ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` high-water mark
minus the RSS measured once the inputs exist (so: what the step itself adds, gradients included).

**step** — the same comparison as **loss**, but over a whole training step of our decoder (4 layers, d =
256 by default) on one CYB-laid-out batch (B rows × T real tokens × W = K + 1): forward, loss, backward and
AdamW. The reference is again TBYS cross-entropy as usually written: the decoder's full logits ``[B, T·W,
V]`` and ``F.cross_entropy`` with ``ignore_index`` on the pause steps. The other cases are
``CYBModule.training_step`` with each loss (chunked, the default; ``*_plain``: ``loss_chunk_size=0``, one
chunk, the full logits). Peak memory added includes AdamW's state (two fp32 copies of the parameters), the
same in every case.

**fsdp2** — the **step** comparison under FSDP2: ``torchrun --nproc_per_node 2`` with gloo on CPU (the code
path GPUs take: ``cyb_lightning.parallel.parallelize``, ``fully_shard`` per block and on the root, fp32),
each rank its own batch. The CYB losses run inside the decoder's forward (``head_fn``), where FSDP2 has the
root's head gathered; the reference is ``F.cross_entropy`` on the full logits of the same sharded model.
Peak memory: the largest of the two ranks' added RSS; time: rank 0's median step (the ranks run in lockstep).

**model** — optimizer steps (forward, loss, backward, AdamW) of the same architecture (RMSNorm, RoPE,
SwiGLU, untied head, no biases) on the same random batch, fp32: our ``CYBModule`` with ``CrossEntropy``
(no pauses; chunked and plain loss) vs ``litgpt.model.GPT`` built from a ``litgpt.Config`` with
``F.cross_entropy`` on its logits. litgpt pins ``jsonargparse<=4.41``, which conflicts with this project,
so it lives in its own venv that reuses this venv's packages::

    python -m venv /tmp/litgpt-venv && /tmp/litgpt-venv/bin/pip install --no-deps litgpt psutil
    python -c "import site; print(site.getsitepackages()[0])" > /tmp/litgpt-venv/lib/python3.11/site-packages/work_venv.pth

(the second line, run with this project's python, makes torch & co. of this venv visible there; the
script runs the litgpt case with ``--litgpt-python``, default ``/tmp/litgpt-venv/bin/python``).

**generation** — ``cyb_lightning.generation.AdaptiveRunner`` on the quickstart checkpoint (a trained
CYB-AP model; ``--ckpt``), sampling ``--new-tokens`` tokens from the end-of-text id: the trained rule
(adaptive) vs fixed K pauses vs no pauses, with the KV cache, and fixed-K / adaptive without the cache.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LOSS_METHODS = ["ce", "tbys_plain", "tbys_chunked", "ap_plain", "ap_chunked", "va_plain", "va_chunked",
                "dp_plain", "dp_chunked"]  # fmt: skip
STEP_METHODS = ["ce", "tbys_chunked", "ap_plain", "ap_chunked", "va_chunked", "dp_chunked"]
FSDP2_METHODS = ["ce", "ap_chunked", "va_chunked", "dp_chunked"]
LABELS = {"ce": "TBYS cross-entropy (F.cross_entropy, full logits)", "tbys": "TBYS CE (ours)", "ap": "CYB-AP",
          "va": "CYB-VA", "dp": "CYB-DP"}  # fmt: skip


def machine() -> dict:
    model = platform.processor() or "?"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    import torch

    return {"cpu": model, "cores": os.cpu_count(), "date": datetime.datetime.now(datetime.timezone.utc)
            .strftime("%Y-%m-%d %H:%M UTC"), "load": os.getloadavg()[0], "torch": torch.__version__}  # fmt: skip


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def timed(step, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def summary(times: list[float]) -> dict:
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "n": len(times)}


# -- loss ----------------------------------------------------------------------------------------


def loss_case(args) -> dict:
    """One (vocabulary, method) case, in this (fresh) process."""
    import torch
    import torch.nn.functional as TF

    from cyb_lightning.losses import CYBAP, CYBDP, CYBVA, TBYSPerToken
    from cyb_lightning.losses.head import OutputHead, head_loss

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    N, W, d, V, dk = args.tokens, args.pauses + 1, args.d_model, args.vocab, 2
    hidden = torch.randn(N, W, d, requires_grad=True)
    weight = (torch.randn(V, d) * d**-0.5).requires_grad_()
    targets = torch.randint(3 + args.pauses, V, (N,))
    labels = torch.full((N, W), -100, dtype=torch.long)
    labels[:, -1] = targets
    kind, _, how = args.method.partition("_")
    loss = {"tbys": TBYSPerToken(), "ap": CYBAP(), "va": CYBVA(), "dp": CYBDP()}.get(kind)
    if loss is not None:
        loss.check_steps(W)

    def step():
        hidden.grad = weight.grad = None
        if kind == "ce":
            value = TF.cross_entropy((hidden.view(-1, d) @ weight.T), labels.view(-1), ignore_index=-100)
        elif how == "plain":
            value = loss(hidden @ weight.T, targets, dk).mean()
        else:
            value = head_loss(hidden, OutputHead(weight), targets, loss, dk, chunk_size=args.chunk_size).total / N
        value.backward()
        return value

    base = rss_kib()
    times = timed(step, args.warmup, args.steps)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"method": args.method, "vocab": V, **summary(times), "times": times, "peak_mib": (peak - base) / 1024,
            "loss": float(step().detach())}  # fmt: skip


def merge_rounds(rows: list[dict]) -> list[dict]:
    """One row per (vocabulary, method): all timed steps of every round pooled, the largest peak."""
    merged: dict[tuple, dict] = {}
    for r in rows:
        key = (r["vocab"], r["method"])
        m = merged.setdefault(key, {**r, "times": []})
        m["times"] += r["times"]
        m["peak_mib"] = max(m["peak_mib"], r["peak_mib"])
    for m in merged.values():
        m.update(summary(m["times"]))
    return list(merged.values())


def run_cases(args, case: str, methods: list[str], launcher: list[str] | None = None) -> list[dict]:
    """Every (vocabulary, method) in fresh processes (``case``: ``_loss_case``, ``_step_case``, ``_fsdp2_case``;
    ``launcher``: e.g. torchrun instead of this Python), CE first."""
    if "ce" not in methods:
        methods = ["ce", *methods]  # every ratio is against it
    rows = []
    # Rounds interleave the cases, so that a change of machine load hits every case alike.
    for _, V, method in itertools.product(range(args.rounds), args.vocabs, methods):
        cmd = [*(launcher or [sys.executable]), __file__, case, "--vocab", str(V), "--method", method,
               "--tokens", str(args.tokens), "--d-model", str(args.d_model), "--pauses", str(args.pauses),
               "--warmup", str(args.warmup), "--steps", str(args.steps), "--threads", str(args.threads),
               *(["--chunk-size", str(args.chunk_size)] if args.chunk_size is not None else []), "--batch", str(args.batch), "--seq-len", str(args.seq_len),
               "--layers", str(args.layers), "--heads", str(args.heads), "--model-d", str(args.model_d)]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            print(res.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{case} {method} at V = {V} failed (see above)")
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(json.dumps(r), flush=True)
        rows.append(r)
    return merge_rounds(rows)


def ratio_rows(args, rows: list[dict]) -> list[str]:
    """Table rows: each case's median step time and peak memory, and both as a multiple of CE's."""
    lines = []
    for V in args.vocabs:
        ce = next(r for r in rows if r["vocab"] == V and r["method"] == "ce")
        for r in (r for r in rows if r["vocab"] == V):
            kind, _, how = r["method"].partition("_")
            lines.append(
                f"| {V // 1000}k | {LABELS[kind]} | {how or 'plain'} | {r['median'] * 1e3:,.0f} ms "
                f"({r['min'] * 1e3:,.0f}–{r['max'] * 1e3:,.0f}) | {r['median'] / ce['median']:.2f} | "
                f"{r['peak_mib']:,.0f} MiB | {r['peak_mib'] / ce['peak_mib']:.2f} |"
            )
    return lines


TABLE_HEAD = ["| V | loss | path | step time median (min–max) | × CE time | peak memory added | × CE memory |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip


def run_loss(args) -> str:
    rows = run_cases(args, "_loss_case", args.methods or LOSS_METHODS)
    W = args.pauses + 1
    return "\n".join([
        f"### Head + loss step, N = {args.tokens} real tokens × W = {W} ({args.tokens * W} laid-out rows), "
        f"d = {args.d_model}, fp32; {args.rounds} round(s) × {args.steps} timed steps per case", "",
        *TABLE_HEAD, *ratio_rows(args, rows)])  # fmt: skip


def step_case(args, mesh=None) -> dict:
    """One (vocabulary, method) training step of the whole model, in this (fresh) process; with ``mesh``,
    one FSDP2 rank's (``fsdp2_case``)."""
    import torch
    import torch.nn.functional as TF

    from cyb_lightning.losses import CYBAP, CYBDP, CYBVA, TBYSPerToken
    from cyb_lightning.model import GPTConfig
    from cyb_lightning.module import CYBModule

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B, T, K, V, dk = args.batch, args.seq_len, args.pauses, args.vocab, 2
    W = K + 1
    pause_ids = list(range(3, 3 + K))
    real = torch.randint(3 + K, V, (B, T + 1))
    groups = torch.empty(B, T, W, dtype=torch.long)
    groups[..., 0], groups[..., 1:] = real[:, :-1], torch.tensor(pause_ids)
    batch = {"input_ids": groups.view(B, -1), "position_ids": torch.arange(T).repeat_interleave(W).expand(B, -1),
             "targets": real[:, 1:].contiguous(), "target_mask": torch.ones(B, T, dtype=torch.bool)}  # fmt: skip
    kind, _, how = args.method.partition("_")
    loss = {"tbys": TBYSPerToken(), "ap": CYBAP(), "va": CYBVA(), "dp": CYBDP()}.get(kind, TBYSPerToken())
    spec = GPTConfig(n_layer=args.layers, n_head=args.heads, d_model=args.model_d, max_position=T,
                     tie_embeddings=False)  # fmt: skip
    m = CYBModule(spec, loss, vocab_size=V, dk_id=dk, steps_per_token=W, seq_len=T,
                  loss_chunk_size=args.chunk_size if how == "chunked" else 0)  # fmt: skip
    m._device_mesh = mesh  # FSDP2 (the fsdp2 case): configure_model shards the decoder over it
    m.configure_model()
    m.log = lambda *a, **k: None  # no trainer here
    m._logging_step = lambda: False
    labels = batch["targets"][..., None].repeat(1, 1, W)
    labels[..., :-1] = -100  # TBYS: only the last step of each group is scored

    def loss_fn():
        if kind == "ce":
            logits = m(batch["input_ids"], batch["position_ids"])
            return TF.cross_entropy(logits.view(-1, V), labels.view(-1), ignore_index=-100)
        return m.training_step(batch, 0)["loss"]

    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        value = loss_fn()
        value.backward()
        opt.step()
        return value.detach()

    base = rss_kib()
    first = float(step())  # the loss of the initial weights: every case's objective on the same model and batch
    times = timed(step, args.warmup, args.steps)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n_params = sum(p.numel() for p in m.parameters())
    return {"method": args.method, "vocab": V, **summary(times), "times": times, "peak_mib": (peak - base) / 1024,
            "params": n_params, "first_loss": first}  # fmt: skip


def fsdp2_case(args) -> dict | None:
    """One FSDP2 rank of a (vocabulary, method) case, under torchrun; rank 0 returns the report."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from cyb_lightning.__main__ import end_process_group

    dist.init_process_group("gloo")
    try:
        args.threads = max(1, args.threads // dist.get_world_size())  # the ranks share the machine's cores
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        row = step_case(args, mesh)
        peaks = [None] * dist.get_world_size()
        dist.all_gather_object(peaks, row["peak_mib"])
        row.update(peak_mib=max(peaks), peak_mib_per_rank=peaks, world=dist.get_world_size())
        return row if dist.get_rank() == 0 else None
    finally:
        end_process_group()


def run_fsdp2(args) -> str:
    rows = run_cases(args, "_fsdp2_case", args.methods or FSDP2_METHODS, launcher=[
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"])  # fmt: skip
    W = args.pauses + 1
    n = args.batch * args.seq_len
    return "\n".join([
        f"### Training step under FSDP2 (2 gloo ranks on CPU, fp32, `fully_shard` per block + root), "
        f"{args.layers} layers, d = {args.model_d}, per rank: batch {args.batch} × {args.seq_len} real tokens × "
        f"W = {W} ({n * W} laid-out positions); {max(1, args.threads // 2)} thread(s) per rank; {args.rounds} round(s) × "
        f"{args.steps} timed steps per case", "",
        *TABLE_HEAD, *ratio_rows(args, rows)])  # fmt: skip


def run_step(args) -> str:
    rows = run_cases(args, "_step_case", args.methods or STEP_METHODS)
    W = args.pauses + 1
    n = args.batch * args.seq_len
    params = ", ".join(f"{V // 1000}k: {next(r['params'] for r in rows if r['vocab'] == V) / 1e6:.1f}M"
                       for V in args.vocabs)  # fmt: skip
    return "\n".join([
        f"### Training step (decoder + loss + backward + AdamW), {args.layers} layers, d = {args.model_d}, batch "
        f"{args.batch} × {args.seq_len} real tokens × W = {W} ({n * W} laid-out positions), fp32; parameters "
        f"{params}; {args.rounds} round(s) × {args.steps} timed steps per case", "",
        *TABLE_HEAD, *ratio_rows(args, rows)])  # fmt: skip


# -- model throughput ----------------------------------------------------------------------------


def model_case(args) -> dict:
    import torch
    import torch.nn.functional as TF

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B, T, V = args.batch, args.seq_len, args.vocab
    ids = torch.randint(10, V, (B, T + 1))
    inputs, targets = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    ffn = 64 * -(-8 * args.d_model // (3 * 64))
    if args.impl == "litgpt":
        import litgpt
        from litgpt.config import Config
        from litgpt.model import GPT

        cfg = Config(block_size=T, vocab_size=V, padded_vocab_size=V, n_layer=args.layers, n_head=args.heads,
                     n_embd=args.d_model, n_query_groups=args.heads, rotary_percentage=1.0, parallel_residual=False,
                     bias=False, norm_class_name="RMSNorm", norm_eps=1e-5, mlp_class_name="LLaMAMLP",
                     intermediate_size=ffn, rope_base=10000)  # fmt: skip
        model = GPT(cfg)
        from importlib.metadata import version as dist_version

        version = getattr(litgpt, "__version__", None) or dist_version("litgpt")

        def loss_fn():
            logits = model(inputs)
            return TF.cross_entropy(logits.view(-1, V), targets.view(-1))

        params = model.parameters()
    else:
        from cyb_lightning.losses import CrossEntropy
        from cyb_lightning.model import GPTConfig
        from cyb_lightning.module import CYBModule

        spec = GPTConfig(n_layer=args.layers, n_head=args.heads, d_model=args.d_model, ffn_hidden=ffn,
                         max_position=T, tie_embeddings=False)  # fmt: skip
        m = CYBModule(spec, CrossEntropy(), vocab_size=V, dk_id=2, steps_per_token=1, seq_len=T,
                      loss_chunk_size=None if args.impl == "ours_chunked" else 0)  # fmt: skip
        m.configure_model()
        m.log = lambda *a, **k: None  # no trainer here
        m._logging_step = lambda: False
        batch = {"input_ids": inputs, "position_ids": torch.arange(T).expand(B, -1), "targets": targets,
                 "target_mask": torch.ones(B, T, dtype=torch.bool)}  # fmt: skip
        model, version = m, "this commit"

        def loss_fn():
            return m.training_step(batch, 0)["loss"]

        params = m.parameters()
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(list(params), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        opt.step()

    base = rss_kib()
    times = timed(step, args.warmup, args.steps)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"impl": args.impl, "version": version, "params": n_params, **summary(times),
            "tokens_per_s": B * T / statistics.median(times), "peak_mib": (peak - base) / 1024}  # fmt: skip


def run_model(args) -> str:
    rows = []
    for impl in ("ours_chunked", "ours_plain", "litgpt"):
        python = sys.executable
        if impl == "litgpt" and Path(args.litgpt_python).exists():
            python = args.litgpt_python
        cmd = [python, __file__, "_model_case", "--impl", impl, "--batch", str(args.batch), "--seq-len",
               str(args.seq_len), "--vocab", str(args.model_vocab), "--layers", str(args.layers), "--heads",
               str(args.heads), "--d-model", str(args.model_d), "--warmup", str(args.warmup), "--steps",
               str(args.steps), "--threads", str(args.threads)]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            print(res.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"{impl} failed (see above); for litgpt, see this script's docstring for the venv")
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(json.dumps(r), flush=True)
        rows.append(r)
    lit = rows[-1]
    lines = [
        f"### Training throughput, no pauses: {args.layers} layers, d = {args.model_d}, {args.heads} heads, "
        f"V = {args.model_vocab}, batch {args.batch} × {args.seq_len}, fp32, AdamW",
        "",
        "| implementation | params | step median (min–max) | tokens/s | × litgpt | peak memory added |",
        "|---|---|---|---|---|---|",
    ]
    names = {"ours_chunked": "cyb_lightning (chunked loss, default)", "ours_plain": "cyb_lightning (plain loss)",
             "litgpt": f"litgpt {lit['version']} `GPT` + `F.cross_entropy`"}  # fmt: skip
    for r in rows:
        lines.append(
            f"| {names[r['impl']]} | {r['params'] / 1e6:.1f}M | {r['median'] * 1e3:,.0f} ms ({r['min'] * 1e3:,.0f}–"
            f"{r['max'] * 1e3:,.0f}) | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / lit['tokens_per_s']:.2f} | "
            f"{r['peak_mib']:,.0f} MiB |"
        )
    return "\n".join(lines)


# -- generation ----------------------------------------------------------------------------------


def run_generation(args) -> str:
    import torch

    from cyb_lightning.commands.loading import load_run
    from cyb_lightning.generation import PausePolicy, Sampling, runner_for

    torch.set_num_threads(args.threads)
    module, dm = load_run(args.ckpt, None, [])
    module.eval()
    prompt = [dm.eot_id]
    cases = [("threshold", True), ("fixed", True), ("none", True), ("threshold", False), ("fixed", False)]
    rows = []
    for kind, cache in cases:
        def once():
            gen = torch.Generator().manual_seed(0)
            runner = runner_for(module, PausePolicy(kind), Sampling(0.8, 0, 0.95), dm.pause_ids, generator=gen,
                                use_cache=cache)  # fmt: skip
            return runner.generate(prompt, args.new_tokens)

        trace = once()
        times = timed(once, args.warmup_gen, args.repeats)
        steps = trace.steps[0].float().mean().item()
        new = trace.tokens.shape[1] - len(prompt)
        r = {"policy": kind, "cache": cache, **summary(times), "tokens_per_s": new / statistics.median(times),
             "steps_per_token": steps, "new_tokens": new}  # fmt: skip
        print(json.dumps(r), flush=True)
        rows.append(r)
    ref = rows[1]
    n_params = sum(p.numel() for p in module.decoder.parameters())
    lines = [
        f"### Adaptive generation: quickstart CYB-AP checkpoint ({n_params / 1e6:.2f}M params, K = "
        f"{module.hparams.steps_per_token - 1}), batch 1, {args.new_tokens} new tokens, sampling T = 0.8, top-p 0.95",
        "",
        "| policy | KV cache | forward steps / token | time median (min–max) | tokens/s | × fixed-K (cached) |",
        "|---|---|---|---|---|---|",
    ]
    names = {"threshold": "adaptive (the trained rule: pause while d ≥ 0.5)", "fixed": "fixed K pauses",
             "none": "no pauses"}  # fmt: skip
    for r in rows:
        lines.append(
            f"| {names[r['policy']]} | {'yes' if r['cache'] else 'no'} | {r['steps_per_token']:.2f} | "
            f"{r['median']:.2f} s ({r['min']:.2f}–{r['max']:.2f}) | {r['tokens_per_s']:,.0f} | "
            f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f} |"
        )
    return "\n".join(lines)


# -- command -------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["loss", "step", "model", "generation", "fsdp2", "all", "_loss_case", "_step_case",
                                    "_fsdp2_case",
                                    "_model_case"])  # fmt: skip
    p.add_argument("--out", help="append the tables (with machine, date, load, command) to this Markdown file")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=5)
    # loss
    p.add_argument("--vocabs", type=int, nargs="+", default=[32_000, 256_000])
    p.add_argument("--tokens", type=int, default=256, help="real tokens N (laid-out rows: N·(K+1))")
    p.add_argument("--pauses", type=int, default=3)
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--chunk-size", type=int, default=None, help="logit rows per chunk (default: automatic; 0: one chunk)")
    p.add_argument("--methods", nargs="+", choices=LOSS_METHODS,
                   help="a subset of the loss or step cases (default: all of loss; step: " + " ".join(STEP_METHODS) + ")")
    p.add_argument("--rounds", type=int, default=1, help="repeat the loss cases, interleaved, and pool the steps")
    p.add_argument("--vocab", type=int)
    p.add_argument("--method", choices=LOSS_METHODS)
    # model
    p.add_argument("--impl", choices=["ours_chunked", "ours_plain", "litgpt"])
    p.add_argument("--batch", type=int, default=None, help="rows per batch (model: 8; step: 4)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per row (model: 256; step: 64 real tokens)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--model-d", type=int, default=256)
    p.add_argument("--model-vocab", type=int, default=32_000)
    p.add_argument("--litgpt-python", default="/tmp/litgpt-venv/bin/python")
    # generation
    p.add_argument("--ckpt", default=str(ROOT / "runs/quickstart/version_0/checkpoints/last.ckpt"))
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--warmup-gen", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    step_sizes = args.what in ("step", "_step_case", "fsdp2", "_fsdp2_case")  # laid out: T real tokens become T·W positions
    args.batch = args.batch or (4 if step_sizes else 8)
    args.seq_len = args.seq_len or (64 if step_sizes else 256)
    cases = {"_loss_case": loss_case, "_step_case": step_case, "_model_case": model_case, "_fsdp2_case": fsdp2_case}
    if args.what in cases:
        row = cases[args.what](args)
        if row is not None:  # every FSDP2 rank but rank 0 returns None
            print(json.dumps(row))
        return
    info = machine()
    header = (f"Machine: {info['cpu']}, {info['cores']} cores; {info['date']}; load average (1 min) before: "
              f"{info['load']:.2f}; torch {info['torch']}\n\n"
              f"Command: `python bench/loss_bench.py {' '.join(sys.argv[1:])}`")  # fmt: skip
    print(header, flush=True)
    tables = []
    if args.what in ("loss", "all"):
        tables.append(run_loss(args))
    if args.what == "step":  # not in "all": its batch and sequence defaults differ from the model case's
        tables.append(run_step(args))
    if args.what == "fsdp2":
        tables.append(run_fsdp2(args))
    if args.what in ("model", "all"):
        tables.append(run_model(args))
    if args.what in ("generation", "all"):
        tables.append(run_generation(args))
    text = header + "\n\n" + "\n\n".join(tables) + f"\n\nLoad average (1 min) after: {os.getloadavg()[0]:.2f}\n"
    print(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
