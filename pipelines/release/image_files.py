"""Writing sampled images: PNG files, GIF/WebP animations and WebDataset tars, each written atomically."""

import io
from contextlib import contextmanager
from pathlib import Path

import webdataset as wds
from PIL import Image

from sagan.files import atomic_output


def save_image(image, path: Path) -> Path:
    """An (H, W, 3) uint8 array as a PNG at `path`."""
    with atomic_output(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")
    return path


def save_animation(frames, path: Path, ms_per_frame: int = 120) -> Path:
    """The frames there and back again, looping (GIF or WebP by the suffix)."""
    images = [Image.fromarray(f) for f in [*frames, *frames[-2:0:-1]]]
    with atomic_output(path) as tmp:
        images[0].save(
            tmp, format=path.suffix[1:].upper(), save_all=True, append_images=images[1:], duration=ms_per_frame, loop=0
        )
    return path


@contextmanager
def webdataset_writer(path: Path):
    """A function (key, image, class) adding KEY.png and KEY.cls to the tar at `path` (webdataset reads it:
    `wds.WebDataset(path).decode("rgb").to_tuple("png", "cls")`); the tar appears when the block ends cleanly."""

    def write(key: str, image, cls: int) -> None:
        png = io.BytesIO()
        Image.fromarray(image).save(png, format="PNG")
        sink.write({"__key__": key, "png": png.getvalue(), "cls": str(cls).encode()})

    with atomic_output(path) as tmp, wds.TarWriter(str(tmp)) as sink:
        yield write
