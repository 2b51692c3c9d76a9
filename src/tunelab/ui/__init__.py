"""`tunelab ui`: a local web app over a workspace of run folders — plan a run (schema, recipes, advise), launch it,
watch it train, compare runs, try them in a playground. app.py: the FastAPI app (auth, errors, static page, the
run routes) and uvicorn; workspace.py: reading run folders and confining paths; jobs.py: the `tunelab` subprocesses
it starts; plan.py and playground.py: the planning and playground routes. FastAPI and uvicorn come with the `ui`
extra; `check_installed` says how to get them before app.py is imported."""

from __future__ import annotations

from .. import serve


def check_installed() -> None:
    """A one-paragraph error naming the ui extra when FastAPI or uvicorn is missing."""
    serve.check_installed("ui")
