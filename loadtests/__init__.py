"""Load under reload: a locustfile, a runner that drives it headless, and a fastrouter observer.

``loadtests.report`` and ``loadtests.runner`` and ``loadtests.observer`` never import locust:
importing locust monkey-patches the whole process with gevent, so it only runs in a subprocess
(``loadtests/locustfile.py``).
"""
