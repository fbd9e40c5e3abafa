"""Training data (documents, packing, split, deterministic order) and the CLI's flag errors."""

import json

import pytest
import torch
from helpers_training import write_tiny_corpus

from engram_moe import EngramMoEForCausalLM, get_preset
from engram_moe.cli.train import config_from_args
from engram_moe.training.data import ByteTokenizer, PackedData, load_documents, pack, prepare_data
from engram_moe.training.pretrain import TrainConfig, build_config, build_model


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "Engram: 100 km² of memory"
    ids = tok.encode(text)
    assert min(ids) >= 3 and max(ids) < tok.vocab_size == 259
    assert tok.decode(ids) == text


def test_text_jsonl_and_folder_documents(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\nline two\n\n\nsecond doc\n")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "third"}) + "\n" + json.dumps({"text": "fourth"}) + "\n"
    )
    assert load_documents(str(tmp_path / "a.txt")) == ["first doc\nline two", "second doc"]
    assert load_documents(str(tmp_path / "b.jsonl")) == ["third", "fourth"]
    assert load_documents(str(tmp_path)) == ["first doc\nline two", "second doc", "third", "fourth"]
    assert load_documents(str(tmp_path), max_documents=1) == ["first doc\nline two"]
    with pytest.raises(ValueError, match="no column 'body'"):
        load_documents(str(tmp_path / "b.jsonl"), text_column="body")
    with pytest.raises(ValueError, match="does not exist"):
        load_documents(str(tmp_path / "missing.txt"))


def test_embedded_corpus_loads_without_datasets(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    docs = load_documents("embedded", max_documents=3)
    assert len(docs) == 3 and all(len(d) > 100 for d in docs)


def test_pack_concatenates_and_drops_the_tail():
    blocks = pack([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 4)
    assert blocks.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]


def test_split_is_by_document_and_seeded(tmp_path):
    tok = ByteTokenizer()
    docs = [f"<doc{i}> " * 8 for i in range(40)]
    a = prepare_data(docs, tok, 16, 0, val_fraction=0.1, seed=0)
    b = prepare_data(docs, tok, 16, 0, val_fraction=0.1, seed=0)
    c = prepare_data(docs, tok, 16, 0, val_fraction=0.1, seed=1)
    assert a.fingerprint == b.fingerprint != c.fingerprint
    torch.testing.assert_close(a.train, b.train)
    train_text, val_text = tok.decode(a.train.flatten().tolist()), tok.decode(a.val.flatten().tolist())
    val_docs = {f"<doc{i}>" for i in range(40) if f"<doc{i}>" in val_text}
    assert len(val_docs) >= 3 and not any(d in train_text for d in val_docs)
    with pytest.raises(ValueError, match="raise --val-fraction"):
        prepare_data(docs, tok, 512, 0, val_fraction=0.1)


def _data(num_blocks=10):
    return PackedData(
        torch.arange(num_blocks)[:, None].repeat(1, 4), torch.arange(5)[:, None].repeat(1, 4), 3, "x"
    )


def test_two_ranks_see_the_global_batch_of_one_process():
    data = _data()
    for micro in range(7):  # crosses epoch boundaries (10 blocks, 4 per global micro-batch)
        one = data.train_indices(micro, 0, 1, 4)
        two = torch.cat([data.train_indices(micro, r, 2, 2) for r in range(2)])
        assert one.tolist() == two.tolist()


def test_every_block_once_per_epoch_and_epochs_differ():
    data = _data()
    stream = torch.cat([data.train_indices(m, 0, 1, 5) for m in range(4)])  # two epochs of 10
    assert sorted(stream[:10].tolist()) == list(range(10)) == sorted(stream[10:].tolist())
    assert stream[:10].tolist() != stream[10:].tolist()


def test_validation_batches_align_across_ranks():
    data = _data()
    per_rank = [list(data.val_batches(r, 2, 2)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 2  # 5 blocks, global batch 4: the last is topped up
    valid = torch.cat([torch.cat([v for _, v in per_rank[r]]) for r in range(2)])
    assert int(valid.sum()) == 5
    seen = sorted(int(row[0]) for r in range(2) for blocks, v in per_rank[r] for row in blocks[v])
    assert seen == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch-size", "0"], "--batch-size must be a positive integer, got 0"),
        (["--lr", "-1"], "--lr must be a positive number, got -1.0"),
        (["--val-fraction", "1.5"], "--val-fraction must be in (0, 1), got 1.5"),
        (["--max-steps", "ten"], "argument --max-steps: invalid int value: 'ten'"),
        (["--lr-schedule", "step"], "argument --lr-schedule: invalid choice: 'step'"),
        (["--set", "hidden_size"], "--set 'hidden_size' must look like KEY=VALUE"),
    ],
)
def test_bad_flags_name_the_flag_and_value(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        config_from_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_values_found_while_building_name_the_flag(tmp_path, capsys):
    from engram_moe.cli.train import main

    corpus = write_tiny_corpus(tmp_path, num_docs=4, chars=200)
    common = ["--dataset", str(corpus), "--output-dir", str(tmp_path / "run"), "--no-progress"]
    assert main(["--model", "no-such-preset", *common]) == 2
    assert "--model 'no-such-preset' is neither a preset" in capsys.readouterr().err
    assert main(["--model", "tiny-engram-moe", "--set", "hiden_size=8", *common]) == 2
    assert "'hiden_size' is not an EngramMoEConfig field" in capsys.readouterr().err
    assert main(["--model", "tiny-engram-moe", "--tokenizer", "smollm2", *common]) == 2
    assert "--tokenizer 'smollm2' has 49152 ids but the model's vocab_size is 512" in capsys.readouterr().err


def test_parquet_goes_through_datasets(tmp_path):
    pytest.importorskip("datasets")
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["alpha doc", "beta doc", "gamma doc"]}), tmp_path / "docs.parquet")
    assert load_documents(str(tmp_path / "docs.parquet"), text_column="body") == [
        "alpha doc",
        "beta doc",
        "gamma doc",
    ]


def test_model_from_preset_config_file_or_saved_folder(tmp_path):
    config = get_preset("tiny-engram-moe", hidden_size=32)
    config.to_json_file(tmp_path / "cfg.json")
    from_file, weights = build_config(str(tmp_path / "cfg.json"), {"router_bias_update_speed": 0.01})
    assert weights is None and from_file.hidden_size == 32 and from_file.router_bias_update_speed == 0.01
    assert from_file.engram_primes == config.engram_primes

    torch.manual_seed(3)
    saved = EngramMoEForCausalLM(config)
    saved.save_pretrained(tmp_path / "saved")
    model, tokenizer = build_model(TrainConfig(model=str(tmp_path / "saved"), seed=99))
    assert isinstance(tokenizer, ByteTokenizer)  # vocab 512, no tokenizer files in the folder
    for (name, a), b in zip(model.state_dict().items(), saved.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)  # loaded, not re-initialised with seed 99
