"""Stages: build each stage's command and read the files its frozen code writes."""
