"""SAEs page: the selected SAE's health, and how it compares with the rest of the store."""

import altair as alt
import pandas as pd
import streamlit as st

from vitscope.explorer.client import SaeInfo
from vitscope.explorer.data import analyzer_errors, connection, list_saes, selected_sae


def dead_latents(s: SaeInfo) -> int | None:
    """Dead latents over the whole activation set when analysed, else the training window's count."""
    if s.analyzed:
        return s.dead_latents
    dead = s.metrics.get("dead")
    return None if dead is None else int(dead)


def fmt(value: float | int | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def health(s: SaeInfo) -> None:
    m = s.metrics
    dense = m.get("dense")
    quality = st.columns(4)
    quality[0].metric("NMSE", fmt(m.get("nmse"), ".4f"), help="Fraction of variance unexplained (lower is better)")
    quality[1].metric("L0", fmt(m.get("l0"), ".2f"), help="Mean active latents per token")
    quality[2].metric("Dead", fmt(dead_latents(s), "d"), help="Latents that never fired")
    quality[3].metric("Dense", fmt(None if dense is None else int(dense), "d"), help="Latents firing on > 1% of tokens")
    shape = st.columns([1, 1, 2])
    shape[0].metric("d_sae", s.d_sae)
    shape[1].metric("Layer", s.layer)
    shape[2].metric("Model", s.model, help=s.model)


def frequency_histogram(s: SaeInfo) -> None:
    st.subheader("Firing frequency")
    if not s.log_freq_counts:
        st.info("No frequency histogram: this SAE has not been analysed yet.")
        return
    edges = s.log_freq_edges
    df = pd.DataFrame({"lo": edges[:-1], "hi": edges[1:], "latents": s.log_freq_counts})
    chart = alt.Chart(df).mark_bar(color="#4c78a8").encode(
        x=alt.X("lo:Q", title="log10 firing frequency", scale=alt.Scale(domain=[edges[0], edges[-1]])),
        x2="hi:Q",
        y=alt.Y("latents:Q", title="latents"),
        y2=alt.datum(0),  # without it, bars with an x range collapse to lines
        tooltip=[alt.Tooltip("lo:Q", title="from", format=".2f"), alt.Tooltip("hi:Q", title="to", format=".2f"),
                 "latents:Q"],
    )
    st.altair_chart(chart, width="stretch")
    st.caption(f"{s.dead_latents} dead latents (never fired) are not in the histogram.")


def sweep_row(s: SaeInfo, selected: str) -> dict[str, object]:
    """One SAE's identity, metrics and training hyper-parameters, as a table row."""
    row: dict[str, object] = {
        "selected": s.sae_id == selected,
        "sae": s.sae_id,
        "variant": s.variant,
        "layer": s.layer,
        "d_sae": s.d_sae,
        "nmse": s.metrics.get("nmse"),
        "l0": s.metrics.get("l0"),
        "dead": dead_latents(s),
        "dense": s.metrics.get("dense"),
        "analysed": s.analyzed,
    }
    # Hyper-parameters fill the remaining columns; the fixed ones above take precedence.
    row.update({k: v for k, v in sorted(s.config.items()) if k not in row})
    return row


def sweep(saes: list[SaeInfo], selected: str) -> None:
    st.subheader(f"Sweep: {len(saes)} SAEs in this store")
    df = pd.DataFrame([sweep_row(s, selected) for s in saes])
    left, right = st.columns([3, 2])
    with left:
        st.dataframe(df, hide_index=True, width="stretch", key="sweep_table", column_config={
            "selected": st.column_config.CheckboxColumn("●", width="small"),
            "nmse": st.column_config.NumberColumn("NMSE", format="%.4f"),
            "l0": st.column_config.NumberColumn("L0", format="%.2f"),
        })
    with right:
        points = df.dropna(subset=["nmse", "l0"])
        chart = alt.Chart(points).mark_circle(opacity=0.9).encode(
            x=alt.X("l0:Q", title="L0 (active latents per token)", scale=alt.Scale(zero=False)),
            y=alt.Y("nmse:Q", title="NMSE", scale=alt.Scale(zero=False)),
            color=alt.condition("datum.selected", alt.value("#e45756"), alt.value("#4c78a8")),
            size=alt.condition("datum.selected", alt.value(220), alt.value(70)),
            tooltip=["sae:N", "layer:Q", "d_sae:Q", alt.Tooltip("l0:Q", format=".2f"),
                     alt.Tooltip("nmse:Q", format=".4f")],
        ).properties(title="NMSE vs L0 (selected in red)")
        st.altair_chart(chart, width="stretch")


conn = connection()
sae = selected_sae(conn)
st.title("SAE health")
st.caption(f"`{sae.sae_id}` · {sae.variant} · {sae.d_in} → {sae.d_sae} · tokens: {', '.join(sae.tokens) or '–'} "
           f"· activation set `{sae.activation_set_id[:12]}` · {sae.n_images} images, "
           f"{sae.grid_rows}×{sae.grid_cols} patches")
health(sae)
frequency_histogram(sae)
with analyzer_errors(conn):
    all_saes = list_saes(conn)
sweep(all_saes, sae.sae_id)
if sae.config:
    with st.expander("Training configuration"):
        st.json(sae.config)
