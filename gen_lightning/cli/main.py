"""The `gen-lightning` entry point: one command name -> its module. Heavy imports (torch, Lightning: ~4 s) happen
inside the command that needs them, so `--help` and `gen-lightning shards ...` start quickly."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from gen_lightning.cli.sample import evaluate_main, sample_main
from gen_lightning.cli.serve import export_main, play_main
from gen_lightning.cli.shards import shards_main
from gen_lightning.cli.training import run_lightning_cli

LIGHTNING_SUBCOMMANDS = ("fit", "validate", "test")

USAGE = """usage: gen-lightning <command> [options]

Training (LightningCLI; `gen-lightning fit --help` for every option):
  fit        train:         gen-lightning fit --config configs/ddpm_emoji.yaml [--trainer.max_steps 100]
  validate   validation:    gen-lightning validate --config CONFIG --ckpt_path CKPT
  test       test loop:     gen-lightning test --config CONFIG --ckpt_path CKPT

Tools:
  shards     write webdataset shards:  gen-lightning shards emoji --out data/emoji --size 64
                                       gen-lightning shards folder SRC --out DIR [--size 64]
                                       gen-lightning shards ui --out data/ui --episodes 600  (Tk app on Xvfb)
  sample     images from a checkpoint: gen-lightning sample --ckpt CKPT --n 64 --sampler ddim --steps 50 --out grid.png
  evaluate   FID/KID JSON report:      gen-lightning evaluate --ckpt CKPT --data data/emoji --num-samples 1000
             (a world model: one-step PSNR/SSIM/cursor accuracy/FID + 16-step rollouts on held-out episodes)
  play       drive a world model:      gen-lightning play --ckpt CKPT [--port 8000]
  export     safetensors / diffusers:  gen-lightning export --ckpt CKPT --out DIR [--format diffusers]
             (sample, evaluate and play take such a folder as --ckpt)
"""


TOOLS = {"shards": shards_main, "sample": sample_main, "evaluate": evaluate_main, "play": play_main,
         "export": export_main}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    from gen_lightning.console import configure_console

    argv = list(sys.argv[1:] if argv is None else argv)
    configure_console()  # one log format, each line once, inapplicable library warnings silenced
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return
    command, rest = argv[0], argv[1:]
    if command in TOOLS:
        TOOLS[command](rest)
    elif command in LIGHTNING_SUBCOMMANDS:
        run_lightning_cli([command, *rest])
    else:
        print(USAGE, file=sys.stderr)
        sys.exit(f"gen-lightning: unknown command {command!r}")


def console_main() -> None:
    """The `gen-lightning` console script: bad input ends with one line naming the culprit, not a traceback."""
    from gen_lightning.errors import UserInputError

    try:
        main()
    except UserInputError as error:
        sys.exit(f"gen-lightning: error: {error}")
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM where a command turns it into one: clean-ups have run by now
        print("gen-lightning: interrupted", file=sys.stderr)
        sys.exit(130)
