"""Which samples a rank reads in an epoch, in which order, and how they are cut into batches.

The plan depends only on ``(num_samples, epoch, seed, shuffle, rank, world_size, policy)``, so every
rank computes its share without talking to the others, both backends read the same samples in the
same order, and a resumed run can skip exactly the samples it has already consumed.

The randomness of augmentation follows the same rule: :func:`sample_seeds` gives each sample of an
epoch a seed that depends only on ``(seed, epoch, data set index)``, and :func:`batch_seed` gives each
batch (Mixup/CutMix) one that depends only on ``(seed, epoch, position of the batch)``. How many worker
processes or decoder threads there are, and where a run was interrupted, cannot change them.
"""

from __future__ import annotations

import math

import numpy as np


def epoch_order(num_samples: int, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
    """The global sample order of ``epoch``: a permutation seeded by ``(seed, epoch)``, or identity."""
    if not shuffle:
        return np.arange(num_samples, dtype=np.int64)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch)])))
    return rng.permutation(num_samples).astype(np.int64)


def repeat(order: np.ndarray, repeats: int) -> np.ndarray:
    """Repeated augmentation (DeiT's ``RASampler``): each sample of ``order`` becomes ``repeats``
    adjacent copies, given as keys ``index * repeats + copy`` (``key // repeats`` is the data set index;
    the key seeds the copy's augmentation). Sharding then sends the copies of a sample to consecutive
    ranks, as DeiT's sampler does."""
    if repeats == 1:
        return order
    return (order[:, None] * repeats + np.arange(repeats, dtype=np.int64)).reshape(-1)


def samples_per_rank(num_samples: int, world_size: int, policy: str) -> int:
    if policy == "pad":
        return math.ceil(num_samples / world_size)
    return num_samples // world_size


def shard(order: np.ndarray, rank: int, world_size: int, policy: str) -> tuple[np.ndarray, np.ndarray]:
    """This rank's samples of an epoch order and a flag per sample that marks padding.

    ``pad``: the order is extended to a multiple of ``world_size`` by repeating its first samples
    (cyclically, if there are fewer samples than ranks); the repeats are flagged. ``drop``: the
    order is cut to a multiple of ``world_size``. Rank ``r`` then takes positions ``r, r+W, ...``.
    """
    n = len(order)
    per = samples_per_rank(n, world_size, policy)
    if per == 0:
        raise ValueError(f"shard_policy='drop' with {n} samples and world_size={world_size} leaves nothing")
    total = per * world_size
    if total >= n:
        full = np.resize(order, total)  # cyclic repeat
        pad = np.arange(total) >= n
    else:
        full = order[:total]
        pad = np.zeros(total, dtype=bool)
    return full[rank::world_size], pad[rank::world_size]


def num_batches(n: int, batch_size: int, drop_last: bool) -> int:
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def batch_slices(n: int, batch_size: int, drop_last: bool, start: int = 0) -> list[tuple[int, int]]:
    """``(begin, end)`` of each batch of a rank's ``n`` samples, from sample ``start`` on."""
    stop = num_batches(n, batch_size, drop_last) * batch_size
    return [(b, min(b + batch_size, n)) for b in range(start, min(stop, n), batch_size)]


def _mix64(x: np.ndarray) -> np.ndarray:
    """A bijective 64-bit mixing function (the splitmix64 finaliser), element-wise on uint64."""
    x = x.astype(np.uint64, copy=True)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def _key(seed: int, epoch: int, stream: int) -> np.uint64:
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int(epoch), stream]).generate_state(1, np.uint64)
    return state[0]


def sample_seeds(seed: int, epoch: int, indices) -> np.ndarray:
    """The augmentation seed (uint64) of each data set index (or repeated-augmentation key, see
    :func:`repeat`) in ``indices`` for ``epoch``."""
    idx = np.asarray(indices, dtype=np.int64).astype(np.uint64)
    return _mix64(idx ^ _key(seed, epoch, 1))


def derived_seeds(seeds, stream: int) -> np.ndarray:
    """Independent seeds for another random step of the same samples (e.g. random erasing of view
    ``stream``), derived from their augmentation ``seeds``."""
    return _mix64(np.asarray(seeds, dtype=np.uint64) ^ _key(0, 0, 3 + int(stream)))


def batch_seed(seed: int, epoch: int, position: int) -> int:
    """The seed of the batch that starts at sample ``position`` of this rank's share of ``epoch``."""
    return int(_mix64(np.array([position], dtype=np.uint64) ^ _key(seed, epoch, 2))[0])
