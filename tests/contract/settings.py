"""The contract matrix's one settings table: how every registered technique is tested (DESIGN.md §8).

`test_matrix.py` runs each registered technique through the same generic tests. What differs per
technique (the config the matrix applies, its numerics contract and tolerance, what should train,
whether it reverts, what to skip and why) lives here and nowhere else.

HOW TO ADD A TECHNIQUE (one block per technique, blocks in alphabetical order of registry name):

    # ---- lora ------------------------------------------------------------------------------------
    from llmopt.techniques.lora import LoRAConfig  # noqa: E402

    SETTINGS["lora"] = ContractCase(
        config=lambda: LoRAConfig(r=4),                    # small: runs on the `tiny` model
        numerics="exact",                                 # B starts at zero: outputs unchanged at apply
        trainable=adapters_only("lora_"),                 # only parameters named lora_* train
        reversible=True,                                  # must equal the registry's `reversible`
        no_match_config=lambda: LoRAConfig(include=("no_such_module",)),
    )

The block imports its own config, so blocks never conflict with each other. A registered technique
without a block fails `test_every_registered_technique_has_settings`; a block for a name that is not
registered fails `test_every_settings_entry_is_registered`; blocks out of alphabetical order fail
`test_settings_are_in_alphabetical_order`. A generic test that cannot apply is skipped only through
`skip={"<test key>": "<why>"}` (keys in `TEST_KEYS`), never silently. See docs/contract_matrix.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

TEST_KEYS = {
    "apply": "apply_ works and report.changed matches the module tree",
    "forward_backward": "forward and backward are finite",
    "numerics": "outputs and gradients hold the numerics contract against an untransformed copy",
    "meta": "apply_ works on a model built on the meta device, with the same report",
    "state_dict": "state_dict survives save -> fresh model + apply -> load with equal outputs",
    "hooks_state": "the report's hooks checkpoint and resume bit-identically",
    "double_apply": "applying the technique twice raises",
    "no_match": "a config matching nothing raises NoEffectError and leaves the model untouched",
    "revert": "revert_ restores outputs exactly (or raises NotReversibleError when not reversible)",
    "trainable": "only the intended parameters have requires_grad",
    "config_dict": "config_from_dict(config.to_dict()) == config",
    "spec": "parse_technique_spec(format_technique_spec(config)) == config",
    # non-transform kinds
    "optimizer_step": "an optimizer step runs and moves the parameters, finitely",
    "optimizer_state": "optimizer state_dict round trip continues bit-identically",
    "hook_state": "a hook's state_dict round trip continues bit-identically",
}
"""Keys of the generic tests, for `ContractCase.skip`."""


def adapters_only(prefix: str) -> Callable[[str], bool]:
    """`trainable=` predicate: a parameter trains iff a component of its name starts with `prefix`."""
    def predicate(fqn: str) -> bool:
        return any(part.startswith(prefix) for part in fqn.split("."))

    predicate.__name__ = f"adapters_only({prefix!r})"
    return predicate


@dataclass(frozen=True, kw_only=True)
class ContractCase:
    """How the matrix tests one technique."""

    config: Callable[[], Any] | None = None
    """Factory of the config the matrix applies (small enough for the `tiny` model). Required for transforms;
    for other kinds, None means the config class's defaults (or no config)."""
    numerics: Literal["exact", "tolerance", "changes_outputs"] = "exact"
    """"exact": logits, loss and gradients equal an untransformed deepcopy at atol=0. "tolerance": within
    atol/rtol and/or min_sqnr_db. "changes_outputs": the technique changes the function at apply time (weight
    quantization, pruning): outputs must differ, and stay within the stated bound."""
    atol: float | None = None
    """Absolute tolerance (numerics "tolerance" or the bound of "changes_outputs")."""
    rtol: float = 0.0
    """Relative tolerance, with atol."""
    min_sqnr_db: float | None = None
    """Minimum signal-to-quantization-noise ratio of the logits, 10*log10(|ref|^2 / |ref - out|^2), in dB."""
    reason: str = ""
    """One line: why outputs are not exact (required unless numerics == "exact")."""
    trainable: Literal["unchanged", "all", "none"] | Callable[[str], bool] = "unchanged"
    """Which parameters have requires_grad after apply: "unchanged" (as before apply; the tiny model trains all),
    "all", "none", or a predicate on the parameter's fqn (e.g. `adapters_only("lora_")`)."""
    reversible: bool = False
    """Whether revert_ undoes it; must match the registry entry's `reversible`."""
    meta: bool = True
    """Whether apply_ works on a meta-device model. False needs skip["meta"] saying why."""
    double_apply_raises: bool = True
    """Whether a second apply_ raises (core guarantees it for every transform). False needs skip["double_apply"]."""
    no_match_config: Callable[[], Any] | None = None
    """Factory of a config that matches nothing in the tiny model (must raise NoEffectError). None needs
    skip["no_match"] saying why nothing can fail to match."""
    model_overrides: Mapping[str, Any] = field(default_factory=dict)
    """Overrides of the `tiny` preset for this technique (e.g. {"dim": 64} for block-quantized formats)."""
    build: Callable[..., Any] | None = None
    """Non-transform kinds: builds the object (optimizer: `build(params)`; hook: `build()`); None means
    `lookup(name).build(...)` with `config`."""
    skip: Mapping[str, str] = field(default_factory=dict)
    """{test key: reason} for generic tests that do not apply; keys from TEST_KEYS."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.skip) - set(TEST_KEYS))
        if unknown:
            raise ValueError(f"skip keys {unknown} are not generic tests; use one of {sorted(TEST_KEYS)}")
        for key, why in self.skip.items():
            if not isinstance(why, str) or not why.strip():
                raise ValueError(f"skip[{key!r}] needs a reason string: a skipped test must say why")
        if self.numerics not in ("exact", "tolerance", "changes_outputs"):
            raise ValueError(f"numerics must be 'exact', 'tolerance' or 'changes_outputs', got {self.numerics!r}")
        if self.numerics != "exact":
            if not self.reason.strip():
                raise ValueError(f"numerics={self.numerics!r} needs a one-line reason")
            if self.atol is None and self.min_sqnr_db is None:
                raise ValueError(f"numerics={self.numerics!r} needs a bound: atol (with rtol) or min_sqnr_db")
        elif self.atol is not None or self.min_sqnr_db is not None:
            raise ValueError("numerics='exact' compares at atol=0; drop atol/min_sqnr_db or use 'tolerance'")
        if not self.meta and "meta" not in self.skip:
            raise ValueError("meta=False needs skip['meta'] saying why the technique cannot run on meta")
        if not self.double_apply_raises and "double_apply" not in self.skip:
            raise ValueError("double_apply_raises=False needs skip['double_apply'] saying why")


SETTINGS: dict[str, ContractCase] = {}
"""Registry name -> how the matrix tests it. Append one block per technique, alphabetically (see above)."""


# ---- adamw8bit ---------------------------------------------------------------------------------------
SETTINGS["adamw8bit"] = ContractCase(
    # min_8bit_size=64: the tiny model's matrices get 8-bit state (the default 4096 would keep most in fp32)
    build=lambda params: __import__("llmopt.optim", fromlist=["AdamW8bit"]).AdamW8bit(params, min_8bit_size=64),
)


# ---- buffer_reuse ------------------------------------------------------------------------------------
from llmopt.techniques.buffer_reuse import BufferReuseConfig  # noqa: E402

SETTINGS["buffer_reuse"] = ContractCase(
    config=lambda: BufferReuseConfig(bucket_multiple=16, loss_chunk_rows=8),
    numerics="tolerance",
    atol=1e-6,
    rtol=1e-5,
    reason="the chunked loss over the reused logits buffer accumulates the lm_head gradient chunk by chunk",
    reversible=True,
    skip={"no_match": "a loop hook plus the model's loss_fn: there is nothing that could fail to match"},
)


# ---- checkpointing -----------------------------------------------------------------------------------
from llmopt.techniques.checkpointing import ActivationCheckpointingConfig  # noqa: E402

SETTINGS["checkpointing"] = ContractCase(
    config=lambda: ActivationCheckpointingConfig(policy="selective", probe_batch_size=2, probe_seq_len=16),
    reversible=True,
    no_match_config=lambda: ActivationCheckpointingConfig(include=("no_such_block",)),
)


# ---- compile -----------------------------------------------------------------------------------------
from llmopt.techniques.compile import CompileConfig  # noqa: E402

SETTINGS["compile"] = ContractCase(
    # aot_eager captures the same graphs without Inductor's code generation, which costs ~5-100 s per process on
    # these CPUs; Inductor itself is held to atol=1e-5 in tests/test_compile.py
    config=lambda: CompileConfig(backend="aot_eager"),
    numerics="tolerance",
    atol=1e-6,
    rtol=1e-5,
    reason="AOTAutograd traces the backward as its own graph, so gradient reductions may be ordered differently",
    reversible=True,
    no_match_config=lambda: CompileConfig(include=("no_such_block",)),
)


DIST_SKIP = {k: "needs a process group and a device mesh; every mode is tested with real gloo processes in "
              "tests/distributed/test_distributed.py" for k in ("apply", "forward_backward", "numerics", "meta",
                                                               "state_dict", "hooks_state", "double_apply",
                                                               "no_match", "revert", "trainable")}
"""The generic single-process tests that a parallel transform cannot run without a process group."""


# ---- curriculum --------------------------------------------------------------------------------------
from llmopt.techniques.curriculum import CurriculumConfig  # noqa: E402

SETTINGS["curriculum"] = ContractCase(
    config=lambda: CurriculumConfig(kind="difficulty", start_fraction=0.3, pacing_steps=6),
    skip={"no_match": "adds only a loop hook: there is nothing in the model that could fail to match"},
)


# ---- data_parallel (FSDP2 / HSDP) --------------------------------------------------------------------
from llmopt.train.distributed.parallelize import DataParallelConfig, TensorParallelConfig  # noqa: E402

SETTINGS["data_parallel"] = ContractCase(
    config=lambda: DataParallelConfig(mode="fsdp"),
    skip=DIST_SKIP,
)


# ---- dora --------------------------------------------------------------------------------------------
from llmopt.techniques.dora import DoRAConfig  # noqa: E402

SETTINGS["dora"] = ContractCase(
    config=lambda: DoRAConfig(r=4),
    numerics="tolerance",
    atol=1e-6,
    rtol=1e-5,
    reason="g = m / ||W + sBA|| is exactly 1 at apply, but the base GEMM runs on [x; A] (A W^T for the norm from "
           "the same read of W), which may round x W^T differently from a GEMM of x alone",
    trainable=adapters_only("lora_"),  # lora_A, lora_B, lora_magnitude
    reversible=True,
    no_match_config=lambda: DoRAConfig(target=("no_such_module",)),
)


# ---- flash_attention ---------------------------------------------------------------------------------
from llmopt.techniques.flash_attention import FlashAttentionConfig  # noqa: E402

SETTINGS["flash_attention"] = ContractCase(
    # the tiled CPU kernel with tiles smaller than the matrix's 16 tokens, so the online softmax really runs
    config=lambda: FlashAttentionConfig(backend="tiled", block_q=4, block_k=8),
    numerics="tolerance",
    atol=1e-6,
    rtol=1e-5,
    reason="exact attention, but the online softmax sums the tiles in another order than SDPA",
    reversible=True,
    no_match_config=lambda: FlashAttentionConfig(include=("no_such_attention",)),
)


# ---- fused_ops ---------------------------------------------------------------------------------------
from llmopt.techniques.fused_ops import FusedOpsConfig  # noqa: E402

SETTINGS["fused_ops"] = ContractCase(
    # "reference" kernels keep the matrix free of per-process compile time; tests/test_fused_ops.py holds the
    # compiled path to the same bound
    config=lambda: FusedOpsConfig(backend="reference", chunk_size=8),
    numerics="tolerance",
    atol=1e-6,
    rtol=1e-5,
    reason="the chunked cross-entropy accumulates the lm_head gradient chunk by chunk (another summation order)",
    reversible=True,
    no_match_config=lambda: FusedOpsConfig(cross_entropy=False, include=("no_such_module",)),
)


# ---- galore ------------------------------------------------------------------------------------------
def _galore_groups(params):
    params = list(params)
    projected = [p for p in params if p.dim() == 2 and min(p.shape) > 4]
    return [{"params": projected, "rank": 4, "update_proj_gap": 1},  # refresh every step: exercises the projector
            {"params": [p for p in params if all(p is not q for q in projected)]}]


SETTINGS["galore"] = ContractCase(
    build=lambda params: __import__("llmopt.optim", fromlist=["GaLoreAdamW"]).GaLoreAdamW(_galore_groups(params)),
)


# ---- kv_cache (inference) ----------------------------------------------------------------------------
# Inference components have no generic check yet; tests/test_inference_quantized_cache.py covers it.
SETTINGS["kv_cache"] = ContractCase()


# ---- lamb --------------------------------------------------------------------------------------------
SETTINGS["lamb"] = ContractCase()


# ---- lora --------------------------------------------------------------------------------------------
from llmopt.techniques.lora import LoRAConfig  # noqa: E402

SETTINGS["lora"] = ContractCase(
    config=lambda: LoRAConfig(r=4),
    numerics="exact",  # B starts at zero: the added term is an exact zero
    trainable=adapters_only("lora_"),
    reversible=True,
    no_match_config=lambda: LoRAConfig(target=("no_such_module",)),
)


# ---- mixed_precision ---------------------------------------------------------------------------------
from llmopt.techniques.mixed_precision import MixedPrecisionConfig  # noqa: E402

SETTINGS["mixed_precision"] = ContractCase(
    config=lambda: MixedPrecisionConfig(precision="bf16"),
    numerics="tolerance",
    min_sqnr_db=20.0,
    reason="bf16 autocast: matmuls round their inputs to 8 significant bits",
    reversible=True,
    skip={"no_match": "wraps the model's forward and loss: there is nothing that could fail to match"},
)


# ---- novograd ----------------------------------------------------------------------------------------
SETTINGS["novograd"] = ContractCase()


# ---- prompt_lookup (inference) -----------------------------------------------------------------------
# tests/test_inference_speculative.py: greedy equals generate_reference, batched equals one by one.
SETTINGS["prompt_lookup"] = ContractCase()


# ---- qat -------------------------------------------------------------------------------------------
from llmopt.techniques.qat import QATConfig  # noqa: E402

SETTINGS["qat"] = ContractCase(
    config=lambda: QATConfig(weight="int4", group_size=32, activations="int8"),
    numerics="changes_outputs",
    min_sqnr_db=15.0,
    reason="fake-quantized int4 weights (group 32) and int8 per-token activations",
    reversible=True,
    model_overrides={"dim": 64},
    no_match_config=lambda: QATConfig(include=("no_such_module",)),
)


# ---- qlora -------------------------------------------------------------------------------------------
from llmopt.techniques.qlora import QLoRAConfig  # noqa: E402

SETTINGS["qlora"] = ContractCase(
    config=lambda: QLoRAConfig(r=4),
    numerics="changes_outputs",
    atol=0.1,  # tiny model: max |logit diff| 0.021, SQNR 33 dB
    min_sqnr_db=25.0,
    reason="the base weights are stored as NF4 (4-bit, absmax blocks of 64); the per-weight bound is "
           "nf4_error_bound, tested layer by layer in tests/test_qlora.py",
    trainable=adapters_only("lora_"),
    reversible=True,
    no_match_config=lambda: QLoRAConfig(target=("no_such_module",)),
    skip={"revert": "QLoRA drops the original weights (its memory saving): revert_ gives nn.Linear with the "
                    "dequantized NF4 weights, not the originals; tested in tests/test_qlora.py"},
)


# ---- sgd ---------------------------------------------------------------------------------------------
SETTINGS["sgd"] = ContractCase()


# ---- speculative (inference) ------------------------------------------------------------------------
# tests/test_inference_speculative.py: greedy equals generate_reference; sampling keeps the target distribution.
SETTINGS["speculative"] = ContractCase()


# ---- tensor_parallel ---------------------------------------------------------------------------------
SETTINGS["tensor_parallel"] = ContractCase(
    config=lambda: TensorParallelConfig(sequence_parallel=True),
    skip=DIST_SKIP,
)


# ---- weight_only_quant -------------------------------------------------------------------------------
from llmopt.techniques.weight_only_quant import WeightOnlyQuantConfig  # noqa: E402

SETTINGS["weight_only_quant"] = ContractCase(
    config=lambda: WeightOnlyQuantConfig(bits=4, group_size=32),
    numerics="changes_outputs",
    min_sqnr_db=12.0,
    reason="int4 weights (group 32, asymmetric) and bf16 activations in the CPU int4 kernel",
    trainable=lambda fqn: "norm" in fqn,  # quantized weights are buffers; only the RMSNorm scales stay parameters
    model_overrides={"dim": 64},
    no_match_config=lambda: WeightOnlyQuantConfig(include=("no_such_module",)),
)
