"""Time text generation with and without the KV cache of lightning_modules/nets/transformer.py.

    python benchmarks/generation_speed.py
    python benchmarks/generation_speed.py --tokens 2000 --block-sizes 64 256 1024 --threads 1 2

The network has the size of experiment=embedded_gpt (4 layers, 4 heads, width 128) and a
65-token vocabulary, with random weights: the time per token does not depend on the
weights. Each configuration generates --tokens tokens after a one-token prompt, batch size
1, --repeats times after one warm-up, and the median time is reported. Sampling is greedy,
so the cached and uncached runs must give the same tokens, which the script checks.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightning_modules.nets.transformer import Transformer, TransformerConfig


def time_generation(
    net: Transformer, tokens: int, use_cache: bool, repeats: int
) -> tuple[float, torch.Tensor]:
    """Return the median seconds of `repeats` greedy generations of `tokens` tokens, and the ids."""
    prompt = torch.zeros(1, 1, dtype=torch.int64)
    net.generate(prompt, min(tokens, 50), temperature=0, use_cache=use_cache)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        ids = net.generate(prompt, tokens, temperature=0, use_cache=use_cache)
        times.append(time.perf_counter() - start)
    return statistics.median(times), ids


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1000, help="tokens generated per run")
    parser.add_argument(
        "--block-sizes", type=int, nargs="+", default=[64, 1024], help="context lengths to test"
    )
    parser.add_argument(
        "--threads", type=int, nargs="+", default=[torch.get_num_threads()], help="torch threads"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per configuration")
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {args.tokens} tokens, median of {args.repeats} runs")
    print("block_size  threads  cached s  uncached s  speed-up  cached tokens/s  same tokens")
    for block_size in args.block_sizes:
        torch.manual_seed(0)
        config = TransformerConfig(
            vocab_size=65, block_size=block_size, n_layer=4, n_head=4, n_embd=128
        )
        net = Transformer(config).eval()
        for threads in args.threads:
            torch.set_num_threads(threads)
            cached, cached_ids = time_generation(net, args.tokens, True, args.repeats)
            uncached, uncached_ids = time_generation(net, args.tokens, False, args.repeats)
            same = torch.equal(cached_ids, uncached_ids)
            print(
                f"{block_size:>10}  {threads:>7}  {cached:>8.2f}  {uncached:>10.2f}"
                f"  {uncached / cached:>7.1f}x  {args.tokens / cached:>15.0f}  {same}"
            )


if __name__ == "__main__":
    main()
