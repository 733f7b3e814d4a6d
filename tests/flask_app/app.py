"""A small Flask app: the second app the harness is proven on, with a vassal config of its own.

``/`` answers with the worker's pid (a reload shows up as a new pid), ``/health`` with 200.
"""

from __future__ import annotations

import os

from flask import Flask

app = Flask(__name__)


@app.get("/")
def index() -> dict[str, object]:
    return {"app": "flask", "pid": os.getpid()}


@app.get("/health")
def health() -> str:
    return "ok"
