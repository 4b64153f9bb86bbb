#!/usr/bin/env bash
# One prepared GPU check (DESIGN.md §8): a borrowed GPU gives its whole signal in one call.
#   bash scripts/gpu_check.sh            # results under $OUT (or ./gpu-check-out when OUT is unset)
# Sections are independent; each writes its own files and a line to summary.txt, and a failing section does not
# stop the next. Append new sections at the end, in the same form.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$OUT"
PY="${PY:-python}"
[ -x .venv/bin/python ] && PY=.venv/bin/python
status=0
section() { echo "== $1 ==" | tee -a "$OUT/summary.txt"; }
record() { echo "$1: exit $2" | tee -a "$OUT/summary.txt"; [ "$2" -eq 0 ] || status=1; }

section "environment"
{ nvidia-smi 2>&1 | head -15; $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'triton', triton.__version__, torch.cuda.get_device_name(0))"; } > "$OUT/environment.txt" 2>&1
record environment $?

# ---- kernels (fused ops, fused linear cross-entropy, flash attention): gpu-marked tests --------------------
section "kernels: gpu tests"
$PY -m pytest -q -m gpu tests/kernels tests/test_fused_ops.py tests/test_flash_attention.py \
    -p no:cacheprovider > "$OUT/kernels_gpu_tests.txt" 2>&1
record "kernels gpu tests" $?

# ---- kernels: short Triton-vs-torch benchmark --------------------------------------------------------------
section "kernels: triton vs torch benchmark"
$PY - > "$OUT/kernels_bench.json" 2> "$OUT/kernels_bench.err" <<'PYEOF'
import json, torch
from triton.testing import do_bench
from llmopt.kernels import fused_linear_cross_entropy, linear_cross_entropy_reference, flash_attention, rms_norm, swiglu
dev, res = "cuda", {}
def peak(fn):
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
    fn(); torch.cuda.synchronize(); return torch.cuda.max_memory_allocated() - base
for V in (32_000, 128_256):
    h = torch.randn(4096, 2048, device=dev, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(V, 2048, device=dev, dtype=torch.bfloat16) * 0.02).requires_grad_()
    t = torch.randint(0, V, (4096,), device=dev)
    def step(fn): h.grad = w.grad = None; fn(h, w, t)[0].backward()
    naive = lambda: step(linear_cross_entropy_reference)
    fused = lambda: step(lambda *a: fused_linear_cross_entropy(*a, backend="triton"))
    res[f"flce V={V}"] = {"naive_ms": do_bench(naive), "triton_ms": do_bench(fused),
                          "naive_peak_MiB": peak(naive) / 2**20, "triton_peak_MiB": peak(fused) / 2**20}
for T in (2048, 8192):
    q = torch.randn(4, 32, T, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(4, 8, T, 128, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    do = torch.randn_like(q)
    def run(backend, **kw):
        return lambda: flash_attention(q, k, v, causal=True, backend=backend, **kw).backward(do)
    res[f"attention T={T}"] = {"sdpa_ms": do_bench(run("sdpa")), "triton_ms": do_bench(run("triton")),
                               "triton_window1024_ms": do_bench(run("triton", window=1024))}
x = torch.randn(16384, 4096, device=dev, dtype=torch.bfloat16, requires_grad=True)
wn = torch.ones(4096, device=dev, dtype=torch.bfloat16, requires_grad=True)
res["rms_norm fwd+bwd"] = {b + "_ms": do_bench(lambda: rms_norm(x, wn, 1e-5, backend=b).sum().backward())
                           for b in ("reference", "compiled", "triton")}
g2, u2 = (torch.randn(16384, 8192, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
res["swiglu fwd+bwd"] = {b + "_ms": do_bench(lambda: swiglu(g2, u2, backend=b).sum().backward())
                         for b in ("reference", "compiled", "triton")}
print(json.dumps(res, indent=2))
PYEOF
record "kernels benchmark" $?

# ---- linear-time models (Mamba scan, RetNet chunkwise retention): Triton vs torch on the GPU -----------------
section "linear-time: triton scan and retention vs torch"
$PY - > "$OUT/linear_time.json" 2> "$OUT/linear_time.err" <<'PYEOF'
import json, torch
from triton.testing import do_bench
from llmopt.kernels.scan import selective_scan_triton
from llmopt.kernels.retention import retention_chunkwise_triton
from llmopt.models.mamba import scan_chunked, scan_sequential
from llmopt.models.retnet import head_decays, retention_chunkwise, retention_recurrent
dev, res, g = "cuda", {}, torch.Generator(device="cuda").manual_seed(0)
for T in (2048, 8192):
    x = torch.randn(4, T, 1536, device=dev, generator=g); dt = torch.rand(4, T, 1536, device=dev, generator=g) * 0.1
    A = -torch.rand(1536, 16, device=dev, generator=g) * 8
    Bm, Cm = torch.randn(4, T, 16, device=dev, generator=g), torch.randn(4, T, 16, device=dev, generator=g)
    y_ref, _ = scan_chunked(x, dt, A, Bm, Cm)
    y, _ = selective_scan_triton(x, dt, A, Bm, Cm)
    res[f"scan T={T}"] = {"max_abs_diff_vs_chunked": (y - y_ref).abs().max().item(),
                          "chunked_ms": do_bench(lambda: scan_chunked(x, dt, A, Bm, Cm)),
                          "triton_ms": do_bench(lambda: selective_scan_triton(x, dt, A, Bm, Cm))}
    q = torch.randn(4, 8, T, 64, device=dev, generator=g) / 8; k = torch.randn(4, 8, T, 64, device=dev, generator=g)
    v = torch.randn(4, 8, T, 128, device=dev, generator=g); lg = head_decays(8).to(dev)
    o_ref, _ = retention_chunkwise(q, k, v, lg, chunk_size=64)
    o, _ = retention_chunkwise_triton(q, k, v, lg, chunk_size=64)
    res[f"retention T={T}"] = {"max_abs_diff_vs_chunkwise": (o - o_ref).abs().max().item(),
                               "torch_chunkwise_ms": do_bench(lambda: retention_chunkwise(q, k, v, lg, chunk_size=64)),
                               "triton_ms": do_bench(lambda: retention_chunkwise_triton(q, k, v, lg, chunk_size=64))}
x = torch.randn(1, 256, 64, device=dev, generator=g); dt = torch.rand(1, 256, 64, device=dev, generator=g) * 0.1
A = -torch.rand(64, 16, device=dev, generator=g) * 8; Bm, Cm = (torch.randn(1, 256, 16, device=dev, generator=g) for _ in range(2))
res["scan vs sequential (T=256)"] = (selective_scan_triton(x, dt, A, Bm, Cm)[0] - scan_sequential(x, dt, A, Bm, Cm)[0]).abs().max().item()
print(json.dumps(res, indent=2))
bad = [k for k, v in res.items() if (v if isinstance(v, float) else max(x for n, x in v.items() if "diff" in n)) > 1e-3]
raise SystemExit(1 if bad else 0)
PYEOF
record "linear-time triton vs torch" $?

exit $status
