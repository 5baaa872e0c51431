"""FID and KID over one shared feature pass, with torchmetrics doing the statistics and the cross-rank sync.

torchmetrics' FrechetInceptionDistance / KernelInceptionDistance each run their own `feature` network; with the
standard Inception at ~0.14 s per image on a CPU, that would double the cost. Here the Inception runs once per batch
and both metrics receive its features through an identity "feature network".

Memory: FID keeps running sums (mean and covariance accumulators: constant in N). KID needs the features
themselves for its subset estimates; it keeps at most `kid_max_samples` per side (the first ones seen on each rank).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from gen_lightning.atomic import write_atomic
from gen_lightning.images import to_uint8
from gen_lightning.metrics.inception import FIDInceptionV3

REAL_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


class PrecomputedFeatures(nn.Module):
    """Identity 'feature network': the metrics are fed features, not images."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


class GenerativeMetrics(nn.Module):
    """FID (+ optional KID) between real images and generated ones, both given as float [-1, 1] NCHW.

    Real statistics survive `reset()` (they are the reference); `save_real` / `load_real` cache them on disk.
    """

    def __init__(
        self,
        extractor: FIDInceptionV3 | None = None,
        kid: bool = True,
        kid_subset_size: int = 1000,
        kid_subsets: int = 100,
        kid_max_samples: int = 10_000,
    ) -> None:
        super().__init__()
        # Not a registered submodule: the 87 MB extractor stays out of every state_dict.
        self.__dict__["extractor"] = extractor if extractor is not None else FIDInceptionV3()
        features = PrecomputedFeatures(FIDInceptionV3.num_features)
        self.fid = FrechetInceptionDistance(feature=features, reset_real_features=False)
        self.fid.set_dtype(torch.float64)
        self.kid = (
            KernelInceptionDistance(
                feature=features, subset_size=kid_subset_size, subsets=kid_subsets, reset_real_features=False
            )
            if kid
            else None
        )
        self.kid_max_samples = kid_max_samples
        self._kid_seen = {True: 0, False: 0}

    def _apply(self, fn, recurse: bool = True):
        self.extractor._apply(fn)
        return super()._apply(fn, recurse)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.extractor(to_uint8(images))

    def update(self, images: torch.Tensor, real: bool) -> None:
        self.update_features(self.features(images), real)

    def update_features(self, features: torch.Tensor, real: bool) -> None:
        self.fid.update(features, real=real)
        if self.kid is not None and self._kid_seen[real] < self.kid_max_samples:
            keep = features[: self.kid_max_samples - self._kid_seen[real]]
            self.kid.update(keep, real=real)
            self._kid_seen[real] += keep.shape[0]

    @property
    def num_real(self) -> int:
        return int(self.fid.real_features_num_samples)

    def _kid_counts(self) -> tuple[int, int]:
        """(fake, real) KID features held over all ranks. Every rank must decide alike whether to compute KID (its
        compute is a collective), and under DDP one rank may hold all the real ones (a cached reference)."""
        assert self.kid is not None
        counts = torch.tensor(
            [sum(f.shape[0] for f in self.kid.fake_features), sum(f.shape[0] for f in self.kid.real_features)],
            dtype=torch.int64,
            device=self.fid.real_features_sum.device,
        )
        if self.kid.sync_on_compute and dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts, group=self.kid.process_group)
        return int(counts[0]), int(counts[1])

    def compute(self) -> dict[str, float]:
        result = {"fid": float(self.fid.compute())}
        if self.kid is not None:
            configured = self.kid.subset_size
            subset = min(configured, *self._kid_counts())
            if subset >= 2:
                self.kid.subset_size = subset  # KID needs subset_size <= samples; small evaluations shrink it
                # KID draws its subsets from torch's global RNG: fix the draws, so every evaluation (and every rank)
                # uses the same ones and the training run's random stream is not consumed by evaluating.
                try:
                    with torch.random.fork_rng(devices=[]):
                        torch.default_generator.manual_seed(0)  # CPU only (KID's randperm): CUDA's is not forked
                        mean, std = self.kid.compute()
                finally:
                    self.kid.subset_size = configured  # for the next evaluation, which may have more samples
                result.update(kid=float(mean), kid_std=float(std))
        return result

    def reset(self) -> None:
        """Forget the generated side; keep the real reference."""
        self.fid.reset()
        if self.kid is not None:
            self.kid.reset()
        self._kid_seen[False] = 0

    # --- reference statistics cache -------------------------------------------------------------------------------
    def real_state(self) -> dict[str, Any]:
        """The real-side statistics summed over all ranks (call on every rank; the result is the same everywhere)."""
        with self.fid.sync_context(should_unsync=True):
            state = {name: getattr(self.fid, name).detach().cpu().clone() for name in REAL_STATES}
        if self.kid is not None:
            with self.kid.sync_context(should_unsync=True):
                real = self.kid.real_features
                if isinstance(real, torch.Tensor) or real:
                    state["kid_real_features"] = (real if isinstance(real, torch.Tensor) else torch.cat(real)).cpu()
        return state

    def save_real(self, path: str | Path, key: dict[str, Any], write: bool = True) -> None:
        """Atomically write the (all-rank) real statistics with the key they were computed for (shards, extractor,
        size). Every rank must call it (the sync is a collective); only the one with `write` writes."""
        state = self.real_state()
        if not write:
            return
        write_atomic(Path(path), lambda handle: torch.save({"key": json.dumps(key, sort_keys=True), **state}, handle))

    def load_real(self, path: str | Path, key: dict[str, Any], rank: int = 0, world_size: int = 1) -> bool:
        """Load cached real statistics if they exist and were computed for exactly `key`; False otherwise.

        Under DDP every rank calls it with its rank. The states are combined over ranks at compute(): FID's sums
        are added, so rank 0 holds the cached totals and the others zeros; KID's features are concatenated, so each
        rank holds its slice of them (possibly empty: torchmetrics cannot gather a rank's empty list)."""
        path = Path(path)
        if not path.is_file():
            return False
        cached = torch.load(path, map_location="cpu", weights_only=True)
        if cached.get("key") != json.dumps(key, sort_keys=True):
            return False
        device = self.fid.real_features_sum.device
        if rank == 0:
            for name in REAL_STATES:
                setattr(self.fid, name, cached[name].to(device))
        if self.kid is not None and "kid_real_features" in cached:
            share = cached["kid_real_features"].tensor_split(world_size)[rank]
            self.kid.real_features = [share.to(device)]
            self._kid_seen[True] = share.shape[0]
        return True
