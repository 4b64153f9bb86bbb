"""Technique specs: `name:key=value,...` parsed by field type, errors, and the reverse."""

import enum
from dataclasses import dataclass
from typing import Literal

import pytest
from core_toys import ScaleLinearConfig

from llmopt.core import (
    Stage,
    TechniqueConfig,
    TechniqueSpec,
    format_technique_spec,
    parse_technique_spec,
    register,
    register_technique,
    technique_options,
)


class Policy(enum.Enum):
    FULL = "full"
    SELECTIVE = "selective"


@dataclass(frozen=True, kw_only=True)
class SpecConfig(TechniqueConfig):
    """Every field type a spec can set."""

    r: int = 8
    alpha: float = 16.0
    dropout: bool = False
    target: tuple[str, ...] = ("q_proj", "v_proj")
    policy: Policy = Policy.FULL
    mode: Literal["a", "b"] = "a"
    bits: Literal[4, 8] = 8
    every: int | None = None
    tag: str | None = "x"
    pattern: str = ""


@pytest.fixture
def spec_technique(toys):
    register(SpecConfig, name="spec", stage=Stage.SURGERY)(lambda model, config, *, filter_fn=None: None)


def test_parse_by_field_types(spec_technique):
    config = parse_technique_spec("spec:r=4,alpha=1e-3,dropout=true,target=q_proj|k_proj|o_proj,policy=selective,"
                                  "mode=b,bits=4,every=2,tag=none")
    assert config == SpecConfig(r=4, alpha=1e-3, dropout=True, target=("q_proj", "k_proj", "o_proj"),
                                policy=Policy.SELECTIVE, mode="b", bits=4, every=2, tag=None)
    assert parse_technique_spec("spec") == SpecConfig()
    assert parse_technique_spec(" spec: r = 2 , alpha=3 ") == SpecConfig(r=2, alpha=3.0)
    assert parse_technique_spec("spec:target=") == SpecConfig(target=())
    assert parse_technique_spec("spec:every=none,tag=y").every is None
    assert parse_technique_spec("spec:pattern='re:a|b,c'").pattern == "re:a|b,c"
    assert parse_technique_spec("scale_linear:scale=3") == ScaleLinearConfig(scale=3.0)


def test_parse_errors(spec_technique):
    with pytest.raises(ValueError, match=r"no technique named 'lorra'; registered: .*scale_linear"):
        parse_technique_spec("lorra:r=8")
    with pytest.raises(ValueError, match=r"spec has no option 'rank'; its options are: allow_no_effect: bool, "
                                         r"r: int, alpha: float, .*target: tuple\[str, \.\.\.\], policy: "
                                         r"'full' \| 'selective', mode: 'a' \| 'b', bits: 4 \| 8, every: int \| None"):
        parse_technique_spec("spec:rank=8")
    with pytest.raises(ValueError, match="spec: r: expected int, got 'eight'"):
        parse_technique_spec("spec:r=eight")
    with pytest.raises(ValueError, match="dropout: expected bool.*use true or false"):
        parse_technique_spec("spec:dropout=maybe")
    with pytest.raises(ValueError, match=r"mode: expected 'a' \| 'b', got 'c'; choose one of 'a', 'b'"):
        parse_technique_spec("spec:mode=c")
    with pytest.raises(ValueError, match="not key=value"):
        parse_technique_spec("spec:r")
    with pytest.raises(ValueError, match="given twice"):
        parse_technique_spec("spec:r=1,r=2")
    with pytest.raises(ValueError, match="scale_linear:scale=0.*scale must be nonzero"):
        parse_technique_spec("scale_linear:scale=0")


@pytest.mark.parametrize("config", [
    SpecConfig(),
    SpecConfig(r=3, alpha=0.1, dropout=True, target=("a", "re:b|c", ""), policy=Policy.SELECTIVE, mode="b", bits=4,
               every=5, tag=None, pattern="x,y"),
    SpecConfig(target=(), tag="none", pattern="it's"),
    SpecConfig(allow_no_effect=True),
])
def test_format_round_trips(spec_technique, config):
    text = format_technique_spec(config)
    assert parse_technique_spec(text) == config


def test_format_shows_only_changed_fields(spec_technique):
    assert format_technique_spec(SpecConfig()) == "spec"
    assert format_technique_spec(SpecConfig(r=4, target=("q_proj",), policy=Policy.SELECTIVE)) == \
        "spec:r=4,target=q_proj,policy=selective"


def test_factory_options_for_techniques_without_config(toys):
    class Lamb:
        """LAMB optimizer (toy)."""

        def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), clamp=10.0,
                     foreach: bool | None = None):
            self.params, self.lr, self.betas, self.clamp, self.foreach = params, lr, betas, clamp, foreach

    register_technique("toy_lamb", kind="optimizer", factory=Lamb)
    assert list(technique_options("toy_lamb")) == ["lr", "betas", "clamp", "foreach"]
    spec = parse_technique_spec("toy_lamb:lr=0.01,betas=0.8|0.9,clamp=3,foreach=true")
    assert spec == TechniqueSpec(name="toy_lamb", options=(("lr", 0.01), ("betas", (0.8, 0.9)), ("clamp", 3.0),
                                                           ("foreach", True)))
    optimizer = spec.build(["p"], clamp=1.0)
    assert (optimizer.params, optimizer.lr, optimizer.betas, optimizer.clamp) == (["p"], 0.01, (0.8, 0.9), 1.0)
    assert format_technique_spec(spec) == "toy_lamb:lr=0.01,betas=0.8|0.9,clamp=3.0,foreach=true"
    with pytest.raises(ValueError, match="toy_lamb has no option 'eps'; its options are: lr: float"):
        parse_technique_spec("toy_lamb:eps=1")
