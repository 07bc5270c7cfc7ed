"""Photos are stored upright: preprocessing applies the EXIF Orientation tag, and says so in the manifest."""

import json

import numpy as np
from PIL import Image

from tests.fake_imagenet import make_tree
from tests.test_shard_imagenet import shard


def test_exif_orientation_is_applied_so_a_rotated_photo_is_stored_upright(tmp_path):
    from preprocessing.shards import ImageOptions, load_square

    stored = np.zeros((40, 80, 3), np.uint8)  # as the sensor wrote it: 80 wide, 40 high
    stored[:, :40] = (255, 0, 0)  # left half red
    stored[:10, 40:] = (0, 0, 255)  # a blue band at the top of the right half
    sideways = Image.fromarray(stored)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    sideways.save(tmp_path / "camera.png", exif=exif)
    sideways.transpose(Image.Transpose.ROTATE_270).save(tmp_path / "upright.png")  # what a viewer shows
    opts = ImageOptions(32, "bicubic", 95)
    got, info = load_square(str(tmp_path / "camera.png"), opts)
    want, _ = load_square(str(tmp_path / "upright.png"), opts)
    assert info["size"] == [80, 40] and np.array_equal(np.asarray(got), np.asarray(want))
    sideways.save(tmp_path / "no-exif.png")  # the same pixels without the tag: stored sideways
    assert not np.array_equal(np.asarray(load_square(str(tmp_path / "no-exif.png"), opts)[0]), np.asarray(want))


def test_shards_made_before_orientation_was_applied_are_not_mixed_with_new_ones(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    make_tree(src, "folders")
    assert shard(src, out) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["options"]["orientation"]  # as an earlier version wrote it
    (out / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert shard(src, out) == 2
    err = capsys.readouterr().err
    assert "holds shards made with other options (orientation: None -> exif); pass --overwrite" in err, err
