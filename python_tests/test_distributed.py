"""SpectralPenalty on FSDP2-sharded weights (specreg_fast/distributed.py): gloo ranks on CPU,
compared with the single-process run on the full weights.

Spawning a process group costs seconds, so one spawned group runs a list of scenarios and
the test process checks each against its own single-process run."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from spectral_testing import assert_close as _close

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

STEPS = 20
BATCH = 4  # per rank


def _mlp():
    torch.manual_seed(0)
    # 9 and 7 rows: uneven shards at 2 ranks (5/4, 4/3), and an empty rank for 9 rows at 4 (3/3/3/0)
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Linear(9, 7), nn.Tanh(), nn.Linear(7, 3))


def _cnn():
    torch.manual_seed(0)
    # operator norms: zero and circular padding, stride, groups=2 (3 channels a group: the
    # 2-rank shards 3/3 fall on the group boundary), 5 channels (uneven 3/2 shards)
    return nn.Sequential(nn.Conv2d(2, 5, 3, padding=1), nn.Tanh(),
                         nn.Conv2d(5, 6, 3, stride=2, padding=1, padding_mode="circular"), nn.Tanh(),
                         nn.Conv2d(6, 6, 3, padding=1, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(6 * 3 * 3, 3))


MODELS = {"mlp": (_mlp, (6,)), "cnn": (_cnn, (2, 5, 5))}


def _batches(world, model="mlp"):
    """Per step, one batch per rank; the single-process run takes their concatenation."""
    g = torch.Generator().manual_seed(5)
    shape = MODELS[model][1]
    return [[torch.randn(BATCH, *shape, generator=g) for _ in range(world)] for _ in range(STEPS)]


# scenario -> (how the model is sharded, reshard_after_forward, "loss" (penalty() added) or
# "accumulate_grad", penalty kwargs). Sharding: "layers" (fully_shard on each Linear, then the
# root), "root" (the root only), "hsdp" (per layer and root on a (replicate, shard) mesh),
# "tp" (ColwiseParallel on the first Linear: Shard(0) weight; the other layers stay plain;
# every rank sees the same batch).
SCENARIOS = {
    "layers_reshard_loss": ("layers", True, "loss", {}),
    "layers_noreshard_acc": ("layers", False, "accumulate_grad", {}),
    "root_loss": ("root", True, "loss", {}),
    "schedule": ("layers", True, "loss", {"start_step": 2, "every": 3}),
    "schedule_acc": ("layers", False, "accumulate_grad", {"start_step": 3, "every": 2, "n_iter_init": 4}),
    "tp_colwise": ("tp", True, "loss", {}),
    "hsdp": ("hsdp", True, "loss", {}),
    "cnn_loss": ("layers", True, "loss", {}),
    "cnn_acc": ("layers", False, "accumulate_grad", {}),
}


def _model_of(name):
    return "cnn" if name.startswith("cnn") else "mlp"


def _train(model, pen, batches, mode, rank=None):
    """Training steps; returns the per-step (data loss, penalty) and the first step's grads.
    ``rank``: this rank's batch; None: the concatenation (the single-process run); -1: the
    first batch (the same on every rank)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    hist, first_grads = [], None
    for xs in batches:
        x = torch.cat(xs) if rank is None else xs[max(rank, 0)]
        opt.zero_grad()
        data = model(x).square().mean()
        if mode == "loss":
            p = pen()
            (data + p).backward()
        else:
            data.backward()
            p = pen.accumulate_grad()
        hist.append((float(data.detach()), float(p.detach())))
        if first_grads is None:
            first_grads = [q.grad.detach().clone() for q in model.parameters()]
        opt.step()
    return hist, first_grads


def _shard_rows(t):
    """(local tensor, global row offset) of a DTensor or a plain tensor."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not isinstance(t, DTensor):
        return t.detach().clone(), 0
    _, off = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    return t.to_local().detach().clone(), off[0]


def _run_scenario(name, world):
    import specreg_fast as sf
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate

    where, reshard, mode, kw = SCENARIOS[name]
    model = MODELS[_model_of(name)][0]()
    pen = sf.SpectralPenalty(model, gamma=0.05, seed=11, **kw)
    batches = _batches(world, _model_of(name))
    if where == "tp":
        from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

        mesh = init_device_mesh("cpu", (world,))
        parallelize_module(model, mesh, {"0": ColwiseParallel(output_layouts=Replicate())})
        hist, first_grads = _train(model, pen, batches, mode, -1)
    else:
        mesh = (init_device_mesh("cpu", (2, world // 2), mesh_dim_names=("replicate", "shard"))
                if where == "hsdp" else None)
        if where in ("layers", "hsdp"):
            for m in model:
                if isinstance(m, (nn.Linear, nn.Conv2d)):
                    fully_shard(m, mesh=mesh, reshard_after_forward=reshard)
        fully_shard(model, mesh=mesh, reshard_after_forward=reshard)
        hist, first_grads = _train(model, pen, batches, mode, dist.get_rank())
    # the single-process data loss is the mean of the ranks' (on their own batches; tp: all the same)
    data = torch.tensor([h[0] for h in hist], dtype=torch.float64)
    dist.all_reduce(data)
    return {"data": (data / world).tolist(), "pen": [h[1] for h in hist],
            "grads": [_shard_rows(g) for g in first_grads],
            "weights": [_shard_rows(p) for p in model.parameters()],
            "buffers": {k: b.clone() for k, b in pen.state_dict().items() if isinstance(b, torch.Tensor)},
            "sigmas": pen.sigmas(), "eval": _eval_value(pen)}


def _eval_value(pen):
    """The penalty at the current vectors (no step: the u^T W v all-reduce of the shards)."""
    pen.eval()
    value = float(pen().detach())
    pen.train()
    return value


def _count_collectives():
    """Collectives of one penalty call with the weights in each FSDP2 state."""
    import specreg_fast as sf
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.debug import CommDebugMode

    out = {}
    for reshard in (True, False):
        model = _mlp()
        for m in model:
            if isinstance(m, nn.Linear):
                fully_shard(m, reshard_after_forward=reshard)
        fully_shard(model, reshard_after_forward=reshard)
        pen = sf.SpectralPenalty(model, gamma=0.05, n_iter=2, n_iter_init=3)
        x = torch.randn(BATCH, 6)
        y = model(x).square().mean()  # between forward and backward
        for call in ("first", "between"):
            with CommDebugMode() as comm:
                p = pen()
            out[(reshard, call)] = {str(k): v for k, v in comm.get_comm_counts().items()}
        (y + p).backward()
        with CommDebugMode() as comm:
            pen.accumulate_grad()
        out[(reshard, "after")] = {str(k): v for k, v in comm.get_comm_counts().items()}
    return out


def _conv_collectives():
    """The sharded CNN (three hidden convs, FSDP2 per layer): the collectives of creating the
    state (``layer_names``) and of each penalty call, and the initial ``x_i``, ``y_i``."""
    import specreg_fast as sf
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.debug import CommDebugMode

    model = _cnn()
    for m in model:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            fully_shard(m)
    fully_shard(model)
    pen = sf.SpectralPenalty(model, gamma=0.05, seed=11, n_iter=2, n_iter_init=3)
    y = model(torch.randn(BATCH, 2, 5, 5)).square().mean()  # the convs' input sizes (and the state)
    pen.reset()  # the state again, counted: created by layer_names
    out = {}
    with CommDebugMode() as comm:
        names = pen.layer_names
    out["init"] = {str(k): v for k, v in comm.get_comm_counts().items()}
    out["state"] = {k: b.clone() for k, b in pen.named_buffers() if k[0] in "xy"}
    out["names"] = names
    for call in ("first", "between"):
        with CommDebugMode() as comm:
            p = pen()
        out[call] = {str(k): v for k, v in comm.get_comm_counts().items()}
    (y + p).backward()
    with CommDebugMode() as comm:
        pen.accumulate_grad()
    out["after"] = {str(k): v for k, v in comm.get_comm_counts().items()}
    return out


def _rejections(world):
    """Placements the penalty refuses, each with a clear error and nothing updated: a
    Partial weight (a pending sum), a sharded ConvTranspose (dim 0 = input channels), a
    grouped conv whose shards split a group. Returns ``{case: (message, state unchanged)}``."""
    import specreg_fast as sf
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import RowwiseParallel, parallelize_module

    torch.manual_seed(0)
    partial = _mlp()  # a Partial placement: a weight that is a pending sum over ranks
    parallelize_module(partial, init_device_mesh("cpu", (world,)), {"2": RowwiseParallel()})
    with torch.no_grad():
        from torch.distributed.tensor import DTensor, Partial
        w = partial[2].weight
        partial[2].weight = nn.Parameter(DTensor.from_local(w.to_local().new_zeros(7, 9), w.device_mesh, (Partial(),),
                                                            run_check=False, shape=w.shape, stride=w.stride()))
    # 6 output channels in groups of 2 at 2 ranks: shards [0, 3) and [3, 6) cut group 1
    grouped = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, groups=3), nn.Tanh(), nn.Conv2d(6, 2, 1))
    transposed = nn.Sequential(nn.ConvTranspose2d(4, 2, 3), nn.Tanh(), nn.Conv2d(2, 2, 1))
    # (no forward of the Partial model)
    cases = {"partial": (partial, None), "grouped": (grouped, torch.randn(2, 6, 4, 4)),
             "transposed": (transposed, torch.randn(2, 4, 4, 4))}
    out = {}
    for case, (model, x) in cases.items():
        if case != "partial":
            fully_shard(model[0])
            fully_shard(model)
        pen = sf.SpectralPenalty(model, gamma=0.05, scope="all")  # "all": the readout is regularized
        if x is not None:
            model(x)  # the convs' input size
        before = {k: b.clone() for k, b in pen.state_dict().items() if isinstance(b, torch.Tensor)}
        try:
            pen()  # (the convs fail when their vectors are created, the dense layer at its first step)
            msg = None
        except ValueError as e:
            msg = str(e)
        out[case] = (msg, all(torch.equal(pen.state_dict()[k], b) for k, b in before.items()))
    return out


def _dcp_model():
    """The MLP, FSDP2 per layer at the current world size, and its penalty."""
    import specreg_fast as sf
    from torch.distributed.fsdp import fully_shard

    model = _mlp()
    for m in model:
        if isinstance(m, nn.Linear):
            fully_shard(m)
    fully_shard(model)
    return model, sf.SpectralPenalty(model, gamma=0.05, seed=11)


def _dcp_save(ckpt):
    """3 steps at this world size, then a DCP checkpoint of the model and the penalty."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    model, pen = _dcp_model()
    _train(model, pen, _batches(dist.get_world_size())[:3], "loss", dist.get_rank())
    dcp.save({"model": get_model_state_dict(model), "penalty": pen.state_dict()}, checkpoint_id=ckpt)
    return {k: b.clone() for k, b in pen.state_dict().items() if isinstance(b, torch.Tensor)}


def _dcp_load_and_step(ckpt, distributed=True):
    """Load the checkpoint (FSDP2 at this world size, or a plain model with no process
    group), then one evaluation and one update of the penalty: (buffers after loading,
    sigmas at the loaded vectors, sigmas after one step)."""
    import specreg_fast as sf
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    if distributed:
        model, pen = _dcp_model()
    else:
        model = _mlp()
        pen = sf.SpectralPenalty(model, gamma=0.05, seed=11)
    model(torch.zeros(1, 6))  # the forward order (readout) before the vectors are created
    pen.layer_names
    state = {"model": get_model_state_dict(model), "penalty": pen.state_dict()}
    dcp.load(state, checkpoint_id=ckpt)
    set_model_state_dict(model, state["model"])
    pen.load_state_dict(state["penalty"])
    loaded = {k: b.clone() for k, b in pen.state_dict().items() if isinstance(b, torch.Tensor)}
    pen.eval()
    at_loaded = pen().detach().clone()
    pen.train()
    pen()
    return loaded, at_loaded, pen.last_sigmas.clone()


def _nonfinite_rolls_back():
    """A NaN in one rank's shard of layer 0: on every rank that layer's estimate is NaN and
    its vectors stay as they were, while layer 2 takes its step."""
    model, pen = _dcp_model()
    model(torch.zeros(1, 6))
    pen.layer_names
    before = {k: b.clone() for k, b in pen.state_dict().items() if isinstance(b, torch.Tensor)}
    if dist.get_rank() == dist.get_world_size() - 1:
        with torch.no_grad():
            model[0].weight.to_local()[-1, 2] = float("nan")
    with torch.no_grad():
        pen()
    after = pen.state_dict()
    return (pen.last_sigmas.clone(), [torch.equal(after[k], before[k]) for k in ("u_0", "v_0", "u_1", "v_1")])


def _worker(rank, world, out_dir, names, extra, ckpt=None):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=world)
    try:
        res = {n: _run_scenario(n, world) for n in names}
        if extra:
            res["comm"] = _count_collectives()
            res["conv_comm"] = _conv_collectives()
            res["rejected"] = _rejections(world)
            res["nonfinite"] = _nonfinite_rolls_back()
            res["dcp_saved"] = _dcp_save(ckpt)
        elif ckpt is not None:
            res["dcp_loaded"] = _dcp_load_and_step(ckpt)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # as in test_penalty_ddp.py: leave without C++ static destructors (gloo threads winding down)
    os._exit(0)


def _single(name, world):
    import specreg_fast as sf

    where, _, mode, kw = SCENARIOS[name]
    model = MODELS[_model_of(name)][0]()
    pen = sf.SpectralPenalty(model, gamma=0.05, seed=11, **kw)
    hist, first_grads = _train(model, pen, _batches(world, _model_of(name)), mode, -1 if where == "tp" else None)
    return {"hist": hist, "grads": first_grads, "weights": [p.detach() for p in model.parameters()],
            "buffers": {k: b.clone() for k, b in pen.state_dict().items() if isinstance(b, torch.Tensor)},
            "sigmas": pen.sigmas(), "eval": _eval_value(pen)}


def _check_against_single(results, world, names):
    for name in names:
        ref = _single(name, world)
        for rank, res in enumerate(results):
            r = res[name]
            ref_loss = [d + p for d, p in ref["hist"]]
            _close([d + p for d, p in zip(r["data"], r["pen"])], ref_loss, f"{name} rank {rank} losses")
            _close(r["pen"], [p for _, p in ref["hist"]], f"{name} rank {rank} penalties")
            for j, ((g, off), G) in enumerate(zip(r["grads"], ref["grads"])):
                _close(g, G[off:off + g.shape[0]], f"{name} rank {rank} first-step grad of param {j} (rows {off}+)")
            for j, ((w, off), W) in enumerate(zip(r["weights"], ref["weights"])):
                _close(w, W[off:off + w.shape[0]], f"{name} rank {rank} weights of param {j} after {STEPS} steps")
            assert r["sigmas"].keys() == ref["sigmas"].keys()
            _close(list(r["sigmas"].values()), list(ref["sigmas"].values()), f"{name} rank {rank} sigmas")
            _close(r["eval"], ref["eval"], f"{name} rank {rank} penalty at the final vectors")
            for k, b in ref["buffers"].items():
                if isinstance(b, torch.Tensor) and b.is_floating_point():
                    _close(r["buffers"][k], b, f"{name} rank {rank} buffer {k}")
        # the persistent vectors are the same tensors on every rank
        for k in results[0][name]["buffers"]:
            assert all(torch.equal(res[name]["buffers"][k], results[0][name]["buffers"][k]) for res in results), k


def _spawn(tmp_path, world, names, extra, ckpt=None):
    mp.spawn(_worker, args=(world, str(tmp_path), names, extra, ckpt), nprocs=world, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _check_comm(comm, n_init=3, n_iter=2):
    ar = "c10d.allreduce_"
    for reshard in (True, False):
        first, between, after = (comm[(reshard, c)] for c in ("first", "between", "after"))
        # one all-reduce per power iteration for all layers, nothing else (no gather)
        assert first == {ar: n_init}, (reshard, first)
        assert between == {ar: n_iter}, (reshard, between)
        assert after == {ar: n_iter}, (reshard, after)


TWO_RANKS = ["layers_reshard_loss", "layers_noreshard_acc", "root_loss", "schedule", "schedule_acc", "tp_colwise",
             "cnn_loss", "cnn_acc"]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The 2-rank group's results and its DCP checkpoint (saved at 2 ranks)."""
    out = tmp_path_factory.mktemp("two_ranks")
    ckpt = str(out / "ckpt")
    return _spawn(out, 2, TWO_RANKS, extra=True, ckpt=ckpt), ckpt


def test_fsdp2_two_ranks_match_single_process(two_ranks):
    results, _ = two_ranks
    _check_against_single(results, 2, TWO_RANKS)
    _check_comm(results[0]["comm"])
    rejected = results[0]["rejected"]
    for case, (start, words) in {"partial": ("2: ", "Partial"), "grouped": ("0: ", "splits a group"),
                                 "transposed": ("0: ", "ConvTranspose")}.items():
        msg, unchanged = rejected[case]
        assert msg is not None and msg.startswith(start) and words in msg, (case, msg)
        assert unchanged, case
    for res in results:
        sig, unchanged = res["nonfinite"]
        assert torch.isnan(sig[0]) and torch.isfinite(sig[1]), sig
        assert unchanged == [True, True, False, False], unchanged


def test_fsdp2_sharded_convs_one_all_reduce_for_all_from_the_initial_state_on(two_ranks):
    """Three sharded convs: creating their state takes one all-reduce for all of them (y = A x
    from the shards), each power iteration one for all; the initial ``y_i`` on every rank is
    ``A x_i / |A x_i|`` of the whole conv (the explicit conv of the unsharded weight)."""
    import specreg_fast as sf
    from specreg_fast import reference as ref

    results, _ = two_ranks
    ar = "c10d.allreduce_"
    model = _cnn()
    shapes = {"0": (2, 5, 5), "2": (5, 5, 5), "4": (6, 3, 3)}
    for rank, res in enumerate(results):
        comm = res["conv_comm"]
        assert comm["names"] == ["0", "2", "4"]
        assert comm["init"] == {ar: 1}, (rank, comm["init"])
        # one per power iteration (n_iter_init=3, then n_iter=2) for the three convs together
        assert [comm[c] for c in ("first", "between", "after")] == [{ar: 3}, {ar: 2}, {ar: 2}], rank
        for i, (name, shape) in enumerate(shapes.items()):
            x, y = comm["state"][f"x_{i}"], comm["state"][f"y_{i}"]
            assert x.shape == shape and torch.equal(x, results[0]["conv_comm"]["state"][f"x_{i}"])
            with torch.no_grad():
                Ax = ref.conv_apply(sf.ConvSpec.from_module(model.get_submodule(name), shape), x.double()[None])[0]
            _close(y, Ax / torch.linalg.vector_norm(Ax), f"rank {rank}: initial y_{i} of conv {name}")


def test_fsdp2_four_ranks_empty_shard_hsdp_and_dcp(tmp_path, two_ranks):
    # 9 rows at 4 ranks: shards of 3, 3, 3 and 0 rows; HSDP on a 2x2 (replicate, shard) mesh;
    # the checkpoint saved at 2 ranks loaded at 4 and at 1 (no process group)
    results2, ckpt = two_ranks
    names = ["layers_reshard_loss", "hsdp"]
    results = _spawn(tmp_path, 4, names, extra=False, ckpt=ckpt)
    _check_against_single(results, 4, names)
    saved = results2[0]["dcp_saved"]
    single = _dcp_load_and_step(ckpt, distributed=False)
    for where, (loaded, at_loaded, stepped) in [("1 process", single)] + [
            (f"rank {r} of 4", res["dcp_loaded"]) for r, res in enumerate(results)]:
        assert loaded.keys() == saved.keys()
        for k in saved:  # the penalty's buffers come back exactly
            assert torch.equal(loaded[k], saved[k]), (where, k)
        _close(at_loaded, single[1], f"{where}: penalty at the loaded vectors")
        _close(stepped, single[2], f"{where}: sigmas one step after loading")


@pytest.mark.slow
def test_fsdp2_example_runs_under_torchrun():
    import shutil
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    example = os.path.join(root, "examples", "fsdp2_cpu.py")
    out = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", example], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("step ") == 5 and "sigmas {'0':" in out.stdout, out.stdout


@pytest.mark.slow  # about 45 s on a loaded 2-core machine (torchrun, 2 processes, transformers import)
def test_llama_fsdp2_tp_example_runs_under_torchrun():
    """examples/llama_fsdp2_tp_cpu.py (a transformers Llama: TP attention, FSDP2 MLPs, 2 gloo
    ranks, torchrun) for 2 steps: its sigmas are the single-process run's (same model,
    batches, optimizer)."""
    import importlib.util
    import json
    import shutil
    import subprocess
    import sys

    pytest.importorskip("transformers")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    env = dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    example = os.path.join(root, "examples", "llama_fsdp2_tp_cpu.py")
    out = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", example, "--steps", "2"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("step ") == 2, out.stdout
    got = json.loads(out.stdout.split("sigmas ", 1)[1].splitlines()[0])
    spec = importlib.util.spec_from_file_location("llama_fsdp2_tp_cpu", example)
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)
    model = ex.make_model()
    pen = ex.make_penalty(model)
    ex.train(model, pen, 2, log=lambda _: None)
    want = pen.sigmas()
    assert list(got) == list(want) and len(want) == 14, list(got)
    _close(list(got.values()), list(want.values()), "example sigmas after 2 steps", rel=1e-4)
