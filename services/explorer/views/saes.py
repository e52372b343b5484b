"""SAEs page: the selected SAE's health, and how it compares with the rest of the store."""

import altair as alt
import pandas as pd
import streamlit as st

from vitscope.explorer.client import sae_id
from vitscope.explorer.data import analyzer_errors, connection, list_saes, selected_sae
from vitscope.metrics import METRICS
from vitscope.proto import names, pb


def never_fired(s: pb.Sae) -> int | None:
    """Latents that never fired over the analysis pass; None until the SAE is analysed."""
    return s.never_fired if s.HasField("never_fired") else None


def metric_values(s: pb.Sae) -> dict[str, float | None]:
    """The SAE's value of each of :data:`vitscope.metrics.METRICS` (None: not recorded), with
    ``never_fired`` over the analysis pass once analysed, else over the trainer's evaluation."""
    values: dict[str, float | None] = {key: s.metrics.get(key) for key in METRICS}
    if never_fired(s) is not None:
        values["never_fired"] = never_fired(s)
    return values


def definition(s: pb.Sae, key: str) -> str:
    """What a metric means, with the window or pass this SAE's value was counted over."""
    text = METRICS[key].definition
    if key == "dead":
        window = s.metrics.get("dead_window")
        return text + (f" (here {int(window):,} tokens)" if window is not None else
                       " (not recorded for SAEs trained before dead and never-fired latents were told apart)")
    if key == "never_fired":
        if never_fired(s) is not None:
            return text + f" (here the analysis pass: every token of the {s.image_count:,} images)"
        tokens = s.metrics.get("eval_tokens")
        return text + (f" (here {int(tokens):,} evaluation tokens)" if tokens is not None else "")
    return text


def fmt(value: float | int | None, spec: str) -> str:
    if value is None:
        return "–"
    return format(int(value) if spec == "d" else value, spec)


def health(s: pb.Sae) -> None:
    values = metric_values(s)
    quality = st.columns(len(METRICS))
    for col, (key, metric) in zip(quality, METRICS.items(), strict=True):
        col.metric(metric.label, fmt(values[key], metric.format), help=definition(s, key))
    shape = st.columns([1, 1, 2])
    shape[0].metric("d_sae", s.d_sae)
    shape[1].metric("Layer", s.layer)
    shape[2].metric("Model", s.model, help=s.model)


def frequency_histogram(s: pb.Sae) -> None:
    st.subheader("Firing frequency")
    if not s.log_frequency_counts:
        st.info("No frequency histogram: this SAE has not been analysed yet.")
        return
    edges = list(s.log_frequency_edges)
    df = pd.DataFrame({"lo": edges[:-1], "hi": edges[1:], "latents": list(s.log_frequency_counts)})
    chart = alt.Chart(df).mark_bar(color="#4c78a8").encode(
        x=alt.X("lo:Q", title="log10 firing frequency", scale=alt.Scale(domain=[edges[0], edges[-1]])),
        x2="hi:Q",
        y=alt.Y("latents:Q", title="latents"),
        y2=alt.datum(0),  # without it, bars with an x range collapse to lines
        tooltip=[alt.Tooltip("lo:Q", title="from", format=".2f"), alt.Tooltip("hi:Q", title="to", format=".2f"),
                 "latents:Q"],
    )
    st.altair_chart(chart, width="stretch")
    st.caption(f"Over the analysis pass; the {s.never_fired} latents that never fired in it (no logarithm) "
               "are not in the histogram.")


def sweep_row(s: pb.Sae, selected: str) -> dict[str, object]:
    """One SAE's identity, metrics and training hyper-parameters, as a table row."""
    row: dict[str, object] = {
        "selected": sae_id(s) == selected,
        "sae": sae_id(s),
        "variant": s.variant,
        "layer": s.layer,
        "d_sae": s.d_sae,
        **metric_values(s),
        "analysed": bool(s.analysis),
    }
    # Hyper-parameters fill the remaining columns; the fixed ones above take precedence.
    row.update({k: v for k, v in sorted(s.config.items()) if k not in row})
    return row


def sweep(saes: list[pb.Sae], selected: str) -> None:
    st.subheader(f"Sweep: {len(saes)} SAEs in this store")
    df = pd.DataFrame([sweep_row(s, selected) for s in saes])
    left, right = st.columns([3, 2])
    with left:
        st.dataframe(df, hide_index=True, width="stretch", key="sweep_table", column_config={
            "selected": st.column_config.CheckboxColumn("●", width="small"),
            **{key: st.column_config.NumberColumn(m.label, format=f"%{m.format}", help=m.definition)
               for key, m in METRICS.items()},
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
st.caption(f"`{sae_id(sae)}` · {sae.variant} · {sae.d_in} → {sae.d_sae} · tokens: {', '.join(sae.tokens) or '–'} "
           f"· activation set `{names.parse_activation_set(sae.activation_set)[:12]}` · {sae.image_count} images, "
           f"{sae.grid_rows}×{sae.grid_cols} patches")
health(sae)
frequency_histogram(sae)
with analyzer_errors(conn):
    all_saes = list_saes(conn)
sweep(all_saes, sae_id(sae))
if sae.config:
    with st.expander("Training configuration"):
        st.json(dict(sae.config))
