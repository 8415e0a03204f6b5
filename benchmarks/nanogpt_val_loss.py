"""Compute a nanoGPT checkpoint's loss on the whole shakespeare_char validation split.

nanoGPT's train.py reports the mean loss of `eval_iters` random validation batches. This
script scores the checkpoint the way genlab's GPT computes val/loss. Every validation
token except the first is a target exactly once, in consecutive chunks of block_size
(datamodules.text.ValidationChunks). The loss is the summed cross-entropy divided by the
number of targets. Run it from anywhere with the project's Python:

    python benchmarks/nanogpt_val_loss.py /path/to/nanoGPT \
        --checkpoint /path/to/nanoGPT/out-shakespeare-char/ckpt.pt

It imports model.py from the nanoGPT checkout and reads
data/shakespeare_char/val.bin there (written by data/shakespeare_char/prepare.py).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from datamodules.text import IGNORE_INDEX, ValidationChunks, pad_collate  # noqa: E402

# nanoGPT's cross-entropy skips targets equal to -1.
NANOGPT_IGNORE_INDEX = -1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("nanogpt_dir", type=Path, help="nanoGPT checkout (contains model.py)")
    parser.add_argument(
        "--checkpoint", type=Path, help="default: <nanogpt_dir>/out-shakespeare-char/ckpt.pt"
    )
    parser.add_argument("--batch-size", type=int, default=256, help="chunks per forward pass")
    args = parser.parse_args()

    sys.path.insert(0, str(args.nanogpt_dir))
    from model import GPT, GPTConfig  # nanoGPT's model.py

    checkpoint_path = args.checkpoint or args.nanogpt_dir / "out-shakespeare-char" / "ckpt.pt"
    # nanoGPT checkpoints store their config as a dict and need the full unpickler.
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    model = GPT(GPTConfig(**checkpoint["model_args"]))
    state = {key.removeprefix("_orig_mod."): value for key, value in checkpoint["model"].items()}
    model.load_state_dict(state)
    model.eval()

    val_path = args.nanogpt_dir / "data" / "shakespeare_char" / "val.bin"
    val_tokens = torch.from_numpy(np.fromfile(val_path, dtype=np.uint16).astype(np.int64))
    block_size = checkpoint["model_args"]["block_size"]
    loader = DataLoader(
        ValidationChunks(val_tokens, block_size), batch_size=args.batch_size, collate_fn=pad_collate
    )

    loss_sum, num_targets = 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            # nanoGPT returns the logits of every position only when targets are given.
            logits, _ = model(x, y.masked_fill(y == IGNORE_INDEX, NANOGPT_IGNORE_INDEX))
            loss_sum += F.cross_entropy(
                logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            ).item()
            num_targets += int((y != IGNORE_INDEX).sum())

    loss = loss_sum / num_targets
    print(f"checkpoint: {checkpoint_path} (iteration {checkpoint['iter_num']})")
    estimate = float(checkpoint["best_val_loss"])
    print(f"nanoGPT's own estimate of the validation loss: {estimate:.4f}")
    print(f"whole-split validation loss: {loss:.4f} over {num_targets} targets")
    print(f"perplexity {math.exp(loss):.3f}, bits per token {loss / math.log(2):.4f}")


if __name__ == "__main__":
    main()
