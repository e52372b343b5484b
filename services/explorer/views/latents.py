"""Latents page: browse the selected SAE's latents, sorted and filtered by firing frequency and
found by their labels."""

import math

import pandas as pd
import streamlit as st

from vitscope.explorer.client import sae_id
from vitscope.explorer.data import (
    analyzer_errors,
    connection,
    label_text,
    list_latents,
    open_latent,
    publish_to_url,
    require_analysis,
    selected_sae,
    url_state,
)
from vitscope.metrics import LOG10_LOW, FrequencyRange
from vitscope.proto import pb

ORDERS = {  # ListLatents' order_by -> what the picker shows
    "frequency desc": "Most frequent first",
    "frequency": "Rarest first",
    "max_activation desc": "Strongest max activation",
    "mean_activation desc": "Strongest mean activation",
    "index": "Index",
}


PAGE_SIZES = [25, 50, 100, 250]


def _log10_range(raw: str) -> tuple[float, float] | None:
    """A URL's "lo,hi" frequency range, if it is one the slider can show."""
    try:
        lo, hi = (float(x) for x in raw.split(","))
    except ValueError:
        return None
    return (lo, hi) if LOG10_LOW <= lo <= hi <= 0.0 else None


def filters() -> tuple[str, float, float, int, str]:
    """(order_by, min_frequency, max_frequency, page_size, label query) from the controls above
    the table, each seeded from the URL and written back to it."""
    url_state("latents_order", lambda raw: raw if raw in ORDERS else None, "frequency desc")
    url_state("latents_freq", _log10_range, (LOG10_LOW, 0.0))
    url_state("latents_page_size", lambda raw: int(raw) if raw.isdigit() and int(raw) in PAGE_SIZES else None, 50)
    url_state("latents_query", lambda raw: raw, "")
    c0, c1, c2, c3 = st.columns([3, 2, 3, 1])
    query = c0.text_input("Search labels", key="latents_query", placeholder="words in a label or its notes; * for all",
                          help="Only latents someone labelled, whose label or notes contain every word")
    order = c1.selectbox("Sort", list(ORDERS), format_func=ORDERS.get, key="latents_order")
    lo, hi = c2.slider("log10 firing frequency", LOG10_LOW, 0.0, step=0.25, key="latents_freq",
                       help="Only latents firing on between 10^lo and 10^hi of all tokens (an end of the "
                            "slider: no bound on that side)")
    page_size = c3.selectbox("Rows", PAGE_SIZES, key="latents_page_size")
    publish_to_url("latents_order", order)
    publish_to_url("latents_freq", f"{lo:g},{hi:g}")
    publish_to_url("latents_page_size", page_size)
    if query:
        publish_to_url("latents_query", query)
    elif "latents_query" in st.query_params:
        del st.query_params["latents_query"]
    return order, *FrequencyRange.from_log10(lo, hi).bounds(), page_size, query.strip()


def page_table(page: pb.ListLatentsResponse) -> pd.DataFrame:
    return pd.DataFrame({
        "latent": [s.index for s in page.latents],
        "label": [label_text(s.label) for s in page.latents],
        "frequency": [s.frequency for s in page.latents],
        "log10 freq": [math.log10(s.frequency) if s.frequency > 0 else None for s in page.latents],
        "mean act": [s.mean_activation for s in page.latents],
        "max act": [s.max_activation for s in page.latents],
    })


def pager(page: pb.ListLatentsResponse, page_size: int) -> None:
    """Previous/next buttons over page tokens, restarting at page 1 whenever the query changes."""
    tokens: list[str] = st.session_state["latents_tokens"]
    n_pages = max(1, math.ceil(page.total_size / page_size))
    left, mid, right = st.columns([1, 3, 1])
    if left.button("Previous", icon=":material/chevron_left:", disabled=len(tokens) == 1, width="stretch"):
        tokens.pop()
        st.rerun()
    mid.markdown(f"<div style='text-align:center'>page {len(tokens)} of {n_pages} · {page.total_size} latents "
                 "match</div>", unsafe_allow_html=True)
    if right.button("Next", icon=":material/chevron_right:", disabled=not page.next_page_token, width="stretch"):
        tokens.append(page.next_page_token)
        st.rerun()


conn = connection()
sae = selected_sae(conn)
require_analysis(sae)
st.title("Latents")
sid = sae_id(sae)
st.caption(f"SAE `{sid}` · {sae.d_sae} latents · click a row to open it")

order, min_f, max_f, page_size, label_query = filters()
query = (sid, order, min_f, max_f, page_size, label_query)
if st.session_state.get("_latents_listing") != query:
    st.session_state["_latents_listing"] = query
    st.session_state["latents_tokens"] = [""]
with analyzer_errors(conn):
    page = list_latents(conn, sid, page_size, st.session_state["latents_tokens"][-1], order, min_f, max_f,
                        label_query)

if not page.latents:
    st.info("No labelled latent matches this search and these filters." if label_query
            else "No latent passes these filters.")
    st.stop()
event = st.dataframe(
    page_table(page), hide_index=True, width="stretch", height=min(38 + 35 * len(page.latents), 640),
    key="latents_table", on_select="rerun", selection_mode="single-row",
    column_config={
        "latent": st.column_config.NumberColumn("latent", format="%d"),
        "label": st.column_config.TextColumn("label", width="medium"),
        "frequency": st.column_config.ProgressColumn("frequency", format="%.2e", min_value=0.0,
                                                     max_value=max(s.frequency for s in page.latents)),
        "log10 freq": st.column_config.NumberColumn(format="%.2f"),
        "mean act": st.column_config.NumberColumn(format="%.3f"),
        "max act": st.column_config.NumberColumn(format="%.3f"),
    })
pager(page, page_size)
if event.selection.rows:
    open_latent(sid, page.latents[event.selection.rows[0]].index)

with st.form("open_latent", border=False):
    c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
    n = c1.number_input("Open latent #", min_value=0, max_value=sae.d_sae - 1, step=1, key="latents_open")
    if c2.form_submit_button("Open", width="stretch"):
        open_latent(sid, int(n))
