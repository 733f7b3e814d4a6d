"""Load under reload: a locustfile, a runner that drives it headless, and a fastrouter observer.

``uwsgi_reload_loadtests.report``, ``.runner`` and ``.observer`` never import locust: importing
locust monkey-patches the whole process with gevent, so it only runs in a subprocess
(``loadtests/locustfile.py``).
"""
