"""transformers.Trainer trains the tiny preset on CPU with the paper's optimizer groups."""

import torch
from conftest import build_model
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

from engram_moe import engram_param_groups
from engram_moe.optim import engram_table_parameter_names


class RepeatingText(Dataset):
    """A short token pattern repeated: learnable in a few dozen steps."""

    def __init__(self, n=64, length=32):
        pattern = torch.randint(3, 512, (12,), generator=torch.Generator().manual_seed(0))
        self.rows = [pattern.repeat(4)[i % 12 : i % 12 + length] for i in range(n)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


def test_param_groups_follow_the_paper(tiny_model):
    groups = {g["name"]: g for g in engram_param_groups(tiny_model, lr=1e-3, weight_decay=0.1)}
    tables = engram_table_parameter_names(tiny_model)
    assert tables == {"model.layers.1.engram.embedding.weight", "model.layers.2.engram.embedding.weight"}
    assert groups["engram_tables"]["lr"] == 5e-3 and groups["engram_tables"]["weight_decay"] == 0.0
    assert len(groups["engram_tables"]["params"]) == 2
    assert groups["backbone"]["weight_decay"] == 0.1
    no_decay = {id(p) for p in groups["backbone_no_decay"]["params"]}
    for name, param in tiny_model.named_parameters():
        if "norm" in name or param.ndim < 2:
            assert id(param) in no_decay, name
    counted = sum(len(g["params"]) for g in groups.values())
    assert counted == sum(1 for p in tiny_model.parameters() if p.requires_grad)


def test_frozen_parameters_are_left_out(tiny_model):
    for name, param in tiny_model.named_parameters():
        param.requires_grad = "engram.embedding" in name
    groups = engram_param_groups(tiny_model, lr=1e-3)
    assert [g["name"] for g in groups] == ["engram_tables"]


def test_trainer_reduces_the_loss(tmp_path):
    model = build_model("tiny-engram-moe")
    data = RepeatingText()
    optimizer = torch.optim.AdamW(engram_param_groups(model, lr=3e-3, weight_decay=0.01))
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=8,
        max_steps=30,
        logging_steps=10,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None))
    model.eval()
    with torch.no_grad():
        before = model(data[0]["input_ids"][None], labels=data[0]["labels"][None]).loss.item()
    trainer.train()
    model.eval()
    with torch.no_grad():
        after = model(data[0]["input_ids"][None], labels=data[0]["labels"][None]).loss.item()
    assert after < 0.5 * before, (before, after)
