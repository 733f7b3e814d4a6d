import os

from django.http import HttpRequest, JsonResponse

from some_proj.deploy import STARTED, VERSION


def index(request: HttpRequest) -> JsonResponse:
    """Which worker answered, running which deploy, loaded when."""
    return JsonResponse({"pid": os.getpid(), "version": VERSION, "started": STARTED})
