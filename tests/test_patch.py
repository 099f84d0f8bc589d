"""The patch of XTuner: reversible, idempotent, switchable (strictly), logged once and
exactly, scoped to InternLM2; importing the package changes nothing."""

import os
import subprocess
import sys
import textwrap
import types

import pytest

pytest.importorskip("xtuner.model")

import xtuner.model.modules as xtuner_modules  # noqa: E402
import xtuner.model.modules.dispatch as xtuner_dispatch  # noqa: E402
import xtuner.model.sft as xtuner_sft  # noqa: E402

import xtuner_patch  # noqa: E402
from xtuner_patch import KernelSwitches  # noqa: E402
from xtuner_patch.errors import UserError  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def stock():
    """XTuner unpatched for the test; the session's patch state is restored after."""
    before = xtuner_patch.active_switches()
    xtuner_patch.unpatch()
    yield xtuner_dispatch.dispatch_modules
    xtuner_patch.unpatch()
    if before is not None:
        xtuner_patch.patch(**before.__dict__)


def test_patch_rebinds_every_xtuner_name_and_unpatch_restores(stock):
    build = xtuner_sft.SupervisedFinetune.build_llm_from_cfg
    xtuner_patch.patch()
    for module in (xtuner_dispatch, xtuner_modules, xtuner_sft):
        assert module.dispatch_modules is not stock
        assert module.dispatch_modules.__wrapped__ is stock
    assert xtuner_sft.SupervisedFinetune.build_llm_from_cfg.__wrapped__ is build
    xtuner_patch.unpatch()
    for module in (xtuner_dispatch, xtuner_modules, xtuner_sft):
        assert module.dispatch_modules is stock
    assert xtuner_sft.SupervisedFinetune.build_llm_from_cfg is build
    assert xtuner_patch.active_switches() is None
    xtuner_patch.unpatch()  # a second unpatch is a no-op
    assert xtuner_sft.dispatch_modules is stock


def test_patch_twice_is_a_no_op(stock):
    first = xtuner_patch.patch()
    patched = xtuner_sft.dispatch_modules
    assert xtuner_patch.patch() == first
    assert xtuner_sft.dispatch_modules is patched
    # Different switches re-patch from the stock function, never wrap a wrapper.
    xtuner_patch.patch(rms_norm=False)
    assert xtuner_sft.dispatch_modules.__wrapped__ is stock
    assert xtuner_sft.dispatch_modules.xtuner_patch_switches.rms_norm is False


def test_switches_from_arguments_and_environment(monkeypatch):
    monkeypatch.setenv("XTUNER_PATCH_RMS_NORM", "0")
    monkeypatch.setenv("XTUNER_PATCH_ROPE", "Off")
    monkeypatch.setenv("XTUNER_PATCH_CROSS_ENTROPY", "FALSE")
    monkeypatch.setenv("XTUNER_PATCH_SWIGLU", " yes ")
    switches = KernelSwitches.resolve()
    assert (switches.attention, switches.rope, switches.rms_norm) == (True, False, False)
    assert (switches.swiglu, switches.cross_entropy) == (True, False)
    assert KernelSwitches.resolve(rms_norm=True).rms_norm is True  # argument wins
    with pytest.raises(TypeError, match="unknown kernel switches"):
        KernelSwitches.resolve(flash=True)


@pytest.mark.parametrize("variable", ["XTUNER_PATCH_ATTENTION", "XTUNER_PATCH_ROPE"])
@pytest.mark.parametrize("value", ["disabled", "2", "nope", "o"])
def test_switch_values_are_parsed_strictly(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    with pytest.raises(UserError, match=f"{variable}='{value}' is not a switch value: use one "
                                        "of 1/true/on/yes/0/false/off/no"):
        KernelSwitches.resolve()


def test_xtuner_patch_variable_is_parsed_strictly(tmp_path):
    """The launcher refuses a value it does not understand, in one line, before any rank."""
    proc = subprocess.run([sys.executable, "-m", "xtuner_patch.cli", "train", "config.py"],
                          capture_output=True, text=True, cwd=str(tmp_path), timeout=300,
                          env=dict(os.environ, PYTHONPATH=REPO, XTUNER_PATCH="disabled"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip() == ("error: XTUNER_PATCH='disabled' is not a switch value: "
                                   "use one of 1/true/on/yes/0/false/off/no (any case)")


def test_one_log_line_per_process():
    code = textwrap.dedent("""
        import xtuner_patch, xtuner.model
        xtuner_patch.patch(); xtuner_patch.patch(); xtuner_patch.unpatch(); xtuner_patch.patch()
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines()
             if "dispatch_modules patched" in ln]
    assert len(lines) == 1, lines
    for name in ("varlen_attn_func", "rms_norm", "swiglu", "fused_linear_cross_entropy"):
        assert f"kernels.{name}" in lines[0], lines[0]


def test_importing_the_package_changes_nothing():
    """No patch, no CPU shims, no import hook, not even torch: the entry points switch
    the patch on (xtuner-patch train, XTUNER_PATCH=1 xtuner train, patch())."""
    code = textwrap.dedent("""
        import sys, importlib
        hooks = list(sys.meta_path)
        import xtuner_patch
        assert sys.meta_path == hooks, sys.meta_path
        assert not {'torch', 'kernels', 'xtuner'} & set(sys.modules), sorted(sys.modules)
        import torch
        set_device = torch.cuda.set_device
        import xtuner.model.sft as sft
        print(sft.dispatch_modules.__module__, xtuner_patch.active_switches(),
              torch.cuda.set_device is set_device, hasattr(torch.cpu, 'is_bf16_supported'))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, env={k: v for k, v in dict(os.environ, PYTHONPATH=REPO)
                                         .items() if k != "XTUNER_PATCH"}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-4:] == ["xtuner.model.modules.dispatch", "None", "True",
                                        "False"]


def test_patch_before_xtuner_is_imported_applies_its_switches_once():
    code = textwrap.dedent("""
        import xtuner_patch
        print(xtuner_patch.patch(rope=False))
        import xtuner.model.sft as sft
        print(xtuner_patch.active_switches(), sft.dispatch_modules.__module__)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), timeout=120)
    assert proc.returncode == 0, proc.stderr
    returned, active = proc.stdout.strip().splitlines()[-2:]
    assert "rope=False" in returned and active.startswith(returned)
    assert active.endswith("xtuner_patch.dispatch")
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines()
             if "dispatch_modules patched" in ln]
    assert len(lines) == 1, lines


def test_non_internlm2_model_is_left_to_xtuner(stock):
    import torch

    calls = []

    def fake_stock(model, use_varlen_attn=False):
        calls.append(use_varlen_attn)

    from xtuner_patch.dispatch import make_dispatch_modules

    dispatch = make_dispatch_modules(fake_stock, KernelSwitches())
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    forward = model[0].forward
    dispatch(model)
    assert calls == [False]
    assert model[0].forward == forward
    if not xtuner_dispatch.SUPPORT_FLASH2:
        with pytest.raises(RuntimeError, match="InternLM2 models only"):
            dispatch(model, use_varlen_attn=True)


def test_check_cfg_lifts_only_the_flash_attn_requirement(stock):
    from mmengine.config import Config

    train = pytest.importorskip("xtuner.tools.train")
    xtuner_patch.patch()
    assert train.check_cfg.xtuner_patch_original is not None
    args = types.SimpleNamespace(deepspeed=None)

    def cfg(**kw):
        base = dict(use_varlen_attn=True, model=dict(llm=dict(attn_implementation="eager")),
                    train_dataloader=dict(batch_size=1, dataset=dict()))
        base.update(kw)
        return Config(base)

    config = cfg()
    train.check_cfg(config, args)  # accepted without flash-attn, any attention class
    assert config.model.llm.attn_implementation == "eager"  # config left as it was
    with pytest.raises(NotImplementedError, match="batch size"):
        train.check_cfg(cfg(train_dataloader=dict(batch_size=2, dataset=dict())), args)
    # Sequence parallel runs on our kernels too: only XTuner's DeepSpeed requirement stays.
    with pytest.raises(AssertionError, match="DeepSpeed"):
        train.check_cfg(cfg(sequence_parallel_size=2), args)
    train.check_cfg(cfg(sequence_parallel_size=2, use_varlen_attn=False),
                    types.SimpleNamespace(deepspeed="deepspeed_zero2"))
    xtuner_patch.unpatch()
    if not xtuner_dispatch.SUPPORT_FLASH2:
        with pytest.raises(AssertionError, match="flash_attn"):
            train.check_cfg(cfg(), args)
        with pytest.raises(AssertionError, match="flash_attn"):
            train.check_cfg(cfg(sequence_parallel_size=2, use_varlen_attn=False),
                            types.SimpleNamespace(deepspeed="deepspeed_zero2"))


SWITCH_SETS = [{}, dict(attention=False), dict(rope=False), dict(rms_norm=False),
               dict(fused_residual=False, swiglu=False), dict(cross_entropy=False),
               dict(attention=False, rms_norm=False, cross_entropy=False)]


@pytest.mark.parametrize("switches", SWITCH_SETS,
                         ids=["all"] + ["-".join(f"no_{k}" for k in s) for s in SWITCH_SETS[1:]])
def test_log_line_names_exactly_the_kernels_that_run(tiny_checkpoint, gen, varlen_args,
                                                     monkeypatch, switches):
    """The kernels the log line names are the ones a training step calls, no more, no
    fewer (RoPE runs inside our attention forward: with attention off it is not named)."""
    import re

    from kernels import backend
    from tests.models import dispatch, load_model, packed_batch
    from xtuner_patch.dispatch import describe

    called = set()

    def recording(name, function, label=None):
        def record(*args, **kwargs):
            called.add(label(args, kwargs) if label else name)
            return function(*args, **kwargs)
        monkeypatch.setattr(backend, name, record)

    recording("varlen_attn_func", backend.varlen_attn_func)
    recording("_triton_split_qkv_rotary", backend._triton_split_qkv_rotary,
              lambda args, kwargs: "split_qkv_rotary")
    recording("_triton_rms_norm", backend._triton_rms_norm, lambda args, kwargs: (
        "rms_norm(residual=)" if kwargs.get("residual") is not None else "rms_norm"))
    recording("_triton_swiglu", backend._triton_swiglu, lambda args, kwargs: "swiglu")
    recording("fused_linear_cross_entropy", backend.fused_linear_cross_entropy)

    model = dispatch(load_model(tiny_checkpoint), **switches)
    input_ids, labels, position_ids, cu = packed_batch(gen, [20, 9, 35], model.config.vocab_size)
    varlen_args(cu, 35)
    model.train()
    model(input_ids, position_ids=position_ids, labels=labels).loss.backward()
    named = set(re.findall(r"kernels\.(\w+(?:\(residual=\))?)",
                           describe(KernelSwitches(**switches))))
    assert named == called
