"""Training throughput and model FLOPs utilisation (MFU) of the latent-diffusion UNet.

    .venv/bin/python -m bench.mfu --device cuda --size 256 --batch 32 [--steps 30] [--peak-tflops 989]

The UNet is our latent-diffusion UNet in a Stable-Diffusion-like shape (widths `--widths`, self- and cross-attention
below the first level, cross-attention to a 77-token text context) at `--size`² pixels, i.e. `--size`/8 latents with 4
channels (an f=8 VAE, as Stable Diffusion). One step = forward + loss + backward + fused AdamW, under bf16 autocast on
CUDA (fp32 on CPU).

FLOPs are counted, not estimated: torch.utils.flop_counter.FlopCounterMode records the matmul/conv/SDPA FLOPs of
one real training step (forward and backward; elementwise ops, norms and the optimizer are not counted, as in the
usual MFU definition). MFU = counted FLOPs per step × steps/s ÷ the device's peak dense bf16 FLOP/s
(`--peak-tflops`; 989 for H100/H200 SXM). Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from gen_lightning.nn.unet import UNet


def build(widths: list[int], context_dim: int, device: str) -> UNet:
    config = {
        "in_channels": 4,
        "out_channels": 4,
        "channels": widths,
        "num_res_blocks": 2,
        "attention_levels": list(range(1, len(widths))),
        "num_heads": 8,
        "context_dim": context_dim,
    }
    return UNet(config).to(device, memory_format=torch.channels_last)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latents are size/8)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--widths", type=int, nargs="+", default=[320, 640, 1280, 1280])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--compile", action="store_true")
    ns = parser.parse_args()
    torch.manual_seed(0)
    device, context_dim, tokens = ns.device, 768, 77
    unet = build(ns.widths, context_dim, device)
    params = sum(p.numel() for p in unet.parameters())
    if ns.compile:
        unet.compile()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=True)
    side = ns.size // 8
    x = torch.randn(ns.batch, 4, side, side, device=device).contiguous(memory_format=torch.channels_last)
    context = torch.randn(ns.batch, tokens, context_dim, device=device)
    t = torch.randint(0, 1000, (ns.batch,), device=device)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32

    def step() -> None:
        with torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=dtype == torch.bfloat16):
            loss = torch.nn.functional.mse_loss(unet(x, t, context).float(), x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()
    for _ in range(ns.warmup):
        step()
    sync()
    times = []
    for _ in range(ns.steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    achieved = flops / seconds
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    print(f"device {name}, {dtype}, UNet widths {ns.widths}, {params / 1e6:.0f}M parameters, compile={ns.compile}")
    print(f"{ns.size}² images ({side}² latents), batch {ns.batch}: {seconds * 1000:.1f} ms/step (median of {ns.steps})")
    print(f"images/s: {ns.batch / seconds:.1f}")
    print(f"counted FLOPs per step (fwd+bwd matmul/conv/attention): {flops / 1e12:.2f} TFLOP")
    print(f"achieved {achieved / 1e12:.1f} TFLOP/s; MFU vs {ns.peak_tflops:.0f} TFLOP/s peak: "
          f"{100 * achieved / (ns.peak_tflops * 1e12):.1f}% (goal ≥ 45%)")  # fmt: skip
    if device.startswith("cuda"):
        print(f"peak memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
