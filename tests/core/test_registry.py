"""The registry: registration, lookup, listing, isolation."""

from dataclasses import dataclass

import pytest
from core_toys import ScaleLinearConfig, apply_scale_linear

from llmopt.core import (
    Stage,
    TechniqueConfig,
    UnknownTechniqueError,
    isolated_registry,
    lookup,
    register,
    register_technique,
    registered,
)


def test_stages_are_ordered():
    assert Stage.SURGERY < Stage.TENSOR_PARALLEL < Stage.CHECKPOINTING < Stage.COMPILE < Stage.DATA_PARALLEL


def test_entries_describe_the_technique(toys):
    entry = lookup("scale_linear")
    assert entry.kind == "transform" and entry.stage is Stage.SURGERY and entry.workload == "train"
    assert entry.description == "Multiply the outputs of Linear layers by a constant (a toy surgery)."
    assert entry.reversible and entry.revert_fn is not None
    assert not lookup("toy_compile").reversible
    assert lookup(ScaleLinearConfig) is entry and lookup(ScaleLinearConfig()) is entry
    names = list(registered())  # registration order (techniques registered globally come first)
    assert names.index("scale_linear") < names.index("toy_compile")


def test_duplicate_registration_raises(toys):
    with pytest.raises(ValueError, match="'scale_linear' is already registered"):
        register(ScaleLinearConfig, name="scale_linear", stage=Stage.SURGERY)(apply_scale_linear)

    @dataclass(frozen=True, kw_only=True)
    class Other(TechniqueConfig):
        pass

    with pytest.raises(ValueError, match="ScaleLinearConfig is already registered as 'scale_linear'"):
        register(ScaleLinearConfig, name="other", stage=Stage.SURGERY)(apply_scale_linear)
    with pytest.raises(TypeError, match="Stage"):
        register(Other, name="other", stage=10)
    with pytest.raises(ValueError, match="lowercase"):
        register(Other, name="Other", stage=Stage.SURGERY)


def test_lookup_lists_registered_names(toys):
    with pytest.raises(KeyError, match="no technique named 'lorra'; registered: .*scale_linear, toy_compile") as info:
        lookup("lorra")
    assert isinstance(info.value, ValueError)
    assert "'no technique" not in str(info.value)  # not wrapped in KeyError's quotes


def test_non_transform_techniques_are_listed_and_built(toys):
    class Sgd:
        """Plain SGD with momentum."""

        def __init__(self, params, lr: float = 0.1, momentum: float = 0.0):
            self.params, self.lr, self.momentum = params, lr, momentum

    entry = register_technique("toy_sgd", kind="optimizer", factory=Sgd)
    assert entry.description == "Plain SGD with momentum."
    assert "toy_sgd" in registered() and "toy_sgd" in registered("optimizer")
    assert "toy_sgd" not in registered("transform")
    built = entry.build([1], lr=0.5)
    assert built.params == [1] and built.lr == 0.5
    with pytest.raises(ValueError, match="kind must be one of"):
        register_technique("x", kind="transform", factory=Sgd)
    with pytest.raises(ValueError, match="needs a config class or a factory"):
        register_technique("x", kind="hook")


def test_isolated_registry_undoes_registrations():
    before = dict(registered())

    @dataclass(frozen=True, kw_only=True)
    class Temp(TechniqueConfig):
        pass

    with isolated_registry():
        register(Temp, name="temp", stage=Stage.SURGERY)(lambda m, c, *, filter_fn=None: None)
        assert "temp" in registered()
    assert dict(registered()) == before
    with pytest.raises(UnknownTechniqueError):
        lookup(Temp)
