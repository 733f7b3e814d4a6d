"""WSGI entry point of the demo Django project (uWSGI: ``wsgi-file = ./wsgi.py``).

It sends one warm-up request through the whole Django stack before uWSGI forks its workers, so
the first real request does not pay for loading URLconf, views and middleware. If the warm-up does
not get 200 the import fails: with ``need-app`` the vassal exits instead of serving errors.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any, Callable
from wsgiref.util import setup_testing_defaults

# uWSGI does not put the chdir on sys.path for a wsgi-file: make some_proj importable.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "some_proj.settings")

import some_proj.deploy  # noqa: F401  (a slow start or a broken deploy happens here)
from django.core.wsgi import get_wsgi_application

application = get_wsgi_application()

WARM_UP_HOST = "domain.tld"


def warm_up(app: Callable[..., Iterable[bytes]], path: str = "/") -> None:
    """Send one GET request to ``app``; raise unless it answers 200."""
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": path,
        "HTTP_HOST": WARM_UP_HOST,
    }
    # Fills in every key PEP 3333 requires (wsgi.input, wsgi.errors, SERVER_NAME, ...).
    setup_testing_defaults(environ)
    statuses: list[str] = []

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Callable[[bytes], None]:
        statuses.append(status)
        return lambda data: None

    body = app(environ, start_response)
    try:
        for _ in body:
            pass
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()
    if not statuses or not statuses[-1].startswith("200"):
        raise RuntimeError(f"warm-up request GET {path} answered {statuses or 'nothing'}")


warm_up(application)
