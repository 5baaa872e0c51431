"""gen_lightning: generative models trained with PyTorch Lightning."""
