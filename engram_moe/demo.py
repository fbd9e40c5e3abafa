"""The main job on an embedded default: build a small Engram-MoE, train it on CPU for a few minutes on the
embedded corpus with `engram-train`'s loop, generate a sample, reload the saved folder through the Auto classes
and check that it gives the same logits, and draw the Engram gates over a probe sentence."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .training import TrainConfig, train

GATE_PROBE = "Only Alexander the Great could tame the horse Bucephalus. The Milky Way is a galaxy."


@dataclass
class DemoArgs:
    preset: str = "small-engram-moe"
    steps: int = 150
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 2e-3
    warmup_steps: int = 15
    eval_batches: int = 8
    seed: int = 0
    output_dir: str = "outputs/demo"
    prompt: str = "Egypt.\nIntroduction - Background:"
    max_new_tokens: int = 40


def run_demo(args: DemoArgs) -> dict:
    result = train(
        TrainConfig(
            model=args.preset,
            tokenizer="smollm2",
            dataset="embedded",
            max_steps=args.steps,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            lr=args.lr,
            warmup_steps=args.warmup_steps,
            eval_every=max(1, args.steps // 5),
            eval_batches=args.eval_batches,
            save_every=0,
            seed=args.seed,
            output_dir=args.output_dir,
            cpu=True,
        )
    )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final_dir = result.final_dir
    tokenizer = AutoTokenizer.from_pretrained(final_dir)
    model = result.model.eval()
    prompt = tokenizer(args.prompt, return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(
            **prompt, max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    sample = tokenizer.decode(generated[0], skip_special_tokens=True)

    reloaded = AutoModelForCausalLM.from_pretrained(final_dir).eval()
    with torch.no_grad():
        same = torch.equal(reloaded(generated).logits, model(generated).logits)
    if not same:
        raise RuntimeError(
            f"The model reloaded from {final_dir} gives different logits than the trained one."
        )

    out = Path(args.output_dir)
    gate_plot = save_gate_heatmap(reloaded, tokenizer, out / "engram_gates.png")
    val = result.val_losses
    summary = {
        "args": asdict(args),
        "first_val_loss": val[min(val)],
        "final_val_loss": val[max(val)],
        "sample": sample,
        "reload_identical_logits": same,
        "model_dir": str(final_dir),
        "plots": [str(p) for p in (out / "loss_curve.png", gate_plot) if p is not None and Path(p).exists()],
        "train": result.summary,
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"validation loss {summary['first_val_loss']:.3f} (step {min(val)}) -> {summary['final_val_loss']:.3f}"
    )
    print(f"sample: {sample!r}")
    print(f"saved to {final_dir}; reloaded with AutoModelForCausalLM: identical logits")
    print(f"plots: {', '.join(summary['plots'])}")
    return summary


def save_gate_heatmap(model, tokenizer, path: Path) -> Path | None:
    """The gate of every Engram layer (mean over residual branches) over a probe sentence, as a PNG."""
    if not model.config.engram_layer_ids:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no gate heatmap (pip install engram-moe[train]).")
        return None
    probe = tokenizer(GATE_PROBE, return_tensors="pt")
    with torch.no_grad():
        gates = model(**probe, output_engram_gates=True).engram_gates
    heat = torch.stack([g[0].mean(-1) for g in gates]).float().numpy()  # [Engram layers, tokens]
    tokens = [tokenizer.decode([t]) for t in probe.input_ids[0]]
    fig, ax = plt.subplots(figsize=(max(6, len(tokens) * 0.45), 2 + len(gates) * 0.5))
    image = ax.imshow(heat, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(tokens)), tokens, rotation=90)
    ax.set_yticks(range(len(gates)), [f"layer {i}" for i in model.config.engram_layer_ids])
    fig.colorbar(image, ax=ax, label="Engram gate")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
