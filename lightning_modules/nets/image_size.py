"""Depth of the convolutional image networks as a function of the image size.

The image networks in this package go from a small s0 x s0 feature map to the full image
by doubling the side k times (and back down by halving it), so they accept any side
s0 * 2**k with a base s0 between MIN_BASE_SIZE and MAX_BASE_SIZE and k >= 1:
8, 16, 32, 64, 128 (s0 = 4), 28 and 56 (s0 = 7), 12, 24, 48 (s0 = 6), 20, 40 (s0 = 5).
"""

from __future__ import annotations

MIN_BASE_SIZE = 4
MAX_BASE_SIZE = 7


def base_size_and_depth(image_size: int) -> tuple[int, int]:
    """Split `image_size` into (s0, k) with image_size = s0 * 2**k, s0 in [4, 7] and k >= 1.

    Raises ValueError for a size that has no such form, such as 18 (9 * 2) or 36 (9 * 4).
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size!r}")

    base, depth = image_size, 0
    while base % 2 == 0 and base // 2 >= MIN_BASE_SIZE:
        base //= 2
        depth += 1

    if depth == 0 or base > MAX_BASE_SIZE:
        raise ValueError(
            f"unsupported image_size {image_size}: the convolutional networks need a size "
            f"s0 * 2**k with s0 between {MIN_BASE_SIZE} and {MAX_BASE_SIZE} and k >= 1, "
            f"such as 8, 16, 28, 32 or 64. Set data.image_size to one of these; the data "
            f"module resizes every image to it."
        )
    return base, depth
