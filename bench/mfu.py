"""Training throughput and model FLOPs utilisation (MFU) of the latent-diffusion backbone, UNet or DiT.

    .venv/bin/python -m bench.mfu --device cuda --size 256 --batch 32 [--steps 30] [--peak-tflops 989]
    .venv/bin/python -m bench.mfu --backbone dit --size 256 --batch 32 [--patch-size 2 --width 1152 --depth 28]

The UNet is our latent-diffusion UNet in a Stable-Diffusion-like shape (widths `--widths`, self- and cross-attention
below the first level, cross-attention to a 77-token text context); the DiT (`--backbone dit`, DiT-XL/2's shape by
default) cross-attends to the same context and takes its pooled state through adaLN, as in LatentDiffusionModel. Both
run at `--size`² pixels, i.e. `--size`/8 latents with 4 channels (an f=8 VAE, as Stable Diffusion). One step = forward
+ loss + backward + fused AdamW, under bf16 autocast on CUDA (fp32 on CPU).

FLOPs are counted, not estimated: torch.utils.flop_counter.FlopCounterMode records the matmul/conv/SDPA FLOPs of
one real training step (forward and backward; elementwise ops, norms and the optimizer are not counted, as in the
usual MFU definition). MFU = counted FLOPs per step × steps/s ÷ the device's peak dense bf16 FLOP/s
(`--peak-tflops`; 989 for H100/H200 SXM). For the DiT, the counted FLOPs of one forward pass are printed beside
nn.dit.dit_forward_flops (the closed form): equal when the counter saw every block (on CUDA; on CPU the counter has
no formula for SDPA's flash kernel and misses the attention products, ~2% of a small DiT). Not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from gen_lightning.nn.dit import DiT, DiTConfig, dit_forward_flops
from gen_lightning.nn.unet import UNet


def build_dit(ns: argparse.Namespace, context_dim: int, device: str) -> DiT:
    config = DiTConfig(
        in_channels=4, input_size=ns.size // 8, patch_size=ns.patch_size, width=ns.width, depth=ns.depth,
        num_heads=ns.heads, context_dim=context_dim, cond_dim=context_dim,
        gradient_checkpointing=ns.gradient_checkpointing,
    )  # fmt: skip
    return DiT(config).to(device)


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
    parser.add_argument("--backbone", choices=("unet", "dit"), default="unet")
    parser.add_argument("--patch-size", type=int, default=2, help="DiT")
    parser.add_argument("--width", type=int, default=1152, help="DiT")
    parser.add_argument("--depth", type=int, default=28, help="DiT")
    parser.add_argument("--heads", type=int, default=16, help="DiT")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="DiT: recompute each block in backward")
    ns = parser.parse_args()
    torch.manual_seed(0)
    device, context_dim, tokens = ns.device, 768, 77
    unet = build(ns.widths, context_dim, device) if ns.backbone == "unet" else build_dit(ns, context_dim, device)
    params = sum(p.numel() for p in unet.parameters())
    if ns.compile:
        unet.compile()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, fused=True)
    side = ns.size // 8
    x = torch.randn(ns.batch, 4, side, side, device=device).contiguous(memory_format=torch.channels_last)
    context = torch.randn(ns.batch, tokens, context_dim, device=device)
    # The DiT also takes the pooled caption (adaLN); the UNet of this bench only cross-attends.
    extra = {"cond": context[:, -1]} if ns.backbone == "dit" else {}
    t = torch.randint(0, 1000, (ns.batch,), device=device)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32

    def step() -> None:
        with torch.autocast(device_type=device.split(":")[0], dtype=dtype, enabled=dtype == torch.bfloat16):
            loss = torch.nn.functional.mse_loss(unet(x, t, context, **extra).float(), x)
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
    shape = f"UNet widths {ns.widths}" if ns.backbone == "unet" else f"DiT {unet.config}"
    print(f"device {name}, {dtype}, {shape}, {params / 1e6:.0f}M parameters, compile={ns.compile}")
    print(f"{ns.size}² images ({side}² latents), batch {ns.batch}: {seconds * 1000:.1f} ms/step (median of {ns.steps})")
    print(f"images/s: {ns.batch / seconds:.1f}")
    print(f"counted FLOPs per step (fwd+bwd matmul/conv/attention): {flops / 1e12:.2f} TFLOP")
    if ns.backbone == "dit":
        forward = FlopCounterMode(display=False)
        with forward, torch.no_grad():
            unet(x, t, context, **extra)
        closed_form = dit_forward_flops(unet.config, side, side, tokens, ns.batch)
        counted = forward.get_total_flops()
        print(f"forward: counted {counted / 1e12:.3f} TFLOP = {counted / closed_form:.4f} x the closed form")
    print(f"achieved {achieved / 1e12:.1f} TFLOP/s; MFU vs {ns.peak_tflops:.0f} TFLOP/s peak: "
          f"{100 * achieved / (ns.peak_tflops * 1e12):.1f}% (goal ≥ 45%)")  # fmt: skip
    if device.startswith("cuda"):
        print(f"peak memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
