"""The closest normal evidence of a region and the part's place among the training images (evidence.py,
image_map.py), on synthetic parts built so the answer is known.

Two of the training images carry a mark (a blue ring) that no other has, each at its own place. A region around
that mark in a copy of one of them must point at that very image and place; the mark on a new part, at a place
neither has, is flagged, and its evidence must be one of the two marked images, near its ring.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

from anomaly_service import AnomalyModel
from anomaly_service.errors import ModelFormatError
from anomaly_service.evidence import Box, TrainingEvidence, hottest_patch
from anomaly_service.image_map import ImageMap
from anomaly_service.provenance import TrainingCatalog
from anomaly_service.regions import Region
from anomaly_service.render import render
from conftest import textured_part

LEGACY = Path(__file__).parent / "data" / "legacy_v1"
MARKED = {3: (36, 40), 7: (92, 30)}  # training image -> (cy, cx) of its ring
RADIUS = 9
NAMES = [f"line-1/good/{i:03d}.png" for i in range(10)]


def ring(image: np.ndarray, cy: int, cx: int, color: tuple[int, int, int] = (40, 90, 220)) -> np.ndarray:
    """A blue ring of radius 9 centred at (cy, cx): a mark no plain part has."""
    yy, xx = np.mgrid[0 : image.shape[0], 0 : image.shape[1]]
    r = np.hypot(yy - cy, xx - cx)
    out = image.copy()
    out[(r <= RADIUS) & (r >= RADIUS - 4)] = color
    return out


def around(cy: int, cx: int, half: int = 12) -> Region:
    """A region box around (cy, cx) with its peak there."""
    return Region(x=cx - half, y=cy - half, width=2 * half, height=2 * half, area=4 * half * half, peak_score=1.0,
                  peak_x=cx, peak_y=cy)


def centre(box: Box) -> tuple[float, float]:
    return box.y + box.height / 2, box.x + box.width / 2


@pytest.fixture(scope="module")
def train() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    images = [textured_part(rng) for _ in range(10)]
    for i, (cy, cx) in MARKED.items():
        images[i] = ring(images[i], cy, cx)
    return images


@pytest.fixture(scope="module")
def marked(train) -> AnomalyModel:
    # the marked images stand out from the rest: the contamination guard warns about them, as it should
    return AnomalyModel(backbone="efficientnet_lite0", image_size=128, coreset_ratio=0.25,
                        progress=False).fit(train, names=NAMES)


@pytest.mark.parametrize("image", sorted(MARKED))
def test_a_clean_region_points_at_the_training_image_it_was_copied_from(marked, train, image):
    """A copy of a marked training image is normal; the region around its ring is the ring it was copied from:
    the same image, the same place, at distance zero."""
    result = marked.score(train[image])
    assert not result.is_anomaly
    evidence = TrainingEvidence.of(marked)
    cy, cx = MARKED[image]
    nn = evidence.nearest_normal(result.matches, around(cy, cx), 128, 128)
    assert nn is not None and nn.image == image and nn.name == NAMES[image]
    assert nn.sha256 == marked.catalog_.digests[image] and (nn.image_width, nn.image_height) == (128, 128)
    assert nn.box == nn.patch  # the very patch, at the very place
    # zero but for float noise: the fit embedded the image in a batch, scoring embeds it alone, and some CPUs'
    # kernels round a batch differently; a patch of another image or place lies orders of magnitude further
    assert nn.distance < 1e-2 * marked.decision.calibration.threshold
    y, x = centre(nn.box)
    assert abs(y - cy) <= RADIUS + 4 and abs(x - cx) <= RADIUS + 4


def test_a_flagged_mark_at_a_new_place_points_at_a_marked_training_image(marked):
    """The ring on a new part, where no training image has one, is flagged; what it is closest to in training is
    a ring: one of the two marked images, near its ring (the patch features see a few cells around them)."""
    probe = ring(textured_part(np.random.default_rng(11)), 84, 90)
    result = marked.score(probe)
    verdict = render(result, evidence=TrainingEvidence.of(marked))
    assert result.is_anomaly and verdict.regions
    region = next(g for g in verdict.regions if g.x <= 90 < g.x + g.width and g.y <= 84 < g.y + g.height)
    nn = region.nearest_normal
    assert nn is not None and nn.image in MARKED and nn.name == NAMES[nn.image]
    (cy, cx), (y, x) = MARKED[nn.image], centre(nn.box)
    assert np.hypot(y - cy, x - cx) <= RADIUS + 3 * 8  # within three grid cells of its ring
    # the hottest patch lies in the region, and its distance is the kNN distance of a flagged patch
    p = nn.patch
    assert region.x <= p.x + p.width and p.x <= region.x + region.width
    assert region.y <= p.y + p.height and p.y <= region.y + region.height
    assert nn.distance > 0
    d = nn.to_dict()
    assert d["box"] == {"x": nn.box.x, "y": nn.box.y, "width": nn.box.width, "height": nn.box.height}
    assert region.to_dict()["nearest_normal"] == d


def test_hottest_patch_is_the_peak_cell_or_a_hotter_neighbour_inside_the_box():
    grid = np.zeros((16, 16), np.float32)
    grid[5, 6] = 3.0  # the hottest patch, one cell right of the peak's
    grid[5, 8] = 9.0  # hotter, but two cells away: another region's
    region = Region(x=32, y=32, width=24, height=24, area=100, peak_score=1.5, peak_x=44, peak_y=44)
    assert hottest_patch(grid, region, 128, 128) == (5, 6)
    narrow = Region(x=40, y=40, width=8, height=8, area=64, peak_score=1.5, peak_x=44, peak_y=44)
    assert hottest_patch(grid, narrow, 128, 128) == (5, 5)  # the neighbour lies outside the region's box
    edge = Region(x=120, y=120, width=8, height=8, area=64, peak_score=1.5, peak_x=127, peak_y=127)
    assert hottest_patch(grid, edge, 128, 128) == (15, 15)


def test_hottest_patch_is_the_hottest_cell_next_to_the_peak_inside_the_box_on_any_frame():
    """Against the rule read cell by cell, on random maps, regions and frames (wider than tall, grids of other
    shapes, boxes at the frame's edges): a mix-up of rows and columns, of a box's first and last cell, or a window
    one cell too wide or too narrow changes some answer."""
    rng = np.random.default_rng(4)
    for _ in range(300):
        height, width = (int(v) for v in rng.integers(8, 200, 2))
        gh, gw = (int(v) for v in rng.integers(1, 24, 2))
        distance = rng.random((gh, gw)).astype(np.float32)
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = int(rng.integers(1, width - x + 1)), int(rng.integers(1, height - y + 1))
        px, py = int(rng.integers(x, x + w)), int(rng.integers(y, y + h))
        region = Region(x=x, y=y, width=w, height=h, area=w * h, peak_score=1.0, peak_x=px, peak_y=py)
        peak = (py * gh // height, px * gw // width)
        rows = range(y * gh // height, (y + h - 1) * gh // height + 1)
        cols = range(x * gw // width, (x + w - 1) * gw // width + 1)
        near = [(r, c) for r in rows for c in cols if abs(r - peak[0]) <= 1 and abs(c - peak[1]) <= 1]
        assert hottest_patch(distance, region, height, width) == max(near, key=lambda rc: distance[rc])


def test_no_evidence_where_the_search_found_no_row_or_a_row_names_no_catalogued_image(marked, train):
    """FAISS answers -1 where it found nothing; a row past the bank, or a source image past the catalog, points at
    nothing either: no evidence rather than another image's. Row 0 and image 0 are real ones. A result without kNN
    matches keeps its regions as they are and has no place on the map."""
    evidence = TrainingEvidence.of(marked)
    result = marked.score(train[3])
    region, m = around(*MARKED[3]), result.matches
    for row, found in ((-1, False), (len(evidence.sources), False), (0, True)):
        nn = evidence.nearest_normal(dataclasses.replace(m, nearest=np.full_like(m.nearest, row)), region, 128, 128)
        assert (nn is not None) == found
    assert nn.image == evidence.sources[0, 0]
    for image, found in ((len(marked.catalog_), False), (0, True)):
        sources = evidence.sources.copy()
        sources[:, 0] = image
        assert (TrainingEvidence(marked.catalog_, sources).nearest_normal(m, region, 128, 128) is not None) == found
    bare = dataclasses.replace(result, matches=None)
    assert evidence.annotate(bare, [region]) == [region] and evidence.position(bare) is None


def test_the_image_map_places_training_images_and_parts_alike(marked, train):
    image_map = marked.catalog_.image_map
    assert image_map is not None and image_map.points.shape == (len(train), 2)
    assert 0 < image_map.explained[1] <= image_map.explained[0] <= 1
    # a copy of a training image lands on that image's point, as the scorer computes it
    evidence = TrainingEvidence.of(marked)
    for i in (0, 3):
        point = evidence.position(marked.score(train[i]))
        assert point is not None
        np.testing.assert_allclose([point.x, point.y], image_map.points[i], rtol=1e-3, atol=1e-3)
    # the two marked images stand apart from the plain ones along the main direction
    plain = [i for i in range(len(train)) if i not in MARKED]
    gap = abs(image_map.points[sorted(MARKED)].mean(0)[0] - image_map.points[plain].mean(0)[0])
    assert gap > 2 * image_map.points[plain, 0].std()


def test_image_map_fit_project_extend_and_storage():
    rng = np.random.default_rng(2)
    pooled = np.concatenate([rng.normal(0, 1, (6, 8)), rng.normal(0, 1, (6, 8)) + 10]).astype(np.float32)
    m = ImageMap.fit(pooled)
    np.testing.assert_allclose(m.points, m.project(pooled), atol=1e-4)
    assert abs(m.points[:6, 0].mean() - m.points[6:, 0].mean()) > 20  # the clusters split along x
    grown = m.extended(pooled[:2] + 1)
    np.testing.assert_array_equal(grown.points[:12], m.points)  # earlier places never move
    assert grown.points.shape == (14, 2)
    assert ImageMap.fit(pooled[:2]).components[1].any() == False  # noqa: E712 - two images: one direction only
    catalog = TrainingCatalog()
    for _ in range(12):
        catalog.add("x.png", "0" * 64, np.zeros((20, 30, 3), np.uint8), (2, 3))
    catalog.image_map = m
    again = TrainingCatalog.from_bytes(catalog.to_bytes())
    np.testing.assert_array_equal(again.image_map.points, m.points)
    np.testing.assert_array_equal(again.image_map.components, m.components)
    for k in ("basis", "spread", "distances"):  # the drift monitor's feature distance (drift.py)
        np.testing.assert_array_equal(getattr(again.image_map, k), getattr(m, k))
    arrays = m.to_arrays()
    older = {k: v for k, v in arrays.items() if k not in ("map_basis", "map_spread", "map_distances")}
    assert ImageMap.from_arrays(older, 12).distances is None  # catalogs saved before the feature distance
    with pytest.raises(ModelFormatError, match="feature distance"):
        ImageMap.from_arrays({**arrays, "map_distances": arrays["map_distances"][:5]}, 12)
    catalog.image_map = None
    assert TrainingCatalog.from_bytes(catalog.to_bytes()).image_map is None  # catalogs saved before the map


def test_evidence_survives_save_and_load(marked, train, tmp_path):
    loaded = AnomalyModel.load(marked.save(tmp_path / "m"), device="cpu")
    region = around(*MARKED[7])
    a, b = (TrainingEvidence.of(m).nearest_normal(m.score(train[7]).matches, region, 128, 128)
            for m in (marked, loaded))
    assert a == b and a.image == 7
    np.testing.assert_array_equal(loaded.catalog_.image_map.points, marked.catalog_.image_map.points)


def test_update_extends_the_evidence_and_the_map(marked, train):
    """Good images added by an update join the catalog and the map: a new mark they bring is found in them."""
    rng = np.random.default_rng(5)
    added = [ring(textured_part(rng), 60, 64, color=(230, 60, 160)), textured_part(rng)]
    new = marked.update(added, names=["added/a.png", "added/b.png"])
    n = len(train)
    assert len(new.catalog_) == n + 2 and new.manifest_.evidence.n_images == n + 2
    assert len(marked.catalog_) == n  # the model it came from is untouched
    points = new.catalog_.image_map.points
    np.testing.assert_array_equal(points[:n], marked.catalog_.image_map.points)  # the fit's places stay
    point = TrainingEvidence.of(new).position(new.score(added[0]))
    np.testing.assert_allclose([point.x, point.y], points[n], rtol=1e-3, atol=1e-3)
    nn = TrainingEvidence.of(new).nearest_normal(new.score(added[0]).matches, around(60, 64), 128, 128)
    assert nn.image == n and nn.name == "added/a.png"


def test_a_model_without_evidence_scores_and_shows_none(train, tmp_path):
    """Models saved before provenance was kept load and score as ever; their regions carry no evidence."""
    model = AnomalyModel.load(shutil.copytree(LEGACY / "default", tmp_path / "legacy"), device="cpu")
    assert model.catalog_ is None and TrainingEvidence.of(model) is None
    bad = ring(textured_part(np.random.default_rng(3)), 64, 64, color=(250, 240, 60))
    result = model.score(bad)
    verdict = render(result, evidence=TrainingEvidence.of(model))
    assert result.is_anomaly and verdict.regions
    assert verdict.embedding is None and all(g.nearest_normal is None for g in verdict.regions)
    assert all(g.to_dict()["nearest_normal"] is None for g in verdict.regions)


def test_training_images_named_in_another_code_page_give_evidence_json_can_carry(train, tmp_path):
    """Good photos whose file names are not UTF-8 were kept in the model as lone surrogates: every flagged part's
    answer (its regions' nearest_normal), the model's manifest and its image map then failed to encode, a 500 for
    each defect. Their names keep the byte as a \\xNN escape; a model saved so before loads with them spelt so."""
    import json
    import os

    from conftest import png_bytes

    paths = []
    for i, image in enumerate(train):
        paths.append(tmp_path / os.fsdecode(b"p\xe9%02d.png" % i))
        paths[-1].write_bytes(png_bytes(image))
    model = AnomalyModel(backbone="efficientnet_lite0", image_size=128, coreset_ratio=0.25,
                         progress=False).fit(paths)
    probe = ring(textured_part(np.random.default_rng(11)), 84, 90)
    verdict = render(model.score(probe), evidence=TrainingEvidence.of(model))
    names = [r.nearest_normal.name for r in verdict.regions]
    assert names and all("p\\xe9" in n for n in names)
    json.dumps([r.to_dict() for r in verdict.regions], ensure_ascii=False).encode("utf-8")
    json.dumps(model.manifest_.model_dump(mode="json"), ensure_ascii=False).encode("utf-8")
    older = TrainingCatalog(names=["p\udce9.png"], digests=["0" * 64], shapes=[(8, 8)], grids=[(1, 1)],
                            thumbnails=[b"\xff\xd8"])
    assert TrainingCatalog.from_bytes(older.to_bytes()).names == ["p\\xe9.png"]


def test_a_thumbnail_an_update_added_says_it_is_gone_after_a_rollback(marked, tmp_path):
    """A part scored while an update was served cites a training image the update added, and a record of it keeps
    the thumbnail URL it was given. After a rollback that URL answers 404 saying the model no longer holds the image
    (re-fitted or rolled back), not that the index the service itself handed out is out of range. The update's image
    map says which version's map it extends, so a part that version scored can be drawn on it."""
    from fastapi.testclient import TestClient

    from anomaly_service.api import create_app
    from anomaly_service.settings import ServiceSettings
    from conftest import png_bytes

    marked.save(tmp_path / "models" / "part")
    added = ring(textured_part(np.random.default_rng(8)), 60, 64, color=(230, 60, 160))
    settings = ServiceSettings(model_dir=tmp_path / "models", reload_interval=0, device="cpu", record=False)
    with TestClient(create_app(settings)) as client:
        fitted = client.get("/models/part/embedding").json()
        assert fitted["extends"] is None  # a fit extends no map
        r = client.post("/models/part/update", files=[("files", ("added.png", png_bytes(added)))])
        assert r.status_code == 200, r.text
        report = r.json()
        # the update's map says it extends the version it updated, whose map is its first points, unmoved: a part
        # that version scored is drawn on them (the page did not draw it at all)
        updated = client.get("/models/part/embedding").json()
        assert updated["model_version"] == report["version"] and len(updated["points"]) == len(marked.catalog_) + 1
        assert report["previous"] == fitted["model_version"]
        assert updated["extends"] == {"model_version": fitted["model_version"], "points": len(marked.catalog_)}
        assert updated["points"][: len(marked.catalog_)] == fitted["points"]
        assert updated["explained_variance"] == fitted["explained_variance"]
        # the added image's mark at another place: its evidence is the added image
        probe = ring(textured_part(np.random.default_rng(9)), 96, 40, color=(230, 60, 160))
        body = client.post("/score", files={"file": ("p.png", png_bytes(probe))}).json()
        cited = [g["nearest_normal"] for g in body["regions"] if g["nearest_normal"]["name"] == "added.png"]
        assert cited and cited[0]["image"] == len(marked.catalog_)
        url = cited[0]["thumbnail_url"]
        assert client.get(url).status_code == 200
        r = client.post("/models/part/rollback", json={"version": report["previous"]})
        assert r.status_code == 200, r.text
        gone = client.get(url)
        assert (gone.status_code, gone.json()["error"]) == (404, "unknown_training_image")
        assert client.get("/models/part/embedding").json()["extends"] is None  # the fit served again
        assert "no longer holds" in gone.json()["detail"] and "rolled back" in gone.json()["detail"]
        # an index out of range that no answer gave out (no digest) still says which exist
        r = client.get(f"/models/part/training-images/{len(marked.catalog_)}/thumbnail")
        assert r.status_code == 404 and f"0 to {len(marked.catalog_) - 1}" in r.json()["detail"]


def test_training_images_of_mixed_sizes_are_cited_by_their_own_name_size_and_place():
    """The fit embeds images of one working size together, so a set of mixed sizes is catalogued out of its input
    order: each entry still names its own image, and a region cites the marked image's name, size and place."""
    rng = np.random.default_rng(4)
    sizes = [(128, 128), (96, 160), (150, 112), (128, 128), (90, 140), (128, 128), (140, 100), (128, 128)]
    train = [textured_part(rng, h, w) for h, w in sizes]
    train[1] = ring(train[1], 30, 120)  # a 96 x 160 image, second in the input, carries the mark
    names = [f"mixed/{i}.png" for i in range(len(train))]
    model = AnomalyModel(backbone="efficientnet_lite0", image_size=128, coreset_ratio=0.25,
                         progress=False).fit(train, names=names)
    catalog = model.catalog_
    assert sorted(catalog.names) == sorted(names) and catalog.names != names  # out of input order, each its own
    for j, name in enumerate(catalog.names):
        assert catalog.shapes[j] == train[names.index(name)].shape[:2]
    nn = TrainingEvidence.of(model).nearest_normal(model.score(train[1]).matches, around(30, 120), 96, 160)
    assert nn.name == "mixed/1.png" and catalog.names[nn.image] == nn.name
    assert (nn.image_height, nn.image_width) == (96, 160) and nn.box == nn.patch
    y, x = centre(nn.box)
    assert abs(y - 30) <= RADIUS + 4 and abs(x - 120) <= RADIUS + 4


# ------------------------------------------------------------------ evaluate --report's embedding map (evaluate.py)
def test_the_report_map_draws_a_test_folder_of_more_defect_types_than_its_palette_has_colours(fitted_model,
                                                                                              tmp_path):
    """Each defect type took the next of tab10's nine other colours from one iterator: a test folder of ten defect
    types stopped `evaluate --report` with StopIteration at its last picture, after all its scoring, the page
    unwritten. Past the nine colours the types are told apart by their marker."""
    from PIL import Image

    from anomaly_service import evaluate
    from anomaly_service.evaluate import Sample, write_embedding_map

    rng = np.random.default_rng(5)
    samples = []
    for t in range(11):
        path = tmp_path / "test" / f"type{t:02d}" / "000.png"
        path.parent.mkdir(parents=True)
        Image.fromarray(textured_part(rng, 64, 64)).save(path)
        samples.append(Sample(path, 1, f"type{t:02d}", None))
    report = tmp_path / "report"
    report.mkdir()
    write_embedding_map(report, fitted_model, samples, [])
    assert (report / "embedding_map.png").stat().st_size > 0
    styles = evaluate.group_styles(2 + 20)
    assert len(set(styles)) == len(styles)  # every group its own look, the training and test goods as before
    assert styles[:2] == [("lightgray", "o"), ("tab:blue", "o")]


def test_the_report_maps_photos_are_decoded_a_backbone_batch_at_a_time(fitted_model, tmp_path, monkeypatch):
    """The report's map embedded every test photo and a few hundred training ones after decoding them all: a
    validation set of megapixel photos was held whole at the end of an evaluation whose scoring had streamed it."""
    import weakref

    from PIL import Image

    from anomaly_service import evaluate

    rng = np.random.default_rng(6)
    paths = []
    for i in range(3 * fitted_model.embedder.batch_size + 1):
        paths.append(tmp_path / f"{i:03d}.png")
        Image.fromarray(textured_part(rng, 64, 64)).save(paths[-1])
    decoded: list[weakref.ref] = []
    held: list[int] = []
    decode_each = evaluate.decode_each

    def tracked(*args, **kwargs):
        for i, d in decode_each(*args, **kwargs):
            decoded.append(weakref.ref(d.array))
            yield i, d

    embed = fitted_model.embedder.embed

    def counting(*args, **kwargs):
        held.append(sum(r() is not None for r in decoded))
        return embed(*args, **kwargs)

    monkeypatch.setattr(fitted_model.embedder, "embed", counting)
    monkeypatch.setattr(evaluate, "decode_each", tracked)
    feats, kept = evaluate.image_features(fitted_model, paths)
    assert kept == list(range(len(paths))) and feats.shape == (len(paths), len(fitted_model.knn.selected_))
    assert held and max(held) <= fitted_model.embedder.batch_size, held
    # the same vectors as each photo embedded alone
    alone = embed([np.asarray(Image.open(paths[-1]).convert("RGB"))], keep=fitted_model.knn.keep)
    np.testing.assert_allclose(feats[-1], alone.features.float().mean(dim=(1, 2))[0].numpy(), rtol=1e-4, atol=1e-4)
