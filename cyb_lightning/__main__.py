"""``python -m cyb_lightning <command>``: Lightning's fit/validate/test/predict, plus our own tools.

Each extra command is a ``main(argv)`` in its own module, imported only when called, so a training run
never pays for (or breaks on) the imports of a tool it does not use.
"""

from __future__ import annotations

import importlib
import sys

# command → "module:function"; the function takes the remaining argv.
COMMANDS: dict[str, str] = {
    "report": "cyb_lightning.commands.report:main",
    "generate": "cyb_lightning.commands.generate:main",
    "consolidate": "cyb_lightning.checkpoint:main",
    "pick-checkpoint": "cyb_lightning.resume:main",
    "download-c4": "cyb_lightning.data.download:main",
    "experiment": "cyb_lightning.experiments.reproduce:main",
}


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in COMMANDS:
        module, func = COMMANDS[args[0]].split(":")
        getattr(importlib.import_module(module), func)(args[1:])
        return
    if args and args[0] in ("-h", "--help"):
        print("extra commands: " + (", ".join(sorted(COMMANDS)) or "none") + "; Lightning's follow.\n")
    from cyb_lightning.cli import main as lightning_main

    lightning_main(argv)  # None: LightningCLI reads sys.argv itself
    end_process_group()


def end_process_group() -> None:
    """End the process group that a multi-process run leaves behind (Lightning does not).

    Left to the interpreter's exit, gloo's threads and sockets are freed during finalisation, in no set
    order and racing the peer's closing connections: the process can abort (SIGABRT, "terminate called
    without an active exception") after a successful run. So the ranks meet at a barrier (every rank is past
    its last collective), drop what still holds the group (a trainer's strategy, a device mesh, sharded
    parameters), and destroy it while the interpreter is whole. Only on success: after an exception other
    ranks may still wait in a collective, and the barrier or the destroy would hang there.
    """
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        gc.collect()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
