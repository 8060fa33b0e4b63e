"""16-bit grey photos that carry fewer bits (bit_depth.py): a mono camera's 12-bit pixels stored in a 16-bit file read
against the bits they carry, one white for every photo of a model, recorded in it and used wherever it decodes."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from anomaly_service import AnomalyModel
from anomaly_service.bit_depth import needed, resolve
from anomaly_service.cli import app
from anomaly_service.images import ImageLimits, load_image
from conftest import add_defect, textured_part
from test_api import client_for, post
from test_orientation import FAST


def sixteen_bit(image: np.ndarray, bits: int, gain: float = 1.0) -> np.ndarray:
    """An 8-bit photo as a ``bits``-bit mono camera stores it in a 16-bit file (values up to 2**bits - 1)."""
    grey = image.astype(np.float64).mean(axis=2) / 255.0
    return np.clip(np.round(grey * gain * (2**bits - 1)), 0, 2**bits - 1).astype(np.uint16)


def png16(values: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, format="PNG")
    return buf.getvalue()


def test_the_bits_a_sixteen_bit_photo_needs_are_a_cameras_depth():
    ramp = np.arange(4096, dtype=np.uint16).reshape(64, 64)
    assert Image.open(io.BytesIO(png16(ramp))).mode.startswith("I;16")
    assert needed(png16(ramp)) == ("grey", 12)
    assert needed(png16(ramp // 4)) == ("grey", 10)  # 1023 at most
    assert needed(png16(ramp // 2)) == ("grey", 12)  # 2047: an 11-bit maximum is a 12-bit camera's dim photo
    assert needed(png16(ramp * 16)) == ("grey", 16)  # MSB-aligned 12-bit data fills the 16-bit range
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="TIFF")
    assert needed(buf.getvalue()) == ("grey", 12)
    assert needed(ramp) == ("grey", 12) and needed(ramp.astype(np.uint8)) is None
    eight = io.BytesIO()
    Image.fromarray((ramp // 16).astype(np.uint8)).save(eight, format="PNG")
    assert needed(eight.getvalue()) is None  # an 8-bit file's depth is its own
    assert resolve("auto", [eight.getvalue()]) == (None, None)
    assert resolve("auto", [png16(ramp // 4), png16(ramp)]).grey == 12  # the fewest bits that hold every image
    assert resolve("14", [png16(ramp)]) == (14, 14)  # a depth given holds for grey and colour photos alike


def test_a_depth_given_below_the_good_images_is_refused_not_learnt_as_white():
    """--bit-depth 8 on a 12-bit camera's photos would read every good photo as a white sheet, and a model of white
    sheets passes every defect: the fit refuses, naming the images and the depth they need, as an update does."""
    from anomaly_service.errors import ConfigError

    ramp = np.arange(4096, dtype=np.uint16).reshape(64, 64)
    with pytest.raises(ConfigError, match=r"--bit-depth 8: 1 good image\(s\) .* \(b.png\); they need 12 bits"):
        resolve("8", [png16(ramp // 16), png16(ramp)], names=["a.png", "b.png"])
    assert resolve("12", [png16(ramp)]) == (12, 12) and resolve("16", [png16(ramp * 16)]) == (16, 16)
    good = [png16(sixteen_bit(textured_part(np.random.default_rng(i)), 12)) for i in range(3)]
    with pytest.raises(ConfigError, match="clipped to white"):
        AnomalyModel(**FAST, bit_depth="10").fit(good)


def test_a_sixteen_bit_photo_decodes_against_the_bits_it_carries():
    """12-bit white reads as white with 12 bits (as 16 of 255 with 16); values above the white saturate; the same
    white applies to a file and to a uint16 array."""
    ramp = np.arange(4096, dtype=np.uint16).reshape(64, 64)
    old, twelve = load_image(png16(ramp)), load_image(png16(ramp), ImageLimits(bit_depth=12))
    assert old.max() == 16 and twelve.max() == 255 and twelve[0, 0, 0] == 0
    assert twelve[32, 0, 0] == round(2048 / 4095 * 255)
    assert (load_image(png16(ramp * 16), ImageLimits(bit_depth=12))[4:] == 255).all()  # 4096 and above: white
    np.testing.assert_array_equal(load_image(ramp, ImageLimits(bit_depth=12)), twelve)
    np.testing.assert_array_equal(load_image(ramp), old)


def twelve_bit_photos(root: Path, seed: int, write: Any) -> Path:
    """Ten good 12-bit photos in ``root/good``, a defect (``bad.png``) and a dimmer good one (``dim.png``), each
    written by ``write(image, gain)``, as a line camera's software writes them."""
    rng = np.random.default_rng(seed)
    (root / "good").mkdir()
    for i in range(10):
        (root / "good" / f"{i}.png").write_bytes(write(textured_part(rng), 1.0))
    bad, _ = add_defect(textured_part(rng), 64, 64, radius=12)
    (root / "bad.png").write_bytes(write(bad, 1.0))
    (root / "dim.png").write_bytes(write(textured_part(rng), 0.5))
    return root


def fitted_on_twelve_bits(root: Path, save_to: Path) -> tuple[AnomalyModel, list[Path], Any]:
    """A model fitted on ``root``'s 12-bit good photos (:func:`twelve_bit_photos`) and saved to ``save_to``, its
    reading checked: the photos' own levels (not a sixteenth of them), a dimmer photo dimmer, the defect flagged.
    Returns the model, the good photos and the defect's result."""
    good = sorted((root / "good").glob("*.png"))
    model = AnomalyModel(**FAST).fit(good)
    seen = load_image(good[0], model.limits)
    assert seen.max() > 150 and load_image(good[0]).max() <= 16  # their levels, not a sixteenth of them
    dim = load_image(root / "dim.png", model.limits)
    assert 0.4 < dim.mean() / seen.mean() < 0.6
    bad = model.score(root / "bad.png")
    assert bad.is_anomaly and not model.score(good[0]).is_anomaly
    model.save(save_to)
    return model, good, bad


@pytest.fixture(scope="module")
def twelve_bit_set(tmp_path_factory) -> Path:
    """Good 12-bit photos on disk, as a mono line camera's software writes them."""
    return twelve_bit_photos(tmp_path_factory.mktemp("mono12"), 12,
                             lambda image, gain: png16(sixteen_bit(image, 12, gain=gain)))


def test_a_fit_reads_twelve_bit_photos_with_their_own_white_and_keeps_it(twelve_bit_set, tmp_path):
    """The fit records the depth it read the good images with; the saved model decodes every photo with it (a
    dimmer photo stays dimmer: one white for all, not each photo stretched to its own range); an explicit depth
    overrides it; a model saved before the depth was recorded reads 16-bit photos as it always did."""
    model, good, bad = fitted_on_twelve_bits(twelve_bit_set, tmp_path / "m")
    assert model.limits.bit_depth == 12
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["preprocessing"]["bit_depth"] == 12
    loaded = AnomalyModel.load(tmp_path / "m", device="cpu")
    assert loaded.limits.bit_depth == 12
    assert loaded.score(twelve_bit_set / "bad.png").score == pytest.approx(bad.score, rel=1e-4)
    assert AnomalyModel(**FAST, bit_depth="16").fit(good).limits.bit_depth == 16

    from conftest import write_manifest

    del manifest["preprocessing"]["bit_depth"]
    write_manifest(tmp_path / "m", manifest)
    assert AnomalyModel.load(tmp_path / "m", device="cpu").limits.bit_depth is None


def test_eight_bit_fits_record_no_depth(rng_images, tmp_path):
    model = AnomalyModel(**FAST).fit(rng_images[:6])
    assert model.limits.bit_depth is None
    model.save(tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["preprocessing"].get("bit_depth") is None and "bit_depth" not in manifest["config"]


def cli_fit(runner: CliRunner, root: Path, out: Path) -> Any:
    """``anomaly fit`` on ``root``'s good photos, small and quick, into ``out``; its result, checked to succeed."""
    r = runner.invoke(app, ["fit", "--normal-dir", str(root / "good"), "--out", str(out),
                            "--backbone", "efficientnet_lite0", "--image-size", "128", "--coreset-ratio", "0.25",
                            "--device", "cpu"])
    assert r.exit_code == 0, r.output
    return r


def test_the_service_and_the_cli_decode_with_the_models_depth(twelve_bit_set, tmp_path):
    """An upload to /score and `anomaly score` read a 12-bit photo as the fit read the good images: the same score
    as the model gives it in process. The CLI offers the depths a camera stores and refuses others."""
    runner = CliRunner()
    out = tmp_path / "models" / "mono"
    r = cli_fit(runner, twelve_bit_set, out)
    assert "16-bit grey images read as 12-bit: 4095 is white" in r.output
    model = AnomalyModel.load(out, device="cpu")
    expected = model.score(twelve_bit_set / "bad.png")
    assert expected.is_anomaly
    with client_for(tmp_path / "models") as client:
        got = post(client, (twelve_bit_set / "bad.png").read_bytes()).json()
    assert got["score"] == pytest.approx(expected.score, rel=1e-4) and got["is_anomaly"]
    r = runner.invoke(app, ["info", str(out)])
    assert "read as 12-bit: 4095 is white" in r.output
    r = runner.invoke(app, ["fit", "--normal-dir", str(twelve_bit_set / "good"), "--out", str(tmp_path / "x"),
                            "--bit-depth", "11"])
    assert r.exit_code != 0 and "8, 10, 12, 14 or 16" in r.output


def test_the_depth_pre_pass_reads_every_bytes_like_input_that_decoding_reads():
    """load_image and the fit's header pass take a bytearray or memoryview as bytes: so does the depth pre-pass."""
    data = png16(np.arange(4096, dtype=np.uint16).reshape(64, 64))
    for src in (bytearray(data), memoryview(data)):
        assert load_image(src).shape == (64, 64, 3)
        assert needed(src) == ("grey", 12) and resolve("auto", [src]).grey == 12


def test_updates_keep_the_depth_and_never_learn_a_photo_brighter_than_its_white(twelve_bit_set, tmp_path):
    """Update after update, the saved version reads as the fit did. A good photo brighter than the model's white
    (a camera now writing more bits, or MSB-aligned) would be learnt clipped to white: refused, naming it."""
    from anomaly_service.errors import ConfigError

    good = sorted((twelve_bit_set / "good").glob("*.png"))
    model = AnomalyModel(**FAST).fit(good[:8])
    twice = model.update([good[8]]).update([good[9]])
    twice.save(tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["preprocessing"]["bit_depth"] == 12 and manifest["lineage"]["updates"] == 2
    loaded = AnomalyModel.load(tmp_path / "m", device="cpu")
    assert loaded.limits.bit_depth == 12
    msb = png16(sixteen_bit(textured_part(np.random.default_rng(3)), 12) * 16)
    with pytest.raises(ConfigError, match="12-bit white.*: msb.png\\. "):
        loaded.update([msb, good[0].read_bytes()], names=["msb.png", "again.png"])


def test_an_api_update_decodes_with_the_depth_of_the_version_it_updates(twelve_bit_set, tmp_path):
    """The service updates the version on disk (another replica, or `anomaly fit`, may have replaced the one it
    loaded): the uploads are read with that version's depth, not the one loaded before, and checked against its
    white as the library checks them."""
    from anomaly_service.training_set import pixel_digest

    good = sorted((twelve_bit_set / "good").glob("*.png"))
    models = tmp_path / "models"
    AnomalyModel(**FAST).fit(good[:8]).save(models / "mono")  # 12-bit
    sixteen = AnomalyModel(**FAST, bit_depth="16").fit(good[:8])
    new = good[8].read_bytes()
    with client_for(models, device="cpu", record=False) as client:
        assert client.app.state.service.limits_for("mono").bit_depth == 12
        # a part as a camera writing its 12 bits at the top of the 16 gives it, in the good photos' frame (an update
        # leaves out other frames, and a flat one, which shows no part)
        msb = png16(sixteen_bit(textured_part(np.random.default_rng(8)), 12) << 4)
        r = client.post("/models/mono/update", files=[("files", ("msb.png", msb))])
        assert r.status_code == 422 and "clipped to white: msb.png" in r.json()["detail"]  # as the library refuses it
        sixteen.save(models / "mono")  # replaced on disk, not yet reloaded here
        r = client.post("/models/mono/update", files=[("files", ("new.png", new))])
        assert r.status_code == 200, r.text
        r = client.post("/models/mono/update", files=[("files", ("msb.png", msb))])
        assert r.status_code == 200, r.text  # a 16-bit model has no white to exceed
    updated = AnomalyModel.load(models / "mono", device="cpu")
    assert updated.limits.bit_depth == 16
    assert pixel_digest(load_image(new, updated.limits)) in updated.catalog_.digests


def test_a_sixteen_bit_pgm_reads_against_its_own_maximum_not_stretched():
    """A PGM declares its white (maxval); Pillow opens one over 255 as 32-bit, scaled to 65535. It was stretched to
    each photo's own range, which hid a dim photo's dimness; it now reads as a 16-bit file does."""
    def pgm(values: np.ndarray, maxval: int) -> bytes:
        return f"P5 {values.shape[1]} {values.shape[0]} {maxval}\n".encode() + values.astype(">u2").tobytes()

    ramp = np.arange(4096, dtype=np.uint16).reshape(64, 64)
    full = load_image(pgm(ramp, 4095))
    assert full.max() == 255 and full[32, 0, 0] == round(2048 / 4095 * 255)
    dim = load_image(pgm(ramp // 2, 4095))
    assert dim.max() == round(2047 / 4095 * 255)  # half as bright, not stretched to white
    assert needed(pgm(ramp, 4095)) == ("grey", 16)  # already read against its own white


def colour_png16(values: np.ndarray, exif: bytes | None = None) -> bytes:
    """A 16-bit RGB (or RGBA) PNG of ``values`` as a colour camera's software writes it; Pillow writes none."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    h, w, c = values.shape
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in values)
    header = struct.pack(">IIBBBBB", w, h, 16, {3: 2, 4: 6}[c], 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + (chunk(b"eXIf", exif) if exif else b"")
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def colour_bits(image: np.ndarray, bits: int, gain: float = 1.0) -> np.ndarray:
    """An 8-bit colour photo as a ``bits``-bit colour camera stores it in a 16-bit file."""
    top = 2**bits - 1
    return np.clip(np.round(image.astype(np.float64) / 255.0 * gain * top), 0, top).astype(np.uint16)


def expected_colour(values: np.ndarray, bits: int) -> np.ndarray:
    """What a 16-bit colour photo reads as against ``bits`` bits: rounded as a grey one is."""
    return np.clip(values * (255.0 / (2**bits - 1)) + 0.5, 0, 255).astype(np.uint8)


def test_a_sixteen_bit_colour_photo_decodes_against_the_bits_its_channels_carry():
    """A colour camera's 12-bit values in a 16-bit PNG or TIFF read near black, Pillow keeping each channel's top
    byte (15 of 255 at most). With a colour depth every value is read whole, against its white, from a PNG, a TIFF in
    either byte order, compressed with a predictor or tiled, an EXIF-turned file (both bytes turned alike), a Pillow
    image and a uint16 array alike; an alpha channel composites on black; without one (older models) the old
    reading stays."""
    import tifffile

    values = (np.random.default_rng(7).random((40, 60, 3)) * 4096).astype(np.uint16)
    twelve = ImageLimits(colour_bit_depth=12)
    want = expected_colour(values, 12)
    png = colour_png16(values)
    assert load_image(png).max() <= 15  # the fault: near black
    np.testing.assert_array_equal(load_image(png), (values >> 8).astype(np.uint8))  # older models: as before
    np.testing.assert_array_equal(load_image(png, twelve), want)
    assert load_image(png, twelve).max() == 255
    for kw in ({}, {"byteorder": ">"}, {"compression": "zlib", "predictor": True}, {"tile": (16, 16)}):
        buf = io.BytesIO()
        tifffile.imwrite(buf, values, photometric="rgb", **kw)
        np.testing.assert_array_equal(load_image(buf.getvalue(), twelve), want, err_msg=str(kw))
    np.testing.assert_array_equal(load_image(Image.open(io.BytesIO(png)), twelve), want)
    np.testing.assert_array_equal(load_image(values, twelve), want)
    exif = Image.Exif()
    exif[0x0112] = 6  # a quarter turn clockwise
    turned = load_image(colour_png16(values, exif.tobytes()[6:]), twelve)
    np.testing.assert_array_equal(turned, np.rot90(want, -1))
    alpha = np.concatenate([values, np.full((40, 60, 1), 65535, np.uint16)], axis=2)
    alpha[:10, :, 3] = 0  # a transparent band: black, as any transparent pixel reads
    got = load_image(colour_png16(alpha), twelve)
    np.testing.assert_array_equal(got[10:], want[10:])
    assert got[:10].max() == 0
    assert needed(png) == ("colour", 12) and needed(values) == ("colour", 12)
    assert resolve("auto", [png, png16(sixteen_bit(textured_part(np.random.default_rng(1)), 10))]) == (10, 12)


@pytest.fixture(scope="module")
def twelve_bit_colour_set(tmp_path_factory) -> Path:
    """Good 12-bit colour photos on disk, as a colour line camera's software writes them."""
    return twelve_bit_photos(tmp_path_factory.mktemp("rgb12"), 13,
                             lambda image, gain: colour_png16(colour_bits(image, 12, gain=gain)))


def test_a_fit_reads_twelve_bit_colour_photos_with_their_own_white_and_keeps_it(twelve_bit_colour_set, tmp_path):
    """As for grey: the fit records the depth of the colour photos' channels (grey photos keep their own), every
    photo of the saved model is read with it, a dimmer photo stays dimmer, and a model saved before the colour depth
    was kept reads a 16-bit colour photo as it always did (each channel's top byte)."""
    from conftest import write_manifest

    model, good, bad = fitted_on_twelve_bits(twelve_bit_colour_set, tmp_path / "m")
    assert (model.limits.bit_depth, model.limits.colour_bit_depth) == (None, 12)
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["preprocessing"]["colour_bit_depth"] == 12 and manifest["preprocessing"].get("bit_depth") is None
    assert manifest["config"]["bit_depth"] == "auto"  # a release that does not know depths refuses the model
    loaded = AnomalyModel.load(tmp_path / "m", device="cpu")
    assert loaded.limits.colour_bit_depth == 12
    assert loaded.score(twelve_bit_colour_set / "bad.png").score == pytest.approx(bad.score, rel=1e-4)
    given = AnomalyModel(**FAST, bit_depth="14").fit(good)
    assert (given.limits.bit_depth, given.limits.colour_bit_depth) == (14, 14)

    del manifest["preprocessing"]["colour_bit_depth"]
    write_manifest(tmp_path / "m", manifest)
    older = AnomalyModel.load(tmp_path / "m", device="cpu")
    assert older.limits.colour_bit_depth is None and load_image(good[0], older.limits).max() <= 16


def test_the_service_and_the_cli_read_a_colour_photo_with_the_models_depth(twelve_bit_colour_set, tmp_path):
    """`anomaly fit` says how colour photos are read, `info` too; an upload to /score gets the in-process score; an
    update refuses a colour photo brighter than the colour white, as it refuses a grey one."""
    from anomaly_service.errors import ConfigError

    runner = CliRunner()
    out = tmp_path / "models" / "rgb"
    r = cli_fit(runner, twelve_bit_colour_set, out)
    assert "16-bit colour images read as 12-bit: 4095 is white" in r.output and "16-bit grey" not in r.output
    assert "16-bit images    colour read as 12-bit: 4095 is white" in runner.invoke(app, ["info", str(out)]).output
    model = AnomalyModel.load(out, device="cpu")
    expected = model.score(twelve_bit_colour_set / "bad.png")
    with client_for(tmp_path / "models") as client:
        got = post(client, (twelve_bit_colour_set / "bad.png").read_bytes()).json()
    assert got["score"] == pytest.approx(expected.score, rel=1e-4) and got["is_anomaly"]
    msb = colour_png16(colour_bits(textured_part(np.random.default_rng(4)), 12) * 16)
    with pytest.raises(ConfigError, match=r"12-bit white \(4095\).*clipped to white: msb.png\. "):
        model.update([msb], names=["msb.png"])


def test_a_sixteen_bit_photo_a_model_of_eight_bit_photos_reads_dark_is_warned_of_and_not_learnt(
        fitted_model, model_dir, tmp_path):
    """A model fitted on 8-bit photos (a camera's viewer saved them so) reads a 16-bit photo of that camera's 12 bits
    against 16-bit white: a good part sixteen times darker, flagged whole, and before this nothing said why, and an
    update learnt such photos' near-black patches as good (session 64). Scoring now says it, from a file or a
    uint16 array, grey or colour; an update leaves the photo out. A photo whose values need all 16 bits is read
    right and not warned of, nor is anything a model scores that did not keep its photos' channels (and so did not
    keep their depths either: its None depth is only how it always read them)."""
    from conftest import write_manifest

    from anomaly_service.errors import ConfigError
    from anomaly_service.images import decode_image

    part = textured_part(np.random.default_rng(9))
    twelve = colour_bits(part, 12)
    said = fitted_model.score(colour_png16(twelve)).warnings
    assert any("16-bit and its values need only 12 bits (white 4095)" in w and "16x darker" in w for w in said)
    assert any("16-bit" in w for w in fitted_model.score(twelve).warnings)
    grey = decode_image(png16(sixteen_bit(part, 12)), fitted_model.limits).warnings
    assert len(grey) == 1 and "no 16-bit grey photo" in grey[0]
    full = colour_bits(part, 16)
    assert not any("16-bit" in w for w in fitted_model.score(full).warnings)
    assert not decode_image(colour_png16(full), fitted_model.limits).warnings
    with pytest.raises(ConfigError, match="no good image to add.*16-bit and its values need only 12 bits"):
        fitted_model.update([colour_png16(twelve)], names=["twelve.png"])
    assert AnomalyModel.load(model_dir / "part", device="cpu").limits.depths_kept
    manifest = json.loads((model_dir / "part" / "manifest.json").read_text())
    del manifest["preprocessing"]["channels"]
    shutil.copytree(model_dir / "part", tmp_path / "old")
    write_manifest(tmp_path / "old", manifest)
    old = AnomalyModel.load(tmp_path / "old", device="cpu")
    assert not old.limits.depths_kept and not decode_image(colour_png16(twelve), old.limits).warnings


def test_a_sixteen_bit_photo_brighter_than_the_models_white_is_warned_of():
    """The mirror case: a model that read its good photos as a 12-bit camera's reads a photo whose values need more
    bits (the camera now writing its bits at the top of the 16) clipped to white, flagged whole; it is warned of
    (an update refuses such a photo already), grey or colour, file or array. A photo within the white is not."""
    from anomaly_service.images import decode_image

    part = textured_part(np.random.default_rng(10))
    twelve = ImageLimits(bit_depth=12, colour_bit_depth=12)
    for photo in (png16(sixteen_bit(part, 12) << 4), colour_png16(colour_bits(part, 12) << 4),
                  sixteen_bit(part, 12) << 4, colour_bits(part, 12) << 4):
        said = decode_image(photo, twelve).warnings
        assert len(said) == 1 and "need 16 bits, more than the 12 (white 4095)" in said[0]
    for photo in (png16(sixteen_bit(part, 12)), colour_png16(colour_bits(part, 12)), colour_bits(part, 10)):
        assert not decode_image(photo, twelve).warnings


def test_a_transparency_keys_pixels_say_nothing_of_the_cameras_depth(tmp_path):
    """A 12-bit camera's 16-bit PNG whose background is a sentinel the file names transparent (its tRNS key: 65535):
    those pixels read black (images.keyed, session 70), so their value is no camera's. It set a fit's white to 16
    bits (every visible value read 16 times darker), and a 12-bit model warned that such a photo needs 16 bits and
    refused to learn it as clipped to white; grey and colour alike, given as bytes, a path or a PIL image. A model
    saved before keys were read black reads the sentinel as white, as it was fitted on it: it still counts."""
    from anomaly_service.bit_depth import above_white
    from anomaly_service.images import decode_image
    from test_images import _keyed_png

    grey = np.full((16, 16), 3000, np.uint16)
    grey[8:] = 4000
    grey[:4] = 0xFFFF  # the key: no visible pixel holds it
    for kind, values, key in (("grey", grey, (0xFFFF,)), ("colour", np.repeat(grey[:, :, None], 3, 2), (0xFFFF,) * 3)):
        data = _keyed_png(values, key)
        path = tmp_path / f"{kind}.png"
        path.write_bytes(data)
        with Image.open(path) as opened:
            for given in (data, path, opened):
                assert needed(given) == (kind, 12), (kind, type(given))
        assert resolve("auto", [data]) == ((12, None) if kind == "grey" else (None, 12))
        twelve = ImageLimits(**{"bit_depth" if kind == "grey" else "colour_bit_depth": 12}, depths_kept=True)
        read = decode_image(data, twelve)
        assert read.warnings == () and read.array[:4].max() == 0 and read.array[-1, -1, 0] == 249
        assert above_white([data], ["keyed"], twelve) == []
        older = dataclasses.replace(twelve, transparency_keys=False)
        assert above_white([data], ["keyed"], older) == ["keyed"]
        assert decode_image(data, older).warnings  # its white reads clipped there, as it always did


def test_a_fit_and_an_update_given_pil_images_read_them_as_their_files(twelve_bit_colour_set):
    """Photos handed to the Python API as PIL images opened from their files (``Image.open``, not yet decoded): the
    depth pre-pass decoded them in place, so the fit then read each 16-bit colour photo with its tiles gone, as its
    top bytes (a 12-bit camera's 4000 as 15, not 249), while it recorded 12 bits and scored every file against
    4095: the bank and threshold were learnt on near-black photos. An update's check of the white did the same to
    the photos it then learnt. Each is now measured on a copy of its file, and reads as the file does."""
    from anomaly_service.feedback import update_model
    from anomaly_service.training_set import pixel_digest

    files = sorted((twelve_bit_colour_set / "good").glob("*.png"))
    opened = [Image.open(f) for f in files[:6]]
    try:
        model = AnomalyModel(**FAST).fit(opened)
        assert model.limits.colour_bit_depth == 12
        assert sorted(model.catalog_.digests) == sorted(pixel_digest(load_image(f, model.limits)) for f in files[:6])
        with Image.open(files[6]) as added:
            new = update_model(model, [added], names=["added"])
        assert pixel_digest(load_image(files[6], model.limits)) in new.catalog_.digests
    finally:
        for img in opened:
            img.close()
