"""Triton kernels (GPU; on CPU only under `TRITON_INTERPRET=1`, for tests). Import only through the
dispatch functions of `llmopt.kernels`, which import these modules lazily: triton is an optional extra."""
