"""Validation on any number of shards and readers (ranks × loader workers): every val sample exactly once, on real
DataLoader workers and on real gloo ranks under Lightning's DDP, with the val metric of one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from gen_lightning.data.datamodule import ShardDataModule, val_reader_parts, val_samples_per_rank
from gen_lightning.data.decode import drain_skipped
from gen_lightning.data.shard_writer import write_shards
from gen_lightning.data.urls import ShardPatternError
from tests.conftest import REPO, shape_png, toy_samples, write_tar
from tests.test_datamodule import free_port


def owners(sizes: list[int], world: int, workers: int) -> Counter:
    """(shard, sample index) -> how many readers keep it."""
    readers = world * workers
    kept: Counter = Counter()
    for reader in range(readers):
        for shard, share, shares in val_reader_parts(len(sizes), reader, readers):
            kept.update((shard, index) for index in range(share, sizes[shard], shares))
    return kept


@pytest.mark.parametrize(
    ("num_shards", "world", "workers"),
    [(1, 1, 1), (1, 2, 2), (3, 3, 3), (2, 1, 3), (3, 2, 2), (5, 2, 2), (4, 8, 4), (31, 8, 4), (32, 8, 4), (70, 8, 4)],
)
def test_every_val_sample_has_exactly_one_reader(num_shards, world, workers):
    sizes = [5 + 3 * shard for shard in range(num_shards)]
    expected = Counter({(shard, index): 1 for shard, size in enumerate(sizes) for index in range(size)})
    assert owners(sizes, world, workers) == expected
    readers = world * workers
    assert all(val_reader_parts(num_shards, reader, readers) for reader in range(readers))  # nobody idles


def test_enough_shards_keep_the_plain_split_by_rank_then_worker():
    """Whole shards, no sharing, and the same split as before: urls[rank::world][worker::workers]."""
    urls = list(range(11))
    world, workers = 2, 3
    for rank in range(world):
        for worker in range(workers):
            parts = val_reader_parts(len(urls), rank + world * worker, world * workers)
            assert [shard for shard, _, _ in parts] == urls[rank::world][worker::workers]
            assert all((share, shares) == (0, 1) for _, share, shares in parts)


def test_shared_shards_spread_over_ranks():
    """One shard on 8 ranks × 4 workers: each rank gets 1/8 of it; 3 shards on 3 ranks: one shard each."""
    assert val_samples_per_rank([320], world=8, workers=4) == [40] * 8
    assert val_samples_per_rank([10, 4, 4], world=3, workers=3) == [10, 4, 4]


def test_one_shard_on_three_loader_workers_is_read_once_and_its_faults_counted_once(tmp_path):
    """Real DataLoader workers share one shard: each sample once, and what is broken (an undecodable image, a
    repeated member, a cut at the end) counted once, not once per worker."""
    members = []
    for sample in toy_samples(9, size=8):
        members += [(f"{sample['__key__']}.png", sample["png"]), (f"{sample['__key__']}.txt", sample["txt"].encode())]
    members.insert(2, ("bad.png", b"not an image"))  # the shard's sample 1
    members.insert(6, ("toy_00002.png", shape_png("red", "circle", 8)))  # toy_00002.png twice in a row
    shard = write_tar(tmp_path / "val-000000.tar", members)
    with tarfile.open(shard) as tar:
        last = tar.getmembers()[-1]
    shard.write_bytes(shard.read_bytes()[: last.offset_data + last.size // 2])  # cut inside the last member
    read = {}
    for workers in (0, 3):
        drain_skipped()
        data = ShardDataModule(val=str(shard), image_size=8, batch_size=16, num_workers=workers)
        data.setup("validate")
        batches = list(data.val_dataloader())  # one partial batch per worker: every skip rides on it
        keys = [key for batch in batches for key in batch["__key__"]]
        read[workers] = (sorted(keys), sum(batch["skipped"] for batch in batches) + drain_skipped())
    keys, skipped = read[3]
    assert len(keys) == len(set(keys)) and (keys, skipped) == read[0]
    assert len(keys) == 9 and skipped == 3  # bad.png, the repeat, the cut (toy_00008 keeps its png)


def test_a_rank_left_without_val_samples_is_refused(tmp_path):
    """Two ranks, one val sample: the rank with none would never join the end-of-validation reduction (a hang)."""
    write_shards(toy_samples(1), tmp_path, samples_per_shard=4, val_fraction=1.0)
    data = ShardDataModule(val=str(tmp_path), num_workers=2)
    data._distributed = lambda: (0, 2)  # as on rank 0 of 2
    with pytest.raises(ShardPatternError, match=r"1 sample\(s\) in 1 shard\(s\) leave rank 1 of 2 without val"):
        data.setup("validate")
    ShardDataModule(val=str(tmp_path), num_workers=2).setup("validate")  # one rank: fine


def val_shards(folder: Path, sizes: list[int]) -> str:
    """Tar shards of toy samples with these sizes; their brace pattern."""
    folder.mkdir()
    samples = iter(toy_samples(sum(sizes), size=16))
    for index, size in enumerate(sizes):
        members = []
        for sample in (next(samples) for _ in range(size)):
            members += [(f"{sample['__key__']}.png", sample["png"]), (f"{sample['__key__']}.txt", b"a toy")]
        write_tar(folder / f"val-{index:06d}.tar", members)
    return str(folder / f"val-{{000000..{len(sizes) - 1:06d}}}.tar")


def validate_on_ranks(tmp_path: Path, sizes: list[int], world: int, workers: int) -> tuple[dict, list[dict]]:
    """Trainer.validate of one tiny VAE on these shards in one process, and on `world` gloo ranks × `workers`
    loader workers (tests/val_split_probe.py): (the one-process report, each rank's report)."""
    pattern, out = val_shards(tmp_path / "shards", sizes), tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "MASTER_PORT": str(free_port()), "PYTHONPATH": str(REPO)}
    probe = [sys.executable, str(REPO / "tests" / "val_split_probe.py"), pattern, str(out), str(world), str(workers)]
    subprocess.run(probe, check=True, timeout=240, cwd=REPO, env=env)
    one = json.loads((out / "world1_rank0.json").read_text())
    return one, [json.loads((out / f"world{world}_rank{rank}.json").read_text()) for rank in range(world)]


def assert_same_validation(one: dict, ranks: list[dict]) -> None:
    seen = [key for rank in ranks for key in rank["keys"]]
    assert len(seen) == len(set(seen)) and sorted(seen) == sorted(one["keys"])  # each val sample exactly once
    assert all(rank["keys"] for rank in ranks)
    # val/psnr: the posterior mode decoded, per image, so a sample's value does not depend on its batch or rank (the
    # VAE's other val terms draw noise per batch index and rank, so they do). Lightning's end-of-epoch reduction,
    # weighted by batch size, must give back one process's mean.
    for rank in ranks:
        assert rank["metrics"]["val/psnr"] == pytest.approx(one["metrics"]["val/psnr"], rel=1e-6, abs=0)


def test_one_val_shard_on_two_ranks_by_two_workers(tmp_path):
    one, ranks = validate_on_ranks(tmp_path, [14], world=2, workers=2)
    assert_same_validation(one, ranks)
    assert [len(rank["keys"]) for rank in ranks] == [7, 7]  # sample i of the shard goes to rank i mod 2


def test_three_val_shards_on_three_ranks_by_three_workers_with_unequal_batch_counts(tmp_path):
    """Each rank reads one shard, its 3 workers keep every 3rd sample. Rank 0 runs 4 val batches, the others 3:
    Lightning reduces the logged val metrics once, at the end of validation, so unequal counts do not hang."""
    one, ranks = validate_on_ranks(tmp_path, [10, 4, 4], world=3, workers=3)
    assert_same_validation(one, ranks)
    assert [rank["batches"] for rank in ranks] == [4, 3, 3]


def test_an_odd_val_count_on_two_ranks_is_averaged_over_every_sample(tmp_path):
    """13 samples on 2 ranks (7 and 6): Lightning averages the ranks' summed batch sizes as a tensor of the logged
    batch size's dtype, so an int count truncates 6.5 to 6 and the mean comes out 13/12 too large (Lightning #21859);
    the models log their val metrics with a float count (GenerativeModule.log_val_mean)."""
    one, ranks = validate_on_ranks(tmp_path, [13], world=2, workers=1)
    assert [len(rank["keys"]) for rank in ranks] == [7, 6]
    assert_same_validation(one, ranks)
