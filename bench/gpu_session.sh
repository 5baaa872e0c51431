#!/usr/bin/env bash
# The one prepared script for a session that is lent a GPU (a few minutes of device time): the GPU tests (bf16 DDP and
# FSDP fits of the diffusion config, DeepSpeed fits of CLIP), the MFU benchmark of the latent-diffusion UNet and DiT
# at 256² in bf16, and bf16 fits of a few hundred steps of the DDPM and the flow + DiT emoji configs. Everything it prints goes to $OUT (or ./gpu_session/) for
# bench/RESULTS.md.
#   bash bench/gpu_session.sh            # on the GPU machine, from the repository root, after `make setup`
set -uo pipefail
out=${OUT:-gpu_session}
mkdir -p "$out"
py=.venv/bin/python
nvidia-smi | tee "$out/nvidia-smi.txt"
$py -m pytest -q -ra tests/test_presets.py tests/test_world_model.py -k gpu 2>&1 | tail -15 | tee "$out/gpu_tests.txt"
$py -m bench.mfu --size 256 --batch 32 2>&1 | tail -8 | tee "$out/mfu.txt"
$py -m bench.mfu --size 256 --batch 32 --compile 2>&1 | tail -8 | tee "$out/mfu_compile.txt"
$py -m bench.mfu --backbone dit --size 256 --batch 32 2>&1 | tail -9 | tee "$out/mfu_dit.txt"
WANDB_MODE=disabled .venv/bin/gen-lightning fit --config configs/ddpm_emoji.yaml --config configs/trainer/ddp-bf16.yaml \
  --trainer.devices=1 --trainer.max_steps=300 --trainer.default_root_dir="$out/ddpm_bf16" --no-resume \
  --trainer.enable_progress_bar=false 2>&1 | tail -20 | tee "$out/ddpm_bf16_fit.txt"
WANDB_MODE=disabled .venv/bin/gen-lightning fit --config configs/flow_dit_emoji.yaml \
  --config configs/trainer/ddp-bf16.yaml --trainer.devices=1 --trainer.max_steps=300 \
  --trainer.default_root_dir="$out/flow_dit_bf16" --no-resume --trainer.enable_progress_bar=false 2>&1 | tail -20 \
  | tee "$out/flow_dit_bf16_fit.txt"
