from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from fracture.deploy.release import with_exif_orientation
from fracture.imaging import preprocess
from fracture.imaging.contract import CONTRACT_VERSION, Contract, geometry, resize
from fracture.imaging.preprocess import ImageError


def gradient(h: int = 60, w: int = 40) -> np.ndarray:
    return (np.add.outer(np.arange(h), np.arange(w)) * 255 // (h + w - 2)).astype(np.uint8)


def test_8bit_16bit_rgb_and_rgba_decode_to_the_same_gray(tmp_path: Path) -> None:
    img = gradient()
    cv2.imwrite(str(tmp_path / "g8.png"), img)
    cv2.imwrite(str(tmp_path / "g16.png"), img.astype(np.uint16) * 257)
    cv2.imwrite(str(tmp_path / "rgb.png"), np.dstack([img] * 3))
    cv2.imwrite(str(tmp_path / "rgba.png"), np.dstack([img] * 3 + [np.full_like(img, 255)]))
    for name in ("g8.png", "g16.png", "rgb.png", "rgba.png"):
        out = preprocess.read_image(tmp_path / name)
        assert out.dtype == np.uint8 and out.shape == img.shape
        assert np.abs(out.astype(int) - img).max() <= 1, name


def test_16bit_images_map_by_their_type_so_one_bright_pixel_changes_nothing_else(tmp_path: Path) -> None:
    img = (gradient().astype(np.uint16) * 200)  # 0..51000 of 0..65535
    cv2.imwrite(str(tmp_path / "plain.png"), img)
    marked = img.copy()
    marked[0, 0] = 65535  # a burned-in marker
    cv2.imwrite(str(tmp_path / "marked.png"), marked)
    cv2.imwrite(str(tmp_path / "marked.tif"), marked)
    plain = preprocess.read_image(tmp_path / "plain.png")
    assert np.abs(plain.astype(int) - np.rint(img / 257.0)).max() <= 1
    for name in ("marked.png", "marked.tif"):
        out = preprocess.read_image(tmp_path / name)
        assert out[0, 0] == 255 and np.array_equal(out[1:], plain[1:]) and np.array_equal(out[0, 1:], plain[0, 1:])


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied_like_a_viewer(tmp_path: Path, orientation: int) -> None:
    img = gradient(40, 64)
    img[:6, :12] = 255  # a corner marker: any wrong turn moves it
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 100])
    data = with_exif_orientation(buf.tobytes(), orientation)
    (tmp_path / "x.jpg").write_bytes(data)
    viewer = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)  # OpenCV applies EXIF here
    out = preprocess.read_image(tmp_path / "x.jpg")
    assert out.shape == viewer.shape and np.abs(out.astype(int) - viewer).max() <= 1


def test_tiff_pixel_bomb_is_refused_from_its_header(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "big.tif"), np.zeros((300, 400), np.uint8))
    with pytest.raises(ImageError, match="header claims 400x300"):
        preprocess.read_image(tmp_path / "big.tif", max_pixels=100_000)


@pytest.mark.parametrize("size", [32, 64, 224])
@pytest.mark.parametrize("method", ["stretch", "letterbox"])
def test_resize_gives_square_inputs(size: int, method: str) -> None:
    out = resize(gradient(90, 30), Contract(image_size=size, resize=method))
    assert out.shape == (size, size) and out.dtype == np.uint8


def test_letterbox_keeps_aspect_and_pads_with_zero() -> None:
    contract = Contract(image_size=64, resize="letterbox")
    img = np.full((100, 50), 200, np.uint8)
    out = resize(img, contract)
    g = geometry(100, 50, contract)
    assert (g.inner_height, g.inner_width) == (64, 32)
    assert (out[:, : g.left] == 0).all() and (out[:, g.left + g.inner_width :] == 0).all()
    assert (out[:, g.left : g.left + g.inner_width] == 200).all()


def test_bad_files_raise_image_error_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "noise.jpg").write_bytes(np.random.default_rng(0).bytes(500))
    ok, buf = cv2.imencode(".jpg", gradient())
    (tmp_path / "cut.jpg").write_bytes(buf.tobytes()[: len(buf) // 2])
    for name, reason in [("empty.png", "empty"), ("noise.jpg", "not a decodable image"), ("cut.jpg", "truncated JPEG"), ("absent.png", "not found")]:
        with pytest.raises(ImageError, match=reason) as info:
            preprocess.read_image(tmp_path / name)
        assert name in str(info.value)


def test_oversized_header_is_refused_before_decoding(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "big.png"), np.zeros((200, 300), np.uint8))
    with pytest.raises(ImageError, match="megapixels"):
        preprocess.read_image(tmp_path / "big.png", max_pixels=50_000)


def test_contract_round_trip_and_validation() -> None:
    c = Contract(image_size=128, resize="letterbox")
    assert Contract.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError):
        Contract(resize="crop")
    with pytest.raises(ValueError):
        Contract.from_dict({**c.to_dict(), "surprise": 1})


def test_version_1_contracts_of_older_models_still_load() -> None:
    v1 = {"image_size": 224, "channels": 1, "resize": "stretch", "interpolation": "area", "pixel_scale": 1 / 255, "mean": 0.5, "std": 0.25}
    old = Contract.from_dict(v1)
    assert old.version == 1 and old.train_crop is None and old.image_size == 224 and old.reduced_decode is False
    v2 = Contract.from_dict({**v1, "version": 2, "train_crop": 256, "image_size": 448})
    assert v2.train_crop == 256 and v2.reduced_decode is False  # models before reduced decoding keep full decoding
    new = Contract(image_size=448, resize="letterbox", train_crop=256, reduced_decode=True)
    assert new.version == CONTRACT_VERSION and Contract.from_dict(new.to_dict()) == new
    with pytest.raises(ValueError, match="misses"):
        Contract.from_dict({k: v for k, v in new.to_dict().items() if k != "train_crop"})
    with pytest.raises(ValueError, match="newer"):
        Contract.from_dict({**new.to_dict(), "version": 99})
    with pytest.raises(ValueError, match="train_crop"):
        Contract(image_size=64, train_crop=128)


@pytest.mark.parametrize("resize", ["stretch", "letterbox"])
def test_reduced_jpeg_decoding_gives_nearly_the_same_input_and_the_original_size(tmp_path: Path, resize: str) -> None:
    from fracture.data.synth import radiograph

    big = np.rint(radiograph(np.random.default_rng(2), True, "oblique", shape=(1200, 1000)) * 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / "big.jpg"), big, [cv2.IMWRITE_JPEG_QUALITY, 95])
    full = Contract(image_size=128, resize=resize)
    reduced = Contract(image_size=128, resize=resize, reduced_decode=True)
    assert preprocess.jpeg_reduction(1000, 1200, reduced) == (4 if resize == "stretch" else 8)
    x_full, shape_full = preprocess.load_with_size(tmp_path / "big.jpg", full)
    x_red, shape_red = preprocess.load_with_size(tmp_path / "big.jpg", reduced)
    assert shape_full == shape_red == (1200, 1000) and x_red.shape == x_full.shape
    assert np.abs(x_red.astype(int) - x_full).mean() < 2.0  # DCT scaling + area resize ≈ full decode + area resize
    small = Contract(image_size=512, resize=resize, reduced_decode=True)
    assert preprocess.jpeg_reduction(1000, 1200, small) == (1 if resize == "stretch" else 2)
    # every container follows the JPEG's reduction: the same pixels as PNG give nearly the JPEG's input
    cv2.imwrite(str(tmp_path / "same.png"), cv2.imread(str(tmp_path / "big.jpg"), cv2.IMREAD_GRAYSCALE))
    x_png, shape_png = preprocess.load_with_size(tmp_path / "same.png", reduced)
    assert shape_png == (1200, 1000) and np.abs(x_png.astype(int) - x_red).mean() < 1.0
    assert preprocess.read_image(tmp_path / "same.png", contract=reduced).shape == preprocess.read_image(tmp_path / "big.jpg", contract=reduced).shape


def test_bytes_in_memory_decode_exactly_as_the_same_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    img16 = rng.integers(0, 65535, (700, 520), np.uint16)
    cv2.imwrite(str(tmp_path / "a.png"), img16)
    cv2.imwrite(str(tmp_path / "b.jpg"), (img16 >> 8).astype(np.uint8))
    cv2.imwrite(str(tmp_path / "c.tif"), cv2.cvtColor((img16 >> 8).astype(np.uint8), cv2.COLOR_GRAY2BGR))
    for contract in (Contract(image_size=64), Contract(image_size=96, resize="letterbox", reduced_decode=True)):
        for path in sorted(tmp_path.iterdir()):
            x, shape, img = preprocess.load_bytes(path.read_bytes(), path.name, contract)
            fx, fshape = preprocess.load_with_size(path, contract)
            assert np.array_equal(x, fx) and shape == fshape == (700, 520) and np.array_equal(img, preprocess.read_image(path, contract=contract))
    with pytest.raises(ImageError, match="^scan.jpg: truncated JPEG"):
        preprocess.load_bytes((tmp_path / "b.jpg").read_bytes()[:500], "scan.jpg", Contract())
