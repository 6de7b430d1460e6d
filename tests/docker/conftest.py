"""Shared by the tests that need a Docker engine and the harness image (pytest -m docker).

scripts/ci_docker.sh sets both up (dockerd, the local Debian base, `harness image build`).
Without them these tests fail with the fix named; they are never skipped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.runners.config import DockerSettings

IMAGE = os.environ.get("HARNESS_TEST_IMAGE", "bitlinear-harness:cpu")


@pytest.fixture(scope="session")
def docker_client() -> Iterator[object]:
    import docker

    try:
        client = docker.from_env(timeout=60)
        client.ping()
    except Exception as e:
        pytest.fail(f"no Docker engine answers ({e}): run scripts/ci_docker.sh, which starts "
                    "dockerd and builds the image", pytrace=False)
    yield client
    client.close()


@pytest.fixture(scope="session")
def image(docker_client: object) -> str:
    import docker.errors

    try:
        docker_client.images.get(IMAGE)  # type: ignore[attr-defined]
    except docker.errors.ImageNotFound:
        pytest.fail(f"no image {IMAGE}: build it with `harness image build --base "
                    "harness-base:bookworm --tag bitlinear-harness:cpu` (scripts/ci_docker.sh)",
                    pytrace=False)
    return IMAGE


@pytest.fixture()
def settings(image: str) -> DockerSettings:
    return DockerSettings(image=image, memory="8g")


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data root for the session: the smoke corpus and eval sets are built on first use."""
    return tmp_path_factory.mktemp("data")
