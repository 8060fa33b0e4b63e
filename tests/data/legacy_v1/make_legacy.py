"""Fit tiny models with the release before the stage redesign (commit 1a09562) and record their scores."""
import sys
from pathlib import Path
import numpy as np
sys.path.insert(0, "/tmp/old"); sys.path.insert(0, "/work/main/tests")
from conftest import textured_part, add_defect
import anomaly_service
assert anomaly_service.__file__.startswith("/tmp/old"), anomaly_service.__file__
from anomaly_service import AnomalyModel
import functools, anomaly_service.model as _m, anomaly_service.autoencoder as _ae
_m.AEConfig = functools.partial(_ae.AEConfig, width=16, bottleneck=8)  # a small network keeps the fixture small

out = Path(sys.argv[1])
rng = np.random.default_rng(0)
train = [textured_part(rng, 64, 64) for _ in range(10)]
rng = np.random.default_rng(1)
probes = [textured_part(rng, 64, 64), add_defect(textured_part(rng, 64, 64), 30, 30, 8)[0], textured_part(rng, 48, 80)]
np.savez_compressed(out / "probes.npz", *probes)
variants = {"default": {}, "selection_random": {"selection": "random"},
            "image_score_reweighted": {"image_score": "reweighted"},
            "autoencoder": {"autoencoder": "features", "ae_epochs": 3}}
for name, params in variants.items():
    m = AnomalyModel(backbone="efficientnet_lite0", image_size=64, coreset_ratio=0.25, calibration_fraction=0.2,
                     progress=False, **params).fit(train)
    m.save(out / name)
    res = [m.score(p) for p in probes]
    np.savez_compressed(out / f"{name}_expected.npz", scores=np.array([r.score for r in res]),
                        normalized=np.array([r.normalized_score for r in res]),
                        knn=np.array([r.scorers["knn"]["score"] if r.scorers else r.score for r in res]),
                        **{f"map{i}": r.anomaly_map for i, r in enumerate(res)},
                        **{f"nmap{i}": r.normalized_map() for i, r in enumerate(res)})
    print(name, [round(r.score, 5) for r in res])
