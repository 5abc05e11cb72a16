"""SpectralPenalty on 2-D meshes (specreg_fast/distributed.py): FSDP2 x tensor parallelism
on a 2x2 ("dp_shard", "tp") mesh of 4 gloo ranks as torchtitan composes them (parallelize_module
with Colwise/Rowwise on the "tp" dim, then fully_shard on "dp_shard": placements
(_StridedShard(0), Shard(0)) and (Shard(0), Shard(1))), and uneven RowwiseParallel shards
on a 1-D mesh of 4, against the single-process run on the full weights. One spawned group
runs every scenario."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from spectral_testing import assert_rank_matches_single, data_loss as _out, local_box as _box, train_and_record as _train

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

STEPS = 20
WORLD = 4
DP = 2  # the 2x2 mesh: rank = dp * 2 + tp


def _llama(layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=layers,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                      attn_implementation="eager")
    return LlamaForCausalLM(cfg)


class _MLP(nn.Sequential):
    def __init__(self):
        torch.manual_seed(0)
        super().__init__(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 7), nn.Tanh(), nn.Linear(7, 3))


class _Uneven(nn.Sequential):
    """Rowwise on 4 ranks over 10 input features: column shards of 3, 3, 3 and 1."""

    def __init__(self):
        torch.manual_seed(0)
        super().__init__(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 7), nn.Tanh(), nn.Linear(7, 3))


MODELS = {"mlp2d": _MLP, "mlp2d_col": _MLP, "llama2d": _llama, "rowwise_uneven": _Uneven}
SCENARIOS = [(m, mode) for m in ("mlp2d", "llama2d") for mode in ("loss", "accumulate_grad")]
SCENARIOS += [("mlp2d_col", "loss"), ("rowwise_uneven", "accumulate_grad")]
TP_PLAN = {"self_attn.q_proj": "col", "self_attn.k_proj": "col", "self_attn.v_proj": "col",
           "self_attn.o_proj": "row", "mlp.gate_proj": "col", "mlp.up_proj": "col", "mlp.down_proj": "row"}


def _batches(name):
    """Per step, one batch per data-parallel rank (the 2-D mesh's dp coordinate; 1-D TP:
    every rank sees the first)."""
    g = torch.Generator().manual_seed(5)
    if name.startswith("llama"):
        return [[torch.randint(0, 32, (2, 8), generator=g) for _ in range(DP)] for _ in range(STEPS)]
    return [[torch.randn(2, 6, generator=g) for _ in range(DP)] for _ in range(STEPS)]


def _shard(name, model):
    """torchtitan's order: tensor parallelism on "tp", then FSDP2 on "dp_shard" per block."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    if name == "rowwise_uneven":
        parallelize_module(model, init_device_mesh("cpu", (WORLD,)), {"2": RowwiseParallel(input_layouts=Replicate())})
        return
    mesh = init_device_mesh("cpu", (DP, WORLD // DP), mesh_dim_names=("dp_shard", "tp"))
    style = {"col": ColwiseParallel, "row": RowwiseParallel}
    if name.startswith("llama"):
        for block in model.model.layers:
            parallelize_module(block, mesh["tp"], {k: style[v]() for k, v in TP_PLAN.items()})
            fully_shard(block, mesh=mesh["dp_shard"])
    else:
        plan = {"0": ColwiseParallel(), "2": RowwiseParallel()} if name == "mlp2d" else \
            {"0": ColwiseParallel(output_layouts=Replicate())}
        parallelize_module(model, mesh["tp"], plan)
        for i in (0, 2, 4):
            fully_shard(model[i], mesh=mesh["dp_shard"])
    fully_shard(model, mesh=mesh["dp_shard"])


def _penalty(model):
    import specreg_fast as sf
    return sf.SpectralPenalty(model, gamma=0.05, seed=11)


def _dp(name, rank):
    return 0 if name == "rowwise_uneven" else rank // (WORLD // DP)


def _run(name, mode, rank):
    model = MODELS[name]()
    pen = _penalty(model)
    _shard(name, model)
    hist, first = _train(model, pen, _batches(name), mode, _dp(name, rank))
    placements = {n: tuple(str(p) for p in q.placements) for n, q in model.named_parameters() if hasattr(q, "placements")}
    return {"pen": hist, "grads": [_box(g) for g in first], "weights": [_box(p) for p in model.parameters()],
            "sigmas": pen.sigmas(), "placements": placements,
            "buffers": {k: b.clone() for k, b in pen.state_dict().items() if isinstance(b, torch.Tensor)}}


def _count(name, rank, layers=2):
    """All-reduces of one pen() with n_iter=2 between forward and backward, and of one
    accumulate_grad() after it: the total (CommDebugMode) and per process group."""
    import specreg_fast as sf
    from torch.distributed.tensor.debug import CommDebugMode

    model = _llama(layers) if name == "llama2d" else MODELS[name]()
    pen = sf.SpectralPenalty(model, gamma=0.05, n_iter=2, n_iter_init=3)
    _shard(name, model)
    y = _out(model, _batches(name)[0][_dp(name, rank)])
    pen()  # the warm start
    groups = {}
    real = dist.all_reduce

    def counted(t, *a, group=None, **k):
        key = "world" if group is None else str(dist.get_process_group_ranks(group))
        groups[key] = groups.get(key, 0) + 1
        return real(t, *a, group=group, **k)

    out = {}
    dist.all_reduce = counted
    try:
        with CommDebugMode() as comm:
            p = pen()
        out["pen"], out["pen_groups"] = {str(k): v for k, v in comm.get_comm_counts().items()}, dict(groups)
        (y + p).backward()
        groups.clear()
        with CommDebugMode() as comm:
            pen.accumulate_grad()
        out["acc"], out["acc_groups"] = {str(k): v for k, v in comm.get_comm_counts().items()}, dict(groups)
    finally:
        dist.all_reduce = real
    return out


def _refusals():
    """Placements refused on the 2-D mesh, each by a ValueError naming the layer and the
    placement: a Partial (pending sum) on "tp", a strided shard whose split factor does not
    make one box per rank."""
    import specreg_fast as sf
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    mesh = init_device_mesh("cpu", (DP, WORLD // DP), mesh_dim_names=("dp_shard", "tp"))
    out = {}
    for case, placements in {"partial": (Shard(0), Partial()),
                             "strided": (_StridedShard(0, split_factor=3), Shard(0))}.items():
        model = _MLP()
        w = model[2].weight
        local = w.detach()[:2].clone() if case == "strided" else w.detach()[:4].clone()
        model[2].weight = nn.Parameter(DTensor.from_local(local, mesh, placements, run_check=False, shape=w.shape,
                                                          stride=w.stride()))
        pen = sf.SpectralPenalty(model, gamma=0.05, scope="all")  # no forward: "all" needs no readout
        try:
            pen()
            out[case] = None
        except ValueError as e:
            out[case] = str(e)
    return out


def _worker(rank, out_dir):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD)
    try:
        res = {(n, m): _run(n, m, rank) for n, m in SCENARIOS}
        res["comm"] = {n: _count(n, rank) for n in MODELS}
        res["comm"]["llama2d_1layer"] = _count("llama2d", rank, layers=1)
        res["refused"] = _refusals()
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # as in test_penalty_ddp.py


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("mesh")
    mp.spawn(_worker, args=(str(out),), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("name,mode", SCENARIOS)
def test_two_d_mesh_matches_single_process(ranks, name, mode):
    model = MODELS[name]()
    pen = _penalty(model)
    hist, first = _train(model, pen, _batches(name), mode, 0 if name == "rowwise_uneven" else None)
    want_w = [p.detach() for p in model.parameters()]
    for rank, res in enumerate(ranks):
        assert_rank_matches_single(res[(name, mode)], pen, hist, first, want_w, f"{name} {mode} rank {rank}", STEPS)
    pl = ranks[0][(name, mode)]["placements"]
    if name == "mlp2d":  # the placements the test is about
        assert pl["0.weight"] == ("_S(0, 2)", "S(0)"), pl
        assert pl["2.weight"] == ("S(0)", "S(1)"), pl
    if name == "llama2d":
        assert {f"model.layers.{i}.{k}" for i in range(2) for k in TP_PLAN} <= set(pen.sigmas())
        assert pl["model.layers.0.self_attn.q_proj.weight"] == ("_S(0, 2)", "S(0)"), pl
        assert pl["model.layers.1.mlp.down_proj.weight"] == ("S(0)", "S(1)"), pl
    if name == "rowwise_uneven":
        assert [res[(name, mode)]["weights"][2][0].shape[1] for res in ranks] == [3, 3, 3, 1]


def test_two_d_mesh_all_reduces_per_group(ranks):
    ar = "c10d.allreduce_"
    for rank, res in enumerate(ranks):
        c = res["comm"]
        dp, tp = rank // 2, rank % 2
        g_dp, g_tp = str([tp, 2 + tp]), str([2 * dp, 2 * dp + 1])
        # Rowwise (Shard(0), Shard(1)) next to Colwise (_StridedShard(0), Shard(0)): per power
        # iteration (n_iter=2) t over tp, then [t | A^T t] over dp, then A^T t over tp, for every
        # map of the model at once: constant in the number of decoder layers
        for n in ("mlp2d", "llama2d", "llama2d_1layer"):
            assert c[n]["pen"] == {ar: 6}, (rank, n, c[n])
            assert c[n]["pen_groups"] == {g_tp: 4, g_dp: 2}, (rank, n, c[n])
        # row blocks only (Colwise under FSDP2): [t | A^T t] over dp, then over tp
        assert c["mlp2d_col"]["pen"] == {ar: 4} and c["mlp2d_col"]["pen_groups"] == {g_dp: 2, g_tp: 2}, c
        # 1-D Rowwise on 4 ranks (uneven): t, then A^T t
        assert c["rowwise_uneven"]["pen"] == {ar: 4}, c["rowwise_uneven"]
        for n in c:
            assert c[n]["acc"] == c[n]["pen"] and c[n]["acc_groups"] == c[n]["pen_groups"], (n, c[n])


def test_two_d_mesh_refusals_name_the_layer_and_placement(ranks):
    for res in ranks:
        r = res["refused"]
        assert r["partial"] is not None and r["partial"].startswith("2: ") and "Partial" in r["partial"], r
        assert r["strided"] is not None and r["strided"].startswith("2: ") and "_StridedShard" in r["strided"], r


# ---------------------------------------------------------------- block plans (one process)
def _general_plan(view, gshape, lshape, offset):
    """The plan from index tensors over the whole parameter (the general route, uncached)."""
    from specreg_fast import distributed as D

    import weakref

    saved, cache, affine = D._affine_plan, dict(D._PLANS), D._AFFINE
    D._affine_plan, D._AFFINE = (lambda *a: None), weakref.WeakKeyDictionary()
    try:
        return D._block_plan(view, gshape, lshape, offset, "x", ())
    except ValueError:
        return None
    finally:
        D._affine_plan, D._AFFINE = saved, affine
        D._PLANS.clear()
        D._PLANS.update(cache)


def _boxes(shape, dims, parts):
    """Every rank's box (local shape, offset) when ``dims`` are split in ``parts`` chunks
    each (torch.chunk sizes: uneven and empty shards included)."""
    import itertools

    cuts = []
    for d, p in zip(dims, parts):
        size = -(-shape[d] // p)
        cuts.append([(min(r * size, shape[d]), min(r * size + size, shape[d])) for r in range(p)])
    for combo in itertools.product(*cuts):
        lshape, off = list(shape), [0] * len(shape)
        for d, (lo, hi) in zip(dims, combo):
            lshape[d], off[d] = hi - lo, lo
        yield tuple(lshape), tuple(off)


def test_block_plans_of_strided_views_need_no_index_tensor_and_no_cache():
    """Linear weights, Conv1D transposes, q/k/v row blocks and conv kernels as matrices, on
    row, column and 2-D boxes (uneven and empty ones too): the plan read from the view's
    strides equals the one from index tensors over the parameter, its index is affine (no
    int64 tensor kept; the general route's cache stays empty), and the plans kept per view
    function go with the view: they do not pile up however many penalties (new view
    closures) ask for them."""
    from specreg_fast import distributed as D
    from specreg_fast.layers import _identity, _reshaped, _rows, _transpose

    D._PLANS.clear()
    checked = 0
    for shape in [(6, 9), (9, 6), (12, 4), (6, 4, 3, 3)]:
        views = [_identity, _transpose, _reshaped] + [_rows(v, i, 3) for v in (_identity, _transpose)
                                                      for i in range(3)]
        for view in views if len(shape) == 2 else [_reshaped]:
            for dims, parts in [((0,), (2,)), ((0,), (4,)), ((1,), (4,)), ((0, 1), (2, 2)), ((0, 1), (4, 2))]:
                for lshape, off in _boxes(shape, dims, parts):
                    want = _general_plan(view, shape, lshape, off)
                    if want is None:  # not one block: the general route refuses it
                        continue
                    got = D._block_plan(view, shape, lshape, off, "x", ())
                    assert got[:4] == want[:4] and got[5] == want[5], (shape, dims, lshape, off, got, want)
                    assert isinstance(got[4], tuple), (shape, lshape, off, got)
                    if got[1] > got[0] and got[3] > got[2]:
                        assert got[4] == want[4], (shape, lshape, off, got, want)
                    checked += 1
    assert checked > 300 and len(D._PLANS) == 0, (checked, len(D._PLANS))
    assert all(isinstance(p[4], tuple) for plans in D._AFFINE.values() for p in plans.values())
    # a penalty built again and again: new closures for its q/k/v views each time
    kept = len(D._AFFINE)
    for _ in range(50):
        D._block_plan(_rows(_identity, 1, 3), (12, 4), (6, 4), (6, 0), "x", ())
    assert len(D._PLANS) == 0 and len(D._AFFINE) <= kept + 1, (len(D._PLANS), len(D._AFFINE), kept)


def test_gather_plans_are_cached_in_a_bounded_cache():
    """A view that is no strided view of the parameter (a column permutation) takes the
    general route: an index of its block, cached per view, least recently used evicted."""
    from specreg_fast import distributed as D

    D._PLANS.clear()
    perm = torch.tensor([3, 0, 2, 1, 5, 4])
    plans = [D._block_plan((lambda t: t[:, perm]), (8, 6), (4, 6), (4, 0), "x", ()) for _ in range(3 * D._PLANS_MAX)]
    r0, r1, c0, c1, index, col_dims = plans[0]
    assert (r0, r1, c0, c1) == (4, 8, 0, 6) and col_dims == frozenset({1})
    assert torch.equal(index, torch.arange(24).view(4, 6)[:, perm])  # the gather of the block
    assert len(D._PLANS) == D._PLANS_MAX
    D._PLANS.clear()
