"""RunSummary: which metrics get a best value."""

from __future__ import annotations

import pytest

from genlab.callbacks import is_lower_better


@pytest.mark.parametrize(
    "key", ["val/loss", "val/nelbo", "val/bpd", "val/bpt", "val/ppl", "val/recon",
            "val/fid_randconv_1000", "val/fid_inception_50000"],
)
def test_lower_is_better_metrics(key):
    assert is_lower_better(key)


@pytest.mark.parametrize("key", ["val/kl", "val/d_loss", "val/g_loss", "val/d_real"])
def test_metrics_without_direction(key):
    assert not is_lower_better(key)
