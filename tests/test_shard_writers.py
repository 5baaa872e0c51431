"""Shard writers: split assignment, tar/manifest round trip through webdataset, folder and emoji sources."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from braceexpand import braceexpand
from PIL import Image

from gen_lightning.data import emoji_source, folder_source
from gen_lightning.data.shard_writer import read_manifest, shard_pattern, split_of, write_shards


def _read_split(out: Path, split: str) -> list[dict]:
    import webdataset as wds

    return list(wds.WebDataset(shard_pattern(out, split), shardshuffle=False))


def _png(color: tuple[int, ...], mode: str = "RGB", size: tuple[int, int] = (8, 6)) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def _samples(n: int) -> list[dict]:
    return [
        {"__key__": f"sample-{i}", "png": _png((i % 256, 0, 0)), "txt": f"caption {i} é", "json": {"i": i}}
        for i in range(n)
    ]


# --- split_of -------------------------------------------------------------------------------------------------


def test_split_of_is_sha256_based_and_stable():
    # sha256(key)[:8] / 2**64 is 0.0334... for this key and 0.7914... for "a" (computed from the documented rule).
    assert split_of("emoji_1f469_200d_2708_fe0f") == "val"
    assert split_of("emoji_1f469_200d_2708_fe0f", 0.0334) == "train"
    assert split_of("emoji_1f469_200d_2708_fe0f", 0.0335) == "val"
    assert split_of("a", 0.7913) == "train"
    assert split_of("a", 0.7914) == "val"
    expected_val = {1, 19}  # the only sample-i keys below 0.1 (sample-9 is 0.104)
    assert {i for i in range(21) if split_of(f"sample-{i}") == "val"} == expected_val
    assert all(split_of("k", 0.0) == "train" and split_of("k", 1.0) == "val" for _ in range(3))
    with pytest.raises(ValueError):
        split_of("k", 1.5)


def test_split_of_gives_about_ten_percent_val():
    keys = [f"img_{i:05d}" for i in range(10_000)]
    n_val = sum(split_of(k) == "val" for k in keys)
    assert 850 <= n_val <= 1150  # binomial sd is 30
    assert [split_of(k) for k in keys[:200]] == [split_of(k) for k in keys[:200]]


# --- write_shards ---------------------------------------------------------------------------------------------


def test_write_shards_round_trip(tmp_path):
    out = tmp_path / "shards"
    samples = _samples(150)
    manifest = write_shards(
        samples, out, samples_per_shard=16, val_fraction=0.2, source={"type": "test"}, skipped={"bad": 2}
    )
    assert read_manifest(out) == manifest == json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == "gen_lightning.shards/1"
    assert manifest["source"] == {"type": "test"} and manifest["skipped"] == {"bad": 2}
    assert manifest["fields"] == ["json", "png", "txt"]
    by_key = {s["__key__"]: s for s in samples}
    total = 0
    for split in ("train", "val"):
        info = manifest["splits"][split]
        read = _read_split(out, split)
        assert len(read) == info["num_samples"] == sum(s["num_samples"] for s in info["shards"]) > 0
        assert all(split_of(r["__key__"], 0.2) == split for r in read)
        for r in read:
            original = by_key[r["__key__"]]
            assert r["png"] == original["png"]
            assert r["txt"].decode() == original["txt"]
            assert json.loads(r["json"]) == original["json"]
        # The pattern expands to exactly the split's files, in order, and each tar holds what the manifest says.
        expanded = list(braceexpand(shard_pattern(out, split)))
        assert expanded == [str((out / s["url"]).resolve()) for s in info["shards"]]
        assert sorted(expanded) == sorted(str(p.resolve()) for p in out.glob(f"{split}-*.tar"))
        for shard in info["shards"]:
            with tarfile.open(out / shard["url"]) as tar:
                names = tar.getnames()
            assert len(names) == 3 * shard["num_samples"]
            assert all(n.rsplit(".", 1)[1] in ("json", "png", "txt") for n in names)
        assert all(s["num_samples"] == 16 for s in info["shards"][:-1])
        total += len(read)
    assert total == 150
    assert sorted(os.listdir(out)) == sorted(["manifest.json", *(p.name for p in out.glob("*.tar"))])


def test_write_shards_is_reproducible_and_removes_stale_shards(tmp_path):
    write_shards(_samples(40), tmp_path / "a", samples_per_shard=8)
    write_shards(_samples(40), tmp_path / "b", samples_per_shard=8)
    for tar in (tmp_path / "a").glob("*.tar"):
        assert tar.read_bytes() == (tmp_path / "b" / tar.name).read_bytes()
    manifest = write_shards(_samples(10), tmp_path / "a", samples_per_shard=8)
    urls = {s["url"] for split in manifest["splits"].values() for s in split["shards"]}
    assert {p.name for p in (tmp_path / "a").glob("*.tar")} == urls


def test_split_key_keeps_groups_together_and_in_order(tmp_path):
    samples = [{"__key__": f"e{e:05d}-t{t:04d}", "txt": f"{e} {t}"} for e in range(20) for t in range(5)]
    write_shards(samples, tmp_path, samples_per_shard=7, val_fraction=0.3, split_key=lambda key: key.split("-")[0])
    by_split = {split: [s["__key__"] for s in _read_split(tmp_path, split)] for split in ("train", "val")}
    episodes = {split: {key.split("-")[0] for key in keys} for split, keys in by_split.items()}
    assert episodes["train"] and episodes["val"] and not episodes["train"] & episodes["val"]
    assert all(split_of(episode, 0.3) == split for split, names in episodes.items() for episode in names)
    for keys in by_split.values():  # every episode whole, its steps in order
        assert keys == sorted(keys) and len(keys) == 5 * len({key.split("-")[0] for key in keys})
    # Without split_key the same keys scatter an episode over both splits (what split_key exists to prevent).
    assert {split_of(s["__key__"], 0.3) for s in samples[:5]} == {"train", "val"}


def test_write_shards_single_shard_pattern_and_empty_split(tmp_path):
    manifest = write_shards(_samples(5), tmp_path, samples_per_shard=64, val_fraction=0.0)
    assert shard_pattern(tmp_path, "train") == str((tmp_path / "train-000000.tar").resolve())
    assert manifest["splits"]["val"] == {"num_samples": 0, "shards": []}
    with pytest.raises(ValueError, match="no shards"):
        shard_pattern(tmp_path, "val")


def test_duplicate_key_fails_and_leaves_no_temp_or_manifest(tmp_path):
    samples = _samples(30)
    samples.append({"__key__": "sample-7", "txt": "again"})
    with pytest.raises(ValueError, match="sample-7"):
        write_shards(samples, tmp_path, samples_per_shard=4)
    assert not (tmp_path / "manifest.json").exists()
    assert not [p for p in os.listdir(tmp_path) if not p.endswith(".tar")]


def test_crash_mid_stream_leaves_no_partial_shard(tmp_path):
    write_shards(_samples(5), tmp_path)  # an older, complete build whose manifest must not survive a failed rebuild

    def crashing():
        yield from _samples(10)
        raise RuntimeError("source died")

    with pytest.raises(RuntimeError, match="source died"):
        write_shards(crashing(), tmp_path, samples_per_shard=4, val_fraction=0.0)
    assert not (tmp_path / "manifest.json").exists()
    assert all(name.endswith(".tar") for name in os.listdir(tmp_path)), os.listdir(tmp_path)
    train = sorted(tmp_path.glob("train-*.tar"))
    assert [p.name for p in train] == ["train-000000.tar", "train-000001.tar"]  # the 3rd (2 of 4 samples) never landed
    for path in train:
        with tarfile.open(path) as tar:
            assert len(tar.getnames()) == 3 * 4


@pytest.mark.parametrize("key", ["a.b", "a/b", "", None])
def test_invalid_key_is_rejected(tmp_path, key):
    with pytest.raises(ValueError, match="__key__"):
        write_shards([{"__key__": key, "txt": "x"}], tmp_path)


def test_read_manifest_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"manifest\.json"):
        read_manifest(tmp_path / "manifest.json")
    (tmp_path / "manifest.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="format"):
        read_manifest(tmp_path)


# --- folder source --------------------------------------------------------------------------------------------


@pytest.fixture
def image_folder(tmp_path) -> Path:
    src = tmp_path / "images"
    (src / "sub dir").mkdir(parents=True)
    Image.new("RGB", (40, 20), (255, 0, 0)).save(src / "a.png")
    (src / "a.txt").write_text("a red rectangle\n", encoding="utf-8")
    Image.new("RGB", (30, 30), (0, 0, 255)).save(src / "sub dir" / "b photo.jpg", quality=95)
    rgba = Image.new("RGBA", (20, 20), (0, 255, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 10, 20))  # left half fully transparent
    rgba.save(src / "sub dir" / "c.png")
    (src / "sub dir" / "c.txt").write_text("half green, ünïcode", encoding="utf-8")
    Image.new("P", (16, 16), 3).save(src / "d.gif")
    Image.new("L", (12, 12), 128).save(src / "e.bmp")
    (src / "broken.png").write_bytes(np.random.default_rng(0).bytes(500))
    Image.new("RGB", (8, 8)).save(src / "latin1.png")
    (src / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (src / "notes.txt").write_text("not a caption of anything")
    (src / ".hidden").mkdir()
    Image.new("RGB", (8, 8)).save(src / ".hidden" / "x.png")
    return src


def test_folder_source_keeps_originals_and_skips_bad_files(image_folder, caplog):
    stats: dict[str, int] = {}
    with caplog.at_level(logging.WARNING):
        samples = {s["__key__"]: s for s in folder_source.iter_folder_samples(image_folder, stats=stats)}
    assert stats == {"unreadable_image": 1, "caption_not_utf8": 1}
    assert "broken.png" in caplog.text and "latin1.txt" in caplog.text
    assert list(samples) == ["a_png", "d_gif", "e_bmp", "sub_dir_b_photo_jpg", "sub_dir_c_png"]
    assert samples["a_png"]["txt"] == "a red rectangle"
    assert samples["sub_dir_c_png"]["txt"] == "half green, ünïcode"
    assert samples["sub_dir_b_photo_jpg"]["txt"] == ""  # no caption file
    assert samples["a_png"]["png"] == (image_folder / "a.png").read_bytes()
    assert samples["sub_dir_b_photo_jpg"]["jpg"] == (image_folder / "sub dir" / "b photo.jpg").read_bytes()
    assert Image.open(io.BytesIO(samples["d_gif"]["png"])).format == "PNG"  # gif/bmp re-encoded
    assert Image.open(io.BytesIO(samples["e_bmp"]["png"])).mode == "L"


def test_folder_source_resizes_to_rgb_squares(image_folder):
    samples = {s["__key__"]: s for s in folder_source.iter_folder_samples(image_folder, size=16)}
    assert len(samples) == 5
    for sample in samples.values():
        image = Image.open(io.BytesIO(sample["png"]))
        assert (image.size, image.mode) == ((16, 16), "RGB")
    rgba = np.asarray(Image.open(io.BytesIO(samples["sub_dir_c_png"]["png"])))
    assert (rgba[:, :6] == 255).all() and tuple(rgba[8, 12]) == (0, 255, 0)  # transparent half became white
    assert tuple(np.asarray(Image.open(io.BytesIO(samples["a_png"]["png"])))[8, 8]) == (255, 0, 0)


def test_folder_keys_are_unique_for_colliding_names(tmp_path):
    for name in ("x y.png", "x_y.png", "x.y.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    keys = [s["__key__"] for s in folder_source.iter_folder_samples(tmp_path)]
    assert len(set(keys)) == 3 and all("." not in k and " " not in k for k in keys)


def test_write_folder_shards_manifest_counts(image_folder, tmp_path):
    manifest = folder_source.write_folder_shards(image_folder, tmp_path / "out", size=16, samples_per_shard=2)
    assert sum(s["num_samples"] for s in manifest["splits"].values()) == 5
    assert manifest["skipped"] == {"caption_not_utf8": 1, "unreadable_image": 1}
    assert manifest["source"]["type"] == "folder"
    splits = [split for split, info in manifest["splits"].items() if info["shards"]]
    assert sum(len(_read_split(tmp_path / "out", split)) for split in splits) == 5


# --- emoji source ---------------------------------------------------------------------------------------------

WOMAN_PILOT = "\U0001f469\u200d\u2708\ufe0f"
THUMBS_UP_MEDIUM = "\U0001f44d\U0001f3fd"
FLAG_JAPAN = "\U0001f1ef\U0001f1f5"
FLAG_SCOTLAND = "\U0001f3f4\U000e0067\U000e0062\U000e0073\U000e0063\U000e0074\U000e007f"
FAMILY = "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466"
KEYCAP_HASH = "#\ufe0f\u20e3"
TRICKY = (WOMAN_PILOT, THUMBS_UP_MEDIUM, FLAG_JAPAN, FLAG_SCOTLAND, FAMILY, KEYCAP_HASH)


@pytest.fixture(scope="module")
def emoji_font() -> Path:
    try:
        return emoji_source.find_emoji_font()
    except FileNotFoundError as err:
        pytest.skip(f"emoji font not installed: {err}")


def _ink_box(image: Image.Image) -> tuple[int, int, int, int]:
    non_white = (np.asarray(image) < 245).any(axis=2)
    ys, xs = np.nonzero(non_white)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def test_emoji_sequences_render_as_one_centered_glyph(emoji_font):
    stats: dict[str, int] = {}
    only = set(TRICKY) | {text for text, _ in emoji_source.fully_qualified_emoji()[1000:1054]}
    samples = {s["json"]["emoji"]: s for s in emoji_source.iter_emoji_samples(emoji_font, 48, stats=stats, only=only)}
    assert set(TRICKY) <= set(samples), f"not rendered: {set(TRICKY) - set(samples)}; skipped {stats}"
    assert len(samples) + sum(stats.values()) == len(only) >= 55
    for text, sample in samples.items():
        image = Image.open(io.BytesIO(sample["png"]))
        assert (image.size, image.mode) == ((48, 48), "RGB")
        left, top, right, bottom = _ink_box(image)
        assert max(right - left, bottom - top) >= 40, f"{sample['txt']}: glyph does not fill the square"
        assert abs((left + right) / 2 - 24) <= 2 and abs((top + bottom) / 2 - 24) <= 2, f"{sample['txt']}: off-center"
        if text in TRICKY:  # all about square when drawn as one glyph; side by side parts would be 2:1 or wider
            assert 0.7 < (right - left) / (bottom - top) < 1.5, f"{sample['txt']}: {right - left}x{bottom - top}"
            assert (np.asarray(image) < 245).any(axis=2).mean() > 0.15, f"{sample['txt']}: mostly white"
    pilot = samples[WOMAN_PILOT]
    assert pilot["__key__"] == "emoji_1f469_200d_2708_fe0f"
    assert pilot["txt"] == "woman pilot"
    assert pilot["json"]["codepoints"] == ["U+1F469", "U+200D", "U+2708", "U+FE0F"]
    assert samples[THUMBS_UP_MEDIUM]["txt"] == "thumbs up medium skin tone"
    assert samples[FLAG_JAPAN]["txt"] == "Japan"
    if emoji_source.group_sources():
        assert (pilot["json"]["group"], pilot["json"]["subgroup"]) == ("People & Body", "person-role")
        assert samples[FLAG_JAPAN]["json"]["subgroup"] == "country-flag"
    else:
        assert pilot["json"]["group"] is None and pilot["json"]["subgroup"] is None


def test_emoji_renderer_rejects_what_the_font_cannot_draw(emoji_font):
    renderer = emoji_source.EmojiRenderer(emoji_font)
    with pytest.raises(emoji_source.EmojiSkipped) as two:
        renderer.render("\U0001f600\U0001f600")
    assert two.value.reason == "multi_glyph"
    with pytest.raises(emoji_source.EmojiSkipped) as missing:
        renderer.render("\U0010fffd")
    assert missing.value.reason in ("empty_render", "placeholder")
    with pytest.raises(emoji_source.EmojiSkipped):
        renderer.render("\U0001f1ff\U0001f1ff")  # no such country: Noto's "?" flag


def test_emoji_limit_order_and_determinism(emoji_font):
    first = list(emoji_source.iter_emoji_samples(emoji_font, size=16, limit=12))
    again = list(emoji_source.iter_emoji_samples(emoji_font, size=16, limit=12))
    assert len(first) == 12 and first == again
    order = [[ord(c) for c in s["json"]["emoji"]] for s in first]
    assert order == sorted(order)


def test_write_emoji_shards_small(emoji_font, tmp_path):
    manifest = emoji_source.write_emoji_shards(tmp_path, size=16, samples_per_shard=8, limit=30)
    assert sum(s["num_samples"] for s in manifest["splits"].values()) == 30
    assert manifest["source"]["type"] == "emoji" and manifest["source"]["font"] == str(emoji_font)
    train = _read_split(tmp_path, "train")
    assert len(train) == manifest["splits"]["train"]["num_samples"]
    assert all(json.loads(s["json"])["codepoints"] for s in train)


@pytest.mark.slow
def test_write_emoji_shards_full_set(emoji_font, tmp_path):
    manifest = emoji_source.write_emoji_shards(tmp_path, size=32)
    kept = sum(s["num_samples"] for s in manifest["splits"].values())
    assert 3_500 <= kept <= 4_000
    assert kept + sum(manifest["skipped"].values()) == len(emoji_source.fully_qualified_emoji())
    val = manifest["splits"]["val"]["num_samples"]
    assert 0.07 < val / kept < 0.13
    digests = {hashlib.sha256(s["png"]).digest() for split in ("train", "val") for s in _read_split(tmp_path, split)}
    assert len(digests) == kept  # exact duplicates were dropped


# --- group data -----------------------------------------------------------------------------------------------


def test_group_loaders_parse_both_formats(tmp_path):
    emoji_test = tmp_path / "emoji-test.txt"
    emoji_test.write_text(
        "# group: Smileys & Emotion\n\n# subgroup: face-smiling\n"
        "1F600                                                  ; fully-qualified     # 😀 E1.0 grinning face\n"
        "# group: People & Body\n# subgroup: person-role\n"
        "1F469 200D 2708 FE0F                                   ; fully-qualified     # 👩‍✈️ E4.0 woman pilot\n",
        encoding="utf-8",
    )
    groups = emoji_source.load_emoji_groups(emoji_test)
    assert groups == {
        "\U0001f600": ("Smileys & Emotion", "face-smiling"),
        WOMAN_PILOT: ("People & Body", "person-role"),
    }
    iamcal = tmp_path / "emoji.json"
    entry = {"unified": "1F44D", "category": "People & Body", "subcategory": "hand-fingers-closed"}
    entry["skin_variations"] = {"1F3FD": {"unified": "1F44D-1F3FD"}}
    iamcal.write_text(json.dumps([entry]), encoding="utf-8")
    assert emoji_source.load_emoji_groups(iamcal)[THUMBS_UP_MEDIUM] == ("People & Body", "hand-fingers-closed")


def test_readable_name():
    assert emoji_source.readable_name(":woman_pilot_medium-dark_skin_tone:") == "woman pilot medium-dark skin tone"
    assert emoji_source.readable_name(":AB_button_(blood_type):") == "AB button (blood type)"
