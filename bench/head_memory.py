"""On paper: per-GPU memory of the output head + pause loss, full logits against our chunked head loss.

    python bench/head_memory.py                     # the CYB paper's setting (Gemma 2B, 2048 real tokens, K = 3)
    python bench/head_memory.py --vocab 128000 --d-model 4096 --real-tokens 4096 --pauses 3 --batch 1

Counts the tensors each path holds at its peak (the backward of the head) for one micro-batch on one GPU;
no GPU needed. Assumptions, stated so they can be checked:

- bf16 parameters for compute (FSDP2's ``MixedPrecisionPolicy`` as ``cyb_lightning.parallel`` sets it),
  the loss in fp32; the head weight ``[V, d]`` is all-gathered (unsharded, bf16) around the decoder's
  forward and backward, and its unsharded bf16 gradient exists until the reduce-scatter.
- **Full logits** (``F.cross_entropy`` or any loss on ``[L, V]``; what FSDP2 forced before the head ran
  inside ``forward``): the bf16 logits of the matmul, their fp32 copy (kept for the log-softmax's
  backward), then in backward the fp32 gradient of the logits and its bf16 cast. A lower bound: the fp32
  copy + the fp32 gradient (8 bytes per logit); with the bf16 logits and bf16 gradient alive at once,
  12 bytes (PyTorch's own kernels may free some earlier, or keep one more temporary).
- **Chunked** (``losses.head.head_loss``, ``loss_chunk_size`` None = ``auto_chunk_size``): one chunk of
  bf16 logits out of the matmul and its fp32 working copy (the gradient is written over it), the fp32
  gradient of the head weight accumulated over chunks, the gradient of the hidden states.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cyb_lightning.losses.head import auto_chunk_size  # noqa: E402

GB = 1e9


def estimate(vocab: int, d_model: int, real_tokens: int, pauses: int, batch: int, chunk_rows: int | None) -> dict:
    W = pauses + 1
    L = batch * real_tokens * W  # laid-out positions whose logits the loss reads
    rows = auto_chunk_size(vocab, W, d_model) if chunk_rows is None else chunk_rows
    rows = min(rows, L)
    weight = vocab * d_model * 2  # the gathered bf16 head weight (both paths)
    weight_grad = vocab * d_model * 2  # its unsharded bf16 gradient before the reduce-scatter (both paths)
    hidden = L * d_model * 2 * 2  # the hidden states and their gradient, bf16
    full_low = L * vocab * (4 + 4)
    full_high = L * vocab * (2 + 4 + 4 + 2)
    chunk = rows * vocab * (2 + 4) + vocab * d_model * 4  # chunk logits (bf16 + fp32) + fp32 weight gradient
    common = weight + weight_grad + hidden
    return {"L": L, "rows": rows, "logits_fp32_gb": L * vocab * 4 / GB, "common_gb": common / GB,
            "full_gb": ((common + full_low) / GB, (common + full_high) / GB), "chunked_gb": (common + chunk) / GB}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=256_000, help="V (Gemma: 256,000)")
    p.add_argument("--d-model", type=int, default=2048, help="d (Gemma 2B: 2048)")
    p.add_argument("--real-tokens", type=int, default=2048, help="T real tokens per sequence (CYB: 2048)")
    p.add_argument("--pauses", type=int, default=3, help="K (CYB: 3, so 8192 laid-out positions)")
    p.add_argument("--batch", type=int, default=1, help="sequences per GPU micro-batch")
    p.add_argument("--chunk-rows", type=int, nargs="*", default=[None, 512], help="loss_chunk_size values (None: auto)")
    args = p.parse_args(argv)
    print(f"V = {args.vocab:,}, d = {args.d_model}, {args.batch} × {args.real_tokens} real tokens × W = "
          f"{args.pauses + 1}; bf16 parameters, fp32 loss; per GPU, head + loss only\n")  # fmt: skip
    print("| path | logit rows live | memory at the head's backward |\n|---|---|---|")
    for i, rows in enumerate(args.chunk_rows):
        rows = None if rows in (None, "None") else int(rows)
        e = estimate(args.vocab, args.d_model, args.real_tokens, args.pauses, args.batch, rows)
        if i == 0:
            low, high = e["full_gb"]
            print(f"| full logits (one [L, V] in fp32 = {e['logits_fp32_gb']:.1f} GB) | {e['L']:,} | "
                  f"{low:.1f}–{high:.1f} GB |")  # fmt: skip
        name = "chunked, automatic" if rows is None else f"chunked, loss_chunk_size {rows}"
        print(f"| {name} | {e['rows']:,} | {e['chunked_gb']:.1f} GB |")
    print(f"\n(both include the gathered head weight, its unsharded gradient and the hidden states: "
          f"{e['common_gb']:.2f} GB)")  # fmt: skip


if __name__ == "__main__":
    main()
