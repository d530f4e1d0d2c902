"""
The training order of a finite dataset as a function of the step alone.

Example number g of the run (counting over steps, micro-batches, ranks and rows) is item perm_e[g mod n] of
the dataset, where e = g // n is its epoch and perm_e a permutation seeded with seed + e. Nothing depends on
what ran before, so a run resumed at any step replays exactly the batches the uninterrupted run would have
seen, on any number of ranks with the same world size.
"""

import torch


class EpochOrder:
    def __init__(self, n, seed):
        self.n, self.seed, self._perm = n, seed, {}

    def __call__(self, g):
        """The dataset index of example number g."""
        epoch, i = divmod(g, self.n)
        if epoch not in self._perm:  # one epoch's permutation at a time
            self._perm = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))}
        return int(self._perm[epoch][i])

    def batch(self, step, micro, rank, world_size, grad_accum, batch_size):
        """The dataset indices of this rank's micro-batch `micro` of optimizer step `step`."""
        first = ((step * grad_accum + micro) * world_size + rank) * batch_size
        return [self(g) for g in range(first, first + batch_size)]
