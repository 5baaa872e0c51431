"""FID against the number of network evaluations (NFE) for each sampler of a checkpoint: the few-step table of
bench/RESULTS.md ("Few steps").

Each row: `sampler:steps` drawn from the same seeds (1,000 samples by default), FID/KID against the val split beside the
metric's floor (as many real training images), the NFE the sampler spent, the sampling wall time per 1,000 samples
(network + sampler only, not the Inception) and a grid of the first 64 samples. Rows are appended to a JSON-lines file
as they finish, so a long sweep that is cut off keeps what it measured; `--table` prints that file as markdown.

    .venv/bin/python -m bench.fid_vs_nfe --ckpt runs/ddpm_emoji/checkpoints/last.ckpt --data data/emoji \
        --rows ddim:1,2,4,8,16,50 dpm++:1,2,4,8,10,16 heun:2,3,5,9 --out bench/fid_vs_nfe
    .venv/bin/python -m bench.fid_vs_nfe --table bench/fid_vs_nfe/rows.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gen_lightning.data.datamodule import ShardDataModule
from gen_lightning.data.urls import train_split_of
from gen_lightning.evaluation.generative import GenerativeEvaluator
from gen_lightning.evaluation.reference import Reference
from gen_lightning.images import make_grid, save_image_atomic
from gen_lightning.models.loading import load_model


def parse_rows(specs: list[str]) -> list[tuple[str, int]]:
    """["ddim:1,2", "heun:3"] -> [("ddim", 1), ("ddim", 2), ("heun", 3)]."""
    rows = []
    for spec in specs:
        sampler, _, steps = spec.partition(":")
        if not steps:
            raise SystemExit(f"--rows {spec!r}: expected SAMPLER:STEPS[,STEPS...]")
        rows += [(sampler, int(s)) for s in steps.split(",")]
    return rows


class TimedSampling:
    """Wraps model.sample: adds up its wall time and keeps the first `keep` images for the grid."""

    def __init__(self, sample: Callable[..., torch.Tensor], keep: int = 64) -> None:
        self.sample, self.keep = sample, keep
        self.seconds, self.images = 0.0, []

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        start = time.perf_counter()
        images = self.sample(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        if sum(len(i) for i in self.images) < self.keep:
            self.images.append(images[: self.keep])
        return images


def evaluations_per_run(model: Any, sampler: str, steps: int) -> int:
    """The network evaluations one sampling run spends (Heun: 2 per step but the last)."""
    made = model.make_sampler(sampler)
    made.set_timesteps(steps)
    count = getattr(made, "num_evaluations", None)
    return int(count()) if callable(count) else len(made.timesteps)


def measure(model: Any, reference: Reference, sampler: str, steps: int, ns: argparse.Namespace) -> dict[str, Any]:
    evaluator = GenerativeEvaluator(steps=steps, sampler=sampler, batch_size=ns.batch_size, cache_dir=ns.cache_dir)
    evaluator.setup(model)
    timed = TimedSampling(model.sample)
    model.sample = timed  # the evaluator draws through model.sample: time exactly that
    try:
        start = time.perf_counter()
        results, _ = evaluator(model, reference, ns.num_samples, torch.Generator().manual_seed(ns.seed))
        total = time.perf_counter() - start
    finally:
        del model.sample
    grid = Path(ns.out) / f"{ns.label}_{sampler}_{steps}.png"
    save_image_atomic(make_grid(torch.cat(timed.images)[:64]), grid)
    return {
        "label": ns.label, "checkpoint": str(ns.ckpt), "sampler": sampler, "steps": steps,
        "nfe": evaluations_per_run(model, sampler, steps), **results,
        "sampling_s_per_1000": timed.seconds * 1000 / ns.num_samples, "total_s": total,
        "num_samples": ns.num_samples, "seed": ns.seed, "grid": str(grid), "threads": torch.get_num_threads(),
    }  # fmt: skip


def markdown(rows_file: Path) -> str:
    rows = [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()]
    lines = [
        "| model | sampler | steps | NFE | FID | FID floor | KID ×10³ | sampling s / 1,000 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['label']} | {r['sampler']} | {r['steps']} | {r['nfe']} | {r['fid']:.1f} | {r['fid_floor']:.1f} | "
            f"{1000 * r['kid']:.1f} | {r['sampling_s_per_1000']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", help="checkpoint (or export folder) to sample from")
    parser.add_argument("--label", default="teacher", help="the model's name in the table")
    parser.add_argument("--data", help="emoji shard folder: val split = reference, train split = floor")
    parser.add_argument("--rows", nargs="+", default=[], help="SAMPLER:STEPS[,STEPS...] ...")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--out", default="bench/fid_vs_nfe", help="folder for rows.jsonl and the grids")
    parser.add_argument("--table", type=Path, help="print this rows.jsonl as markdown and exit")
    ns = parser.parse_args()
    if ns.table:
        print(markdown(ns.table))
        return
    if not (ns.ckpt and ns.data and ns.rows):
        parser.error("--ckpt, --data and --rows are needed (or --table)")
    model = load_model(ns.ckpt).eval()
    image_size = int(model.hparams.image_size)
    data = ShardDataModule(train=train_split_of(ns.data), val=ns.data, image_size=image_size, batch_size=100)
    data.setup("validate")
    reference = Reference.from_datamodule(data, "fid_vs_nfe")
    Path(ns.out).mkdir(parents=True, exist_ok=True)
    for sampler, steps in parse_rows(ns.rows):
        row = measure(model, reference, sampler, steps, ns)
        with open(Path(ns.out) / "rows.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{ns.label} {sampler}:{steps} NFE {row['nfe']}: FID {row['fid']:.2f} (floor {row['fid_floor']:.2f}), "
              f"sampling {row['sampling_s_per_1000']:.0f} s / 1,000", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
