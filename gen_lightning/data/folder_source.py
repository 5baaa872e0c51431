"""Dataset from a folder of images (any depth), each optionally captioned by a same-name .txt file beside it.

Hidden files and folders (names starting with ".") are ignored. Every image gets a "txt" entry ("" when it has
no caption file) so all samples carry the same fields.
Files that cannot be used are skipped with a warning naming them and counted into `stats` by reason:
"unreadable_image" (not decodable, truncated, not really an image) and "caption_not_utf8" (the whole sample is
skipped: a caption in an unknown encoding would be a wrong caption).
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from collections.abc import Iterator
from pathlib import Path

from PIL import Image, ImageOps

from gen_lightning.data.decode import to_rgb, upright
from gen_lightning.data.shard_writer import write_shards
from gen_lightning.progress import progress

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")
# Formats kept byte-for-byte when no size is asked for (what the DataModule decodes); the rest become PNG.
_KEPT_AS_IS = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".webp": "webp"}
_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA", "I;16"}
_UNSAFE = re.compile(r"[^\w-]+")


def _safe_key(relative: str) -> str:
    # webdataset splits a member name at its first dot and treats slashes as folders.
    return _UNSAFE.sub("_", relative).strip("_") or "image"


def _caption(image_path: Path) -> str | None:
    """The caption text ("" when there is no caption file), or None when the file is not UTF-8."""
    caption_path = image_path.with_suffix(".txt")
    if not caption_path.is_file():
        return ""
    try:
        return caption_path.read_bytes().decode("utf-8-sig").strip()
    except UnicodeDecodeError:
        return None


def _encode_png(image: Image.Image) -> bytes:
    if image.mode not in _PNG_MODES:
        image = image.convert("RGBA" if "A" in image.getbands() else "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _image_entry(path: Path, size: int | None) -> tuple[str, bytes]:
    """(extension, bytes) of the sample's image; raises OSError/ValueError/SyntaxError when it is not usable."""
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # a full decode: truncated files fail here, not in a training batch
        if size is None:
            ext = _KEPT_AS_IS.get(path.suffix.lower())
            # Keep the original only when it really is that format (a .png that is a JPEG would be mislabelled).
            if ext is not None and image.format == {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext]:
                return ext, data
            return "png", _encode_png(image)
        rgb = to_rgb(upright(image))
        fitted = ImageOps.fit(rgb, (size, size), Image.Resampling.LANCZOS)  # shorter side to size, center crop
        return "png", _encode_png(fitted)


def _image_files(src: Path) -> list[Path]:
    def hidden(path: Path) -> bool:
        # Tool litter (macOS "._x.jpg" forks, .ipynb_checkpoints), not data.
        return any(part.startswith(".") for part in path.relative_to(src).parts)

    files = [p for p in src.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and not hidden(p) and p.is_file()]
    return sorted(files, key=lambda p: p.relative_to(src).as_posix())


def _count(stats: dict | None, reason: str) -> None:
    if stats is not None:
        stats[reason] = stats.get(reason, 0) + 1


def iter_folder_samples(
    src: str | Path, size: int | None = None, stats: dict | None = None, show_progress: bool = False
) -> Iterator[dict]:
    """Samples {"__key__", <png|jpg|webp>, "txt"} for every image under `src`, in sorted relative-path order.

    size None keeps PNG/JPEG/WebP bytes as they are (other formats become PNG); with a size, each image is made RGB
    (transparency on white), its shorter side resized to `size` and center-cropped to size×size, stored as PNG.
    `show_progress`: progress on stderr (gen_lightning.progress) in image files read.
    """
    root = Path(src)
    if not root.is_dir():
        raise NotADirectoryError(f"image folder {root} does not exist or is not a folder")
    used: set[str] = set()
    for path in progress(_image_files(root), desc="images", unit="files", disable=not show_progress):
        relative = path.relative_to(root).as_posix()
        caption = _caption(path)
        if caption is None:
            log.warning("skipping %s: caption %s is not UTF-8", path, path.with_suffix(".txt"))
            _count(stats, "caption_not_utf8")
            continue
        try:
            ext, data = _image_entry(path, size)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            log.warning("skipping %s: not a readable image (%s)", path, err)
            _count(stats, "unreadable_image")
            continue
        key = _safe_key(relative)
        if key in used:  # 'a b.png' and 'a_b.png' map to the same safe name; the path hash tells them apart
            key = f"{key}_{hashlib.sha256(relative.encode()).hexdigest()[:8]}"
        used.add(key)
        yield {"__key__": key, ext: data, "txt": caption}


def write_folder_shards(
    src: str | Path,
    out_dir: str | Path,
    size: int | None = None,
    samples_per_shard: int = 256,
    val_fraction: float = 0.1,
) -> dict:
    """Shard the images under `src` into train/val shards in `out_dir`; returns the manifest."""
    stats: dict[str, int] = {}
    source = {"type": "folder", "path": str(Path(src).resolve()), "size": size}
    return write_shards(
        iter_folder_samples(src, size=size, stats=stats, show_progress=True),
        out_dir,
        samples_per_shard=samples_per_shard,
        val_fraction=val_fraction,
        source=source,
        skipped=stats,
    )
