from django.urls import path

from some_proj.views import health, index

urlpatterns = [path("", index), path("health", health)]
