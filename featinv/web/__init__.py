"""``featinv serve``: the interactive web app (FastAPI + one plain HTML page)."""
