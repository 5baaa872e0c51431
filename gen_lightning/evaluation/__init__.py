"""Evaluation of generative models: generate -> features -> FID / KID / CLIP score against a cached reference, and the
world-model evaluator. The callbacks schedule it during training; `gen-lightning evaluate` runs the same code."""
