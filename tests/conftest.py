"""Shared fixtures: the tiny demo pair (built once, cached) and prompts from held-out modules."""
from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_pair():
    from actors.demo.build import build_pair

    return build_pair("tiny")


@pytest.fixture(scope="session")
def tiny_tok(tiny_pair):
    from actors.tokenizer import Tokenizer

    return Tokenizer(tiny_pair / "target")


@pytest.fixture(scope="session")
def held_out_prompts(tiny_tok):
    from actors.demo.corpus import prompts

    texts = prompts("code", 12) + prompts("text", 12)
    return [tiny_tok.encode(t)[-96:] for t in texts]


@pytest.fixture(scope="session")
def ray_local():
    """A real embedded Ray cluster on this machine, shared by the tests that need one."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=int(os.environ.get("OUTRIDER_TEST_CPUS", "4")), include_dashboard=False,
                 namespace="outrider-tests", configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()
