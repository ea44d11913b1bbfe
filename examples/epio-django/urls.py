from django.urls import path

from entries import views

urlpatterns = [
    path("", views.index),
    path("sign/", views.sign),
    path("health/", views.health),
    path("compress/", views.compress),
    path("report/", views.report),
]
