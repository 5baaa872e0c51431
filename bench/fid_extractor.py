"""Inception feature throughput: gen_lightning's FIDInceptionV3 wrapper (uint8 in, TF1 resize, scaling) vs calling
the TorchScript FID Inception directly on an already-prepared 299×299 float batch.

    .venv/bin/python -m bench.fid_extractor [--images 64] [--batch 32] [--repeats 3]

Prints images/s of both and the time ratio wrapper / direct (goal <= 1.05). Not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from gen_lightning.metrics.inception import FIDInceptionV3, resize_like_tf1


def timed(fn, batches: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        for batch in batches:
            fn(batch)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32, help="side of the input images before the 299 resize")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    wrapper = FIDInceptionV3()
    generator = torch.Generator().manual_seed(0)
    uint8 = [
        torch.randint(0, 256, (args.batch, 3, args.size, args.size), dtype=torch.uint8, generator=generator)
        for _ in range(args.images // args.batch)
    ]
    prepared = [(resize_like_tf1(b.float()) - 128.0) / 128.0 for b in uint8]
    timed(wrapper, uint8[:1])  # warm-up (TorchScript profiling runs)
    wrapped, direct = [], []
    for _ in range(args.repeats):
        direct.append(timed(wrapper._net, prepared))
        wrapped.append(timed(wrapper, uint8))
    n = len(uint8) * args.batch
    d, w = statistics.median(direct), statistics.median(wrapped)
    print(f"machine: {os.cpu_count()} cpus, torch {torch.__version__}, {n} images of {args.size}², batch {args.batch}")
    print(f"direct TorchScript on prepared 299² input: {n / d:.2f} images/s")
    print(f"FIDInceptionV3 wrapper (uint8 -> resize -> scale -> net): {n / w:.2f} images/s")
    print(f"time ratio wrapper / direct: {w / d:.3f}  (goal <= 1.05)")


if __name__ == "__main__":
    main()
