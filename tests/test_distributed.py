"""Multi-image search and IMP over two gloo processes equal the single-process runs over all
the images; sharding and the module entry point."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

import oes_fast
from oes_fast import distributed, prune, rng

WORLD = 2
N_IMAGES = 4


def tiny(dtype):
    model = oes_fast.models.skip(seed=0, in_channels=4, channels_down=(4, 8), channels_up=(4, 8),
                                 channels_skip=(0, 0))
    return model.to(dtype)


def problem(dtype):
    model = tiny(dtype)
    side = model.min_side
    z = oes_fast.models.dip_input(4, side, side, seed=1).to(dtype)
    ys = [rng.uniform((1, 3, side, side), 100 + i).to(dtype) for i in range(N_IMAGES)]
    return model, z, ys


SEARCH = dict(density=0.3, steps=4, seed=3, kl=1e-3, progress=False)
IMP = dict(density=0.7, steps_per_round=3, seed=3)  # 0.8 then 0.64: two prunings, three rounds


def _worker(rank, port, dtype, folder):
    # a spawned process: join the two-process gloo group, run search and IMP on this rank's shard
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    proc = distributed.init("gloo")
    completed = False
    try:
        model, z, ys = problem(dtype)
        mine = distributed.shard(ys)
        found = oes_fast.search(model, z, mine, distributed=True, **SEARCH)
        pruned = prune.imp(model, z, images=mine, distributed=True, **IMP)
        result = dict(search=dict(logits=found.logits, mask=found.mask.to_flat(), losses=found.losses),
                      imp=dict(masks=[m.to_flat() for m in pruned.masks], losses=pruned.losses))
        torch.save(result, os.path.join(folder, f"rank{proc.rank}.pt"))
        completed = True
    finally:
        distributed.finish(synchronize=completed)


@pytest.fixture(scope="module", params=[torch.float64, torch.float32], ids=["float64", "float32"])
def two_processes(request, tmp_path_factory):
    """(dtype, [rank 0's results, rank 1's results]) of one two-process gloo run."""
    folder = tmp_path_factory.mktemp("ranks")
    port = distributed.free_port()
    mp.spawn(_worker, args=(port, request.param, str(folder)), nprocs=WORLD, join=True)
    return request.param, [torch.load(folder / f"rank{r}.pt") for r in range(WORLD)]


def test_two_process_search_equals_single_process(two_processes):
    dtype, results = two_processes
    ranks = [r["search"] for r in results]
    model, z, ys = problem(dtype)
    single = oes_fast.search(model, z, ys, **SEARCH)
    # the sum over images is split in two and added by the all-reduce: only rounding differs
    rtol, atol = (1e-10, 1e-13) if dtype == torch.float64 else (1e-4, 1e-6)
    for got in ranks:
        for name, expected in single.logits.items():
            torch.testing.assert_close(got["logits"][name], expected, rtol=rtol, atol=atol)
        assert got["losses"] == pytest.approx(single.losses, rel=rtol)
    assert torch.equal(ranks[0]["mask"], ranks[1]["mask"])  # the ranks agree exactly
    if dtype == torch.float64:
        assert torch.equal(ranks[0]["mask"], single.mask.to_flat())
    else:  # float32 rounding may swap logits that are equal to ~1e-7 at the threshold
        assert (ranks[0]["mask"] != single.mask.to_flat()).float().mean() < 1e-3


def test_two_process_imp_equals_single_process(two_processes):
    dtype, results = two_processes
    ranks = [r["imp"] for r in results]
    model, z, ys = problem(dtype)
    single = prune.imp(model, z, images=ys, **IMP)
    assert len(single.masks) == 3
    for got in ranks:
        assert len(got["masks"]) == len(single.masks)
    assert ranks[0]["losses"] == ranks[1]["losses"]  # the ranks agree exactly
    for a, b in zip(ranks[0]["masks"], ranks[1]["masks"]):
        assert torch.equal(a, b)
    expected = [m.to_flat() for m in single.masks]
    if dtype == torch.float64:
        assert ranks[0]["losses"] == pytest.approx(single.losses, rel=1e-10)
        for got, want in zip(ranks[0]["masks"], expected):
            assert torch.equal(got, want)
    else:
        # float32: the dense round agrees to rounding; Adam's early steps are ~lr * sign(g), so a
        # rounding flip of a tiny gradient moves a weight by lr and can swap a few magnitudes at
        # the pruning threshold, after which the rounds drift apart: check the first pruning only
        assert ranks[0]["losses"][0] == pytest.approx(single.losses[0], rel=1e-5)
        assert (ranks[0]["masks"][1] != expected[1]).float().mean() < 5e-3


def test_shard_is_round_robin():
    items = list(range(7))
    assert distributed.shard(items, 0, 3) == [0, 3, 6]
    assert distributed.shard(items, 2, 3) == [2, 5]
    assert sorted(sum((distributed.shard(items, r, 3) for r in range(3)), [])) == items
    assert distributed.shard(items) == items  # no process group: everything
    with pytest.raises(ValueError):
        distributed.shard(items, 3, 3)


def test_imp_distributed_needs_a_process_group():
    model, z, ys = problem(torch.float32)
    with pytest.raises(RuntimeError, match="torch.distributed"):
        prune.imp(model, z, images=ys, distributed=True, **IMP)
    with pytest.raises(ValueError, match="train_fn"):
        prune.imp(model, z, images=ys, distributed=True, train_fn=lambda *a, **k: 0.0, **IMP)


def _photos(folder, sizes):
    paths = []
    for i, (h, w) in enumerate(sizes):
        path = folder / f"img{i}.png"
        pixels = np.random.default_rng(i).integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return paths


def _launch(args, world, cwd):
    # what torchrun does: one process per rank with the rendezvous in the environment
    port = distributed.free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                   WORLD_SIZE=str(world), LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-m", "oes_fast.distributed", *args], env=env, cwd=cwd,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return [(p.wait(timeout=300), *p.communicate()) for p in procs]


@pytest.mark.slow
def test_entry_point_search_on_two_processes(tmp_path):
    # the OES network at 256x256: slow on a small CPU, hence marked slow
    paths = _photos(tmp_path, [(256, 256)] * 4)
    out = tmp_path / "out"
    results = _launch(["search", *paths, "--density", "0.05", "--steps", "2", "--out", str(out), "--no-progress"],
                      WORLD, tmp_path)
    for code, _, err in results:
        assert code == 0, err
    mask = oes_fast.masks.load(out / "mask.safetensors")
    clean = distributed.load_images(paths)
    noisy = [oes_fast.tasks.Denoise(0.1).degrade(image, seed=i) for i, image in enumerate(clean)]
    model = oes_fast.models.skip_oes(seed=0)
    z = oes_fast.models.dip_input(32, 256, 256, seed=0)
    single = oes_fast.search(model, z, noisy, density=0.05, steps=2, progress=False)
    # Only rounding differs, but Adam's first steps move a logit by about lr * sign(g): where the
    # images' gradients nearly cancel, the two ranks' backward passes added by the all-reduce
    # round differently from the single process's one backward of their summed output gradient,
    # and a few logits cross the top-k threshold: 332 of 3,008,867 entries (1.1e-4) on an AVX2
    # machine (Zen 3), above the 1e-4 this test used to allow; reversing the images' order in the
    # single process alone moved 8. The bound is the float32 one of
    # test_two_process_search_equals_single_process.
    assert (mask.to_flat() != single.mask.to_flat()).float().mean() < 1e-3
    assert mask.meta["world_size"] == WORLD and (out / "report.json").is_file()


def test_entry_point_refuses_images_of_different_sizes(tmp_path):
    paths = _photos(tmp_path, [(256, 256), (320, 320)])
    results = _launch(["imp", *paths, "--steps", "1", "--out", str(tmp_path / "out")], WORLD, tmp_path)
    for code, _, err in results:
        assert code == 2 and "same size" in err, err
    assert not (tmp_path / "out").exists()
