"""`tunelab serve`: finished runs behind an OpenAI-compatible HTTP API (engine.py: loading, the worker thread,
batching and decoding; app.py: FastAPI routes, errors, the API key, uvicorn). FastAPI and uvicorn come with the
`serve` extra; `check_installed` says how to get them before app.py is imported."""

from __future__ import annotations

import importlib

from ..errors import TunelabError


def check_installed(command: str = "serve") -> None:
    """A one-paragraph error naming the extra when FastAPI or uvicorn is missing (`tunelab ui` asks too: its extra
    has the command's name)."""
    for name in ("fastapi", "uvicorn"):
        try:
            importlib.import_module(name)
        except ImportError:
            raise TunelabError(f"`tunelab {command}` needs FastAPI and uvicorn, and {name} is not installed in this "
                               f"Python. Install the {command} extra: pip install 'tunelab[{command}]'.") from None
