#!/bin/sh
# Reload every vassal of the emperor without downtime; extra arguments are passed through.
exec ./uwsgi_reload.py \
    --emperor-path /etc/uwsgi.d \
    --fastrouter-stats-socket /tmp/uwsgi_fastrouter_stats.sock \
    --emperor-stats-socket /tmp/uwsgi_stats.sock \
    --timeout 30 \
    "$@"
