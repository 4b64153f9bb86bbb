"""The caching CPU allocator (`llmopt.kernels.cpu_allocator`): blocks never overlap, freed ranges are reused
and coalesce, results are bitwise those of the system allocator, install / uninstall / revert."""

import random

import pytest
import torch

from llmopt.kernels import cpu_allocator

pytestmark = pytest.mark.skipif(not cpu_allocator.available(), reason="no C++ compiler or torch headers here")

MIN = 64 * 1024


def test_random_blocks_keep_their_contents_and_freed_ranges_are_reused():
    cpu_allocator.install(min_bytes=MIN)
    try:
        before = cpu_allocator.stats()
        rng = random.Random(0)
        live: dict[int, torch.Tensor] = {}
        for step in range(400):
            if live and rng.random() < 0.45:
                del live[rng.choice(list(live))]
            else:
                n = rng.choice([rng.randint(1, 4_000), rng.randint(16_000, 600_000)])  # small and large blocks
                live[step] = torch.full((n,), float(step), dtype=torch.float32)
            if step % 25 == 0:  # every live block still holds what was written into it: no two overlap
                for k, t in live.items():
                    assert bool((t == float(k)).all()), f"block {k} was overwritten"
        for k, t in live.items():
            assert bool((t == float(k)).all())
        after = cpu_allocator.stats()
        assert after.requests > before.requests and after.reused > before.reused
        # the arena's high-water mark stays within a small factor of the largest live total it had to hold
        assert after.peak_touched_bytes <= 2 * after.peak_live_bytes + 4 * 2**20
        live.clear()
        final = cpu_allocator.stats()
        assert final.live_bytes == before.live_bytes
    finally:
        cpu_allocator.uninstall()
        cpu_allocator.empty_cache()


def test_freed_neighbours_coalesce_into_one_extent():
    cpu_allocator.install(min_bytes=MIN)
    try:
        anchor = torch.empty(MIN // 4)  # keeps the arena's top above the three blocks below
        blocks = [torch.empty(100_000) for _ in range(3)]
        top_guard = torch.empty(MIN // 4)
        base_free = cpu_allocator.stats().free_bytes
        sizes = [b.untyped_storage().nbytes() for b in blocks]
        del blocks[1], blocks[0]  # two neighbours, then the third: one extent of all three
        blocks.clear()
        merged = cpu_allocator.stats().free_bytes - base_free
        assert merged >= sum(sizes)
        reused = cpu_allocator.stats().reused
        big = torch.empty(sum(sizes) // 4)  # fits in a free extent only if the three ranges merged
        assert cpu_allocator.stats().reused == reused + 1
        assert cpu_allocator.stats().free_bytes - base_free < merged
        del big, anchor, top_guard
    finally:
        cpu_allocator.uninstall()
        cpu_allocator.empty_cache()


def test_a_train_step_under_the_allocator_is_bitwise_the_system_one():
    from llmopt.models import ModelConfig, build_model

    def step():
        torch.manual_seed(0)
        model = build_model(ModelConfig.from_name("tiny"))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for length in (33, 17, 64):
            x = torch.randint(0, 320, (4, length + 1), generator=torch.Generator().manual_seed(length))
            loss_sum, n = model.loss(x[:, :-1], x[:, 1:])
            (loss_sum / n).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    reference = step()
    cpu_allocator.install(min_bytes=4096)
    try:
        requests = cpu_allocator.stats().requests
        ours = step()
        assert cpu_allocator.stats().requests > requests  # the step's tensors came from the arena
    finally:
        cpu_allocator.uninstall()
    for k in reference:
        assert torch.equal(reference[k], ours[k]), k
    del ours  # blocks allocated while installed are freed after uninstall: back to the arena, no crash
    cpu_allocator.empty_cache()


def test_uninstall_gives_torch_its_allocator_back():
    assert cpu_allocator.install(min_bytes=MIN) and cpu_allocator.installed()
    assert not cpu_allocator.install(min_bytes=MIN)  # already installed
    held = torch.empty(MIN)
    assert cpu_allocator.uninstall() and not cpu_allocator.installed()
    requests = cpu_allocator.stats().requests
    other = torch.empty(4 * MIN)
    assert cpu_allocator.stats().requests == requests
    del held, other
    assert not cpu_allocator.uninstall()
    with pytest.raises(ValueError, match="min_bytes"):
        cpu_allocator.install(min_bytes=-1)


def test_buffer_reuse_installs_it_and_revert_removes_it():
    from llmopt import apply_, revert_
    from llmopt.models import ModelConfig, build_model
    from llmopt.techniques.buffer_reuse import BufferReuseConfig

    model = build_model(ModelConfig.from_name("tiny"))
    report = apply_(model, BufferReuseConfig())
    assert cpu_allocator.installed() and any("caching CPU allocator installed" in n for n in report.notes)
    x = torch.randint(0, 320, (2, 40))
    loss_sum, n = model.loss(x[:, :-1], x[:, 1:])
    (loss_sum / n).backward()
    revert_(model, "buffer_reuse")
    assert not cpu_allocator.installed()
    model = build_model(ModelConfig.from_name("tiny"))
    report = apply_(model, BufferReuseConfig(allocator="system"))
    assert not cpu_allocator.installed() and "allocator" not in report.skipped
    with pytest.raises(ValueError, match="allocator"):
        BufferReuseConfig(allocator="jemalloc")


def test_no_bucketing_leaves_the_batch_alone():
    from types import SimpleNamespace

    from llmopt import apply_
    from llmopt.core import call_hooks
    from llmopt.models import ModelConfig, build_model
    from llmopt.techniques.buffer_reuse import BufferReuseConfig

    model = build_model(ModelConfig.from_name("tiny"))
    report = apply_(model, BufferReuseConfig(bucketing="none", allocator="system"))
    x = torch.randint(0, 320, (2, 21))
    out = call_hooks(report.hooks, "before_forward", SimpleNamespace(step=0, model=model, metrics={}), (x, x))
    assert out[0] is x and out[1] is x


def test_a_forked_child_allocates_and_frees_through_the_arena():
    import os

    cpu_allocator.install(min_bytes=MIN)
    try:
        held = torch.ones(MIN)  # lives in the arena in both processes (copy-on-write)
        pid = os.fork()
        if pid == 0:  # the child: allocate, free, check, and leave without running the parent's cleanup
            ok = False
            try:
                blocks = [torch.full((MIN // 2 + i,), float(i)) for i in range(20)]
                ok = all(bool((b == float(i)).all()) for i, b in enumerate(blocks)) and bool((held == 1).all())
                del blocks
            finally:
                os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        del held
    finally:
        cpu_allocator.uninstall()
        cpu_allocator.empty_cache()
