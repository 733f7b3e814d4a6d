import os
import time

from django.http import HttpRequest, JsonResponse

from some_proj.deploy import REQUEST_DELAY, STARTED, VERSION


def index(request: HttpRequest) -> JsonResponse:
    """Which worker answered, running which deploy, loaded when."""
    if REQUEST_DELAY > 0:
        time.sleep(REQUEST_DELAY)
    return JsonResponse({"pid": os.getpid(), "version": VERSION, "started": STARTED})
