"""``index.html`` of ``anomaly evaluate --report``: the page a quality engineer reads before trusting a model.

One static HTML file beside the report's pictures and CSV files, from the metrics ``evaluate_model`` returns: what
was evaluated (data folder, date, model version, threshold and how it was set), the test images per folder with each
defect type's recall, the metrics, the pictures with their alternative text, and the files beside it. No script, no
style sheet or font from elsewhere: it opens offline, from a USB stick or a file share, in any browser.
"""

from __future__ import annotations

import math
from html import escape
from pathlib import Path
from typing import Any, Sequence

from .render import COLOR_SCALE
from .whole_file import write_whole

STYLE = """body{font-family:system-ui,sans-serif;max-width:72rem;margin:1rem auto;padding:0 1rem;color:#111}
table{border-collapse:collapse;margin:.5rem 0 1rem}th,td{border:1px solid #999;padding:.25rem .6rem;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}figure{margin:1rem 0}img{max-width:100%;height:auto}"""

# each picture: its file, its heading and what it shows, said for a reader who cannot see it
PICTURES = {
    "score_histogram.png": ("Scores of good and defective parts",
                            "Histogram of the normalized image scores of the good and the defective test images, "
                            "with the threshold at 1.0 as a dashed line."),
    "roc.png": ("ROC curve",
                "Image-level ROC curve: defect recall against the false-alarm rate on good images, over every "
                "threshold, with the image AUROC."),
    "pro.png": ("PRO curve",
                "Per-region overlap curve: the mean share of each ground-truth defect region above a threshold, "
                "against the false-positive rate over defect-free pixels, up to 0.3; its normalized area is the PRO."),
    "worst_cases.png": ("Worst cases",
                        "Heatmap overlays of the highest-scoring good images (top row) and the lowest-scoring "
                        "defective images (bottom row), each titled with its folder, file name, normalized score "
                        "and decision."),
    "embedding_map.png": ("Where the test parts sit",
                          "Two-dimensional map (PCA, then t-SNE) of mean patch features: training good images, test "
                          "good images and each defect type."),
}

FILES = {
    "per_image.csv": "every test image evaluated: score, decision and the mask its pixel metrics used",
    "skipped_files.csv": "test files left out of every metric, and why",
    "warned_files.csv": "test files evaluated with a warning (which frame was read, a photo unlike the training ones)",
    "training_suspects.csv": "training images the fit flagged as possibly defective",
}


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "not measured"
    if isinstance(value, float) and math.isnan(value):
        return "not measurable"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _share(value: Any) -> str:
    return _number(value) if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.1%}"


def _rows(rows: Sequence[tuple[str, str]]) -> str:
    return "".join(f'<tr><th scope="row">{escape(k)}</th><td>{escape(v)}</td></tr>' for k, v in rows)


def page(metrics: dict[str, Any], pictures: Sequence[str], files: Sequence[str]) -> str:
    """The page's HTML from ``evaluate_model``'s metrics, showing ``pictures`` and linking ``files`` (their names in
    the report folder)."""
    model = metrics.get("model") or {}
    data_dir = str(metrics.get("data_dir") or "")
    title = f"Evaluation report: {Path(data_dir).name or 'test images'}"
    run = [
        ("Data folder", data_dir or "not given"),
        ("Evaluated at (UTC)", str(metrics.get("evaluated_at") or "")),
        ("Model version", model.get("version") or "not saved (fitted by this evaluation)"),
        ("Model fitted at (UTC)", str(model.get("created_at") or "")),
        ("Backbone", str(metrics.get("backbone") or "")),
        ("Training images", _number(model.get("n_training_images"))),
        ("Threshold", f"{_number(metrics.get('threshold'))} raw score, 1.0 on the normalized scale"),
        ("How the threshold was set", f"from good training images only ({model.get('calibration') or 'unknown'}): "
                                      f"{model.get('threshold_method') or 'unknown'}"),
        ("Software", f"anomaly_service {model.get('software') or 'unknown'}"),
    ]
    by_type = metrics.get("by_type") or {}
    per_type = "".join(
        f'<tr><th scope="row">{escape(kind)}</th><td class="n">{t["n"]}</td><td class="n">{t["flagged"]}</td>'
        f'<td class="n">{_share(t["flagged_rate"])}</td><td>{"false alarms" if kind == "good" else "recall"}</td></tr>'
        for kind, t in by_type.items())
    n_good = metrics.get("n_good") or 0
    curve = [(f"Defect recall with at most {float(k):.0%} of good images flagged "
              f"({math.floor(float(k) * n_good)} of {n_good} allowed)", _share(v))
             for k, v in (metrics.get("recall_at_fpr") or {}).items()]
    numbers = [
        ("Image AUROC", _number(metrics.get("image_auroc"))),
        ("Pixel AUROC", _number(metrics.get("pixel_auroc"))),
        ("PRO (area up to 30% false-positive pixels, normalized)", _number(metrics.get("pro"))),
        ("Good images flagged at the threshold (false-alarm rate)", _share(metrics.get("good_fpr"))),
        ("Defective images flagged at the threshold (recall)", _share(metrics.get("defect_recall"))),
        *curve,
        ("Test files skipped (not in any metric)", _number(metrics.get("n_skipped"))),
        ("Defect images without a mask (not in the pixel metrics)",
         str(len(metrics.get("defects_without_mask") or []))),
        ("Defect images whose mask has nothing drawn (every pixel counted defect-free)",
         str(len(metrics.get("defects_with_empty_mask") or []))),
        ("Defect images wholly outside the inspection mask (not in any metric)",
         str(len(metrics.get("defects_outside_mask") or []))),
        ("Scoring time per image (ms)", _number(metrics.get("score_ms_per_image"), 1)),
    ]
    figures = "".join(
        f'<section><h2>{escape(PICTURES[name][0])}</h2><figure><img src="{escape(name)}" '
        f'alt="{escape(PICTURES[name][1])}"><figcaption>{escape(PICTURES[name][1])}'
        + (f" Overlay colours: {escape(COLOR_SCALE)}, one scale for every image." if name == "worst_cases.png" else "")
        + "</figcaption></figure></section>" for name in pictures if name in PICTURES)
    links = "".join(f'<li><a href="{escape(name)}">{escape(name)}</a>: {escape(FILES.get(name, ""))}</li>'
                    for name in files)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>'
            f"<body><main><h1>{escape(title)}</h1>"
            f"<section><h2>What was evaluated</h2><table><caption>Run and model</caption>{_rows(run)}</table></section>"
            "<section><h2>Test images by folder</h2><table><caption>Images per test folder and how many the model "
            'flagged</caption><thead><tr><th scope="col">Folder</th><th scope="col">Images</th>'
            '<th scope="col">Flagged</th><th scope="col">Share flagged</th><th scope="col">Meaning</th></tr></thead>'
            f"<tbody>{per_type}</tbody></table></section>"
            f"<section><h2>Metrics</h2><table><caption>Quality at the threshold and over all thresholds</caption>"
            f"{_rows(numbers)}</table></section>{figures}"
            + (f"<section><h2>Files</h2><ul>{links}</ul></section>" if links else "")
            + "</main></body></html>\n")


def write_page(out: Path, metrics: dict[str, Any]) -> None:
    """``index.html`` in ``out``, showing the report's pictures and linking its CSV files found there (each writer
    removes an earlier run's file it has nothing for, so what is there is this run's); written whole or not at
    all."""
    pictures = [name for name in PICTURES if (out / name).is_file()]
    files = [name for name in FILES if (out / name).is_file()]
    write_whole(out / "index.html", page(metrics, pictures, files).encode("utf-8"))
