"""Metric names: which metrics are better when lower.

This module imports nothing heavy, so that tools which only read logs (compare.py) load fast.
"""

from __future__ import annotations

# Beginnings of the metric names (after "val/" or "test/") that are better when lower.
# "loss" must match exactly: a GAN's d_loss and g_loss do not fall steadily as the
# generator improves.
LOWER_IS_BETTER_PREFIXES = ("nelbo", "bpd", "bpt", "ppl", "recon", "fid", "kid", "nll")


def is_lower_better(key: str) -> bool:
    """Return whether the metric `key` (such as "val/fid_randconv_1000") is better when lower.

    Spreads of a metric (names ending in "_std") have no direction.
    """
    name = key.split("/", 1)[-1]
    if name.endswith("_std"):
        return False
    return name == "loss" or name.startswith(LOWER_IS_BETTER_PREFIXES)
