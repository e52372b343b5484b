"""Sweep page: every SAE trained on one activation set, placed by reconstruction error against
sparsity (NMSE vs L0), with the Pareto front of that trade-off. Each point, and each row of the
table under the chart, opens its SAE."""

import altair as alt
import pandas as pd
import streamlit as st

from vitscope.explorer.client import sae_id
from vitscope.explorer.data import analyzer_errors, connection, list_saes, publish_to_url, seed_from_url
from vitscope.explorer.summary import metric_values, pareto_front
from vitscope.metrics import METRICS
from vitscope.proto import names, pb

SELECTED = "#e45756"


def set_of(s: pb.Sae) -> str:
    """The id of the activation set the SAE was trained on."""
    return names.parse_activation_set(s.activation_set)


def sae_url(sid: str) -> str:
    """The SAE page's address for SAE ``sid``; relative, so it holds under any base path."""
    return f"./?sae={sid}"


def sweep_table(saes: list[pb.Sae], selected: str) -> pd.DataFrame:
    """One row per SAE: identity, metrics, whether it is on the Pareto front (of the SAEs with
    both NMSE and L0 recorded) and its training hyper-parameters."""
    rows = []
    for s in saes:
        row: dict[str, object] = {"selected": sae_id(s) == selected, "sae": sae_id(s), "open": sae_url(sae_id(s)),
                                  "variant": s.variant, "d_sae": s.d_sae, "layer": s.layer, **metric_values(s),
                                  "analysed": bool(s.analysis)}
        # Hyper-parameters fill the remaining columns; the fixed ones above take precedence.
        row.update({k: v for k, v in sorted(s.config.items()) if k not in row})
        rows.append(row)
    df = pd.DataFrame(rows)
    placed = df["nmse"].notna() & df["l0"].notna()
    df.insert(3, "pareto", False)
    df.loc[placed, "pareto"] = pareto_front(df.loc[placed, "l0"], df.loc[placed, "nmse"])
    return df


def pareto_chart(points: pd.DataFrame) -> alt.LayerChart:
    """NMSE against L0: a point per SAE (colour: family, shape: width) that opens its SAE when
    clicked, the Pareto front as a dashed line, the sidebar's SAE ringed."""
    base = alt.Chart(points).encode(
        x=alt.X("l0:Q", title="L0 (active latents per token)", scale=alt.Scale(zero=False)),
        y=alt.Y("nmse:Q", title="NMSE", scale=alt.Scale(zero=False)))
    front = base.transform_filter("datum.pareto").mark_line(color="#888888", strokeDash=[5, 4]).encode(order="l0:Q")
    tooltip = ["sae:N", "variant:N", "d_sae:Q", alt.Tooltip("l0:Q", format=".2f"), alt.Tooltip("nmse:Q", format=".4f"),
               "pareto:N"]
    dots = base.mark_point(filled=True, size=110, opacity=0.9).encode(
        color=alt.Color("variant:N", title="family"), shape=alt.Shape("d_sae:N", title="width (d_sae)"),
        href="open:N", tooltip=tooltip)
    ring = base.transform_filter("datum.selected").mark_point(size=420, color=SELECTED, strokeWidth=2.5).encode(
        href="open:N", tooltip=tooltip)
    return alt.layer(front, dots, ring).properties(height=420)


def pick_set(saes: list[pb.Sae], selected: str) -> str:
    """The activation set to show (URL ``set``), by default the sidebar SAE's, which it follows
    when another SAE is picked there."""
    sets: dict[str, list[pb.Sae]] = {}
    for s in saes:
        sets.setdefault(set_of(s), []).append(s)
    own = next(set_of(s) for s in saes if sae_id(s) == selected)
    raw = st.query_params.get("set")
    if raw is not None and raw not in sets:
        st.warning(f"No SAE in this store was trained on activation set `{raw}`; showing the sidebar SAE's set.",
                   icon=":material/warning:")
    linked = raw in sets and raw != st.session_state.get("_set_url")
    seed_from_url("set", raw, raw if raw in sets else None, fallback=own)
    if not linked and st.session_state.get("_sweep_sae", selected) != selected:
        st.session_state["set"] = own
    st.session_state["_sweep_sae"] = selected

    def describe(set_id: str) -> str:
        layers = ", ".join(f"L{n}" for n in sorted({s.layer for s in sets[set_id]}))
        return f"{set_id[:12]} · {sets[set_id][0].model} · {layers} · {len(sets[set_id])} SAEs"

    chosen = st.selectbox("Activation set", list(sets), key="set", format_func=describe)
    publish_to_url("set", chosen)
    return chosen


conn = connection()
with analyzer_errors(conn):
    store_saes = list_saes(conn)
selected_id = st.session_state["sae"]
st.title("Sweep")
set_id = pick_set(store_saes, selected_id)
sweep = [s for s in store_saes if set_of(s) == set_id]
table = sweep_table(sweep, selected_id)
placed = table[table["nmse"].notna() & table["l0"].notna()]
st.caption(f"The {len(sweep)} SAEs trained on activation set `{set_id}` ({sweep[0].model}, {sweep[0].image_count} "
           "images). The dashed line joins the Pareto front: the SAEs that no other beats on both NMSE and L0 "
           "(lower is better for both). Click a point to open its SAE; the sidebar's SAE is ringed in red.")
if placed.empty:
    st.info("None of these SAEs has both NMSE and L0 recorded, so there is nothing to plot.")
else:
    st.altair_chart(pareto_chart(placed), width="stretch")
if len(placed) < len(table):
    st.caption(f"{len(table) - len(placed)} SAEs without both NMSE and L0 recorded are in the table only.")
if not table["selected"].any():
    st.caption(f"The sidebar's SAE `{selected_id}` was trained on another set.")
st.dataframe(table, hide_index=True, width="stretch", key="sweep_table", column_config={
    "selected": st.column_config.CheckboxColumn("●", width="small", help="the sidebar's SAE"),
    "sae": None,  # the link column shows the id
    "open": st.column_config.LinkColumn("SAE", display_text=r"\?sae=(.+)$", help="open its SAE page"),
    "pareto": st.column_config.CheckboxColumn("front", width="small", help="on the Pareto front"),
    **{key: st.column_config.NumberColumn(m.label, format=f"%{m.format}", help=m.definition)
       for key, m in METRICS.items()},
})
