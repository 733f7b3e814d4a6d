"""Settings of the demo project: no database, no apps, one view."""

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "demo-only-not-secret")
DEBUG = False
# *.test: the keys the harness adds for stacks with several fastrouter keys
ALLOWED_HOSTS = ["domain.tld", ".test", "localhost", "127.0.0.1"]
ROOT_URLCONF = "some_proj.urls"
TIME_ZONE = "UTC"  # Django sets TZ in the process: keep uWSGI log dates in UTC
INSTALLED_APPS: list[str] = []
MIDDLEWARE: list[str] = []
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True
WSGI_APPLICATION = "wsgi.application"
