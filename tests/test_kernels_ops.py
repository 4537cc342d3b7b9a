"""kernels.load_ops: the one Triton-or-twin choice, and the twins' shared signatures with their launchers."""

import dataclasses
import inspect

import pytest

from kernels import HAS_TRITON, KernelOps, load_ops

FIELDS = ["norm_linear", "linear_add", "act_linear_add", "norm_mlp_add", "rope_store_kv", "paged_decode_attention",
          "paged_prefill_attention"]


def test_fields_are_the_seven_ops_and_the_optional_decode_step():
    assert [f.name for f in dataclasses.fields(KernelOps)] == FIELDS + ["decode_layers"]
    assert load_ops(use_triton=False).decode_layers is None  # only the CPU's C ops have one (kernels/cpu_decoder.py)


def test_twins_and_launchers_share_signatures():
    twins = load_ops(use_triton=False)
    assert all(getattr(twins, name).__name__ == f"{name}_torch" for name in FIELDS)
    if not HAS_TRITON:
        with pytest.raises(ImportError):
            load_ops(use_triton=True)
        return
    fast = load_ops(use_triton=True)
    for name in FIELDS:
        assert getattr(fast, name).__name__ == f"{name}_triton"
        assert inspect.signature(getattr(fast, name)) == inspect.signature(getattr(twins, name))


def test_ops_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        load_ops(use_triton=False).rope_store_kv = None
