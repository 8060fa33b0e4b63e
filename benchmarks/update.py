"""Feedback benchmark: add an operator's false alarms as good with ``AnomalyModel.update`` and check the cost.

Per category (efficientnet_lite0, every other option at its default): fit on train/good, score the test set, take
the good test images the model flags (the false alarms an operator would mark good; the 5 highest-scoring good
ones if it flags fewer), add them with ``update``, and compare on the remaining test images before and after:
image AUROC, PRO, defect recall and good FPR at the threshold, plus how many of the added images now pass.
Then the cost: an update of 20 images into a model fitted on 200, against a re-fit on all 220.

    python benchmarks/update.py                 # the three shared categories + the timing on bottle
    python benchmarks/update.py --categories mvtec_ad/bottle --no-timing
    python benchmarks/update.py --moved          # good parts moved in the frame, marked good
    python benchmarks/update.py --turned --orientation fixed any   # turned good parts marked good
    python benchmarks/update.py --repeated --categories magnetic_tile/mt --orientation any   # many updates

``--turned``: the rotated protocol's test photos (benchmarks/quality.py: turned by seeded random angles, mirrored half
of the time; a surface cut to its largest upright rectangle of real pixels, as a camera turned over it frames it, and
a part on a plain background whole, on its grown canvas). Every second turned good photo is one an operator reviews:
those the model flags (its 5 highest-scoring ones when it flags fewer) are marked good and added. Before and after,
on the turned photos nobody marked and on the upright test: image AUROC, pixel AUROC, PRO, good FPR and defect
recall at the threshold.

``--repeated``: a model's long life. A fit on ``--fit-images`` of the training images (a seeded shuffle), then
``--updates`` updates of ``--batch`` more good images each, then fresh fits of the same final image set
(``--fresh-seeds``), which say how far apart two fits of the same images set their threshold. For each: the
threshold (an update's path through its updates), and on the test set upright and turned (the ``--turned`` photos):
good FPR, defect recall and image AUROC.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data"
CATEGORIES = ["mvtec_ad/bottle", "kolektorsdd/kos", "magnetic_tile/mt"]
PARAMS = {"backbone": "efficientnet_lite0"}


def _fmt(v: object) -> str:
    return "n/a" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def feedback(cat: str) -> dict:
    from anomaly_service import AnomalyModel
    from anomaly_service.evaluate import evaluate_model, read_category

    train, samples = read_category(DATA / cat)
    model = AnomalyModel(progress=False, **PARAMS).fit(train)
    results = list(model.score_many([s.path for s in samples]))
    good = [i for i, s in enumerate(samples) if s.label == 0]
    flagged = [i for i in good if results[i].is_anomaly]
    marked = flagged if len(flagged) >= 5 else sorted(good, key=lambda i: -results[i].normalized_score)[:5]
    rest = [s for i, s in enumerate(samples) if i not in set(marked)]
    before = evaluate_model(model, rest)
    t0 = time.perf_counter()
    new = model.update([samples[i].path for i in marked])
    update_s = time.perf_counter() - t0
    after = evaluate_model(new, rest)
    passing = sum(not r.is_anomaly for r in new.score_many([samples[i].path for i in marked]))
    lineage = new.manifest_.lineage
    return {"category": cat, "flagged": len(flagged), "marked": len(marked), "now_pass": passing,
            "patches": lineage.patches_added, "bank": f"{model.knn.bank_size}->{new.knn.bank_size}",
            "threshold": f"{model.calibration_.threshold:.3f}->{new.calibration_.threshold:.3f}",
            "update_s": update_s, "before": before, "after": after}


def moved(cat: str, n_add: int = 4, n_other: int = 6) -> dict:
    """Good parts moved in the frame (a fixture that shifted): the whole-image branch flags them. An operator marks
    ``n_add`` of them good; how many of those, and of ``n_other`` moved parts nobody marked, pass after the update,
    and what the update does to the unmoved test set. Fitted on every 7th training image (30 on bottle), the moved
    parts are other training images shifted by 20-40 px (wrapped round)."""
    import numpy as np

    from anomaly_service import AnomalyModel
    from anomaly_service.evaluate import evaluate_model, read_category
    from anomaly_service.images import load_image

    train, samples = read_category(DATA / cat)
    fit_on = train[::7][:30]
    spare = [p for p in train if p not in set(fit_on)]
    rng = np.random.default_rng(0)
    shifts = [(int(rng.choice([-1, 1]) * rng.integers(20, 41)), int(rng.choice([-1, 1]) * rng.integers(0, 41)))
              for _ in range(n_add + n_other)]
    shifted = [np.roll(load_image(p), s, axis=(1, 0)) for p, s in zip(spare, shifts)]
    added, others = shifted[:n_add], shifted[n_add:]
    model = AnomalyModel(progress=False, **PARAMS).fit(fit_on)
    new = model.update(added)
    passing = lambda m, imgs: sum(not r.is_anomaly for r in m.score_many(imgs))  # noqa: E731
    return {"category": cat, "layout": model.manifest_.training.layout_strength,
            "fused": model.autoencoder_ is not None, "added": f"{passing(model, added)} -> {passing(new, added)}",
            "others": f"{passing(model, others)} -> {passing(new, others)}", "n_add": n_add, "n_other": n_other,
            "still_flagged": len(new.still_flagged_), "before": evaluate_model(model, samples),
            "after": evaluate_model(new, samples)}


def turned_views(p: "ProtocolPhotos") -> list[tuple[int, object, object]]:  # noqa: F821
    """The turned test photos as a camera shows them (``p``: the rotated protocol's photos): a part on a plain
    background turned whole (its canvas shows the background), a surface as the cut shows it; each with its
    sample's index and its mask."""
    from anomaly_service.orientation import plain_background

    cut_at = dict(zip(p.keep, range(len(p.keep))))
    views = [(i, p.turned[i], p.turned_masks[i]) if plain_background(img) is not None
             else (i, p.cut[cut_at[i]], p.cut_masks[cut_at[i]]) if i in cut_at else None
             for i, img in enumerate(p.upright)]
    return [v for v in views if v is not None]


def turned(cat: str, orientation: str) -> dict:
    """Turned good parts an operator marks good (the module docstring's ``--turned``): what the update does to the
    turned parts nobody marked and to the upright test, for a model fitted with ``orientation``."""
    import numpy as np

    sys.path.insert(0, str(REPO / "benchmarks"))
    from quality import _judged, _quality, _scored, protocol_photos

    from anomaly_service import AnomalyModel
    from anomaly_service.evaluate import read_category

    train, samples = read_category(DATA / cat)
    model = AnomalyModel(progress=False, orientation=orientation, **PARAMS).fit(train)
    p = protocol_photos(samples)
    views = turned_views(p)
    shown = [samples[i] for i, _, _ in views]
    photos, masks = [v[1] for v in views], [v[2] for v in views]
    scores, maps, _ = _scored(model, photos, None)
    reviewed = [j for j, smp in enumerate(shown) if smp.label == 0][::2]
    flagged = [j for j in reviewed if scores[j] > 1.0]
    marked = flagged if len(flagged) >= 5 else sorted(reviewed, key=lambda j: -scores[j])[:5]
    rest = [j for j in range(len(shown)) if j not in set(marked)]

    def on_rest(s: list[float], mp: list[np.ndarray]) -> dict:
        return _judged([shown[j] for j in rest], [s[j] for j in rest], [mp[j] for j in rest],
                       [masks[j] for j in rest], 0.0)

    before, upright_before = on_rest(scores, maps), _quality(model, p.upright, samples, p.masks, None)
    t0 = time.perf_counter()
    new = model.update([photos[j] for j in marked], names=[f"turned {shown[j].path.name}" for j in marked])
    update_s = time.perf_counter() - t0
    new_scores, new_maps, _ = _scored(new, photos, None)
    lineage = new.manifest_.lineage
    return {"category": cat, "orientation": orientation, "aligned": model.alignment_ is not None,
            "flagged": len(flagged), "reviewed": len(reviewed), "marked": len(marked),
            "now_pass": sum(new_scores[j] <= 1.0 for j in marked),
            "added": f"{lineage.images_added} ({lineage.patches_added} patches)",
            "bank": f"{model.knn.bank_size}->{new.knn.bank_size}",
            "threshold": f"{model.calibration_.threshold:.2f}->{new.calibration_.threshold:.2f}",
            "update_s": update_s, "before": before, "after": on_rest(new_scores, new_maps),
            "upright_before": upright_before, "upright_after": _quality(new, p.upright, samples, p.masks, None)}


def repeated(cat: str, orientation: str, fit_n: int, updates: int, batch: int, seeds: list[int],
             defect_every: int) -> list[dict]:
    """Many updates of good images (the module docstring's ``--repeated``): a fit on ``fit_n`` of the training images
    (a seeded shuffle), ``updates`` updates of ``batch`` more each, and fresh fits (``seeds``) of the final image
    set. Each model's threshold, and on the test set upright and turned (the rotated protocol's photos as a camera
    shows them; every ``defect_every``-th defect): good FPR, defect recall and image AUROC."""
    import numpy as np

    sys.path.insert(0, str(REPO / "benchmarks"))
    from quality import _judged, _scored, protocol_photos

    from anomaly_service import AnomalyModel
    from anomaly_service.errors import UpdateRefusedError
    from anomaly_service.evaluate import read_category

    train, samples = read_category(DATA / cat)
    shuffled = [train[i] for i in np.random.default_rng(0).permutation(len(train))]
    if fit_n + updates * batch > len(shuffled):
        raise SystemExit(f"{cat}: {fit_n} + {updates} x {batch} images asked for, {len(shuffled)} in train/good")
    chosen = [i for i, s in enumerate(samples) if s.label == 0 or i % defect_every == 0]
    samples = [samples[i] for i in chosen]
    p = protocol_photos(samples)
    views = turned_views(p)

    def judged(name: str, model: AnomalyModel, path: list[float], forced: int = 0) -> dict:
        up, up_maps, _ = _scored(model, p.upright, None)
        tu, tu_maps, _ = _scored(model, [v[1] for v in views], None)
        return {"model": name, "thresholds": path, "forced": forced, "bank": model.knn.bank_size,
                "calibrated_on": model.calibration_.n_images,
                "upright": _judged(samples, up, up_maps, [None] * len(up), 0.0),
                "turned": _judged([samples[i] for i, _, _ in views], tu, tu_maps, [None] * len(tu), 0.0)}

    model = AnomalyModel(progress=False, orientation=orientation, **PARAMS).fit(shuffled[:fit_n])
    rows = [judged(f"fit on {fit_n}", model, [model.calibration_.threshold])]
    path, forced = [model.calibration_.threshold], 0
    for k in range(updates):
        added = shuffled[fit_n + k * batch : fit_n + (k + 1) * batch]
        try:
            model = model.update(added)
        except UpdateRefusedError:  # an operator who marked them good forces it
            model, forced = model.update(added, force=True), forced + 1
        path.append(model.calibration_.threshold)
        print(f"{cat}: update {k + 1}/{updates}: threshold {path[-1]:.2f}", file=sys.stderr, flush=True)
    rows.append(judged(f"{updates} updates of {batch}", model, path, forced))
    final = shuffled[: fit_n + updates * batch]
    for seed in seeds:
        fresh = AnomalyModel(progress=False, orientation=orientation, seed=seed, **PARAMS).fit(final)
        rows.append(judged(f"fresh fit on {len(final)}, seed {seed}", fresh, [fresh.calibration_.threshold]))
        print(f"{cat}: fresh fit seed {seed}: threshold {rows[-1]['thresholds'][-1]:.2f}", file=sys.stderr,
              flush=True)
    return rows


def timing() -> dict:
    from anomaly_service import AnomalyModel
    from anomaly_service.evaluate import read_category

    train, samples = read_category(DATA / "mvtec_ad/bottle")
    extra = (train[200:] + [s.path for s in samples if s.label == 0])[:20]
    base = AnomalyModel(progress=False, **PARAMS).fit(train[:200])
    t0 = time.perf_counter()
    base.update(extra)
    update_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    AnomalyModel(progress=False, **PARAMS).fit(train[:200] + extra)
    refit_s = time.perf_counter() - t0
    return {"update_s": update_s, "refit_s": refit_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--categories", nargs="+", default=CATEGORIES)
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--moved", action="store_true", help="Instead: good parts moved in the frame, marked good (the "
                    "whole-image branch's false alarms)")
    ap.add_argument("--turned", action="store_true", help="Instead: turned good parts marked good (the rotated "
                    "protocol's photos; the module docstring)")
    ap.add_argument("--orientation", nargs="+", default=["any"], help="With --turned: the fits' orientations")
    ap.add_argument("--repeated", action="store_true", help="Instead: a fit on part of train/good, many updates "
                    "of good images from the rest, and fresh fits of the final set (the module docstring)")
    ap.add_argument("--fit-images", type=int, default=100, help="With --repeated: images the first fit learns")
    ap.add_argument("--updates", type=int, default=6, help="With --repeated: how many updates")
    ap.add_argument("--batch", type=int, default=30, help="With --repeated: good images per update")
    ap.add_argument("--fresh-seeds", type=int, nargs="*", default=[0, 1], help="With --repeated: the fresh fits' "
                    "seeds (none: no fresh fits)")
    ap.add_argument("--defect-every", type=int, default=1, help="With --repeated: score every n-th defect")
    a = ap.parse_args()
    if a.repeated:
        print("| category | orientation | model | threshold (path) | scores calibrated on | forced | bank "
              "| upright: good FPR / defect recall / img AUROC | turned: good FPR / defect recall / img AUROC |")
        print("| --- | --- | --- | --- | ---: | ---: | ---: | --- | --- |")
        for cat in a.categories:
            for orientation in a.orientation:
                for r in repeated(cat, orientation, a.fit_images, a.updates, a.batch, a.fresh_seeds,
                                  a.defect_every):
                    tri = lambda q: " / ".join(_fmt(q[k])  # noqa: E731
                                               for k in ("good_fpr", "defect_recall", "image_auroc"))
                    path = " -> ".join(f"{t:.2f}" for t in r["thresholds"])
                    print(f"| {cat} | {orientation} | {r['model']} | {path} | {r['calibrated_on']} | {r['forced']} "
                          f"| {r['bank']} "
                          f"| {tri(r['upright'])} | {tri(r['turned'])} |", flush=True)
        return
    if a.turned:
        print("| category | orientation | turned good flagged (of reviewed) | marked good | now below threshold "
              "| images added (patches) | bank | threshold | turned, not marked: img / pix / PRO | good FPR "
              "| defect recall | upright: img / pix / PRO | upright recall | update s |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for cat in a.categories:
            for orientation in a.orientation:
                r = turned(cat, orientation)
                b, f, ub, uf = r["before"], r["after"], r["upright_before"], r["upright_after"]
                tri = lambda q: " / ".join(_fmt(q[k]) for k in ("image_auroc", "pixel_auroc", "pro"))  # noqa: E731
                pair = lambda x, y, k: f"{_fmt(x[k])} -> {_fmt(y[k])}"  # noqa: E731
                kind = f"{orientation}{' (aligned)' if r['aligned'] else ''}"
                print(f"| {cat} | {kind} | {r['flagged']} of {r['reviewed']} | {r['marked']} | "
                      f"{r['now_pass']}/{r['marked']} | {r['added']} | {r['bank']} | {r['threshold']} | "
                      f"{tri(b)} -> {tri(f)} | {pair(b, f, 'good_fpr')} | {pair(b, f, 'defect_recall')} | "
                      f"{tri(ub)} -> {tri(uf)} | {pair(ub, uf, 'defect_recall')} | {r['update_s']:.1f} |",
                      flush=True)
        return
    if a.moved:
        print("| category | layout (branch fused) | marked good: passing before -> after | moved, not marked: passing "
              "before -> after | still flagged | image AUROC | PRO | defect recall | good FPR |")
        print("| --- | --- | --- | --- | ---: | --- | --- | --- | --- |")
        for cat in a.categories:
            r = moved(cat)
            b, f = r["before"], r["after"]
            pair = lambda k: f"{_fmt(b[k])} -> {_fmt(f[k])}"  # noqa: E731
            layout = "not read" if r["layout"] is None else f"{r['layout']:.2f}"  # a small fit reads none
            print(f"| {cat} | {layout} ({'yes' if r['fused'] else 'no'}) | {r['added']} of {r['n_add']} | "
                  f"{r['others']} of {r['n_other']} | {r['still_flagged']} | {pair('image_auroc')} | {pair('pro')} | "
                  f"{pair('defect_recall')} | {pair('good_fpr')} |", flush=True)
        return
    rows = []
    for cat in a.categories:
        r = feedback(cat)
        rows.append(r)
        print(f"{cat}: done ({r['update_s']:.1f}s update)", file=sys.stderr, flush=True)
    print("| category | false alarms marked | now below threshold | patches added | bank | threshold "
          "| image AUROC | PRO | defect recall | good FPR | update s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        b, f = r["before"], r["after"]
        pair = lambda k: f"{_fmt(b[k])} -> {_fmt(f[k])}"  # noqa: E731
        print(f"| {r['category']} | {r['marked']} ({r['flagged']} flagged) | {r['now_pass']}/{r['marked']} "
              f"| {r['patches']} | {r['bank']} | {r['threshold']} | {pair('image_auroc')} | {pair('pro')} "
              f"| {pair('defect_recall')} | {pair('good_fpr')} | {r['update_s']:.1f} |")
    if not a.no_timing:
        t = timing()
        print(f"\nbottle, 20 images into a model fitted on 200: update {t['update_s']:.1f} s; "
              f"re-fit on 220: {t['refit_s']:.1f} s ({t['update_s'] / t['refit_s']:.1%} of a re-fit)")


if __name__ == "__main__":
    main()
