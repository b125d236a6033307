"""16-bit images reach the network scaled to 8 bits, never clipped to white.

Files are written by PIL, by tifffile and by a PNG encoder written here (zlib and struct only),
and every decoded image is compared with numpy's scaling of the original 16-bit array
(the high byte: 65535 -> 255, as torchvision's `ToDtype` and PIL's 16-bit RGB decoding reduce).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from PIL import Image
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2 import functional as F

from finetune.datamodules import CorruptImageError, ImageFolderDataModule
from finetune.datamodules.device_decode import EncodedImages
from finetune.datamodules.images import UnreadableImage, decode_rgb, open_image
from finetune.commands.evaluate import folder_predictions
from finetune.build import build_datamodule, build_module
from helpers import compose_config


def write_png16(path: Path, array: np.ndarray) -> None:
    """A 16-bit PNG (greyscale H×W or RGB H×W×3) encoded by hand from the PNG specification, without PIL."""
    height, width = array.shape[:2]
    rows = array.astype(">u2").reshape(height, -1)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)  # filter type 0 on every row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, 0 if array.ndim == 2 else 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _sixteen_bit(seed: int, channels: int = 0) -> np.ndarray:
    """A 40×52 uint16 gradient over the whole 16-bit range with noise: almost every value is above 255."""
    rng = np.random.default_rng(seed)
    shape = (40, 52, channels) if channels else (40, 52)
    ramp = np.linspace(0, 65535, 52)[None, :, None] if channels else np.linspace(0, 65535, 52)[None, :]
    return np.clip(ramp + rng.normal(0, 3000, shape), 0, 65535).astype(np.uint16)


#: name -> (writer, array maker): the same kind of image in each format and from each encoder.
WRITERS: dict[str, tuple[Callable[[Path, np.ndarray], None], int]] = {
    "pil.png": (lambda path, a: Image.fromarray(a).save(path), 0),  # PIL writes mode I;16
    "encoded.png": (write_png16, 0),
    "rgb.png": (write_png16, 3),  # PIL reduces 16-bit RGB itself: the greyscale scaling must agree with it
    "little.tif": (lambda path, a: tifffile.imwrite(path, a), 0),  # PIL mode I;16
    "big.tif": (lambda path, a: tifffile.imwrite(path, a, byteorder=">"), 0),  # PIL mode I;16B
}


def _expected_rgb(array: np.ndarray) -> np.ndarray:
    eight = (array >> 8).astype(np.uint8)
    return eight if eight.ndim == 3 else np.repeat(eight[..., None], 3, axis=2)


def _write_trees(root16: Path, root8: Path) -> None:
    """The same layout twice: 16-bit files, and 8-bit files holding numpy's scaling of the same arrays."""
    seed = 0
    for split in ("train", "val"):
        for label in ("a", "b"):
            for name, (write, channels) in WRITERS.items():
                seed += 1
                array = _sixteen_bit(seed, channels)
                for root in (root16, root8):
                    (root / split / label).mkdir(parents=True, exist_ok=True)
                write(root16 / split / label / name, array)
                Image.fromarray(_expected_rgb(array)).save(root8 / split / label / name)


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root16, root8 = tmp_path_factory.mktemp("sixteen"), tmp_path_factory.mktemp("eight")
    _write_trees(root16, root8)
    return root16, root8


@pytest.mark.parametrize("name", [name for name, (_, channels) in WRITERS.items() if not channels])
def test_a_16_bit_greyscale_file_decodes_to_the_high_byte_of_each_value(tmp_path: Path, name: str) -> None:
    write, channels = WRITERS[name]
    array = _sixteen_bit(7, channels)
    write(tmp_path / name, array)
    with open_image(tmp_path / name) as image:
        decoded = np.asarray(decode_rgb(image))
    np.testing.assert_array_equal(decoded, _expected_rgb(array))
    if name.endswith(".png"):  # torchvision's own decoder and ToDtype read the file alike
        tv = F.to_dtype(decode_image(str(tmp_path / name), mode=ImageReadMode.RGB), torch.uint8, scale=True)
        np.testing.assert_array_equal(decoded, tv.permute(1, 2, 0).numpy())


def test_wider_pixels_without_a_range_are_refused_in_one_line(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "float.tif", np.linspace(0, 1, 40 * 52, dtype=np.float32).reshape(40, 52))
    tifffile.imwrite(tmp_path / "wide.tif", np.full((40, 52), 70000, dtype=np.int32))
    tifffile.imwrite(tmp_path / "fits.tif", _sixteen_bit(3).astype(np.int32))  # PIL mode I, in the 16-bit range
    for name, message in (("float.tif", r"floating-point pixels \(PIL mode F,"), ("wide.tif", "32-bit integer pixels")):
        with open_image(tmp_path / name) as image, pytest.raises(UnreadableImage, match=message) as error:
            decode_rgb(image)
        assert "\n" not in str(error.value)
    with open_image(tmp_path / "fits.tif") as image:
        np.testing.assert_array_equal(np.asarray(decode_rgb(image)), _expected_rgb(_sixteen_bit(3)))
    # The full check (data.verify_images) finds them at setup, naming the file.
    root = tmp_path / "tree"
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            tifffile.imwrite(root / label / f"{i}.tif", _sixteen_bit(i))
    tifffile.imwrite(root / "b" / "3.tif", np.full((40, 52), 70000, dtype=np.int32))
    with pytest.raises(CorruptImageError, match=r"3\.tif': 32-bit integer pixels"):
        ImageFolderDataModule(root=str(root), num_workers=0, verify_images=True).setup("fit")


def _split_images(dm: ImageFolderDataModule, split: str, epoch: int) -> torch.Tensor:
    """A whole split's uint8 images as the network's device receives them (decoded there with data.decode=device)."""
    loader = dm.train_dataloader() if split == "train" else dm.val_dataloader()
    if split == "train":
        loader.sampler.set_epoch(epoch)
    images = []
    for batch in loader:
        x, y = move_data_to_device(batch, torch.device("cpu"))  # what Lightning does to a batch
        if isinstance(x, EncodedImages):
            x, y = dm.dataset(split).decode_batch(x, y)
        images.append(x)
    return torch.cat(images)


@pytest.mark.parametrize("decode", ["worker", "device"])
def test_training_batches_of_16_bit_files_equal_those_of_their_8_bit_scaling(trees: tuple[Path, Path],
                                                                             decode: str) -> None:
    root16, root8 = trees
    sixteen, eight = (ImageFolderDataModule(root=str(root), num_workers=0, batch_size=4, resolution=32, seed=3,
                                            decode=decode) for root in (root16, root8))
    for split in ("train", "val"):  # random resized crops (JPEG draft path) and the eval resize + centre crop
        got, expected = _split_images(sixteen, split, epoch=2), _split_images(eight, split, epoch=2)
        assert got.shape == (10, 3, 32, 32) and torch.equal(got, expected), split
        assert got.float().mean() < 200  # not white


def test_evaluation_reads_16_bit_files_as_their_8_bit_scaling(trees: tuple[Path, Path], tmp_path: Path) -> None:
    """finetune-evaluate's labelled-folder path (`folder_predictions`) sees what numpy's scaling shows."""
    root16, root8 = trees
    cfg = compose_config(["model=b0", "model.pretrained=null", "model.resolution=32", "data=imagefolder",
                          f"data.root={root16}", "data.num_workers=0", "trainer=cpu"], tmp_path)
    module = build_module(cfg, build_datamodule(cfg))
    got, expected = (folder_predictions(module, root / "val") for root in (root16, root8))
    assert got.items == [item.replace(str(root8), str(root16)) for item in expected.items] and len(got.items) == 10
    indices = list(range(len(got.items)))
    torch.testing.assert_close(got.network_view(indices), expected.network_view(indices), rtol=0, atol=0)
    assert got.network_view(indices).mean() < 0.8  # not white
