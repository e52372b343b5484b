"""The vitscope explorer: a Streamlit app that browses SAEs and their latents through the
analyzer's gRPC API. Run it with ``vitscope explore`` (or ``streamlit run app.py``) with
``VITSCOPE_ANALYZER=host:port`` and, if the analyzer wants one, ``VITSCOPE_TOKEN``.

The pages are scripts in ``views/``; this entry point runs before each of them and owns what
they share: the page config, the navigation and the SAE picker in the sidebar."""

import streamlit as st

from vitscope.explorer.data import connection, pick_sae

# Material icons ship with Streamlit's front end; emoji would need a font the host may lack.
st.set_page_config(page_title="vitscope explorer", page_icon=":material/biotech:", layout="wide")

page = st.navigation([
    st.Page("views/saes.py", title="SAEs", icon=":material/monitor_heart:", default=True),  # served at /
    st.Page("views/latents.py", title="Latents", icon=":material/table_rows:", url_path="latents"),
    st.Page("views/latent.py", title="Latent", icon=":material/image_search:", url_path="latent"),
    st.Page("views/probe.py", title="Image probe", icon=":material/center_focus_strong:", url_path="probe"),
    st.Page("views/search.py", title="Concept search", icon=":material/manage_search:", url_path="search"),
    st.Page("views/compare.py", title="Compare", icon=":material/compare:", url_path="compare"),
    st.Page("views/sweep.py", title="Sweep", icon=":material/scatter_plot:", url_path="sweep"),
])

conn = connection()
st.sidebar.caption(f"analyzer `{conn.target}`")
pick_sae(conn)
st.sidebar.text_input("Your name", key="author", max_chars=100, placeholder="for the labels you write",
                      help="Saved with every label and note you write, so others know whose they are.")
page.run()
