"""The suite's fixtures come from the harness plugin (``uwsgi_reload_harness.plugin``):
``uwsgi_stack``, ``make_uwsgi_stack``, ``reload_template`` and ``record_reload``, whose rows are
the table of reloads printed at the end of the run.
"""
