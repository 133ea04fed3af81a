"""Predict with a fine-tuned model: the top classes by name for texts or image files.

    python -m experiments.predict --workdir runs/minilm_wordnet_lpft "a large cat of the savannah" "a sweet dessert"
    python -m experiments.predict --workdir runs/fm path/to/shoe.png --top 3

Reads `<workdir>/export` (written by experiments.finetune: the model with its head and label names, the tokenizer,
and how inputs were preprocessed) — the same model `load_pretrained` gives back from that folder.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from experiments.cli import positive_int


def load(workdir: str):
    """(loaded model, label names, input description, tokenizer or None) from a job's export folder."""
    import tljax.models as tm
    from tljax.job import DATA_FILE, EXPORT

    folder = Path(workdir) / EXPORT
    if not (folder / DATA_FILE).is_file():
        raise SystemExit(f"{folder} is not a finished job's export (no {DATA_FILE}): run experiments.finetune first")
    loaded = tm.load_pretrained(folder)
    inputs = json.loads((folder / DATA_FILE).read_text())
    labels = [loaded.hf_config.id2label[i] for i in range(len(loaded.hf_config.id2label))]
    tokenizer = tm.load_tokenizer(folder) if inputs["kind"] == "text" else None
    return loaded, labels, inputs, tokenizer


def batches(items: list[str], inputs: dict, tokenizer, batch_size: int = 32):
    """Model batches for raw texts or image paths, preprocessed as in training (evaluation mode)."""
    from tljax import data

    if inputs["kind"] == "text":
        batcher = data.TextBatcher(
            tokenizer, inputs["max_length"], tuple(inputs.get("eval_buckets") or inputs["buckets"])
        )
        records = [{"text": t} for t in items]
        collate = batcher
    else:
        from tljax.data.images import decode_image

        pre = data.ImagePreprocess(size=inputs["size"], mean=tuple(inputs["mean"]), std=tuple(inputs["std"]),
                                   crop_pct=inputs["crop_pct"], resample=inputs["resample"],
                                   rescale_factor=inputs["rescale_factor"])  # fmt: skip
        # the job's evaluation transform on each decoded file (resize or crop, then normalise); the label is unused
        records = [{"pixel_values": pre({"image": decode_image(p), "label": -1})["pixel_values"]} for p in items]
        collate = data.stack
    for i in range(0, len(records), batch_size):
        yield dict(collate(records[i : i + batch_size]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="a finished experiments.finetune work directory")
    parser.add_argument("--top", type=positive_int, default=3, help="classes to show per input")
    parser.add_argument("inputs", nargs="+", help="texts (text models) or image paths (image models)")
    args = parser.parse_args(argv)
    from tljax import evaluation

    loaded, labels, inputs, tokenizer = load(args.workdir)
    preds = evaluation.predict(loaded, batches(args.inputs, inputs, tokenizer), label_names=labels, top_k=args.top)
    for i, item in enumerate(args.inputs):
        top = " | ".join(f"{name} {p:.3f}" for name, p in preds.top_classes(i))
        print(f"{item[:60]!r}: {top}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
