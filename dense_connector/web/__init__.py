"""The web demo and the layer attention maps: `dense-connector web` and `dense-connector attention-maps`.

`command` holds both commands' arguments and entry points; `app` the Gradio app (needs the `web` extra, imported only
by `dense-connector web`); `backends` where its answers come from (a checkpoint in this process or an OpenAI-compatible
server); `attention` the per-layer attention of the vision tower and the grid picture drawn from it (PIL only, so
`attention-maps` runs without the `web` extra).
"""
