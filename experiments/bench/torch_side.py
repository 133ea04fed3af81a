"""The PyTorch side of `bench peer`: transformers' BertForSequenceClassification / ViTForImageClassification
fine-tuned from the same folder, batch, loss and AdamW as the tljax worker, in a process of its own.

Frozen parameters get `requires_grad=False` (so autograd builds no backward pass below the lowest trainable block)
and no optimizer state. In bf16 (`peer.bf16`: on a GPU by default) the step runs under `torch.autocast(bfloat16)`
(on a CPU too with `--precision bf16`); otherwise in fp32, on CPU with torch's default thread count.
`python -m experiments.bench.torch_side '<spec json>'` serves `peer.serve`'s protocol.
"""

from __future__ import annotations

import json
import os
import re
import sys

from experiments.bench import peer


def _classes(kind: str):
    from transformers import BertConfig, BertForSequenceClassification, ViTConfig, ViTForImageClassification

    if kind == "text":
        return BertConfig, BertForSequenceClassification
    return ViTConfig, ViTForImageClassification


def with_checkpoint(s: dict, folder: str) -> dict:
    """The spec with its checkpoint folder: the real MiniLM-L6 for "minilm", else a random classification model
    built from the spec's HF config (seed 0) and saved under `folder`. Adds the fields batches need."""
    import torch

    from tljax.assets import minilm_path

    config_cls, model_cls = _classes(s["kind"])
    if s["config"] is None:
        path = str(minilm_path())
        config = config_cls.from_pretrained(path)
    else:
        path = os.path.join(folder, s["name"])
        config = config_cls(**s["config"], num_labels=s["classes"])
        torch.manual_seed(0)
        model_cls(config).save_pretrained(path)
    extra = {"vocab_size": config.vocab_size} if s["kind"] == "text" else {"patch_size": config.patch_size}
    extra.update(layers=config.num_hidden_layers, hidden=config.hidden_size, intermediate=config.intermediate_size)
    return {**s, **extra, "folder": path}


def trainable(name: str, mode: str, layers: int) -> bool:
    """Whether a torch parameter trains in `mode`, mirroring tljax's `rules.full / top_k(3) / linear_probe`: the
    classifier always; top3 adds the top blocks and what sits above them (BERT's pooler, ViT's final LayerNorm)."""
    if mode == "full" or name.startswith("classifier."):
        return True
    if mode == "head":
        return False
    block = re.search(r"\.(?:layer|layers)\.(\d+)\.", name)  # BERT: bert.encoder.layer.i; ViT (v5): vit.layers.i
    if block:
        return int(block.group(1)) >= layers - peer.TOP_K
    return bool(re.match(r"(bert\.pooler|vit\.layernorm)\.", name))


def _optimizer(model, mode: str, layers: int):
    """AdamW over the trainable parameters; no weight decay on biases and norms (tljax's `no_decay` default)."""
    import torch

    params = [(n, p) for n, p in model.named_parameters() if trainable(n, mode, layers)]
    no_decay = lambda n: n.endswith(".bias") or "LayerNorm" in n or "layernorm" in n
    groups = [
        {"params": [p for n, p in params if not no_decay(n)], "weight_decay": peer.OPTIMIZER["weight_decay"]},
        {"params": [p for n, p in params if no_decay(n)], "weight_decay": 0.0},
    ]
    o = peer.OPTIMIZER
    return torch.optim.AdamW(groups, lr=o["learning_rate"], betas=(o["b1"], o["b2"]), eps=o["eps"])


def load_model(s: dict):
    """The spec's checkpoint as a transformers classification model (attention dropout off where tljax's is)."""
    off = {"attention_probs_dropout_prob": 0.0} if peer.attention_dropout_off(s) else {}
    return _classes(s["kind"])[1].from_pretrained(s["folder"], num_labels=s["classes"], **off)


def torch_steps(s: dict, modes) -> dict:
    """mode -> a zero-argument function running one blocking train step (sets that mode's `requires_grad`)."""
    import contextlib

    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = load_model(s).to(device).train()
    batch = {k: torch.from_numpy(v).to(device) for k, v in peer.make_batch(s).items()}
    batch["labels"] = batch["labels"].long()
    bf16 = peer.bf16(s, device.type)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    steps = {}
    for mode in modes:
        opt = _optimizer(model, mode, s["layers"])
        flags = {n: trainable(n, mode, s["layers"]) for n, _ in model.named_parameters()}

        def one(opt=opt, flags=flags):
            for n, p in model.named_parameters():
                p.requires_grad_(flags[n])
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = model(**batch).loss
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize()

        steps[mode] = one
    return steps


def torch_gemm(s: dict) -> tuple:
    """`peer.gemm_shape`'s product as the torch step computes it (bf16 where it autocasts), for `peer.repeated`."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if peer.bf16(s, device.type) else torch.float32
    m, k, n = peer.gemm_shape(s)
    generator = torch.Generator().manual_seed(0)
    x, w = (torch.randn(shape, generator=generator).to(device, dtype) for shape in ((m, k), (k, n)))
    finish = (lambda _: torch.cuda.synchronize()) if device.type == "cuda" else (lambda _: None)
    return peer.repeated(lambda: torch.matmul(x, w), finish, 2 * m * k * n)


if __name__ == "__main__":
    import torch

    _s = json.loads(sys.argv[1])
    if _s["threads"] != "default":
        torch.set_num_threads(int(_s["threads"]))
    _platform = "cuda" if torch.cuda.is_available() else "cpu"
    _gemm, _gemm_flops = torch_gemm(_s)
    peer.serve(
        {**torch_steps(_s, _s["modes"]), peer.GEMM: _gemm},
        {
            "version": torch.__version__,
            "threads": torch.get_num_threads(),
            "precision": peer.precision_name(_s, _platform, "torch"),
            "gemm_flops": _gemm_flops,
        },
    )
