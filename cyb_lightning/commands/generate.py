"""``python -m cyb_lightning generate``: a checkpoint's text, pausing where the model asks (``generation.py``)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from cyb_lightning.generation import DEFAULT_POLICY, POLICIES, PausePolicy, Sampling, runner_for


def text_of(tokenizer, ids: Sequence[int]) -> str:
    """The text of generated ids, without the ids that stand for a role (padding, end of text, DK, pauses)."""
    roles = tokenizer.role_ids
    return tokenizer.decode([i for i in ids if i not in roles])


def _boolean(text: str) -> bool:
    if text.lower() in ("true", "yes", "1"):
        return True
    if text.lower() in ("false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def prompt_ids(datamodule, text: str, num_prompt_pauses: int | None = None) -> list[int]:
    """``<eot>`` + the prompt's tokens + M pauses (the input a prompt gets in training).

    M (TBYS pause fine-tuning's M_ft, spec §4) defaults to the run's layout's (``Layout.prompt_pauses``:
    ``data.num_pauses`` of a ``tbys_finetune`` run, 0 for every other layout).
    """
    if num_prompt_pauses is None:
        num_prompt_pauses = datamodule.layout_spec.prompt_pauses
    if num_prompt_pauses < 0:
        raise ValueError(f"num_prompt_pauses must be >= 0, got {num_prompt_pauses}")
    ids = [datamodule.eot_id, *datamodule.tokenizer.encode(text)]  # as the tbys_finetune stream builds a prompt
    return ids + [datamodule.vocab.pause_ids[0]] * num_prompt_pauses


def main(argv: list[str] | None = None) -> None:
    """``python -m cyb_lightning generate --ckpt_path RUN/checkpoints/last.ckpt --prompt "..."``."""
    parser = argparse.ArgumentParser(prog="python -m cyb_lightning generate", description=main.__doc__)
    parser.add_argument("--ckpt_path", required=True)
    parser.add_argument("--config", help="the run's config.yaml (default: next to the checkpoint's run)")
    parser.add_argument("--prompt", default="")
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument(
        "--policy",
        choices=POLICIES,
        default=DEFAULT_POLICY,
        help="when to pause: threshold (d_i > τ) and sample (with probability d_i) follow the rule the "
        "CYB losses train; greedy (DK is the argmax) does not",
    )
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top_k", type=int, default=0)
    parser.add_argument("--top_p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--use_cache", type=_boolean, default=True, help="false: recompute everything at every step")
    parser.add_argument("--compare", action="store_true", help="also run fixed-K and no-pause decoding")
    parser.add_argument("--html", help="write the text coloured by pauses spent to this HTML file")
    parser.add_argument(
        "--num_prompt_pauses",
        type=int,
        default=None,
        help="pauses appended after the prompt (TBYS pause fine-tuning's M_ft); default: the "
        "checkpoint's data.num_pauses for a tbys_finetune run, else 0",
    )
    args, overrides = parser.parse_known_args(argv)

    from cyb_lightning.commands.loading import load_run

    module, datamodule = load_run(args.ckpt_path, args.config, overrides)
    tok = datamodule.tokenizer
    prompt = prompt_ids(datamodule, args.prompt, args.num_prompt_pauses)
    sampling = Sampling(args.temperature, args.top_k, args.top_p)
    kinds = [args.policy] + ([k for k in ("fixed", "none") if k != args.policy] if args.compare else [])
    for kind in kinds:
        gen = torch.Generator().manual_seed(args.seed)
        runner = runner_for(
            module,
            PausePolicy(kind, args.threshold),
            sampling,
            datamodule.pause_ids,
            use_cache=args.use_cache,
            generator=gen,
        )
        trace = runner.generate(
            prompt,
            args.max_new_tokens,
            stop_ids=[datamodule.eot_id],
            answers_only=datamodule.eval_layout_spec.answers_only,
        )
        ids = trace.tokens[0].tolist()
        new = ids[len(prompt) :]
        steps = trace.steps[0].tolist()
        gen_steps = steps[len(prompt) - 1 :]
        spent = sum(gen_steps) / max(1, len(gen_steps))
        print(
            f"=== policy {kind}: {len(new)} new tokens, {spent:.2f} forward steps per token "
            f"(fixed-K: {len(runner.pause_ids) + 1}; {trace.forward_calls} decoder calls)"
        )
        print(text_of(tok, ids))
        if args.html and kind == args.policy:
            from cyb_lightning.evaluation.render import token_pieces, write_html

            # Token t's colour: the pauses spent after it (steps − 1), as in the report's coloured text.
            pieces = token_pieces(tok, ids[1 : len(steps)])
            write_html(args.html, pieces, [s - 1 for s in steps[1:]], len(runner.pause_ids), title=f"policy {kind}")
            print(f"coloured text: {args.html}")
