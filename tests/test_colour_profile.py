"""A photo's embedded ICC profile: its colours read as sRGB (colour_profile.py), recorded in the model.

The profiles are made here, as the ICC format lays out a matrix-and-curve RGB profile: a wide-gamut one with Adobe
RGB (1998)'s primaries and gamma, and one with sRGB's primaries but another tone curve. No profile file is needed.
"""

import io
import json
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageCms

from anomaly_service.images import ImageLimits, decode_image, load_image

D50 = (0.9642, 1.0, 0.8249)
# Adobe RGB (1998)'s colorants, adapted to the profile connection space's D50 white, and its gamma (563/256)
ADOBE_LIKE = ((0.6097, 0.3111, 0.0195), (0.2053, 0.6257, 0.0609), (0.1492, 0.0632, 0.7446), 563 / 256)
# sRGB's colorants with a plain gamma of 1.8: the same primaries, other tones
SRGB_PRIMARIES_GAMMA_18 = ((0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141), 1.8)


def _s15(x: float) -> bytes:
    return struct.pack(">i", round(x * 65536))


def rgb_profile(name: str, red, green, blue, gamma: float) -> bytes:
    """An ICC v2 display profile: three colorants and one gamma curve per channel."""
    def xyz(v):
        return b"XYZ " + bytes(4) + b"".join(_s15(c) for c in v)

    text = name.encode() + b"\0"
    desc = b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(8) + bytes(3) + bytes(67)
    curve = b"curv" + bytes(4) + struct.pack(">IH", 1, round(gamma * 256)) + bytes(2)
    tags = [(b"desc", desc), (b"cprt", b"text" + bytes(4) + b"test\0"), (b"wtpt", xyz(D50)), (b"rXYZ", xyz(red)),
            (b"gXYZ", xyz(green)), (b"bXYZ", xyz(blue)), (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve)]
    offset, table, body = 128 + 4 + 12 * len(tags), b"", b""
    for sig, data in tags:
        data += bytes(-len(data) % 4)
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data
    header = (struct.pack(">I", offset + len(body)) + bytes(4) + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ "
              + bytes(12) + b"acsp" + bytes(24) + bytes(4) + b"".join(_s15(c) for c in D50) + bytes(48))
    return header + struct.pack(">I", len(tags)) + table + body


ADOBE = rgb_profile("Adobe-like RGB (test)", *ADOBE_LIKE)
GAMMA_18 = rgb_profile("sRGB primaries, gamma 1.8 (test)", *SRGB_PRIMARIES_GAMMA_18)
SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def saved_in(rgb: np.ndarray, profile: bytes, fmt: str = "PNG", alpha: np.ndarray | None = None) -> bytes:
    """The sRGB picture ``rgb`` saved as a camera set to ``profile`` saves it: its colours converted there, and the
    profile embedded, so that a viewer shows the same colours."""
    out = ImageCms.profileToProfile(Image.fromarray(rgb), io.BytesIO(SRGB), io.BytesIO(profile), outputMode="RGB")
    if alpha is not None:
        out = Image.fromarray(np.dstack([np.asarray(out), alpha]), "RGBA")
    buf = io.BytesIO()
    out.save(buf, fmt, icc_profile=profile, **({"quality": 100} if fmt == "JPEG" else {}))
    return buf.getvalue()


def colourful(seed: int = 0, shape=(48, 64)) -> np.ndarray:
    """Smooth colours over the whole gamut (no noise, so that a JPEG keeps them)."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]] / np.array(shape).reshape(2, 1, 1)
    phase = np.random.default_rng(seed).uniform(0, 6, 3)
    return (127.5 + 127.5 * np.sin(np.stack([6 * xx + phase[0], 5 * yy + phase[1], 4 * (xx + yy) + phase[2]], -1))
            ).astype(np.uint8)


@pytest.mark.parametrize("profile", [ADOBE, GAMMA_18], ids=["wide gamut", "other tone curve"])
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF"])
def test_the_same_colours_saved_in_another_colour_space_read_the_same(profile, fmt):
    """A camera set to another colour space stores other numbers for the same colours, with the profile that says
    so. Read as stored they were far from the sRGB photo (tens of levels); read through the profile they are the
    same colours, within what 8 bits in the other space (and a JPEG's chroma) keep."""
    rgb = colourful()
    data = saved_in(rgb, profile, fmt)
    stored = load_image(data, ImageLimits(colour_profiles=False))
    read = load_image(data)
    far, near = np.abs(stored.astype(int) - rgb), np.abs(read.astype(int) - rgb)
    assert far.mean() > 4 * max(near.mean(), 0.5) and far.max() >= 15, (far.mean(), near.mean())
    assert near.mean() < 1.5 and np.percentile(near, 99) <= 10, (near.mean(), np.percentile(near, 99))


def test_an_srgb_profile_or_none_leaves_the_values_as_stored():
    """The web's convention: no profile is sRGB; and an embedded sRGB profile changes nothing, to the level."""
    rgb = colourful(1)
    plain, tagged = io.BytesIO(), io.BytesIO()
    Image.fromarray(rgb).save(plain, "PNG")
    Image.fromarray(rgb).save(tagged, "PNG", icc_profile=SRGB)
    assert np.array_equal(load_image(plain.getvalue()), rgb) and np.array_equal(load_image(tagged.getvalue()), rgb)


def test_the_alpha_of_a_profiled_photo_is_kept():
    """A transparent pixel reads black with a profile as without one: the alpha is not converted."""
    rgb = colourful(2)
    alpha = np.full(rgb.shape[:2], 255, np.uint8)
    alpha[:, :20] = 0
    read = load_image(saved_in(rgb, ADOBE, alpha=alpha))
    assert read[:, :20].max() == 0 and np.abs(read[:, 20:].astype(int) - rgb[:, 20:]).mean() < 1.5


def test_a_profile_that_cannot_be_read_leaves_the_values_and_says_so():
    """A damaged profile (or one of the wrong kind) does not refuse the photo: its values are read as stored, and
    the warning says why its colours may be off."""
    rgb = colourful(3)
    for profile in (b"not a profile" * 20, ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes()):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, "PNG", icc_profile=profile)
        decoded = decode_image(buf.getvalue())
        assert np.array_equal(decoded.array, rgb)
        assert any("colour profile could not be read" in note for note in decoded.warnings), decoded.warnings
    # the reason is the profile's, not an exception's name: a Lab profile is named as what it is
    assert any("(a Lab profile on a colour photo)" in note for note in decoded.warnings), decoded.warnings


def test_a_profile_that_flattens_the_colours_is_taken_as_broken():
    """littlecms converts through a profile whose tone curve is zero (a tag its writer left empty) or whose three
    colorants are one grey without a word: every photo read through it became a handful of flat colours (nearly
    white) with no warning, and the model scored a white square. Such a profile
    is taken as one that cannot be read: the values as stored, and the warning. A real gamut, however wide, keeps
    its colours apart (Adobe RGB's primaries and ProPhoto's, clipped into sRGB, are converted as before)."""
    rgb = colourful(7)
    broken = {"zero tone curve": rgb_profile("zero gamma (test)", *ADOBE_LIKE[:3], 0.0),
              "one grey colorant": rgb_profile("grey colorants (test)", *[(0.32, 0.33, 0.28)] * 3, 2.2)}
    for name, profile in broken.items():
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, "PNG", icc_profile=profile)
        decoded = decode_image(buf.getvalue())
        assert np.array_equal(decoded.array, rgb), name
        assert any("broken profile" in note for note in decoded.warnings), (name, decoded.warnings)
    prophoto = rgb_profile("ProPhoto-like (test)", (0.7977, 0.2880, 0.0), (0.1352, 0.7119, 0.0),
                           (0.0313, 0.0001, 0.8249), 1.8)
    for profile in (ADOBE, prophoto):
        decoded = decode_image(saved_in(rgb, profile))
        assert not decoded.warnings and np.abs(decoded.array.astype(int) - rgb).mean() < 3


def _app2_icc_segments(jpeg: bytes) -> list[tuple[int, int]]:
    """Where each of a JPEG's ICC_PROFILE APP2 segments starts and ends, in the file's order."""
    found, i = [], 2
    while jpeg[i] == 0xFF and jpeg[i + 1] != 0xDA:  # the markers before the scan
        end = i + 2 + struct.unpack(">H", jpeg[i + 2:i + 4])[0]
        if jpeg[i + 1] == 0xE2 and jpeg[i + 4:i + 16] == b"ICC_PROFILE\0":
            found.append((i, end))
        i = end
    return found


def test_a_jpeg_profile_with_a_part_missing_says_so():
    """A profile past one APP2 marker's room is split over several, numbered. Pillow puts them together in their
    numbers' order (a file that holds them out of order reads the same), but drops the profile without a word when
    one is missing or doubled (a tool that kept the first marker only), and the photo read as sRGB, as one saved
    with no profile, with no warning: its colours off by tens of levels. Its values are still read as stored (the
    profile is not there to convert them), and the warning now says the profile is incomplete."""
    rgb = colourful(9)
    profile = bytearray(ADOBE + bytes(150_000))
    profile[:4] = struct.pack(">I", len(profile))
    whole = saved_in(rgb, bytes(profile), "JPEG")
    (a0, a1), (b0, b1), _ = _app2_icc_segments(whole)
    swapped = whole[:a0] + whole[b0:b1] + whole[a0:a1] + whole[b1:]
    torn = whole[:b0] + whole[b1:]
    read, shuffled, cut = decode_image(whole), decode_image(swapped), decode_image(torn)
    assert not read.warnings and not shuffled.warnings and np.array_equal(read.array, shuffled.array)
    assert np.abs(read.array.astype(int) - rgb).mean() < 3
    with Image.open(io.BytesIO(torn)) as img:
        assert img.info.get("icc_profile") is None  # Pillow's own reading: dropped
        stored = np.asarray(img.convert("RGB"))
    assert np.array_equal(cut.array, stored)
    assert any("colour profile is incomplete" in note for note in cut.warnings), cut.warnings
    exif = Image.Exif()
    exif[0x0112] = 6  # a turned photo: the turned copy has no markers, so they are read from the opened file
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=100, exif=exif, icc_profile=bytes(profile))
    _, (c0, c1), _ = _app2_icc_segments(buf.getvalue())
    turned = decode_image(buf.getvalue()[:c0] + buf.getvalue()[c1:])
    assert turned.array.shape == (rgb.shape[1], rgb.shape[0], 3)
    assert any("colour profile is incomplete" in note for note in turned.warnings), turned.warnings


def test_a_pillow_built_without_littlecms_reads_the_values_and_says_so(tmp_path):
    """Pillow's wheels carry littlecms, but a Pillow built from source without it (a distribution's or a conda
    build, an Alpine image without lcms2) has ImageCms and not its extension, and ImageCms's first use raised
    ImportError out of the decoding of every photo that carried a profile. Such a photo is read as one whose
    profile could not be read: its values as stored, and a warning that says why. A fresh process whose Pillow has
    no littlecms extension, as such a build has none."""
    photo = tmp_path / "wide.png"
    photo.write_bytes(saved_in(colourful(6), ADOBE))
    code = ("import json, sys\n"
            "import numpy as np\n"
            "sys.modules['PIL._imagingcms'] = None  # no such extension, as a Pillow built without littlecms\n"
            "from anomaly_service.images import decode_image\n"
            "read = decode_image(open(sys.argv[1], 'rb').read())\n"
            "np.save(sys.argv[2], read.array)\n"
            "print(json.dumps(list(read.warnings)))\n")
    done = subprocess.run([sys.executable, "-c", code, str(photo), str(tmp_path / "read.npy")], capture_output=True,
                          text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    with Image.open(photo) as img:
        stored = np.asarray(img.convert("RGB"))
    assert np.array_equal(np.load(tmp_path / "read.npy"), stored)
    warnings = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(warnings) == 1 and "built without littlecms" in warnings[0], warnings


def test_a_model_records_it_and_an_older_one_reads_the_values_as_stored(model_dir, rng_images, tmp_path):
    """A fit records that it reads profiles as sRGB (preprocessing.colour_profile), and its saved model scores a
    good part saved in another colour space as the part itself. A model saved before (no such field) was fitted on
    values as stored, and reads them so still: its threshold was set on them."""
    from anomaly_service import AnomalyModel
    from conftest import write_manifest

    photo = rng_images[3]
    wide = saved_in(photo, ADOBE)
    shutil.copytree(model_dir / "part", tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    assert manifest["preprocessing"]["colour_profile"] == "srgb"
    model = AnomalyModel.load(tmp_path / "m", device="cpu")
    assert model.limits.colour_profiles
    same, stored = model.score(photo).score, model.score(wide).score
    del manifest["preprocessing"]["colour_profile"]
    write_manifest(tmp_path / "m", manifest)
    older = AnomalyModel.load(tmp_path / "m", device="cpu")
    assert not older.limits.colour_profiles
    as_stored = older.score(wide).score
    assert abs(stored - same) < abs(as_stored - same) / 4, (same, stored, as_stored)


def test_the_profiles_read_are_not_kept_in_memory_whole():
    """A JPEG carries a profile of up to some 16 MB over its APP2 markers (a TIFF's tag more). The conversions of the
    last few distinct profiles are kept, and were kept under the profiles' own bytes: photos sent with large distinct
    profiles held that much of the service's memory each until other profiles pushed them out. The key is the
    profile's digest, so what a profile read leaves behind is its conversion, whatever its size."""
    import gc
    import tracemalloc

    from anomaly_service import colour_profile

    rgb = colourful(4)
    pad = 2_000_000
    photos = []
    for i in range(colour_profile.KEPT_PROFILES + 1):
        profile = bytearray(ADOBE + bytes(pad))
        profile[:4] = struct.pack(">I", len(profile))
        profile[-1] = i + 1  # distinct bytes past its tags: another profile to the cache, the same colours
        photos.append(saved_in(rgb, bytes(profile), "JPEG"))  # split over APP2 markers
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for photo in photos:
            read = decode_image(photo)
            assert np.abs(read.array.astype(int) - rgb).mean() < 3 and not read.warnings  # converted
        del read
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < pad, kept


def test_an_srgb_profile_is_passed_over_and_the_grid_that_tells_it_holds_every_level():
    """An sRGB profile (within a level on every colour of a grid of 16 levels a channel) hands back the photo itself,
    unconverted."""
    from anomaly_service import colour_profile

    img = Image.fromarray(colourful(5))
    img.info["icc_profile"] = SRGB
    assert colour_profile.as_srgb(img) == (img, None)
    grid = np.asarray(colour_profile._grid()).reshape(-1, 3)
    levels = set(range(0, 256, 17))
    assert len({tuple(c) for c in grid}) == len(levels) ** 3 and set(grid.ravel().tolist()) == levels
    moved = np.abs(np.asarray(ImageCms.profileToProfile(colour_profile._grid(), io.BytesIO(ADOBE), io.BytesIO(SRGB)),
                              dtype=int) - np.asarray(colour_profile._grid(), dtype=int)).max()
    assert moved > 1


def test_a_profile_is_taken_as_srgb_up_to_the_bound_in_levels(monkeypatch):
    """``SAME_AS_SRGB_LEVELS`` is a bound that holds: a profile that moves no colour of the grid by more than it is
    passed over, one that moves one by a level more is converted."""
    from anomaly_service import colour_profile

    grid = colour_profile._grid()
    moved = int(np.abs(np.asarray(ImageCms.profileToProfile(grid, io.BytesIO(GAMMA_18), io.BytesIO(SRGB)),
                                  dtype=int) - np.asarray(grid, dtype=int)).max())
    monkeypatch.setattr(colour_profile, "SAME_AS_SRGB_LEVELS", moved)
    assert colour_profile._transforms(GAMMA_18) is None
    monkeypatch.setattr(colour_profile, "SAME_AS_SRGB_LEVELS", moved - 1)
    assert colour_profile._transforms(GAMMA_18) is not None


def test_a_profile_is_read_once_and_the_least_recently_used_goes_first(monkeypatch):
    """Each distinct profile is read by littlecms once, and its conversion kept for the next photo; past
    ``KEPT_PROFILES`` of them the one least recently used is let go (the line's own camera stays, however many
    strangers' photos come between)."""
    from collections import OrderedDict

    from anomaly_service import colour_profile

    read = []
    real = colour_profile._transforms

    def counted(profile):
        read.append(profile)
        return real(profile)

    monkeypatch.setattr(colour_profile, "_kept", OrderedDict())
    monkeypatch.setattr(colour_profile, "_transforms", counted)
    profiles = [rgb_profile(f"camera {i} (test)", *ADOBE_LIKE) for i in range(colour_profile.KEPT_PROFILES + 2)]
    first = colour_profile._conversion(profiles[0], "RGB")
    assert first is not None and colour_profile._conversion(profiles[0], "RGBA") is not None and len(read) == 1
    for profile in profiles[1:colour_profile.KEPT_PROFILES]:
        colour_profile._conversion(profile, "RGB")
    assert len(read) == colour_profile.KEPT_PROFILES and len(colour_profile._kept) == colour_profile.KEPT_PROFILES
    colour_profile._conversion(profiles[0], "RGB")  # the line's camera again: kept, and now the most recent
    colour_profile._conversion(profiles[-2], "RGB")  # one more: the least recently used (profiles[1]) goes
    assert len(colour_profile._kept) == colour_profile.KEPT_PROFILES and len(read) == colour_profile.KEPT_PROFILES + 1
    assert colour_profile._conversion(profiles[0], "RGB") is first and len(read) == colour_profile.KEPT_PROFILES + 1
    colour_profile._conversion(profiles[1], "RGB")
    assert read[-1] == profiles[1] and len(read) == colour_profile.KEPT_PROFILES + 2
