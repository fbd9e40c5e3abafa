"""The main job on an embedded default: build a small Engram-MoE, train it on CPU for a few minutes on the
embedded corpus, generate a sample, save it with its code, reload it through the Auto classes and check that
the reloaded model gives the same logits. Writes a loss curve and a gate heatmap next to the checkpoint."""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import EngramMoEForCausalLM, build_token_map, engram_param_groups, get_preset, token_map_config
from .data import load_default_tokenizer, load_embedded_corpus, pack_documents
from .modeling_engram import update_router_biases

GATE_PROBE = "Only Alexander the Great could tame the horse Bucephalus. The Milky Way is a galaxy."


@dataclass
class DemoArgs:
    preset: str = "small-engram-moe"
    steps: int = 150
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 2e-3
    warmup_steps: int = 15
    weight_decay: float = 0.1
    eval_batches: int = 8
    seed: int = 0
    output_dir: str = "outputs/demo"
    prompt: str = "Egypt.\nIntroduction - Background:"
    max_new_tokens: int = 40


def lr_at(step: int, args: DemoArgs) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < args.warmup_steps:
        return (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, batch_size: int) -> float:
    model.eval()
    losses = [model(batch, labels=batch).loss.item() for batch in blocks.split(batch_size)]
    model.train()
    return sum(losses) / len(losses)


def run_demo(args: DemoArgs) -> dict:
    torch.manual_seed(args.seed)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = load_default_tokenizer()
    token_map = build_token_map(tokenizer)
    config = get_preset(args.preset, **token_map_config(token_map, raw_pad_id=2))
    model = EngramMoEForCausalLM(config)
    if config.engram_layer_ids:
        model.set_engram_token_map(token_map)

    documents = load_embedded_corpus()
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(documents), generator=generator).tolist()
    val_docs = [documents[i] for i in order[:8]]
    train_docs = [documents[i] for i in order[8:]]
    train = pack_documents(train_docs, tokenizer, args.seq_len)
    val = pack_documents(val_docs, tokenizer, args.seq_len)[: args.eval_batches * args.batch_size]
    params = sum(p.numel() for p in model.parameters())
    print(
        f"{args.preset}: {params / 1e6:.1f}M parameters ({config.engram_table_parameters / 1e6:.1f}M in Engram "
        f"tables); {train.numel() / 1e6:.2f}M training tokens, {val.numel() / 1e3:.0f}k validation tokens"
    )

    optimizer = torch.optim.AdamW(engram_param_groups(model, lr=args.lr, weight_decay=args.weight_decay))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, args))
    history = {"step": [], "train_loss": [], "val_step": [], "val_loss": []}
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc="training", unit="step")
    for step in bar:
        index = torch.randint(0, train.shape[0], (args.batch_size,), generator=generator)
        batch = train[index]
        loss = model(batch, labels=batch).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {loss.item()} at step {step}; stopping.")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        update_router_biases(model)
        history["step"].append(step)
        history["train_loss"].append(loss.item())
        tokens_per_s = (step + 1) * batch.numel() / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tokens_per_s:,.0f}")
        if (step + 1) % max(1, args.steps // 5) == 0 or step + 1 == args.steps:
            history["val_step"].append(step)
            history["val_loss"].append(evaluate(model, val, args.batch_size))
    bar.close()

    model.eval()
    prompt = tokenizer(args.prompt, return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(
            **prompt, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    sample = tokenizer.decode(generated[0], skip_special_tokens=True)

    model_dir = out / "model"
    model.save_pretrained(model_dir)
    tokenizer.padding_side = "left"  # batched generation pads on the left
    tokenizer.save_pretrained(model_dir)
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        same = torch.equal(reloaded(generated).logits, model(generated).logits)
    if not same:
        raise RuntimeError("The reloaded model gives different logits than the trained one.")

    plots = save_plots(model, tokenizer, history, out)
    summary = {
        "args": asdict(args),
        "parameters": params,
        "engram_table_parameters": config.engram_table_parameters,
        "first_train_loss": history["train_loss"][0],
        "final_val_loss": history["val_loss"][-1],
        "seconds": time.perf_counter() - start,
        "sample": sample,
        "reload_identical_logits": same,
        "model_dir": str(model_dir),
        "plots": plots,
    }
    (out / "summary.json").write_text(json.dumps({**summary, "history": history}, indent=2))
    print(f"validation loss {history['val_loss'][0]:.3f} -> {history['val_loss'][-1]:.3f}")
    print(f"sample: {sample!r}")
    print(f"saved to {model_dir}; reloaded with AutoModelForCausalLM: identical logits")
    return summary


def save_plots(model, tokenizer, history: dict, out: Path) -> list[str]:
    """Loss curves and, for an Engram model, a heatmap of its gates over a probe sentence."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping plots (pip install engram-moe[train]).")
        return []
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(history["step"], history["train_loss"], label="train", alpha=0.7)
    ax.plot(history["val_step"], history["val_loss"], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=120)
    plt.close(fig)
    paths.append(str(out / "loss.png"))
    if model.config.engram_layer_ids:
        probe = tokenizer(GATE_PROBE, return_tensors="pt")
        with torch.no_grad():
            gates = model(**probe, output_engram_gates=True).engram_gates
        heat = torch.stack([g[0].mean(-1) for g in gates]).float().numpy()  # [layers, tokens], branch mean
        tokens = [tokenizer.decode([t]) for t in probe.input_ids[0]]
        fig, ax = plt.subplots(figsize=(max(6, len(tokens) * 0.45), 2 + len(gates) * 0.5))
        image = ax.imshow(heat, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_xticks(range(len(tokens)), tokens, rotation=90)
        ax.set_yticks(range(len(gates)), [f"layer {i}" for i in model.config.engram_layer_ids])
        fig.colorbar(image, ax=ax, label="Engram gate")
        fig.tight_layout()
        fig.savefig(out / "engram_gates.png", dpi=120)
        plt.close(fig)
        paths.append(str(out / "engram_gates.png"))
    return paths
