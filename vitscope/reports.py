"""Evaluation reports format v1: what ``vitscope evaluate`` found about one SAE, under
``evaluations/<report_id>/``::

    report.json     the report (schema below), written last
    <name>.png      its plots, listed in the report's ``plots``

The evaluator writes reports; the analyzer serves them and the pipeline's artifacts summarise
them, so the format lives here, below every stage. The schema (every section may instead be
``{"skipped": "<why>"}`` when the data it needs is not there) is documented in
docs/evaluation.md; ``format`` and ``version`` say which it is.
"""

from __future__ import annotations

import json
from typing import Any

from vitscope.hashing import content_id
from vitscope.store import NotFound, Store

FORMAT = "vitscope.evaluation"
VERSION = 1
PREFIX = "evaluations"

SECTIONS = ("reconstruction", "decoder", "substitution", "probing", "label_alignment", "stability", "ground_truth")
"""The report's sections, in the order docs/evaluation.md and the explorer present them."""


class ReportFormatError(ValueError):
    """A report of another format or of a version this code does not read."""


def report_id(sae_id: str, activation_set_id: str, settings: dict[str, Any]) -> str:
    """The id of the report on ``sae_id`` over ``activation_set_id`` with these settings (those
    that change its figures): evaluating the same thing twice finds the first report."""
    return content_id({"evaluation": VERSION, "sae": sae_id, "set": activation_set_id, "settings": settings})


def headline(report: dict[str, Any]) -> list[tuple[str, str]]:
    """The report's headline figures as (measure, value) rows, for artifacts and dashboards; a
    skipped section's rows say why."""

    def cell(section: Any, *path: str) -> str:
        node = section
        for key in path:
            if not isinstance(node, dict) or key not in node:
                return (f"skipped: {section['skipped']}" if isinstance(section, dict) and "skipped" in section
                        else "n/a")
            node = node[key]
        return f"{node:.4g}" if isinstance(node, float) else str(node)

    rec, sub, align = report["reconstruction"], report["substitution"], report["label_alignment"]
    return [
        ("split", report["split"]), ("images", str(report["images"])),
        ("NMSE", cell(rec, "nmse")), ("explained variance", cell(rec, "explained_variance")),
        ("L0", cell(rec, "l0")), ("shrinkage", cell(rec, "shrinkage")),
        ("never fired / dense", f"{cell(rec, 'never_fired')} / {cell(rec, 'dense')}"),
        ("decoder duplicates (cos > 0.9)", cell(report["decoder"], "duplicates_above_0.9")),
        ("embedding cosine with SAE", cell(sub, "cosine_sae")),
        ("probe accuracy recovered", cell(sub, "linear_probe", "accuracy", "recovered")),
        ("zero-shot accuracy recovered", cell(sub, "zero_shot", "accuracy", "recovered")),
        ("probe on latents - on activations", cell(report["probing"], "delta")),
        ("sparse probe AP, 1 / 5 latents", f"{cell(report['probing'], 'sparse', 'ap_k1')} / "
                                           f"{cell(report['probing'], 'sparse', 'ap_k5')}"),
        ("patch mAP: SAE / PCA / k-means", " / ".join(cell(align, m, "map") for m in ("sae", "pca", "kmeans"))),
    ]


def report_prefix(rid: str) -> str:
    return f"{PREFIX}/{rid}"


def report_exists(store: Store, rid: str) -> bool:
    return store.exists(f"{report_prefix(rid)}/report.json")


def save_report(store: Store, report: dict[str, Any], plots: dict[str, bytes]) -> None:
    """Publish ``report`` (with ``report_id``) and its PNG plots by name; the JSON goes last, so
    a report that exists is complete."""
    prefix = report_prefix(report["report_id"])
    for name, png in plots.items():
        store.put_bytes(f"{prefix}/{name}.png", png)
    body = {"format": FORMAT, "version": VERSION, **report, "plots": sorted(plots)}
    store.put_bytes(f"{prefix}/report.json", json.dumps(body, indent=1, allow_nan=True).encode())


def load_report(store: Store, rid: str) -> dict[str, Any]:
    """A published report; NotFound if there is none, ReportFormatError if it is not one this
    code reads."""
    try:
        body = json.loads(store.get_bytes(f"{report_prefix(rid)}/report.json"))
    except NotFound:
        raise NotFound(f"no evaluation report {rid!r} in {store.uri}") from None
    if body.get("format") != FORMAT:
        raise ReportFormatError(f"{rid} is not an evaluation report (format {body.get('format')!r})")
    if body.get("version") != VERSION:
        raise ReportFormatError(f"evaluation report {rid} has version {body.get('version')}; this vitscope reads "
                                f"version {VERSION}: rerun `vitscope evaluate` to make a new one")
    return body


def load_plot(store: Store, rid: str, name: str) -> bytes:
    """One of a report's PNG plots."""
    return store.get_bytes(f"{report_prefix(rid)}/{name}.png")


def list_reports(store: Store, sae_id: str | None = None) -> list[dict[str, Any]]:
    """Every readable report in the store (of ``sae_id`` only, if given), newest first."""
    out = []
    for key in store.list(f"{PREFIX}/"):
        if not key.endswith("/report.json"):
            continue
        try:
            body = load_report(store, key.split("/")[-2])
        except (NotFound, ReportFormatError, ValueError):
            continue
        if sae_id is None or body.get("sae_id") == sae_id:
            out.append(body)
    return sorted(out, key=lambda r: r.get("created_at", ""), reverse=True)
