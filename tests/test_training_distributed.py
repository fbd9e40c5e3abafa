"""Sharded training on 2 CPU processes (gloo) equals one process, and each rank holds only its rows.

One spawn runs everything that needs a process group (process start-up dominates the cost):
1. `ShardedEmbedding` against `nn.Embedding`: forward and gradients, uneven split, a rank with no rows;
2. a 4-step training run with per-device batch 2, checkpoints at steps 2 and 4;
3. a resume of that run from its step-2 checkpoint (in a copy of the output folder).
The test process then trains 4 steps on one process with batch 4 and compares.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers_training import free_port, one_thread, tiny_config, write_tiny_corpus  # noqa: F401
from torch import nn

from engram_moe import EngramMoEForCausalLM, get_preset
from engram_moe.training.pretrain import train
from engram_moe.training.sharding import (
    ShardedEmbedding,
    clip_grad_norm_,
    gather_full_tables,
    shard_engram_tables,
    shard_range,
)

pytestmark = pytest.mark.usefixtures("one_thread")

WORLD = 2
ROOT = Path(__file__).resolve().parents[1]


def _check_sharded_embedding(rank: int, world: int) -> dict:
    """Forward and gradient of the sharded lookup equal nn.Embedding's on the full table."""
    report = {}
    for rows in (11, 1):  # 11 rows: 6 + 5; 1 row: rank 1 owns nothing
        torch.manual_seed(rows)
        full = nn.Embedding(rows, 3)
        ids = torch.randint(0, rows, (2 * world, 5, 4))  # repeated ids included
        weights = torch.randn(2 * world, 5, 4, 3)
        # Reference: the mean over ranks of each rank's loss, on one process.
        (full(ids) * weights).sum().div(world).backward()
        sharded = ShardedEmbedding.from_embedding(full, rank, world)
        mine = slice(2 * rank, 2 * rank + 2)
        out = sharded(ids[mine])
        torch.testing.assert_close(out, full(ids[mine]).detach())
        (out * weights[mine]).sum().backward()
        torch.testing.assert_close(
            sharded.weight.grad, full.weight.grad[sharded.row_start : sharded.row_stop]
        )
        gathered = gather_full_tables(nn.ModuleDict({"t": sharded}))
        if rank == 0:
            torch.testing.assert_close(gathered["t.weight"], full.weight.detach())
        report[rows] = [sharded.row_start, sharded.row_stop]
    return report


def _worker(rank: int, world: int, port: int, corpus: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    report = {}
    first = tiny_config(corpus, f"{out}/run", batch_size=2, max_steps=4, save_every=2, save_final=True)
    result = train(first)  # initialises the gloo process group through Accelerate
    report["embedding"] = _check_sharded_embedding(rank, world)
    report["tables"] = {
        name: [type(layer.embedding).__name__, list(layer.embedding.weight.shape)]
        for name, layer in result.model.named_modules()
        if type(layer).__name__ == "EngramLayer"
    }
    report["losses"] = result.losses
    report["val_losses"] = result.val_losses
    report["summary"] = result.summary

    # Resume from the step-2 checkpoint of a copy (as if the run had been killed after step 3).
    if rank == 0:
        shutil.copytree(f"{out}/run", f"{out}/resumed")
        shutil.rmtree(f"{out}/resumed/checkpoints/step-00000004")
        with open(f"{out}/resumed/checkpoints/latest", "w") as f:
            f.write("step-00000002\n")
    dist.barrier()
    resumed = train(
        tiny_config(corpus, f"{out}/resumed", batch_size=2, max_steps=4, save_every=2, resume=True)
    )
    report["resumed_losses"] = resumed.losses
    # The fused PyTorch path of the Engram layer ("torch" kernels) reads full tables through `reader`; shards
    # decline, so the sharded run falls back to the All-to-All lookup and must still match one process.
    fused = train(
        tiny_config(corpus, f"{out}/fused", batch_size=2, max_steps=2, set={"engram_kernels": "torch"})
    )
    report["fused_losses"] = fused.losses
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(report, f)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_procs")
    corpus = write_tiny_corpus(out)
    mp.spawn(_worker, args=(WORLD, free_port(), str(corpus), str(out)), nprocs=WORLD, join=True)
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return out, corpus, reports


@pytest.fixture(scope="module")
def one_process_run(two_process_run):
    out, corpus, _ = two_process_run
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(
            tiny_config(corpus, out / "single", batch_size=4, max_steps=4, save_every=2, save_final=True)
        )
    finally:
        torch.set_num_threads(threads)


def test_sharded_lookup_matches_embedding(two_process_run):
    _, _, reports = two_process_run
    assert reports[0]["embedding"] == {"11": [0, 6], "1": [0, 1]}
    assert reports[1]["embedding"] == {"11": [6, 11], "1": [1, 1]}


def test_two_processes_match_one_process(two_process_run, one_process_run):
    _, _, reports = two_process_run
    single = one_process_run
    for report in reports:  # every rank reports the same (all-reduced) losses
        two = {int(k): v for k, v in report["losses"].items()}
        assert sorted(two) == [1, 2, 3, 4]
        torch.testing.assert_close(
            torch.tensor([two[s] for s in sorted(two)]),
            torch.tensor([single.losses[s] for s in sorted(two)]),
            rtol=1e-5,
            atol=0,
        )
        val = {int(k): v for k, v in report["val_losses"].items()}
        torch.testing.assert_close(
            torch.tensor([val[s] for s in sorted(val)]),
            torch.tensor([single.val_losses[s] for s in sorted(val)]),
            rtol=1e-5,
            atol=0,
        )
    # The loss really moved (the comparison is not between two untouched models).
    assert single.losses[4] < single.losses[1] - 0.05


def test_fused_kernel_path_matches_across_process_counts(two_process_run, tmp_path):
    out, corpus, reports = two_process_run
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train(
            tiny_config(
                corpus, tmp_path / "fused", batch_size=4, max_steps=2, set={"engram_kernels": "torch"}
            )
        )
    finally:
        torch.set_num_threads(threads)
    layer = single.model.model.engram_layers[0]
    assert layer.embedding.reader(layer.embedding.weight.device) is layer.embedding.weight  # fused path taken
    for report in reports:
        two = [report["fused_losses"][str(s)] for s in (1, 2)]
        torch.testing.assert_close(
            torch.tensor(two), torch.tensor([single.losses[1], single.losses[2]]), rtol=1e-5, atol=0
        )


def test_each_rank_holds_only_its_rows(two_process_run):
    _, _, reports = two_process_run
    full = reports[0]["summary"]["engram_table_parameters"]
    per_rank = [r["summary"]["engram_table_parameters_per_rank"] for r in reports]
    assert sum(per_rank) == full
    assert all(0 < n < full for n in per_rank)
    # Rows follow torch.chunk: rank r owns [r*c, (r+1)*c); every table contributes its share.
    model = EngramMoEForCausalLM._from_config(get_preset("tiny-engram-moe"))
    expected = 0
    for layer in model.model.engram_layers:
        rows, dim = layer.embedding.weight.shape
        start, stop = shard_range(rows, 0, WORLD)
        expected += (stop - start) * dim
    assert per_rank[0] == expected
    for rank, report in enumerate(reports):
        for kind, _shape in report["tables"].values():
            assert kind == "ShardedEmbedding"
        layer = model.model.layers[1].engram
        start, stop = shard_range(layer.embedding.weight.shape[0], rank, WORLD)
        assert report["tables"]["model.layers.1.engram"][1] == [stop - start, layer.embedding.weight.shape[1]]


def test_sharded_checkpoint_resumes_with_the_same_losses(two_process_run):
    out, _, reports = two_process_run
    shards = sorted(p.name for p in (out / "run" / "checkpoints" / "step-00000004").glob("tables-*"))
    assert shards == ["tables-rank00000-of-00002.pt", "tables-rank00001-of-00002.pt"]
    for report in reports:
        resumed = {int(k): v for k, v in report["resumed_losses"].items()}
        assert sorted(resumed) == [3, 4]
        for step, loss in resumed.items():
            assert loss == pytest.approx(report["losses"][str(step)], rel=1e-6)


def test_save_pretrained_is_unsharded_and_matches_one_process(two_process_run, one_process_run):
    out, _, _ = two_process_run
    two = EngramMoEForCausalLM.from_pretrained(out / "run" / "final").eval()
    one = EngramMoEForCausalLM.from_pretrained(one_process_run.final_dir).eval()
    for a, b in zip(two.model.engram_layers, one.model.engram_layers, strict=True):
        assert isinstance(a.embedding, nn.Embedding)  # a plain, full table: loads anywhere
        assert a.embedding.weight.shape == b.embedding.weight.shape
        # Adam divides by sqrt(v): rows whose gradients are ~0 turn float32 summation-order noise into
        # differences of a small fraction of one update (lr x 5 = 0.015 here).
        torch.testing.assert_close(a.embedding.weight, b.embedding.weight, rtol=0, atol=1e-3)
    ids = torch.randint(3, 259, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(two(input_ids=ids).logits, one(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_cli_under_torchrun_with_bf16_and_checkpointing(tmp_path):
    """The documented launch: `torchrun --nproc_per_node 2 scripts/train.py ...` (accelerate launch uses it too)."""
    corpus = write_tiny_corpus(tmp_path, num_docs=20, chars=1500)
    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
        str(ROOT / "scripts" / "train.py"), "--model", "tiny-engram-moe", "--dataset", str(corpus),
        "--seq-len", "32", "--batch-size", "2", "--max-steps", "3", "--eval-every", "3", "--eval-batches", "1",
        "--save-every", "3", "--log-every", "1", "--bf16", "--gradient-checkpointing", "--set", "router_bias_update_speed=0.01",
        "--output-dir", str(out), "--no-progress",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es) on cpu" in result.stdout
    shards = sorted(p.name for p in (out / "checkpoints" / "step-00000003").glob("tables-*"))
    assert shards == ["tables-rank00000-of-00002.pt", "tables-rank00001-of-00002.pt"]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
    assert (out / "loss_curve.png").stat().st_size > 10_000
    assert json.loads((out / "final" / "train_config.json").read_text())["bf16"] is True
    model = EngramMoEForCausalLM.from_pretrained(out / "final")
    assert all(isinstance(layer.embedding, nn.Embedding) for layer in model.model.engram_layers)


def test_clip_grad_norm_matches_torch_on_one_process():
    torch.manual_seed(0)
    model = EngramMoEForCausalLM._from_config(get_preset("tiny-engram-moe"), experts_implementation="eager")
    reference = EngramMoEForCausalLM._from_config(
        get_preset("tiny-engram-moe"), experts_implementation="eager"
    )
    reference.load_state_dict(model.state_dict())
    shard_engram_tables(model)  # one process: the shards are the whole tables
    ids = torch.randint(3, 259, (2, 16), generator=torch.Generator().manual_seed(1))
    for m in (model, reference):
        m(input_ids=ids, labels=ids).loss.backward()
    ours = clip_grad_norm_(model, 0.5)
    theirs = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    torch.testing.assert_close(ours, theirs)
    assert ours > 0.5  # clipping happened
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_two_process_checkpoint_resumes_on_one_process(two_process_run, tmp_path):
    """Shards are stored with their row ranges: one process reassembles both and continues the same run."""
    out, corpus, reports = two_process_run
    resumed_dir = tmp_path / "one"
    shutil.copytree(out / "run", resumed_dir)
    shutil.rmtree(resumed_dir / "checkpoints" / "step-00000004")
    (resumed_dir / "checkpoints" / "latest").write_text("step-00000002\n")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        resumed = train(
            tiny_config(corpus, resumed_dir, batch_size=4, max_steps=4, save_every=2, resume=True)
        )
    finally:
        torch.set_num_threads(threads)
    assert sorted(resumed.losses) == [3, 4]
    for step in (3, 4):
        assert resumed.losses[step] == pytest.approx(reports[0]["losses"][str(step)], rel=1e-5)
