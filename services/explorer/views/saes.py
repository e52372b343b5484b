"""SAEs page: the selected SAE's health (the Sweep page compares it with the other SAEs of its set)."""

import json

import streamlit as st

from vitscope.explorer.client import sae_id
from vitscope.explorer.data import Connection, analyzer_errors, connection, get_evaluation, selected_sae
from vitscope.explorer.summary import fmt, metric_values, never_fired
from vitscope.metrics import METRICS
from vitscope.proto import names, pb
from vitscope.reports import headline


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
    # Imported here, after the metrics are drawn: altair and pandas take a second to import on a
    # 2-core machine, which the first page after `vitscope explore` starts would otherwise wait on.
    import altair as alt
    import pandas as pd

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


def evaluation(conn: Connection, s: pb.Sae) -> None:
    st.subheader("Evaluation")
    with analyzer_errors(conn):
        ev = get_evaluation(conn, sae_id(s))
    if ev is None:
        st.info(f"No evaluation report yet: `vitscope evaluate --sae {sae_id(s)}` makes one (docs/evaluation.md): "
                "reconstruction on held-out images, the SAE spliced into its ViT, probing, label alignment.",
                icon=":material/fact_check:")
        return
    report = json.loads(ev.report_json)
    split = ("on held-out images" if report["split"] == "held-out"
             else "on its training images (no held-out set was given)")
    st.caption(f"Report `{ev.report_id}` ({report['created_at']}), {report['images']} images of activation set "
               f"`{report['activation_set_id'][:12]}`, {split}.")
    table, plots = st.columns([2, 3], gap="large")
    table.table({"measure": [k for k, _ in headline(report)], "value": [v for _, v in headline(report)]})
    note = report["substitution"].get("note")
    if note:
        table.caption(f"Substitution: {note}.")
    with plots:
        for plot in ev.plots:
            st.image(plot.png, caption=plot.name.replace("_", " "))
    with st.expander("The whole report (JSON)"):
        st.json(report, expanded=False)


conn = connection()
sae = selected_sae(conn)
st.title("SAE health")
st.caption(f"`{sae_id(sae)}` · {sae.variant} · {sae.d_in} → {sae.d_sae} · tokens: {', '.join(sae.tokens) or '–'} "
           f"· activation set `{names.parse_activation_set(sae.activation_set)[:12]}` · {sae.image_count} images, "
           f"{sae.grid_rows}×{sae.grid_cols} patches")
health(sae)
frequency_histogram(sae)
evaluation(conn, sae)
st.page_link("views/sweep.py", label="Sweep: how it compares with every SAE of its activation set",
             icon=":material/scatter_plot:",
             query_params={"sae": sae_id(sae), "set": names.parse_activation_set(sae.activation_set)})
st.page_link("views/compare.py", label="Compare it with another SAE, latent by latent", icon=":material/compare:",
             query_params={"sae": sae_id(sae)})
if sae.config:
    with st.expander("Training configuration"):
        st.json(dict(sae.config))
