"""Triton kernels vs the torch reference, run by the tests in a fresh TRITON_INTERPRET=1 process (see conftest).

Each function returns {what: relative error} as plain floats; small fp32 shapes so each runs in seconds.
"""

import torch

torch.set_num_threads(1)


def _rel(ref, out):
    ref, out = ref.double(), out.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def cross_entropy():
    from test_cross_entropy import _inputs, _loss_and_grads

    from llmopt.kernels import fused_linear_cross_entropy, linear_cross_entropy_reference

    errors = {}
    for vocab in (300, 2000):
        h, w, t = _inputs(13, 16, vocab)
        ref = _loss_and_grads(linear_cross_entropy_reference, h, w, t)
        out = _loss_and_grads(lambda *a: fused_linear_cross_entropy(*a, backend="triton", chunk_size=4), h, w, t)
        for name, i in (("loss", 0), ("grad_hidden", 2), ("grad_weight", 3)):
            errors[f"V={vocab} {name}"] = _rel(ref[i], out[i])
    return errors


def pointwise():
    from test_pointwise import run_all

    return run_all("triton")


def attention():
    from test_attention import CASES, compare

    errors = {}
    for name in ("full", "window", "window_documents"):  # every mask branch of the kernels, short sequences
        for what, err in compare("triton", **CASES[name], T=21).items():
            errors[f"{name} {what}"] = err
    return errors
