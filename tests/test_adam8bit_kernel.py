"""The fused CPU kernel of AdamW8bit (llmopt.kernels.adam8bit) against the torch path it replaces.

Codes and block maxima must be bit-identical to the torch path's for the same state and gradients; the
parameters may differ by the square root's rounding only (torch's CPU sqrt is MKL's, one ulp off in about
a fifth of the elements; the kernel's is IEEE-exact), hence the few-ulp tolerance on parameters.
"""

import io
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from llmopt.kernels.adam8bit import adamw8bit_kernel_available, adamw8bit_step_cpu, fp16_bits_soft
from llmopt.optim import AdamW8bit
from llmopt.optim.quantization import quant_map

pytestmark = pytest.mark.skipif(not adamw8bit_kernel_available(), reason="no C compiler: the kernel cannot build")

ODD_SHAPES = ((64, 96), (300,), (37, 129), (5000,), (257,), (1,), (3, 7, 11))
LR = 1e-2
"""Parameters may differ by the update's rounding (a relative 2**-23 of lr per step), so atol = 1e-6 * lr."""


def _params(shapes=ODD_SHAPES, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=g) * 0.1).to(dtype)) for s in shapes]


def _grads(shapes, steps, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randn(s, generator=g) * 1e-2).to(dtype) for s in shapes] for _ in range(steps)]


def _step(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()
    opt.step()


def _assert_same_state(opt_a, a, opt_b, b):
    for x, y in zip(a, b):
        sa, sb = opt_a.state[x], opt_b.state[y]
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("block_size,chunk_size", [(256, 1 << 18), (64, 1 << 12), (100, 100 * 7)])
def test_kernel_step_equals_torch_path(block_size, chunk_size):
    shapes = ODD_SHAPES
    a, b = _params(shapes), _params(shapes)
    opts = dict(lr=LR, weight_decay=0.1, min_8bit_size=1, block_size=block_size, chunk_size=chunk_size)
    ref, fused = AdamW8bit(a, backend="torch", **opts), AdamW8bit(b, backend="cpu", **opts)
    for grads in _grads(shapes, 6):
        _step(ref, a, grads)
        _step(fused, b, grads)
        _assert_same_state(ref, a, fused, b)  # codes and block maxima bit for bit, every step
        for x, y in zip(a, b):
            torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-6 * LR)
    assert "exp_avg_codes" in fused.state[b[5]]  # even a 1-element tensor went through 8 bits


def test_kernel_with_nonzero_padding_codes_and_large_gradients():
    # gradients spanning many orders of magnitude exercise every exponent group of the map and the fp16
    # subnormal range of the encode
    shapes = ((4099,),)
    a, b = _params(shapes), _params(shapes)
    g = torch.Generator().manual_seed(3)
    ref = AdamW8bit(a, lr=LR, backend="torch", min_8bit_size=1)
    fused = AdamW8bit(b, lr=LR, backend="cpu", min_8bit_size=1)
    for _ in range(4):
        grad = torch.randn(shapes[0], generator=g) * torch.logspace(-12, 2, shapes[0][0])
        _step(ref, a, [grad])
        _step(fused, b, [grad])
        _assert_same_state(ref, a, fused, b)
        torch.testing.assert_close(b[0], a[0], rtol=1e-6, atol=1e-6 * LR)


def test_auto_uses_the_kernel_on_cpu_fp32_and_keeps_small_tensors_in_fp32():
    shapes = ((128, 64), (300,))  # 8192 elements in 8 bits, 300 under min_8bit_size (4096) in fp32
    a, b, c = _params(shapes), _params(shapes), _params(shapes)
    auto, fused = AdamW8bit(a, lr=1e-2), AdamW8bit(b, lr=1e-2, backend="cpu")
    ref = AdamW8bit(c, lr=1e-2, backend="torch")
    for grads in _grads(shapes, 3):
        for opt, ps in ((auto, a), (fused, b), (ref, c)):
            _step(opt, ps, grads)
    for x, y, z in zip(a, b, c):
        assert torch.equal(x, y)  # auto == the kernel, bit for bit
    assert "exp_avg" in auto.state[a[1]] and "exp_avg_codes" in auto.state[a[0]]
    assert torch.equal(a[1], c[1])  # the fp32-state tensor took the same (torch) update on every backend
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(auto.state[a[1]][key], ref.state[c[1]][key])


def test_state_dict_round_trip_between_paths():
    shapes = ((64, 96), (257,))
    a = _params(shapes)
    fused = AdamW8bit(a, lr=1e-2, backend="cpu", min_8bit_size=1)
    grads = _grads(shapes, 6)
    for g in grads[:3]:
        _step(fused, a, g)
    buf = io.BytesIO()
    torch.save(fused.state_dict(), buf)
    copies = {}
    for backend in ("cpu", "torch"):
        ps = [torch.nn.Parameter(p.detach().clone()) for p in a]
        buf.seek(0)
        opt = AdamW8bit(ps, lr=1e-2, backend=backend, min_8bit_size=1)
        opt.load_state_dict(torch.load(buf, weights_only=True))
        _assert_same_state(fused, a, opt, ps)  # loaded bit for bit (uint8 codes stay uint8)
        copies[backend] = (opt, ps)
    for g in grads[3:]:
        _step(fused, a, g)
        for opt, ps in copies.values():
            _step(opt, ps, g)
    cpu_opt, cpu_ps = copies["cpu"]
    _assert_same_state(fused, a, cpu_opt, cpu_ps)
    for x, y in zip(a, cpu_ps):
        assert torch.equal(x, y)  # resumed kernel run == uninterrupted kernel run
    torch_opt, torch_ps = copies["torch"]
    _assert_same_state(fused, a, torch_opt, torch_ps)  # the torch path continues the kernel's state
    for x, y in zip(a, torch_ps):
        torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-6 * LR)


def test_threads_do_not_change_the_result():
    n = 64 * 256 + 77  # enough blocks for the parallel region (>= 64)
    g = torch.Generator().manual_seed(0)
    p0, grad = torch.randn(n, generator=g), torch.randn(n, generator=g) * 1e-2
    signed, unsigned = quant_map(True), quant_map(False)
    out = []
    for threads in (1, 2):
        p = p0.clone()
        nb = -(-n // 256)
        mc, vc = torch.zeros(nb * 256, dtype=torch.uint8), torch.zeros(nb * 256, dtype=torch.uint8)
        ma, va = torch.zeros(nb), torch.zeros(nb)
        for _ in range(3):
            adamw8bit_step_cpu(p, grad, mc, ma, vc, va, m_code=signed.code, v_code=unsigned.code, m_lut=signed.lut,
                               v_lut=unsigned.lut, block_size=256, beta1=0.9, beta2=0.999, decay=0.999,
                               step_size=-1e-3, eps_hat=1e-8, threads=threads)
        out.append((p, mc, ma, vc, va))
    for x, y in zip(*out):
        assert torch.equal(x, y)


def test_software_fp16_rounding_matches_torch():
    # the integer fp32 -> fp16 conversion the kernel uses on CPUs without F16C: every exponent, subnormal
    # halves, ties, overflow to inf
    bits = torch.arange(0, 1 << 32, 4099, dtype=torch.int64)
    x = (bits - (1 << 31)).to(torch.int32).view(torch.float32)
    x = torch.cat([x[~torch.isnan(x)], torch.tensor([65504.0, 65520.0, 65519.996, 2.0 ** -25, 2.0 ** -24 * 1.5,
                                                      -(2.0 ** -25) * 3, 0.0, -0.0, float("inf")])])
    assert torch.equal(fp16_bits_soft(x), x.half().view(torch.int16))


def test_non_fp32_parameters_fall_back_to_the_torch_path():
    shapes = ((64, 96),)
    a, b = _params(shapes, dtype=torch.bfloat16), _params(shapes, dtype=torch.bfloat16)
    auto, ref = AdamW8bit(a, lr=1e-2, min_8bit_size=1), AdamW8bit(b, lr=1e-2, min_8bit_size=1, backend="torch")
    for grads in _grads(shapes, 3, dtype=torch.bfloat16):
        _step(auto, a, grads)
        _step(ref, b, grads)
    _assert_same_state(auto, a, ref, b)
    assert torch.equal(a[0], b[0])
    forced = AdamW8bit(_params(shapes, dtype=torch.bfloat16), min_8bit_size=1, backend="cpu")
    for p in forced.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="backend='auto'"):
        forced.step()


def test_bad_kernel_arguments_raise():
    p = torch.zeros(300)
    with pytest.raises(ValueError, match="m_codes"):
        adamw8bit_step_cpu(p, torch.zeros(300), torch.zeros(300, dtype=torch.uint8), torch.zeros(2),
                           torch.zeros(512, dtype=torch.uint8), torch.zeros(2), m_code=quant_map(True).code,
                           v_code=quant_map(False).code, m_lut=quant_map(True).lut, v_lut=quant_map(False).lut,
                           block_size=256, beta1=0.9, beta2=0.999, decay=1.0, step_size=-1e-3, eps_hat=1e-8)


def test_without_a_compiler_auto_falls_back_and_cpu_says_what_to_do(tmp_path):
    # a real missing compiler: CC is `false`, the kernel cache is empty, so the build fails in the subprocess
    script = textwrap.dedent("""
        import torch
        from llmopt.kernels.adam8bit import adamw8bit_kernel_available
        from llmopt.optim import AdamW8bit
        assert not adamw8bit_kernel_available()
        try:
            AdamW8bit([torch.nn.Parameter(torch.zeros(8))], backend="cpu")
        except ImportError as e:
            assert "backend='torch'" in str(e), e
        else:
            raise AssertionError("backend='cpu' built without a compiler")
        def run(backend):
            g = torch.Generator().manual_seed(0)
            p = torch.nn.Parameter(torch.randn(5000, generator=g))
            opt = AdamW8bit([p], lr=1e-2, min_8bit_size=1, backend=backend)
            for _ in range(3):
                p.grad = torch.randn(5000, generator=g) * 1e-2
                opt.step()
            return p, opt.state[p]["exp_avg_codes"]
        (pa, ca), (pt, ct) = run("auto"), run("torch")
        assert torch.equal(pa, pt) and torch.equal(ca, ct)
        print("fallback ok")
    """)
    env = {**os.environ, "CC": "false", "LLMOPT_CACHE_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "fallback ok" in done.stdout
