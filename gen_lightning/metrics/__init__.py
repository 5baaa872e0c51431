"""Generative metrics: the standard FID Inception offline, FID/KID (torchmetrics) over one feature pass.

Import the submodules directly (`gen_lightning.metrics.generative`): they import torchmetrics.
"""
