"""TechniqueConfig: to_dict / config_from_dict round trip and validation."""

import enum
import json
from dataclasses import FrozenInstanceError, dataclass
from typing import ClassVar, Literal

import pytest
from core_toys import ScaleLinearConfig

from llmopt.core import Stage, TechniqueConfig, UnknownTechniqueError, config_from_dict, isolated_registry, register


class Granularity(enum.Enum):
    ROW = "row"
    TENSOR = "tensor"


@dataclass(frozen=True, kw_only=True)
class RichConfig(TechniqueConfig):
    """A config with every supported field type."""

    version: ClassVar[int] = 2
    bits: int = 8
    ratio: float = 0.5
    enabled: bool = True
    name: str = "x"
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    shape: tuple[int, int] = (2, 3)
    mode: Literal["fast", "exact"] = "fast"
    granularity: Granularity = Granularity.ROW
    limit: int | None = None
    inner: ScaleLinearConfig | None = None

    @classmethod
    def migrate(cls, data, from_version):
        if from_version == 1:  # v1 called `bits` `nbits`
            data = dict(data)
            data["bits"] = data.pop("nbits")
            return data
        return super().migrate(data, from_version)


@pytest.fixture
def rich(toys):
    register(RichConfig, name="rich", stage=Stage.SURGERY)(lambda model, config, *, filter_fn=None: None)


def test_round_trip_through_json_keeps_tuples_enums_and_nested(rich):
    config = RichConfig(bits=4, targets=("a", "b", "c"), shape=(4, 5), mode="exact", granularity=Granularity.TENSOR,
                        limit=3, inner=ScaleLinearConfig(scale=3.0, exclude=("lm_head",)))
    data = config.to_dict()
    assert data["_type"] == "rich" and data["version"] == 2
    assert data["targets"] == ["a", "b", "c"] and data["granularity"] == "tensor"
    assert data["inner"]["_type"] == "scale_linear"
    back = config_from_dict(json.loads(json.dumps(data)))
    assert back == config
    assert isinstance(back.targets, tuple) and isinstance(back.inner.exclude, tuple)
    assert RichConfig.from_dict(data) == config
    assert hash(back) == hash(config)


def test_configs_are_frozen_and_keyword_only(toys):
    config = ScaleLinearConfig(scale=3.0)
    with pytest.raises(FrozenInstanceError):
        config.scale = 1.0
    with pytest.raises(TypeError):
        ScaleLinearConfig(3.0)


def test_validation_error_says_the_fix(toys):
    with pytest.raises(ValueError, match="scale=1.0"):
        ScaleLinearConfig(scale=0)


def test_from_dict_validates_like_the_constructor(toys):
    with pytest.raises(ValueError, match="scale must be nonzero"):
        config_from_dict({"_type": "scale_linear", "version": 1, "scale": 0.0})


def test_unknown_field_and_wrong_type_name_the_field(rich):
    with pytest.raises(ValueError, match=r"unknown field\(s\) nbit.*bits"):
        config_from_dict({"_type": "rich", "nbit": 4})
    with pytest.raises(ValueError, match=r"rich.bits: expected int"):
        config_from_dict({"_type": "rich", "bits": "four"})
    with pytest.raises(ValueError, match=r"rich.mode.*'fast', 'exact'"):
        config_from_dict({"_type": "rich", "mode": "slow"})
    with pytest.raises(ValueError, match="needs exactly 2 items"):
        config_from_dict({"_type": "rich", "shape": [1, 2, 3]})


def test_versions_migrate_or_refuse(rich):
    assert config_from_dict({"_type": "rich", "version": 1, "nbits": 4}).bits == 4
    with pytest.raises(ValueError, match="newer"):
        config_from_dict({"_type": "rich", "version": 3})
    with pytest.raises(ValueError, match="does not convert"):
        config_from_dict({"_type": "scale_linear", "version": 0})


def test_unregistered_type_lists_registered_names(toys):
    with pytest.raises(UnknownTechniqueError, match="registered: .*scale_linear, toy_compile"):
        config_from_dict({"_type": "nope"})
    with pytest.raises(ValueError, match="_type"):
        config_from_dict({"scale": 2.0})


def test_to_dict_of_an_unregistered_config_says_so():
    @dataclass(frozen=True, kw_only=True)
    class Loose(TechniqueConfig):
        pass

    with isolated_registry(), pytest.raises(KeyError, match="Loose is not registered"):
        Loose().to_dict()
