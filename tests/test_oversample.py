"""data.oversample on real tar shards: matching samples are drawn `factor` times as often, epochs keep their length,
and a rule that cannot match is refused (a field no sample has) or warned about (a value none has)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from gen_lightning.data.datamodule import ShardDataModule
from gen_lightning.errors import UserInputError
from tests.conftest import shape_png

RARE_SHARE = 0.2  # of the samples are kind "rare"


@pytest.fixture(scope="module")
def kinds_shards(tmp_path_factory) -> Path:
    """100 samples, every 5th of kind "rare", the rest "common"; 10 per shard."""
    from gen_lightning.data.shard_writer import write_shards

    png = shape_png("red", "circle", size=8)
    samples = (
        {"__key__": f"s{i:03d}", "png": png, "json": {"kind": "rare" if i % 5 == 0 else "common", "n": i}}
        for i in range(100)
    )
    out = tmp_path_factory.mktemp("kinds")
    write_shards(samples, out, samples_per_shard=10, val_fraction=0.0)
    return out


def stream_kinds(shards: Path, oversample: dict | None, batches: int = 60) -> tuple[list[str], int]:
    data = ShardDataModule(
        train=str(shards), image_size=8, batch_size=25, num_workers=0, shuffle_buffer=50, oversample=oversample,
        samples_per_epoch=25 * batches,
    )  # fmt: skip
    data.setup("fit")
    loader = data.train_dataloader()
    kinds = [meta["kind"] for batch in loader for meta in batch["meta"]]
    return kinds, len(loader)


def test_matching_samples_are_drawn_factor_times_as_often(kinds_shards):
    plain, plain_batches = stream_kinds(kinds_shards, None)
    boosted, boosted_batches = stream_kinds(kinds_shards, {"kind=rare": 4})
    assert plain_batches == boosted_batches == 60 and len(plain) == len(boosted) == 1500  # the epoch keeps its length
    share = boosted.count("rare") / len(boosted)
    expected = 4 * RARE_SHARE / (4 * RARE_SHARE + 1 - RARE_SHARE)  # 0.5
    # 1,500 draws: the standard error is ~0.013 (less: copies of one sample are not independent draws, more)
    assert abs(plain.count("rare") / len(plain) - RARE_SHARE) < 0.06
    assert abs(share - expected) < 0.08
    fractional, _ = stream_kinds(kinds_shards, {"kind=rare": 2.5, "kind=common": 0.5})  # 0.5 / (0.5 + 0.4) = 0.56
    assert abs(fractional.count("rare") / len(fractional) - 0.5 / 0.9) < 0.08
    dropped, _ = stream_kinds(kinds_shards, {"kind=rare": 0}, batches=8)
    assert "rare" not in dropped and len(dropped) == 200


def test_rules_on_numbers_match_their_json_form(kinds_shards):
    kinds, _ = stream_kinds(kinds_shards, {"n=0": 0, "kind=rare": 1}, batches=40)
    assert 0.1 < kinds.count("rare") / len(kinds) < 0.25  # one of the 20 rare samples (n=0) left out


def test_a_field_no_sample_has_is_refused_by_name(kinds_shards):
    with pytest.raises(UserInputError, match=r"data.oversample: no sample in .*train-000000.tar has the json field "
                       r"'kidn' \(fields there: \['kind', 'n'\]\)"):  # fmt: skip
        stream_kinds(kinds_shards, {"kidn=rare": 3})


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ({"kind": 3}, r"'kind' is not of the form 'field=value'"),
        ({"=rare": 3}, r"'=rare' is not of the form"),
        ({"kind=rare": -1}, r"'kind=rare' has factor -1; expected a number >= 0"),
        ({"kind=rare": float("nan")}, r"'kind=rare' has factor nan"),
    ],
)
def test_malformed_rules_are_refused(rules, message):
    with pytest.raises(UserInputError, match=rf"data.oversample: {message}"):
        ShardDataModule(train="unused", oversample=rules)


def test_a_value_no_sample_has_is_warned_about_with_the_values_seen(kinds_shards, caplog):
    with caplog.at_level(logging.INFO, logger="gen_lightning.data.datamodule"):
        stream_kinds(kinds_shards, {"kind=rar": 3, "kind=rare": 2}, batches=2)
    (record,) = [r for r in caplog.records if "data.oversample" in r.getMessage()]
    assert record.levelno == logging.WARNING
    message = record.getMessage()
    assert "kind=rar ×3: 0% of the samples" in message and "values there: ['common', 'rare']" in message
    assert message.startswith("data.oversample (measured on ") and "train-000000.tar): kind=rar ×3" in message
    # the first shard holds samples 0-9: 2 of them rare, drawn twice: 4 of 12 in the stream
    assert "kind=rare ×2: 20% of the samples, 33% of the stream" in message
