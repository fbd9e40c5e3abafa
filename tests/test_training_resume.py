"""Resumable and safe runs (one process, in-process): kill-and-resume, the NaN guard, crash-safe saves."""

import json

import pytest
import torch
from helpers_training import one_thread, tiny_config, write_tiny_corpus  # noqa: F401

from engram_moe.training import checkpoint as checkpoint_module
from engram_moe.training.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from engram_moe.training.metrics import read_metrics
from engram_moe.training.pretrain import NonFiniteLossError, TrainHooks, build_model, build_optimizer, train
from engram_moe.training.sharding import shard_engram_tables

pytestmark = pytest.mark.usefixtures("one_thread")


class SimulatedKill(Exception):
    pass


def _kill_at(step_to_die: int):
    def hook(step, model):
        if step == step_to_die:
            raise SimulatedKill(step)

    return hook


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_tiny_corpus(tmp_path_factory.mktemp("corpus"))


# Gradient accumulation and the MoE balancing bias are on, so their state must survive the restart too.
RUN = dict(max_steps=6, grad_accum=2, batch_size=2, set={"router_bias_update_speed": 0.01})


@pytest.fixture(scope="module")
def uninterrupted(corpus, tmp_path_factory):
    with torch.random.fork_rng():
        torch.set_num_threads(1)
        return train(tiny_config(corpus, tmp_path_factory.mktemp("full"), **RUN))


def test_resume_after_kill_gives_the_uninterrupted_losses(corpus, tmp_path, uninterrupted):
    out = tmp_path / "killed"
    # Killed during step 5 (0-based 4): the last checkpoint is step 4, metrics already hold step 4's record.
    with pytest.raises(SimulatedKill):
        train(tiny_config(corpus, out, **RUN), TrainHooks(on_step_start=_kill_at(4)))
    assert latest_checkpoint(out).name == "step-00000004"
    torch.manual_seed(1234)  # the resumed run must restore the RNG itself
    resumed = train(tiny_config(corpus, out, resume=True, **RUN))
    assert sorted(resumed.losses) == [5, 6]
    for step in (5, 6):
        assert resumed.losses[step] == pytest.approx(uninterrupted.losses[step], rel=1e-6, abs=0)
    assert resumed.val_losses[6] == pytest.approx(uninterrupted.val_losses[6], rel=1e-6)
    # The balancing bias moved and was carried through the checkpoint.
    bias = resumed.model.model.layers[1].mlp.gate.e_score_correction_bias
    torch.testing.assert_close(bias, uninterrupted.model.model.layers[1].mlp.gate.e_score_correction_bias)
    assert bias.abs().sum() > 0
    # metrics.jsonl holds each step once, as if nothing had happened.
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_a_different_run(corpus, tmp_path, uninterrupted):
    with pytest.raises(ValueError, match="--seq-len"):
        train(tiny_config(corpus, uninterrupted.output_dir, resume=True, **{**RUN, "seq_len": 16}))
    with pytest.raises(ValueError, match="global micro-batch"):
        train(tiny_config(corpus, uninterrupted.output_dir, resume=True, **{**RUN, "batch_size": 4}))
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train(tiny_config(corpus, tmp_path / "empty", resume=True, **RUN))


def test_nan_guard_stops_the_run_and_keeps_the_last_checkpoint(corpus, tmp_path):
    out = tmp_path / "nan"

    def poison(step, model):
        if step == 3:  # before the 4th step: step-2 checkpoint exists
            with torch.no_grad():
                model.model.layers[0].self_attn.q_proj.weight.fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 4.*step-00000002.*--resume"):
        train(tiny_config(corpus, out, max_steps=6, eval_every=0), TrainHooks(on_step_start=poison))
    assert [p.name for p in list_checkpoints(out)] == ["step-00000002"]
    # The checkpoint is finite and loads.
    model, _ = build_model(tiny_config(corpus, out))
    shard_engram_tables(model)
    optimizer, scheduler = build_optimizer(model, tiny_config(corpus, out))
    state = load_checkpoint(latest_checkpoint(out), model, optimizer, scheduler)
    assert state["step"] == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_cli_reports_nan_with_exit_code_1(corpus, tmp_path, capsys):
    from engram_moe.cli.train import main

    # An absurd init scale overflows float32 in the first forward.
    code = main(
        [
            "--model",
            "tiny-engram-moe",
            "--tokenizer",
            "byte",
            "--dataset",
            str(corpus),
            "--seq-len",
            "32",
            "--batch-size",
            "2",
            "--max-steps",
            "2",
            "--output-dir",
            str(tmp_path / "cli"),
            "--no-progress",
            "--no-plot",
            "--set",
            "initializer_range=1e30",
            "--experts-implementation",
            "eager",
        ]
    )
    assert code == 1
    err = capsys.readouterr().err
    assert (
        "Stopped: training loss is" in err and "at step 1" in err and "no checkpoint was written yet" in err
    )


def test_crash_during_save_keeps_the_previous_checkpoint(corpus, tmp_path, monkeypatch, uninterrupted):
    out = tmp_path / "crash"
    real_write = checkpoint_module._write
    calls = {"n": 0}

    def crashing_write(path, obj):
        if path.parent.name == ".tmp-step-00000004":
            calls["n"] += 1
            if calls["n"] == 2:  # the table shard is on disk, model.pt is half-written
                path.write_bytes(b"partial")
                raise SimulatedKill("killed while writing the step-4 checkpoint")
        real_write(path, obj)

    monkeypatch.setattr(checkpoint_module, "_write", crashing_write)
    with pytest.raises(SimulatedKill):
        train(tiny_config(corpus, out, **RUN))
    monkeypatch.undo()
    root = out / "checkpoints"
    assert (root / ".tmp-step-00000004").is_dir()  # the interrupted save, never committed
    assert latest_checkpoint(out).name == "step-00000002"
    assert json.loads((root / "step-00000002" / "trainer_state.json").read_text())["step"] == 2
    # Resuming uses step 2, cleans up the partial folder at its next save, and ends where the clean run ends.
    resumed = train(tiny_config(corpus, out, resume=True, **RUN))
    assert sorted(resumed.losses) == [3, 4, 5, 6]
    assert resumed.losses[6] == pytest.approx(uninterrupted.losses[6], rel=1e-6)
    assert not (root / ".tmp-step-00000004").exists()
    assert [p.name for p in list_checkpoints(out)] == ["step-00000004", "step-00000006"]
