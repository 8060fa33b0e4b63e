"""What a model's manifest tells its user after a fit, in ``info`` and after an update: the contamination
guard's suspects, the surface warning of ``orientation any``, the layout and the whole-image branch."""

from __future__ import annotations

from typing import Any

import click


def describe_suspects(m: Any) -> list[str]:
    """The contamination guard's listing (contamination.py): a heading, then one line per training image it flagged,
    with its score, the threshold the other images set and how far above the median it lies. Empty: none."""
    suspects = m.training.suspects
    if not suspects:
        return []
    done = ("left out of the model" if m.training.suspects_action == "drop"
            else "kept in the model; --contamination drop re-fits without them")
    return [f"{len(suspects)} training image(s) look unlike the other good ones and may be defective ({done}):",
            *(f"  {s.name}  score {s.score:.4g} (threshold set by the others "
              f"{'-' if s.threshold is None else f'{s.threshold:.4g}'}, {s.ratio:.2f}x the median)" for s in suspects)]


def describe_duplicates(m: Any) -> list[str]:
    """The exact duplicates the fit left out of the bank and the threshold: a heading, then one line per repeat with
    the image it repeats. Empty: none (or a model from before they were recorded)."""
    repeats = m.training.duplicates
    if not repeats:
        return []
    return [f"{len(repeats)} exact duplicate image(s) left out of the bank and the threshold:",
            *(f"  {r.name}  repeats {r.of}" for r in repeats)]


def describe_part_groups(m: Any, updated: bool = False) -> str | None:
    """How ``part_id`` grouped the training images for the leave-one-out threshold (part_groups.py), or None (a
    model fitted without it). ``updated``: the model has had images added since, each a group of its own."""
    groups = m.training.part_groups
    if not groups:
        return None
    unmatched = groups.get("unmatched", 0)
    rest = (f"{unmatched} image(s) the pattern did not match, each a part of its own" if unmatched
            else "every image matched the pattern")
    return (f"{groups['n_groups']} parts by --part-id '{groups['pattern']}': {groups['grouped_images']} images share "
            f"a part with another (the largest {groups['largest']}), each left out of the threshold with its part's "
            f"others; {rest}"
            + ("; images added by updates are each a part of their own" if updated else ""))


def echo_fit_warnings(m: Any) -> None:
    """After a fit (fit, evaluate), on stderr: the exact duplicates left out, the suspects, and the surface warning
    of an orientation=any fit. The fit's own log records of these are left out (progress.RESTATED_BY_CLI)."""
    repeats = describe_duplicates(m)
    if repeats:
        click.echo("warning: " + "\n".join(repeats), err=True)
    lines = describe_suspects(m)
    if lines:
        click.echo("warning: " + "\n".join(lines), err=True)
    surface = describe_surface(m, rise=True)
    if surface is not None:
        click.echo(f"warning: {surface}", err=True)


def describe_surface(m: Any, rise: bool = False) -> str | None:
    """orientation.surface_warning for a model's manifest (None unless orientation any on a surface). ``rise``:
    with how far the turned pose moved the threshold, which only a fit's own manifest can say (an update
    re-calibrates, while ``upright_threshold`` stays the fit's)."""
    from ..orientation import surface_warning

    turned = m.training.turned_copies or {}
    return surface_warning(turned.get("surface_images", 0), m.training.n_images,
                           m.calibration.threshold if rise else None, turned.get("upright_threshold"),
                           bool((turned.get("alignment") or {}).get("kept")))


def describe_layout(m: Any) -> str | None:
    """What the layout strength (layout.py) says about the whole-image branch, for this model's user."""
    from ..layout import LAYOUT_STRENGTH

    strength, second = m.training.layout_strength, m.training.second_opinion
    if strength is None:
        return None
    if second is not None:
        why_not = {"tile": "not trained: the kNN decides alone (--tile has no one layout)",
                   "orientation any": "not trained: the kNN decides alone (--orientation any has no one layout)",
                   "calibration": "not fused: the kNN decides alone (too few good images it did not learn to set "
                                  "its threshold)"}.get(second.get("why_not"))
        verdict = "fused" if second.get("fused") else why_not or "not trained: the kNN decides alone"
        return f"layout {strength:.2f} (position's share of the good images' pixel variance): whole-image branch " \
               f"{verdict}"
    if m.autoencoder is not None:  # the feature autoencoder asked for by name: the kNN does not decide alone
        return f"layout {strength:.2f} (position's share of the good images' pixel variance): whole-image branch " \
               "not trained (--autoencoder features is the second opinion)"
    # models fitted without a second opinion: suggested only where it combines (not with turned copies or tiles)
    if strength >= LAYOUT_STRENGTH:
        apart = "--tile" if m.config.get("tile") is not None else \
            "--orientation any" if m.config.get("orientation", "fixed") != "fixed" else None
        if apart is not None:
            return f"layout {strength:.2f}: the part lies one way, but {apart} has no one layout: the kNN decides alone"
        return f"layout {strength:.2f}: the part lies one way, so --autoencoder global can also catch missing, " \
               "extra or moved components (docs/decisions.md)"
    return f"layout {strength:.2f}: no fixed layout (a surface, or parts that lie any way round); the kNN alone fits"
