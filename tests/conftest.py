"""Test-suite set-up: Triton interpreter on CPU-only hosts, the ``gpu`` marker, fixtures.

``TRITON_INTERPRET`` must be set before any module defining ``@triton.jit`` kernels
is imported, so it is set here, at conftest import time, before test modules load.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Tests run XTuner in this process, as a training rank does: with the shims our entry
# points give a process on a machine without CUDA (no-ops where CUDA is present).
from xtuner_patch import cpu_compat  # noqa: E402

cpu_compat.apply()

from tests.helpers import HAS_CUDA, make_generator, seed_for  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run `make gpu-check` on the GPU host)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session", autouse=True)
def ftdp_cache_dir(tmp_path_factory) -> str:
    """Token indexes written by the tests (and the training runs they start) stay in a
    temporary folder, not in the user's cache."""
    from xtuner_patch.dataset.index import CACHE_ENV

    folder = str(tmp_path_factory.mktemp("ftdp-index"))
    previous = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = folder
    yield folder
    if previous is None:
        del os.environ[CACHE_ENV]
    else:
        os.environ[CACHE_ENV] = previous


@pytest.fixture
def seed(request) -> int:
    """A seed that differs per test (and per parametrisation) but is reproducible."""
    return seed_for(request.node.nodeid)


@pytest.fixture
def gen(seed) -> torch.Generator:
    """A fresh seeded generator on the test device."""
    return make_generator(seed)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """A tiny InternLM2 checkpoint directory (HF layout, modeling code from xtuner)."""
    pytest.importorskip("xtuner._lite.modelings.internlm2", reason="needs xtuner's InternLM2 code")
    from xtuner_patch.fixtures import build_internlm2_checkpoint

    return build_internlm2_checkpoint(str(tmp_path_factory.mktemp("tiny-internlm2")), "tiny")


@pytest.fixture(scope="session")
def sample_ftdp(tmp_path_factory) -> dict:
    """A sample ftdp dataset folder: ``{"root": path, **summary}``."""
    from xtuner_patch.fixtures import write_sample_ftdp_dataset

    root = str(tmp_path_factory.mktemp("ftdp"))
    return {"root": root, **write_sample_ftdp_dataset(root)}


@pytest.fixture
def varlen_args():
    """``put(cumulative_len, max_seqlen)``: what XTuner's ``VarlenAttnArgsToMessageHubHook``
    stores for rank 0 before a training iteration; cleared after the test."""
    from mmengine import MessageHub

    hub = MessageHub.get_instance("varlen_attn_args")

    def put(cu, max_seqlen):
        hub.update_info("cumulative_len_rank_0", cu)
        hub.update_info("max_seqlen_rank_0", max_seqlen)

    yield put
    put(None, None)
