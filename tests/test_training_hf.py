"""Fine-tuning with transformers.Trainer and PEFT: EngramTrainer, LoRA round trip, memory-only training."""

import pytest
import torch
from helpers_training import one_thread, write_tiny_corpus  # noqa: F401
from transformers import TrainingArguments

from engram_moe import EngramMoEForCausalLM, get_preset
from engram_moe.optim import engram_table_parameter_names
from engram_moe.training.data import ByteTokenizer, load_documents
from engram_moe.training.hf import (
    EngramTrainer,
    PackedBlocks,
    RouterBiasUpdateCallback,
    engram_lora_config,
    train_only_engram_tables,
)

pytestmark = pytest.mark.usefixtures("one_thread")

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    corpus = write_tiny_corpus(tmp_path_factory.mktemp("corpus"), num_docs=20, chars=1500)
    return PackedBlocks.from_texts(load_documents(str(corpus)), ByteTokenizer(), seq_len=32, eos_token_id=0)


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    return EngramMoEForCausalLM._from_config(
        get_preset("tiny-engram-moe", **overrides), experts_implementation="eager"
    )


def _args(tmp_path, **overrides):
    values = dict(
        output_dir=str(tmp_path),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        weight_decay=0.1,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def test_engram_trainer_uses_the_paper_groups_and_balances_routers(tmp_path, datasets):
    speed = 0.01
    model = _model(router_bias_update_speed=speed)
    train_ds, val_ds = datasets
    tables_before = {
        n: p.detach().clone() for n, p in model.named_parameters() if n in engram_table_parameter_names(model)
    }
    trainer = EngramTrainer(model=model, args=_args(tmp_path), train_dataset=train_ds, eval_dataset=val_ds)
    assert any(isinstance(cb, RouterBiasUpdateCallback) for cb in trainer.callback_handler.callbacks)
    trainer.train()
    groups = {g["name"]: g for g in trainer.optimizer.param_groups}
    assert set(groups) == {"backbone", "backbone_no_decay", "engram_tables"}
    assert groups["engram_tables"]["initial_lr"] == pytest.approx(5 * 3e-3)
    assert groups["backbone"]["initial_lr"] == pytest.approx(3e-3)
    assert groups["engram_tables"]["weight_decay"] == 0.0 and groups["backbone"]["weight_decay"] == 0.1
    for name, before in tables_before.items():
        assert not torch.equal(before, model.get_parameter(name))
    # One sign step of `speed` per optimizer step: biases are multiples of speed, within 4 steps' reach.
    for layer in model.model.layers[1:]:
        bias = layer.mlp.gate.e_score_correction_bias
        torch.testing.assert_close(bias / speed, (bias / speed).round())
        assert bias.abs().max() <= 4 * speed + 1e-6 and bias.abs().sum() > 0
    assert trainer.evaluate()["eval_loss"] < 6.0  # from ln(512) = 6.24 at init


def test_memory_only_fine_tuning_changes_only_the_tables(tmp_path, datasets):
    model = _model()
    trainable = train_only_engram_tables(model)
    assert trainable == sorted(engram_table_parameter_names(model))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = EngramTrainer(model=model, args=_args(tmp_path), train_dataset=datasets[0])
    trainer.train()
    assert [g["name"] for g in trainer.optimizer.param_groups] == ["engram_tables"]
    for key, value in model.state_dict().items():
        changed = not torch.equal(before[key], value)
        assert changed == (key in trainable), key


def test_lora_adapter_saves_reloads_and_merges_with_identical_logits(tmp_path, datasets):
    from peft import PeftModel, get_peft_model

    model = get_peft_model(_model(), engram_lora_config(r=4, lora_alpha=8))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("self_attn.q_proj.lora_A" in n for n in trainable)
    assert any("mlp.experts" in n and "lora_B" in n for n in trainable)  # the 3-D expert weights
    assert not any("engram.embedding" in n for n in trainable)
    trainer = EngramTrainer(model=model, args=_args(tmp_path / "lora"), train_dataset=datasets[0])
    trainer.train()
    model.eval()
    ids = torch.randint(3, 259, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        base_logits = _model().eval()(input_ids=ids).logits
    assert (tuned - base_logits).abs().max() > 1e-3  # the adapter learned something

    model.save_pretrained(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    reloaded = PeftModel.from_pretrained(_model(), tmp_path / "adapter").eval()
    merged = reloaded.merge_and_unload().eval()
    assert isinstance(merged, EngramMoEForCausalLM)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, tuned, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(merged(input_ids=ids).logits, tuned, rtol=1e-5, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    again = EngramMoEForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=0, atol=0)


def test_lora_config_needs_a_target():
    with pytest.raises(ValueError, match="attention=True or experts=True"):
        engram_lora_config(attention=False, experts=False)
