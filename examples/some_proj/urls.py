from django.urls import path

from some_proj.views import index

urlpatterns = [path("", index)]
