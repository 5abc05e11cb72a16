"""SpectralPenalty on maps that are views of sharded parameters (specreg_fast/distributed.py,
``_Block``): column blocks (RowwiseParallel, transformers Conv1D under FSDP2) and the q/k/v
row blocks of a dim-0-sharded ``in_proj_weight``, on 2 gloo ranks, against the single-process
run on the full weights. One spawned group runs every scenario."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from spectral_testing import assert_close as _close, assert_rank_matches_single, data_loss as _out
from spectral_testing import local_box as _box, train_and_record as _train

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

STEPS = 20
WORLD = 2


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, n_positions=8, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, max_position_embeddings=16)
    return LlamaForCausalLM(cfg)


class _MLP(nn.Sequential):
    def __init__(self):
        torch.manual_seed(0)
        # 10 hidden: 5/5 (RowwiseParallel's forward assumes even shards of its input)
        super().__init__(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 7), nn.Tanh(), nn.Linear(7, 3))


class _Attn(nn.Module):
    """in_proj_weight (18, 6) at 2 ranks: rows 0-8 (q and k's first 3 rows), 9-17 (k's last 3, v)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.fc = nn.Linear(6, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.attn(x, x, x, need_weights=False)[0]
        return self.head(torch.tanh(self.fc(h))).mean(1)


MODELS = {"gpt2": _gpt2, "mlp_tp": _MLP, "mha": _Attn, "mlp_tp_frozen": _MLP, "gpt2_split": _gpt2, "llama": _llama}
SCENARIOS = [(m, mode) for m in ("gpt2", "mlp_tp", "mha") for mode in ("loss", "accumulate_grad")]
SCENARIOS += [("mlp_tp_frozen", "loss"), ("gpt2_split", "accumulate_grad"), ("llama", "loss")]
# gpt2_split: c_attn split into its q/k/v maps (split=): column blocks of each under FSDP2
SPLIT = {f"transformer.h.{i}.attn.c_attn": 3 for i in range(2)}


def _freeze(name, model):
    """mlp_tp_frozen: the RowwiseParallel layer (its only column-sharded map) is frozen."""
    if name == "mlp_tp_frozen":
        for p in model[2].parameters():
            p.requires_grad_(False)


def _batches(model):
    """Per step, one batch per rank (TP: every rank sees the first)."""
    g = torch.Generator().manual_seed(5)
    if model.startswith(("gpt2", "llama")):
        return [[torch.randint(0, 32, (2, 8), generator=g) for _ in range(WORLD)] for _ in range(STEPS)]
    shape = (6,) if model.startswith("mlp_tp") else (5, 6)
    return [[torch.randn(2, *shape, generator=g) for _ in range(WORLD)] for _ in range(STEPS)]


def _penalty(model, name):
    import specreg_fast as sf
    return sf.SpectralPenalty(model, gamma=0.05, seed=11, **({"split": SPLIT} if name == "gpt2_split" else {}))


def _shard(name, model):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if name.startswith("mlp_tp"):
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        parallelize_module(model, init_device_mesh("cpu", (WORLD,)), {"0": ColwiseParallel(), "2": RowwiseParallel()})
    elif name.startswith("gpt2"):
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
    elif name == "llama":
        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
    else:
        fully_shard(model.attn)
        fully_shard(model)


def _run(name, mode, rank):
    model = MODELS[name]()
    pen = _penalty(model, name)
    _shard(name, model)
    _freeze(name, model)
    hist, first = _train(model, pen, _batches(name), mode, 0 if name.startswith("mlp_tp") else rank)
    return {"pen": hist, "grads": [_box(g) for g in first], "weights": [_box(p) for p in model.parameters()],
            "sigmas": pen.sigmas(), "buffers": {k: b.clone() for k, b in pen.state_dict().items()
                                                if isinstance(b, torch.Tensor)}}


def _count(name, rank):
    """All-reduces of one pen() with n_iter=2 between forward and backward, and of one
    accumulate_grad() after it."""
    import specreg_fast as sf
    from torch.distributed.tensor.debug import CommDebugMode

    model = MODELS[name]()
    pen = sf.SpectralPenalty(model, gamma=0.05, n_iter=2, n_iter_init=3)
    _shard(name, model)
    _freeze(name, model)
    x = _batches(name)[0][0 if name.startswith("mlp_tp") else rank]
    y = _out(model, x)
    pen()  # the warm start
    out = {}
    with CommDebugMode() as comm:
        p = pen()
    out["pen"] = {str(k): v for k, v in comm.get_comm_counts().items()}
    (y + p).backward()
    with CommDebugMode() as comm:
        pen.accumulate_grad()
    out["acc"] = {str(k): v for k, v in comm.get_comm_counts().items()}
    return out


COMPILE_STEPS = 5


def _compiled(rank):
    """The tiny Llama under FSDP2 per decoder layer, as torchtitan compiles it: each block
    compiled and registered back, and the training step (model and penalty) compiled too
    (backend aot_eager: dynamo and AOTAutograd, no C++ toolchain), against the same run
    eager. The penalty on sharded weights runs eagerly inside the compiled step (a graph
    break: SpectralPenalty._eager_forward)."""
    from torch.distributed.fsdp import fully_shard

    out = {}
    for how in ("eager", "compiled"):
        torch._dynamo.reset()
        model = _llama()
        pen = _penalty(model, "llama")
        for block in model.model.layers:
            fully_shard(block)
        fully_shard(model)
        if how == "compiled":
            for i, block in enumerate(model.model.layers):
                model.model.layers.register_module(str(i), torch.compile(block, backend="aot_eager"))
        opt = torch.optim.SGD(model.parameters(), lr=0.05)

        def step(x):
            loss = _out(model, x) + pen()
            loss.backward()
            return loss

        run = torch.compile(step, backend="aot_eager") if how == "compiled" else step
        hist, first = [], None
        for xs in _batches("llama")[:COMPILE_STEPS]:
            opt.zero_grad()
            hist.append(float(run(xs[rank]).detach()))
            if first is None:
                first = [_box(q.grad) for q in model.parameters()]
            opt.step()
        out[how] = {"loss": hist, "grads": first, "weights": [_box(p) for p in model.parameters()],
                    "sigmas": pen.sigmas(), "names": pen.layer_names}
    return out


DCP_MODELS = ("gpt2", "mlp_tp")


def _dcp_setup(name, sharding):
    """The model and its penalty, sharded as ``sharding``: "fsdp" (FSDP2 per block / layer),
    "root" (FSDP2 of the root only), "tp" (the MLP's Colwise then Rowwise layers) or None
    (one process, no sharding)."""
    model = MODELS[name]()
    pen = _penalty(model, name)
    if sharding == "fsdp" and name == "mlp_tp":
        from torch.distributed.fsdp import fully_shard
        for m in model:
            if isinstance(m, nn.Linear):
                fully_shard(m)
        fully_shard(model)
    elif sharding == "root":
        from torch.distributed.fsdp import fully_shard
        fully_shard(model)
    elif sharding is not None:
        _shard(name, model)
    return model, pen


def _dcp_save(name, ckpt, rank):
    """3 training steps on column-sharded maps (GPT-2 under FSDP2, Rowwise TP), a DCP
    checkpoint of the model and the penalty, and the penalty at the saved vectors."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    model, pen = _dcp_setup(name, "tp" if name == "mlp_tp" else "fsdp")
    _train(model, pen, _batches(name)[:3], "loss", 0 if name == "mlp_tp" else rank)
    dcp.save({"model": get_model_state_dict(model), "penalty": pen.state_dict()}, checkpoint_id=ckpt)
    return _dcp_probe(name, model, pen, rank, loaded=None)


def _dcp_load(name, ckpt, sharding, rank=0):
    """Load the checkpoint into the model sharded as ``sharding`` (another placement than
    saved, or one process), then probe the penalty."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    model, pen = _dcp_setup(name, sharding)
    _out(model, _batches(name)[0][0])  # the forward order (readout) before the vectors are created
    pen.layer_names
    state = {"model": get_model_state_dict(model), "penalty": pen.state_dict()}
    dcp.load(state, checkpoint_id=ckpt)
    set_model_state_dict(model, state["model"])
    pen.load_state_dict(state["penalty"])
    loaded = {k: b.clone() for k, b in pen.state_dict().items() if isinstance(b, torch.Tensor)}
    return _dcp_probe(name, model, pen, rank, loaded)


def _dcp_probe(name, model, pen, rank, loaded):
    """(buffers, the penalty at the current vectors, the sigmas one step later)."""
    buffers = loaded if loaded is not None else {k: b.clone() for k, b in pen.state_dict().items()
                                                 if isinstance(b, torch.Tensor)}
    pen.eval()
    at = pen().detach().clone()
    pen.train()
    pen()
    return buffers, at, pen.last_sigmas.clone()


def _worker(rank, out_dir):
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD)
    try:
        res = {(n, m): _run(n, m, rank) for n, m in SCENARIOS}
        res["comm"] = {n: _count(n, rank) for n in MODELS if n not in ("gpt2_split", "llama")}
        res["compiled"] = _compiled(rank)
        for n in DCP_MODELS:
            res[("dcp_saved", n)] = _dcp_save(n, os.path.join(out_dir, f"ckpt_{n}"), rank)
        # loaded at 2 ranks with other placements: the TP MLP under FSDP2 (its Rowwise layer's
        # map row-sharded now), GPT-2 under FSDP2 of the root only
        res[("dcp_resharded", "mlp_tp")] = _dcp_load("mlp_tp", os.path.join(out_dir, "ckpt_mlp_tp"), "fsdp", rank)
        res[("dcp_resharded", "gpt2")] = _dcp_load("gpt2", os.path.join(out_dir, "ckpt_gpt2"), "root", rank)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # as in test_penalty_ddp.py


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("maps")
    mp.spawn(_worker, args=(str(out),), nprocs=WORLD, join=True)
    res = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r in res:
        r["dir"] = out
    return res


@pytest.mark.parametrize("name,mode", SCENARIOS)
def test_views_of_sharded_parameters_match_single_process(ranks, name, mode):
    model = MODELS[name]()
    pen = _penalty(model, name)
    _freeze(name, model)
    hist, first = _train(model, pen, _batches(name), mode, 0 if name.startswith("mlp_tp") else None)
    want_w = [p.detach() for p in model.parameters()]
    for rank, res in enumerate(ranks):
        assert_rank_matches_single(res[(name, mode)], pen, hist, first, want_w, f"{name} {mode} rank {rank}", STEPS)
    if name == "gpt2":  # the Conv1D maps of both blocks are regularized
        assert {f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                                      "mlp.c_proj")} <= set(pen.sigmas())
    if name == "gpt2_split":
        assert {f"transformer.h.{i}.attn.c_attn[{t}]" for i in range(2) for t in "qkv"} <= set(pen.sigmas())
    if name == "mha":
        assert {"attn[q]", "attn[k]", "attn[v]", "attn.out_proj"} <= set(pen.sigmas())


def test_column_and_row_blocks_two_all_reduces_per_iteration(ranks):
    ar = "c10d.allreduce_"
    for res in ranks:
        c = res["comm"]
        # column blocks (Conv1D under FSDP2; RowwiseParallel next to ColwiseParallel): t, then A^T t,
        # for every map of the model at once: 2 per power iteration (n_iter=2), whatever the layer count
        assert c["gpt2"]["pen"] == {ar: 4}, c["gpt2"]
        assert c["mlp_tp"]["pen"] == {ar: 4}, c["mlp_tp"]
        # row blocks only (q/k/v of in_proj_weight, out_proj, fc under FSDP2): one per iteration
        assert c["mha"]["pen"] == {ar: 2}, c["mha"]
        # frozen maps take no step: the frozen Rowwise layer's second all-reduce is gone
        assert c["mlp_tp_frozen"]["pen"] == {ar: 2}, c["mlp_tp_frozen"]
        for n in c:
            assert c[n]["acc"] == c[n]["pen"], (n, c[n])


def test_compiled_blocks_and_step_equal_eager(ranks):
    """torchtitan's pattern (FSDP2 per block, each block compiled, the step compiled): the
    same losses, first-step gradients on each shard, weights and sigmas as eager."""
    for rank, res in enumerate(ranks):
        e, c = res["compiled"]["eager"], res["compiled"]["compiled"]
        assert c["names"] == e["names"] and len(e["names"]) == 14, c["names"]  # 7 maps per block
        _close(c["loss"], e["loss"], f"rank {rank} compiled losses")
        _close(list(c["sigmas"].values()), list(e["sigmas"].values()), f"rank {rank} compiled sigmas")
        for j, (((g, off), (G, OFF)), ((w, _), (W, _))) in enumerate(zip(zip(c["grads"], e["grads"]),
                                                                         zip(c["weights"], e["weights"]))):
            assert off == OFF
            _close(g, G, f"rank {rank} compiled first-step grad of param {j}")
            _close(w, W, f"rank {rank} compiled param {j} after {COMPILE_STEPS} steps")


@pytest.mark.parametrize("name", DCP_MODELS)
def test_dcp_column_sharded_maps_load_at_another_mesh(ranks, name):
    """Saved at 2 ranks (GPT-2's Conv1D maps under FSDP2, the MLP's Rowwise TP layer: column
    blocks), loaded at 1 process and at 2 ranks with other placements: the penalty's buffers
    come back exactly, and the penalty at them and the sigmas one step later are the saved
    run's."""
    saved = ranks[0][("dcp_saved", name)]
    single = _dcp_load(name, str(ranks[0]["dir"] / f"ckpt_{name}"), None)
    assert len(saved[0]) > 4
    for where, (loaded, at, stepped) in [("1 process", single)] + [
            (f"rank {r} resharded", res[("dcp_resharded", name)]) for r, res in enumerate(ranks)]:
        assert loaded.keys() == saved[0].keys(), where
        for k in saved[0]:
            assert torch.equal(loaded[k], saved[0][k]), (where, k)
        _close(at, saved[1], f"{name} {where}: penalty at the loaded vectors")
        _close(stepped, saved[2], f"{name} {where}: sigmas one step after loading")
