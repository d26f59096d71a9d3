"""One declared engine interface (actors/engine_api.py): the Ray and the plain-process engines
answer every call of it with the same parameters, so the coordinator, the supervisor and the
benchmarks drive either one the same way."""
import inspect

import pytest

from actors.engine_api import Engine
from actors.launch import LocalEngine
from cluster.launch.engine import RayEngine

CALLS = [name for name, member in vars(Engine).items() if inspect.isfunction(member) and not name.startswith("_")]


def test_the_interface_names_the_calls_the_serving_side_makes():
    assert set(CALLS) >= {"start", "stop", "submit", "abort", "poll", "metrics", "verifier_alive", "check_drafter",
                          "restart_drafter"}


@pytest.mark.parametrize("cls", [RayEngine, LocalEngine])
@pytest.mark.parametrize("call", CALLS)
def test_each_engine_answers_each_call_with_the_same_parameters(cls, call):
    ours = inspect.signature(getattr(cls, call))
    declared = inspect.signature(getattr(Engine, call))
    strip = lambda sig: [(p.name, p.kind, p.default) for p in sig.parameters.values()]   # noqa: E731
    assert strip(ours) == strip(declared), f"{cls.__name__}.{call}{ours} against Engine.{call}{declared}"
