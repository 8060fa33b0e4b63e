"""Fits larger than memory: patches spill to disk, the coreset is built chunk by chunk, the index is chosen by size.

The store's memory budget and the chunk size are shrunk so that a few synthetic images take the streamed path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from anomaly_service import AnomalyModel, knn_scorer, patch_store
from anomaly_service.coreset import extend_coreset, random_projection
from anomaly_service.index import AUTO_FLAT_MAX, resolve_index_kind
from anomaly_service.patch_store import PatchStore
from anomaly_service.training_set import TrainingImages

from conftest import SMALL, add_defect, fill, mounted, textured_part


@pytest.fixture(scope="module")
def goods() -> list[np.ndarray]:
    rng = np.random.default_rng(11)
    return [textured_part(rng) for _ in range(24)]


@pytest.fixture(scope="module")
def streamed(goods) -> AnomalyModel:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(patch_store, "DEFAULT_MEMORY_BUDGET", 200_000)  # a few images' patches, then disk
        mp.setattr(knn_scorer, "STREAM_ABOVE_ROWS", 4_000)
        mp.setattr(knn_scorer, "STREAM_CHUNK_ROWS", 2_000)  # ~8 images per chunk
        return AnomalyModel(**SMALL).fit(goods)


def test_store_spills_to_disk_and_reads_back_what_was_added(tmp_path):
    rng = np.random.default_rng(0)
    grids = [torch.from_numpy(rng.normal(size=(4, 5, 6)).astype(np.float32)) for _ in range(7)]
    with PatchStore(memory_budget=3 * 20 * 6 * 4, spill_dir=tmp_path) as store:
        for g in grids:
            store.add(g)
        assert store.spilled and any(tmp_path.iterdir())
        for i, g in enumerate(grids):
            assert torch.equal(store.grid(i), g)
        keep = torch.tensor([1, 4])
        want_rows = torch.cat([grids[5].reshape(-1, 6), grids[2].reshape(-1, 6)])[:, keep]
        assert torch.equal(store.gather([5, 2], keep), want_rows)
        want = torch.cat([g.reshape(-1, 6) for g in grids]).double().std(0).float()
        assert torch.allclose(store.channel_std(), want, atol=1e-5)
        assert [len(c) for c in store.chunks(range(7), 45)] == [2, 2, 2, 1]
    assert not any(tmp_path.iterdir())  # the spill file goes with the store


def test_a_spill_the_temporary_volume_does_not_take_is_one_clear_error(tmp_path):
    """A fit past the memory budget on a full temporary volume ended in a traceback from the spill's write; it is
    an AnomalyError naming the directory and TMPDIR (the CLI's one line), and no spill file is left."""
    from anomaly_service.errors import AnomalyError

    with mounted(tmp_path / "tmp", "1m") as spill:
        fill(spill).unlink()
        (spill / "filler").write_bytes(bytes(1024 * 1024 - 64 * 1024))  # some room, not enough
        grid = torch.zeros(32, 32, 64)  # 256 KiB of patches an image
        with pytest.raises(AnomalyError, match=f"under {spill}.*TMPDIR"):
            with PatchStore(memory_budget=1, spill_dir=spill) as store:
                for _ in range(8):
                    store.add(grid)
                store.rows(0)  # the last buffered bytes are written here
        assert [p.name for p in spill.iterdir()] == ["filler"]


def test_a_spill_directory_that_takes_no_writes_is_not_called_full(tmp_path):
    """A temporary volume remounted read-only (a disk error) under a fit: the error told the user to find a volume
    "with room", where room was not what it lacked."""
    from anomaly_service.errors import AnomalyError

    with mounted(tmp_path / "ro") as spill:
        with pytest.raises(AnomalyError, match="Read-only file system") as raised:
            with PatchStore(memory_budget=1, spill_dir=spill) as store:
                store.add(torch.zeros(8, 8, 64))
    assert "with room" not in str(raised.value) and "a directory it can write" in str(raised.value)


def test_in_memory_store_gives_the_old_concatenated_bank():
    rng = np.random.default_rng(1)
    grids = [torch.from_numpy(rng.normal(size=(3, 3, 4)).astype(np.float32)) for _ in range(3)]
    with PatchStore() as store:
        for g in grids:
            store.add(g)
        assert not store.spilled
        assert torch.equal(store.all(), torch.cat([g.reshape(-1, 4) for g in grids]))


def test_streamed_fit_covers_every_training_patch_within_its_radius(streamed, goods):
    """PatchCore's guarantee survives the chunks: every patch of every training image has a bank row within the
    radius the first chunk's greedy reached (in the greedy's projected space)."""
    m = streamed.manifest_
    assert m.training.patches_on_disk is True
    assert m.coreset.chunks > 1
    radius = m.coreset.coverage_radius
    knn = streamed.knn
    feats = torch.cat([streamed.embedder.embed([g], keep=knn.keep).features.reshape(-1, len(knn.selected_))
                       for g in goods])
    both = random_projection(torch.cat([torch.from_numpy(knn.bank()), feats]), streamed.config.projection_dim,
                             streamed.config.seed).double()
    bank, patches = both[: knn.bank_size], both[knn.bank_size :]
    nearest = torch.cdist(patches, bank).min(1).values
    assert float(nearest.max()) <= radius * (1 + 1e-3)
    assert knn.bank_size < len(patches)  # and it is still a subsample


def test_streamed_fit_with_coreset_ratio_one_keeps_every_patch(goods):
    """``coreset_ratio`` 1 is PatchCore without subsampling: a streamed fit keeps every patch of every training
    image (no cover drops near-duplicates), each under its own provenance, and the radius is 0."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(knn_scorer, "STREAM_ABOVE_ROWS", 1_000)
        mp.setattr(knn_scorer, "STREAM_CHUNK_ROWS", 1_000)
        model = AnomalyModel(**{**SMALL, "coreset_ratio": 1.0, "calibration": "holdout"}).fit(goods[:12])
    m = model.manifest_
    assert m.coreset.chunks > 1 and m.coreset.coverage_radius == 0.0
    assert model.knn.bank_size == m.coreset.from_patches
    sources = model.knn.provenance_
    assert len(np.unique(sources, axis=0)) == len(sources)  # each (image, row, col) once
    # an update at radius 0 adds every new patch and none already in the bank, without a greedy over them
    bank = torch.from_numpy(model.knn.bank())
    new = bank[:50] + 0.5
    add = extend_coreset(bank, torch.cat([bank[:200], new]), 0.0)
    assert sorted(add.tolist()) == list(range(200, 250))


def test_coreset_max_caps_a_streamed_bank_too(goods, caplog):
    """``--coreset-max`` is a hard cap: later chunks stop adding rows once the bank holds that many (the cover would
    otherwise grow past it), and the fit says what was left out."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(knn_scorer, "STREAM_ABOVE_ROWS", 1_000)
        mp.setattr(knn_scorer, "STREAM_CHUNK_ROWS", 1_000)
        with caplog.at_level("WARNING", logger="anomaly_service.knn_scorer"):
            model = AnomalyModel(**{**SMALL, "coreset_max": 100, "calibration": "holdout"}).fit(goods[:16])
    assert model.manifest_.coreset.chunks > 1
    assert model.knn.bank_size == 100
    assert "coreset_max=100 reached while streaming" in caplog.text


def test_a_capped_streamed_fit_still_calibrates_leave_one_out(goods):
    """With the cap reached before the last images, those have no row in the bank; the guard's support score
    (contamination.py) still counts them as images (it once indexed past the last image with rows)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(knn_scorer, "STREAM_ABOVE_ROWS", 1_000)
        mp.setattr(knn_scorer, "STREAM_CHUNK_ROWS", 1_000)
        model = AnomalyModel(**{**SMALL, "coreset_max": 100}).fit(goods[:16])
    assert model.manifest_.training.calibration == "leave-one-out" and model.knn.bank_size == 100
    assert np.isfinite(model.decision.calibration.threshold)
    assert len(set(model.knn.provenance_[:, 0].tolist())) < 16  # some images did not get a row


def test_streamed_fit_keeps_provenance_catalog_and_finds_a_defect(streamed, goods):
    assert len(streamed.catalog_) == len(goods)
    sources = streamed.knn.provenance_
    assert sources is not None and len(sources) == streamed.knn.bank_size
    assert set(np.unique(sources[:, 0])) <= set(range(len(goods)))
    rng = np.random.default_rng(12)
    good = streamed.score(textured_part(rng))
    bad = streamed.score(add_defect(textured_part(rng), 64, 64, radius=14)[0])
    assert bad.score > good.score and bad.is_anomaly


def test_streamed_model_saves_and_loads(streamed, tmp_path):
    path = streamed.save(tmp_path / "m")
    loaded = AnomalyModel.load(path)
    img = textured_part(np.random.default_rng(13))
    assert loaded.score(img).score == pytest.approx(streamed.score(img).score, rel=1e-5)


def test_auto_index_is_exact_on_small_banks_and_recorded(streamed):
    assert resolve_index_kind("auto", AUTO_FLAT_MAX) == "flat"
    assert resolve_index_kind("auto", AUTO_FLAT_MAX + 1) == "ivf"
    assert resolve_index_kind("ivfpq", 10) == "ivfpq"  # an explicit choice always wins
    m = streamed.manifest_
    assert streamed.config.index == "auto" and m.index.kind == "flat" and m.index.requested == "auto"


def test_training_images_read_sizes_from_headers_and_skip_bad_ones(tmp_path, goods):
    from PIL import Image

    good = tmp_path / "a.png"
    Image.fromarray(goods[0][:100]).save(good)
    rotated = tmp_path / "r.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate a quarter turn on display: decoded height and width swap
    Image.fromarray(goods[1][:100]).save(rotated, exif=exif)
    broken = tmp_path / "b.png"
    broken.write_bytes(b"not an image")
    images = TrainingImages([good, rotated, broken, goods[2]])
    assert len(images) == 3 and len(images.skipped) == 1
    assert images.shapes == [(100, 128), (128, 100), (128, 128)]
    assert [images[i].shape[:2] for i in range(3)] == images.shapes


def test_calibration_sample_calibrates_as_the_full_map():
    """Leave-one-out keeps only the pixels calibration reads: thresholds, floor and drift reference are equal."""
    from anomaly_service.decision import KNN, Decision, calibration_sample

    rng = np.random.default_rng(3)
    maps = [rng.gamma(2.0, 3.0, size=(int(rng.integers(90, 700)), int(rng.integers(90, 700)))).astype(np.float32)
            for _ in range(60)]
    for m in maps[::7]:
        m[:10, :] = np.nan  # an inspection mask's outside
    raws = [{KNN: (float(np.nanmax(m)), m)} for m in maps]
    full, sampled = Decision(), Decision()
    full.calibrate(raws)
    sampled.calibrate([{KNN: (s, calibration_sample(m))} for (s, m) in (r[KNN] for r in raws)])
    assert sampled.calibration.to_dict() == full.calibration.to_dict()


SPILLING = ("import sys, time, torch\n"
            "from anomaly_service.patch_store import PatchStore\n"
            "store = PatchStore(memory_budget=0, spill_dir=sys.argv[1])\n"
            "store.add(torch.ones(4, 4, 8))\n"
            "print('spilled', flush=True)\n"
            "time.sleep(600)\n")


def test_the_spill_of_a_killed_fit_is_removed_by_the_next_one_that_spills(tmp_path):
    """A fit killed outright (the out-of-memory killer, likeliest on the largest fits, the ones that spill) ran no
    clean-up: its spill of patches stayed in the temporary directory for good, one more per killed fit. The next
    fit that spills removes those no live fit holds; a live fit's, however old, is left."""
    import os
    import subprocess
    import time
    import sys

    procs = [subprocess.Popen([sys.executable, "-c", SPILLING, str(tmp_path)], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        for proc in procs:
            assert proc.stdout.readline() == "spilled\n"
        procs[0].kill()
        procs[0].wait()
        spills = sorted(tmp_path.glob("anomaly-patches-*"))
        assert len(spills) == 2
        hour_ago = time.time() - 3600 - 60
        for path in [*spills, *tmp_path.glob("*/*")]:
            os.utime(path, (hour_ago, hour_ago))  # neither written to for more than an hour
        with PatchStore(memory_budget=0, spill_dir=tmp_path) as store:
            store.add(torch.ones(4, 4, 8))
            left = sorted(tmp_path.glob("anomaly-patches-*"))
            assert len(left) == 2 and store._file.parent in left  # its own and the live fit's
            alive = [p for p in left if p != store._file.parent]
            assert alive and alive[0] in spills
        assert procs[1].poll() is None
        assert alive[0].is_dir() and len(list(tmp_path.iterdir())) == 1  # the killed fit's is gone, the live one's not
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


# a fit of an earlier release: its spill open to write, no lock on it (it took none)
EARLIER_RELEASE = ("import os, sys, torch\n"
                   "from anomaly_service.patch_store import PatchStore\n"
                   "store = PatchStore(memory_budget=0, spill_dir=sys.argv[1])\n"
                   "store.add(torch.ones(4, 4, 8))\n"
                   "os.close(store._lock)\n"
                   "store._lock = None\n"
                   "print('spilled', flush=True)\n"
                   "sys.stdin.readline()\n"
                   "print(tuple(store.rows(0).shape), flush=True)\n")


def test_the_spill_of_a_live_fit_of_an_earlier_release_is_left_however_old(tmp_path):
    """An earlier release's fit takes no lock on its spill, and a fit of thousands of photos reads it back for
    hours after its last write (its coreset): a fit that spilled meanwhile took it for a killed fit's and removed it,
    and the live fit failed on its next read ('No such file or directory: .../patches.f32')."""
    import os
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-c", EARLIER_RELEASE, str(tmp_path)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "spilled\n"
        hours_ago = time.time() - 2 * 3600
        for path in [*tmp_path.glob("anomaly-patches-*"), *tmp_path.glob("*/*")]:
            os.utime(path, (hours_ago, hours_ago))  # written to last two hours ago
        with PatchStore(memory_budget=0, spill_dir=tmp_path) as store:
            store.add(torch.ones(4, 4, 8))
            assert len(list(tmp_path.glob("anomaly-patches-*"))) == 2
        out, err = proc.communicate("\n", timeout=60)
        assert out == "(16, 8)\n", err
    finally:
        proc.kill()
        proc.wait()


def _direct_scorer(ratio: float, k: int):
    from anomaly_service.coreset import GreedyCoresetSampler
    from anomaly_service.knn_scorer import KnnScorer
    from anomaly_service.selection import make_selector

    return KnnScorer(selector=make_selector("none", 1.0), sampler=GreedyCoresetSampler(ratio, None, 16, 0, False), k=k)


def test_a_fit_records_what_it_read_and_takes_a_k_equal_to_its_bank(monkeypatch):
    """The manifest's coreset section (patches read, radius, chunks) was only ever read from fits whose numbers no
    test compared: a bank keeping every patch has radius 0 and one chunk, a subsampled one the radius of its
    greedy, and both read every patch of the store. A --k equal to the bank is searched (it was only refused above
    it), and the refusal above it asks for images when every patch is kept already, for patches otherwise."""
    from anomaly_service import ConfigError

    rng = np.random.default_rng(3)
    with PatchStore(memory_budget=1 << 20) as store:
        for _ in range(3):
            store.add(torch.from_numpy(rng.normal(size=(4, 5, 8)).astype(np.float32)))
        whole = _direct_scorer(1.0, k=60)
        whole.fit(store)
        assert whole.bank_size == 60
        assert whole.stats_["from_patches"] == 60
        assert whole.stats_["coverage_radius"] == 0.0 and whole.stats_["chunks"] == 1
        part = _direct_scorer(0.25, k=1)
        part.fit(store)
        assert part.bank_size == 15 and part.stats_["from_patches"] == 60 and part.stats_["chunks"] == 1
        radius = part.sampler.coverage_radius(torch.from_numpy(part.bank()))  # the bank keeps the greedy's order
        assert part.stats_["coverage_radius"] == radius > 0
        with pytest.raises(ConfigError, match="add good images") as err:
            _direct_scorer(1.0, k=61).fit(store)
        assert "--coreset-ratio" not in str(err.value)
        with pytest.raises(ConfigError, match=r"keep more patches \(--coreset-ratio"):
            _direct_scorer(0.25, k=16).fit(store)
        with pytest.raises(TypeError, match="from its PatchStore"):  # turned copies need the store's images
            _direct_scorer(1.0, k=1).fit(store.all(), extra=store)
        monkeypatch.setattr(knn_scorer, "STREAM_ABOVE_ROWS", 40)
        monkeypatch.setattr(knn_scorer, "STREAM_CHUNK_ROWS", 20)  # an image a chunk
        streamed = _direct_scorer(0.25, k=1)
        streamed.fit(store)
        assert streamed.stats_["from_patches"] == 60 and streamed.stats_["chunks"] == 3


def test_a_streamed_cap_counts_what_it_left_out_and_keeps_the_farthest(monkeypatch, caplog):
    """--coreset-max while streaming: the chunk that crosses the cap keeps its farthest patches up to it, and the
    later chunks are not searched; the warning's two counts (patches cut, images not looked at) were never
    compared with what was left out (only that the warning came)."""
    monkeypatch.setattr(knn_scorer, "STREAM_ABOVE_ROWS", 40)
    monkeypatch.setattr(knn_scorer, "STREAM_CHUNK_ROWS", 20)  # an image a chunk
    rng = np.random.default_rng(4)
    with PatchStore(memory_budget=1 << 20) as store:
        for _ in range(4):
            store.add(torch.from_numpy(rng.normal(size=(4, 5, 64)).astype(np.float32)))
        free = _direct_scorer(0.05, k=1)  # one row of the first chunk: radius 0, every later patch joins
        free.fit(store)
        order = list(dict.fromkeys(free.provenance_[:, 0].tolist()))  # images in the order the chunks came
        per_image = [int((free.provenance_[:, 0] == i).sum()) for i in order]
        first, second = per_image[0], per_image[1]
        cap = first + 2
        assert second > 2  # the second chunk crosses the cap
        capped = _direct_scorer(0.05, k=1)
        capped.sampler.max_size = cap
        caplog.clear()
        with caplog.at_level("WARNING", logger="anomaly_service.knn_scorer"):
            capped.fit(store)
        assert capped.bank_size == cap
        np.testing.assert_array_equal(capped.bank(), free.bank()[:cap])  # the farthest first, in the free order
        said = f"streaming: {second - 2} patches farther than the fit's radius were left out, and 2 later images"
        assert said in caplog.text


class _Copies:
    """Extra patches as :class:`~anomaly_service.knn_scorer.ExtraPatches` asks (orientation.TurnedCopies' shape):
    entry ``i`` of ``rows`` is image ``i``'s, ``(1, n, D)``, each row from the source cell ``(0, k)``."""

    def __init__(self, rows: PatchStore, factor: float):
        self.rows, self.factor = rows, factor

    def sources(self, images, place) -> np.ndarray:
        return np.concatenate([np.column_stack([np.full(self.rows.size(i), p), np.zeros(self.rows.size(i)),
                                                np.arange(self.rows.size(i))]) for i, p in zip(images, place)]
                              ).astype(np.int32)


@pytest.mark.parametrize("streamed", [False, True])
def test_copies_join_a_fit_only_where_its_own_bank_leaves_them_uncovered(monkeypatch, caplog, streamed):
    """Turned copies add only the patches the images' own bank leaves farther than its radius, one greedy or
    streamed: copies that repeat the images' own patches add none, far ones come in, marked as copies and counted
    among the patches read. Only whole fits of turned photos (whose copies are all unlike the originals) tested
    this, and the one-greedy path's copies could be taken evenly, covered or not, unseen."""
    if streamed:
        monkeypatch.setattr(knn_scorer, "STREAM_ABOVE_ROWS", 40)
        monkeypatch.setattr(knn_scorer, "STREAM_CHUNK_ROWS", 20)  # an image a chunk
    rng = np.random.default_rng(5)
    grids = [rng.normal(size=(4, 5, 8)).astype(np.float32) for _ in range(3)]
    with PatchStore(memory_budget=1 << 20) as store, PatchStore(memory_budget=1 << 20) as turned:
        for g in grids:
            store.add(torch.from_numpy(g))
            rows = g.reshape(1, -1, 8)
            turned.add(torch.from_numpy(np.concatenate([rows, rows + 100.0], axis=1)))  # the same, and far ones
        scorer = _direct_scorer(0.25, k=1)
        scorer.fit(store, extra=_Copies(turned, factor=10.0))
        bank, copies = scorer.bank(), scorer.copies_
        own = int((~copies).sum())
        assert own == (15 if not streamed else len(bank) - int(copies.sum()))
        assert copies.any() and not copies[:own].any()  # the images' own rows first, then the copies'
        assert (np.abs(bank[copies]).max(1) > 50).all()  # no copy of a covered patch
        assert int(copies.sum()) == int((np.abs(bank).max(1) > 50).sum())
        assert scorer.stats_["from_patches"] == 60 + 120
        for row, (image, _, cell) in zip(bank[copies], scorer.provenance_[copies]):  # each names its own image
            assert cell >= 20 and np.allclose(row, grids[image].reshape(-1, 8)[cell - 20] + 100.0)
        # a bank too small for every uncovered copy keeps the farthest, spread over the images, and says which flag
        # gives them room: the cap where --coreset-max set it, --coreset-ratio where the factor did
        limit = own + int(copies.sum()) // 2
        for cap, factor, flag in ((limit, 10.0, "--coreset-max"), (None, limit / own, "--coreset-ratio")):
            cut = _direct_scorer(0.25, k=1)
            cut.sampler.max_size = cap
            caplog.clear()
            with caplog.at_level("WARNING", logger="anomaly_service.knn_scorer"):
                cut.fit(store, extra=_Copies(turned, factor=factor))
            assert cut.bank_size == limit and int((~cut.copies_).sum()) == own
            assert (np.abs(cut.bank()[cut.copies_]).max(1) > 50).all()
            named = flag if cap is not None else f"{factor:g}x the bank without copies"
            assert f"reached its {limit} patches ({named})" in caplog.text
            assert f"a larger {flag} gives the copies more room" in caplog.text
