"""FID against the number of network evaluations (NFE) for each sampler of a checkpoint: the few-step table of
bench/RESULTS.md ("Few steps").

Each row: `sampler:steps` drawn from the same seeds (1,000 samples by default), FID/KID against the val split beside the
metric's floor (as many real training images), the NFE the sampler spent, the sampling wall time per 1,000 samples
(network + sampler only; `--timing-samples` measures it apart, on a quiet machine) and a grid of the first 64 samples.
Rows are appended to a JSON-lines file as they finish, so a long sweep that is cut off keeps what it measured;
`--table` prints that file as markdown.

    .venv/bin/python -m bench.fid_vs_nfe --ckpt runs/ddpm_emoji/checkpoints/last.ckpt --data data/emoji \
        --rows ddim:1,2,4,8,16,50 dpm++:1,2,4,8,10,16 heun:2,3,5,9 --out bench/fid_vs_nfe
    .venv/bin/python -m bench.fid_vs_nfe --ckpt ... --rows ... --timing-samples 256   # wall time, nothing else running
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
    """The network evaluations one sampling run spends: one per entry of the sampler's timesteps, as the sampling
    loop calls the network (Heun lists each step's second evaluation too)."""
    made = model.make_sampler(sampler)
    made.set_timesteps(steps)
    return len(made.timesteps)


def time_sampling(model: Any, sampler: str, steps: int, ns: argparse.Namespace) -> dict[str, Any]:
    """Sampling wall time per 1,000 images from `--timing-samples` images after one warm-up batch, no Inception:
    run on a quiet machine, apart from the FID sweep (whose timings include the Inception's competition)."""
    generator = torch.Generator().manual_seed(ns.seed)
    model.sample(min(ns.batch_size, 16), steps=steps, sampler=sampler, generator=generator)  # warm-up
    start = time.perf_counter()
    for first in range(0, ns.timing_samples, ns.batch_size):
        model.sample(min(ns.batch_size, ns.timing_samples - first), steps=steps, sampler=sampler, generator=generator)
    seconds = time.perf_counter() - start
    return {"label": ns.label, "sampler": sampler, "steps": steps, "nfe": evaluations_per_run(model, sampler, steps),
            "sampling_s_per_1000": seconds * 1000 / ns.timing_samples, "timing_samples": ns.timing_samples,
            "threads": torch.get_num_threads()}  # fmt: skip


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


def read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def markdown(rows_file: Path) -> str:
    """The FID rows as a table, by model, sampler and NFE, each FID also as a ratio to the first model's DDIM-50 (the
    baseline of the few-step targets); the wall time from timing.jsonl beside them when measured (quiet machine)."""
    rows = read_rows(rows_file)
    timings = {(r["label"], r["sampler"], r["steps"]): r for r in read_rows(rows_file.parent / "timing.jsonl")}
    labels = list(dict.fromkeys(r["label"] for r in rows))
    samplers = list(dict.fromkeys(r["sampler"] for r in rows))
    rows.sort(key=lambda r: (labels.index(r["label"]), samplers.index(r["sampler"]), r["nfe"]))
    base = next((r["fid"] for r in rows if r["label"] == labels[0] and (r["sampler"], r["nfe"]) == ("ddim", 50)), None)
    lines = [
        "| model | sampler | steps | NFE | FID | FID / DDIM-50 | FID floor | KID ×10³ | sampling s / 1,000 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        timing = timings.get((r["label"], r["sampler"], r["steps"]))
        seconds = f"{timing['sampling_s_per_1000']:.0f}" if timing else "–"
        ratio = f"{r['fid'] / base:.2f}" if base else "–"
        lines.append(
            f"| {r['label']} | {r['sampler']} | {r['steps']} | {r['nfe']} | {r['fid']:.1f} | {ratio} | "
            f"{r['fid_floor']:.1f} | {1000 * r['kid']:.1f} | {seconds} |"
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
    parser.add_argument("--timing-samples", type=int, default=0, help="instead of FID: time sampling this many "
                        "images per row (to timing.jsonl; run with nothing else on the machine)")  # fmt: skip
    ns = parser.parse_args()
    if ns.table:
        print(markdown(ns.table))
        return
    if not (ns.ckpt and ns.data and ns.rows):
        parser.error("--ckpt, --data and --rows are needed (or --table)")
    model = load_model(ns.ckpt).eval()
    Path(ns.out).mkdir(parents=True, exist_ok=True)
    if ns.timing_samples:
        for sampler, steps in parse_rows(ns.rows):
            row = time_sampling(model, sampler, steps, ns)
            with open(Path(ns.out) / "timing.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            print(
                f"{ns.label} {sampler}:{steps} NFE {row['nfe']}: {row['sampling_s_per_1000']:.1f} s / 1,000", flush=True
            )
        return
    image_size = int(model.hparams.image_size)
    data = ShardDataModule(train=train_split_of(ns.data), val=ns.data, image_size=image_size, batch_size=100)
    data.setup("validate")
    reference = Reference.from_datamodule(data, "fid_vs_nfe")
    for sampler, steps in parse_rows(ns.rows):
        row = measure(model, reference, sampler, steps, ns)
        with open(Path(ns.out) / "rows.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{ns.label} {sampler}:{steps} NFE {row['nfe']}: FID {row['fid']:.2f} (floor {row['fid_floor']:.2f}), "
              f"sampling {row['sampling_s_per_1000']:.0f} s / 1,000", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
