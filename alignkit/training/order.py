"""Which rows each step and each process draws: a seeded, resumable data order (a function of the seed and the
step, so a resumed run draws exactly what the uninterrupted one would).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from alignkit.config.base import TrainConfig
from alignkit.config.online import OnlineConfig


@dataclass
class DataOrder:
    """Which examples each optimizer step uses: a seeded stream of epoch permutations, no state to save.

    The permutations of epochs 0, 1, 2, ... are laid end to end and cut into steps of `rows_per_step` =
    batch_size x grad_accum x world rows, so no row is lost or repeated at an epoch boundary: a step that
    reaches the end of one epoch takes the rest of its rows from the next. Every step is full, so every
    process does the same work and the same collectives. Step s of a resumed run sees exactly the rows
    step s of the uninterrupted run saw.
    """

    n_examples: int
    batch_size: int
    grad_accum: int
    seed: int
    world: int = 1
    rank: int = 0
    shuffle: bool = True
    lengths: list[int] | None = None
    """Per-example lengths: when given (and shuffling), each step's rows are of similar length (see
    `group_by_length`), so padded batches waste little; None keeps the plain random order."""
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def rows_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.world

    @property
    def steps_per_epoch(self) -> float:
        """Optimizer steps one pass over the rows takes (a fraction when the last step spills over)."""
        return self.n_examples / self.rows_per_step

    def permutation(self, epoch: int) -> list[int]:
        if epoch not in self._cache:
            if len(self._cache) > 4:
                self._cache.clear()
            self._cache[epoch] = self._permutation(epoch)
        return self._cache[epoch]

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.n_examples))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.n_examples, generator=g).tolist()
        if self.lengths is None:
            return perm
        return group_by_length(perm, self.lengths, self.rows_per_step, g)

    def step_rows(self, step: int) -> list[int]:
        """The `rows_per_step` example indices of global step `step`, over all processes."""
        start = step * self.rows_per_step
        rows = []
        while len(rows) < self.rows_per_step:
            epoch, offset = divmod(start + len(rows), self.n_examples)
            need = self.rows_per_step - len(rows)
            rows += self.permutation(epoch)[offset : offset + need]
        return rows

    def micro_batches(self, step: int) -> list[list[int]]:
        """This process's `grad_accum` micro-batches (lists of example indices) for global step `step`."""
        return self.rank_micro_batches(step, self.rank)

    def rank_micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """Process `rank`'s micro-batches for step `step`: micro-batch m of every process is a slice of
        rows [m·bs·world, (m+1)·bs·world), so the rows of a step do not depend on how it is split."""
        rows = self.step_rows(step)
        per_micro = self.batch_size * self.world
        return [
            rows[m * per_micro + rank * self.batch_size : m * per_micro + (rank + 1) * self.batch_size]
            for m in range(self.grad_accum)
        ]


def group_by_length(perm: list[int], lengths: list[int], rows_per_step: int, g: torch.Generator) -> list[int]:
    """`perm` reordered so that each run of `rows_per_step` rows holds examples of similar length.

    As transformers' LengthGroupedSampler: the random permutation is cut into mega-batches of up to 50
    steps (at most a quarter of the data, so batches still mix differently every epoch), each is sorted
    by length, cut into steps, and the steps are shuffled. A step's micro-batches are then padded to
    nearly the same length instead of to the longest row of a random draw.
    """
    steps_per_mega = max(1, min(len(perm) // (4 * rows_per_step), 50))
    mega = steps_per_mega * rows_per_step
    full, partial = [], []
    for start in range(0, len(perm), mega):
        chunk = sorted(perm[start : start + mega], key=lambda i: -lengths[i])
        for s in range(0, len(chunk), rows_per_step):
            (full if len(chunk) - s >= rows_per_step else partial).append(chunk[s : s + rows_per_step])
    order = torch.randperm(len(full), generator=g).tolist()
    return [i for k in order for i in full[k]] + [i for step in partial for i in step]


def data_order(cfg: TrainConfig, n_examples: int, accelerator, lengths: list[int] | None = None) -> DataOrder:
    """The run's DataOrder for `n_examples` training examples (length-grouped when `lengths` is given)."""
    return DataOrder(
        n_examples,
        cfg.batch_size,
        cfg.grad_accum,
        cfg.seed,
        accelerator.num_processes,
        accelerator.process_index,
        cfg.shuffle,
        lengths,
    )


def used_indices(cfg: TrainConfig, n_examples: int, accelerator) -> list[int]:
    """Indices of the training examples the run's steps will visit on any process (all of them once the
    run covers an epoch; fewer when max_steps stops early), so one-off passes skip rows never trained on.
    The same list on every process."""
    order = data_order(cfg, n_examples, accelerator)
    steps = total_steps(cfg, order)
    if steps * order.rows_per_step >= n_examples:
        return list(range(n_examples))
    return sorted({i for s in range(steps) for i in order.step_rows(s)})


def total_steps(cfg: TrainConfig, order: DataOrder) -> int:
    """max_steps, or enough steps for `epochs` passes over the rows (the last one topped up)."""
    if order.n_examples < order.rows_per_step:
        raise ValueError(
            f"{order.n_examples} training examples are fewer than one optimizer step needs "
            f"(batch_size x grad_accum x processes = {order.rows_per_step}); lower batch_size"
        )
    if cfg.max_steps > 0:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * order.steps_per_epoch - 1e-9))


def minibatches(n: int, cfg: OnlineConfig, seed: int) -> list[list[list[int]]]:
    """Every optimizer step of one rollout of n rows: `ppo_epochs` passes, each a seeded shuffle cut into
    minibatches of `minibatch_size` rows, each cut into `grad_accum` micro-batches (lists of rows).

    The shuffle's seed is reduced modulo 2**64 (a step's seed times 1_000_003 passes it above seed
    ~18,282); the CPU generator reads only its low 32 bits, which the reduction keeps."""
    size = cfg.minibatch_size or n
    micro = size // cfg.grad_accum
    steps = []
    for epoch in range(cfg.ppo_epochs):
        if cfg.ppo_epochs == 1 and size == n:
            order = list(range(n))
        else:
            order = torch.randperm(
                n, generator=torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**64)
            ).tolist()
        for start in range(0, n, size):
            rows = order[start : start + size]
            steps.append([rows[m : m + micro] for m in range(0, size, micro)])
    return steps
