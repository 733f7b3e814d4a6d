import os
import time

from django.http import HttpRequest, JsonResponse

from some_proj import deploy
from some_proj.deploy import REQUEST_DELAY, STARTED, VERSION


def index(request: HttpRequest) -> JsonResponse:
    """Which worker answered, running which deploy, loaded when, whether it found its cache
    cold (and paid to fill it)."""
    deploy.crash_if_due()
    cold = deploy.fill_cache()
    if REQUEST_DELAY > 0:
        time.sleep(REQUEST_DELAY)
    body = {"pid": os.getpid(), "version": VERSION, "started": STARTED, "cold": cold}
    return JsonResponse(body)


def health(request: HttpRequest) -> JsonResponse:
    """200 while the deploy is healthy, 500 once it is sick (``sick_after``)."""
    deploy.crash_if_due()
    healthy = deploy.healthy()
    body = {"pid": os.getpid(), "version": VERSION, "healthy": healthy}
    return JsonResponse(body, status=200 if healthy else 500)
