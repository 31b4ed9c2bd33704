"""No Docker engine runs here, so the Dockerfile is checked by reading it."""

from __future__ import annotations

from pathlib import Path

DOCKERFILE = (Path(__file__).resolve().parent.parent / "Dockerfile").read_text()
INSTRUCTIONS = [line.split(None, 1) for line in DOCKERFILE.splitlines()
                if line.strip() and not line.startswith(("#", " "))]


def test_build_is_multi_stage_with_the_wheel_copied_into_the_runtime() -> None:
    stages = [args for word, args in INSTRUCTIONS if word == "FROM"]
    assert len(stages) == 2 and stages[0].endswith("AS build")
    assert any(word == "COPY" and args.startswith("--from=build /wheels") for word, args in INSTRUCTIONS)


def test_runtime_runs_as_a_non_root_user() -> None:
    users = [args.strip() for word, args in INSTRUCTIONS if word == "USER"]
    assert users and users[-1] not in ("root", "0")


def test_the_three_ports_are_exposed_and_health_checked() -> None:
    exposed = " ".join(args for word, args in INSTRUCTIONS if word == "EXPOSE").split()
    assert {"8700/tcp", "8600/udp", "8600/tcp", "8701/tcp"} <= set(exposed)
    assert "HEALTHCHECK" in DOCKERFILE and "/v1/status/leader" in DOCKERFILE
    assert '["spina", "agent"]' in DOCKERFILE
