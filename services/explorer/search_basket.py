"""The concept search's examples, collected from any page: a researcher adds images (with the
patch that matters) as positive or negative examples while browsing, then searches.

Examples live in the session, and dataset images also in the URL of the Search page (uploads
cannot be: they are only in this browser's session)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import streamlit as st

from vitscope.proto import ResourceNameError, names

KINDS = ("positives", "negatives")


@dataclass(frozen=True)
class Example:
    """A dataset image (``image``: its name) or an upload (``upload``: its bytes, ``image``: a
    short name to show), and optionally one patch of it (row-major in the grid)."""

    image: str
    patch: int | None = None
    upload: bytes | None = None


def examples(kind: str) -> list[Example]:
    """The current positive or negative examples, in the order they were added."""
    return st.session_state.setdefault(f"search_{kind}", [])


def add(kind: str, example: Example) -> None:
    """Add an example (once: adding it again does nothing), and take it out of the other kind."""
    other = KINDS[1 - KINDS.index(kind)]
    st.session_state[f"search_{other}"] = [e for e in examples(other) if e != example]
    if example not in examples(kind):
        examples(kind).append(example)


def remove(kind: str, example: Example) -> None:
    st.session_state[f"search_{kind}"] = [e for e in examples(kind) if e != example]


def add_buttons(where, image: str, patch: int | None, key: str, upload: bytes | None = None) -> None:
    """Plus and minus buttons that add an image (a dataset image's name, or an upload's bytes
    and :func:`upload_name`), or one patch of it, to the search as a positive or negative example."""
    left, right = where.columns(2)
    example = Example(image, patch, upload)
    what = "the whole image" if patch is None else "this patch"
    # Material icons rather than "＋"/"－": the front end ships their font, a host may lack those glyphs.
    left.button("", icon=":material/add:", key=f"{key}_pos", on_click=add, args=("positives", example),
                width="stretch", help=f"Add to the concept search as a positive example ({what})")
    right.button("", icon=":material/remove:", key=f"{key}_neg", on_click=add, args=("negatives", example),
                 width="stretch", help=f"Add to the concept search as a negative example ({what})")


def upload_name(data: bytes) -> str:
    """The name an upload is shown by: ``upload:`` and a short hash of its bytes (the same
    file uploaded twice is one example)."""
    return f"upload:{hashlib.sha256(data).hexdigest()[:10]}"


def to_url(kind: str) -> str:
    """The dataset examples of a kind as a URL parameter: ``name@patch`` (or ``name``), comma-separated."""
    return ",".join(e.image + ("" if e.patch is None else f"@{e.patch}") for e in examples(kind) if e.upload is None)


def from_url(raw: str) -> list[Example]:
    """The examples of a URL parameter made by :func:`to_url` (malformed parts are skipped)."""
    out = []
    for part in filter(None, raw.split(",")):
        name, _, patch = part.partition("@")
        if patch and not patch.isdigit():
            continue
        try:
            names.parse_image(name)
        except ResourceNameError:
            continue
        out.append(Example(name, int(patch) if patch else None))
    return out
