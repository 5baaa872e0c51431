"""Evaluation of generative models: generate -> features -> FID / KID / CLIP score against a cached reference, and the
world-model evaluator. The callbacks schedule it during training; `gen-lightning evaluate` runs the same code.

Every evaluator has one interface: `setup(model)`, then `evaluator(model, reference, num_samples, generator, rank,
world) -> (metrics, images)` as often as wanted, and `report(model)` (what the numbers were measured with);
`evaluators.evaluator_for(model)` picks the one for what the model declares itself to be.

Import from the modules: this package stays import-free, so `gen-lightning sample --help` does not load torch.
"""
