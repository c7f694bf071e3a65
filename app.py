"""Hugging Face Space entry point: the `dense-connector web` app, configured by environment variables.

A Gradio Space runs `python app.py`; Gradio reads the address and port from the Space's environment. Set
`DENSE_CONNECTOR_MODEL` (a Hub id or folder; unset = the bundled demo checkpoint) or `OPENAI_BASE_URL` (with
optional `OPENAI_MODEL` / `OPENAI_API_KEY`) to answer through an OpenAI-compatible server. See docs/web.md.
"""

import os

from dense_connector.web.app import create_app, launch, make_backend


backend = make_backend(
    os.environ.get("DENSE_CONNECTOR_MODEL"),
    os.environ.get("DENSE_CONNECTOR_DEVICE", "auto"),
    os.environ.get("OPENAI_BASE_URL"),
    os.environ.get("OPENAI_MODEL"),
    os.environ.get("OPENAI_API_KEY"),
)
demo = create_app(backend)

if __name__ == "__main__":
    launch(demo)
