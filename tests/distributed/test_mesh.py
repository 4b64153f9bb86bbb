"""Bad meshes are refused with one line before any process group starts (no torchrun needed)."""

from __future__ import annotations

import pytest

from llmopt.train.distributed.mesh import MeshError, MeshSpec, check_rendezvous, validate


def test_parse_and_axes():
    spec = MeshSpec.parse("pp=2,dp=2,tp=2")
    assert (spec.pp, spec.dp, spec.tp, spec.world_size, spec.dp_size) == (2, 2, 2, 8, 2)
    hsdp = MeshSpec.parse("dp_replicate=2,dp_shard=4")
    assert hsdp.hsdp and hsdp.dp_size == 8 and [n for n, _ in hsdp.axes()] == ["pp", "dp_replicate", "dp_shard", "tp"]
    assert MeshSpec.parse("").world_size == 1


@pytest.mark.parametrize("text,fragment", [("dp=2,xp=2", "unknown mesh axis 'xp'"), ("dp", "name=size"),
                                           ("dp=two", "not an integer"), ("dp=0", "at least 1"),
                                           ("dp=2,dp=2", "given twice"), ("dp=2,dp_shard=2", "either dp=N")])
def test_bad_mesh_text(text, fragment):
    with pytest.raises(MeshError, match=fragment):
        MeshSpec.parse(text)


def test_mesh_checked_against_world_model_and_batch():
    from llmopt.models import ModelConfig
    from llmopt.train.config import DistConfig, TrainConfig

    mc = ModelConfig.from_name("tiny")  # 4 heads, 2 kv heads, 2 layers
    tc = TrainConfig(batch_size=8, seq_len=32)
    with pytest.raises(MeshError, match="needs 4 processes but the world has 2"):
        validate(MeshSpec.parse("dp=2,tp=2"), world_size=2)
    with pytest.raises(MeshError, match="tp=4 does not divide model.n_kv_head=2"):
        validate(MeshSpec.parse("tp=4"), world_size=4, model_config=mc)
    with pytest.raises(MeshError, match="pp=4 .* is more than model.n_layer=2"):
        validate(MeshSpec.parse("pp=4"), world_size=4, model_config=mc, dist_config=DistConfig())
    with pytest.raises(MeshError, match="not divisible by the 3 data-parallel"):
        validate(MeshSpec.parse("dp=3"), world_size=3, model_config=mc, train_config=tc)
    with pytest.raises(MeshError, match="interleaved_1f1b puts 2 stages on each rank: model.n_layer=6"):
        validate(MeshSpec.parse("pp=2"), world_size=2, model_config=ModelConfig.from_name("tiny", n_layer=6),
                 train_config=tc,
                 dist_config=DistConfig(pp_schedule="interleaved_1f1b"))
    with pytest.raises(MeshError, match="DDP over tensor-parallel"):
        validate(MeshSpec.parse("dp=2,tp=2"), world_size=4, dist_config=DistConfig(data_parallel="ddp"))
    with pytest.raises(MeshError, match="two stages per rank"):
        validate(MeshSpec.parse("pp=2,dp=2"), world_size=4, dist_config=DistConfig(pp_schedule="looped_bfs"))
    validate(MeshSpec.parse("pp=2,dp=2,tp=2"), world_size=8, model_config=mc, train_config=tc,
             dist_config=DistConfig())


def test_missing_rendezvous_variable(monkeypatch):
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(v, raising=False)
    with pytest.raises(MeshError, match="without RANK in the environment"):
        check_rendezvous()


@pytest.mark.parametrize("args,fragment", [
    (["--nproc", "2", "--mesh", "dp=2,tp=2"], "needs 4 processes but the world has 2"),
    (["--nproc", "4", "--mesh", "tp=4"], "does not divide"),
    (["--nproc", "4", "--mesh", "pp=4"], "more than model.n_layer"),
    (["--mesh", "dp=2"], "without RANK in the environment"),
])
def test_cli_refuses_bad_mesh_before_starting(tmp_path, capsys, monkeypatch, args, fragment):
    from llmopt.cli import main

    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(v, raising=False)
    out = tmp_path / "run"
    rc = main(["train", "tiny", "--out", str(out), "--set", "train.steps=1", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error:") and fragment in err[0], err
    assert not (out / "launch_config.json").exists()  # nothing started, nothing written
