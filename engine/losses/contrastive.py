"""Contrastive representation distillation (Tian et al., ICLR 2020).

The student and the teacher each embed an image (a linear head, then L2 normalisation); a memory
bank per network keeps a running embedding of every training image. Each network's embedding is
the anchor against the other's bank: the same image's row is the positive, `negatives` distinct
random rows of other classes the negatives (the reference's default), scored by noise-contrastive estimation. Like RKD and SP it reads each
network's last stage (the classifier's input), global-average-pooled when it is a map: the
reference reads the penultimate layer, which in its CIFAR networks is that pooled vector.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.config import KDConfig
from engine.losses import Batch, LossContext, register
from engine.losses.feature import FeatureLoss
from engine.losses.relation import _last_stages, pooled

# The trainer's own generator is seeded with the run's seed; a fixed offset keeps the negatives'
# stream from repeating its draws.
_SEED_OFFSET = 0x637264 << 32


def nce_loss(log_p: torch.Tensor, num_train: int) -> torch.Tensor:
    """Eq. 18 of the paper, averaged over the anchors. `log_p` [B, 1 + K]: log(exp(<v, m> / T) / Z)
    for the positive (first) and K negatives; the noise is uniform, P_n = 1 / num_train. With
    D = P / (P + K P_n), the loss is -(log D(positive) + sum over negatives of log(1 - D)).
    In log space, so that a small temperature cannot overflow exp."""
    log_noise = math.log((log_p.shape[1] - 1) / num_train)  # log(K * P_n)
    pos = -F.softplus(log_noise - log_p[:, 0])  # log D
    neg = -F.softplus(log_p[:, 1:] - log_noise)  # log(1 - D)
    return -(pos.sum() + neg.sum()) / len(log_p)


@torch.no_grad()
def update_bank(bank: torch.Tensor, rows: torch.Tensor, v: torch.Tensor, momentum: float,
                in_place: bool = True) -> torch.Tensor:
    """The rows seen this step move towards their new embeddings and stay on the unit sphere. Not in place when
    this step's scores multiplied the whole bank (whole_bank): their backward still needs it as it was."""
    new = F.normalize(momentum * bank[rows] + (1 - momentum) * v.detach(), dim=1)
    if not in_place:
        return bank.index_copy(0, rows, new)
    bank[rows] = new
    return bank


def scores(bank: torch.Tensor, v: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """[B, R]: <bank[rows[b, r]], v[b]>. The reference gathers bank[rows] ([B, R, D]) and multiplies each anchor's
    block by its embedding: a read of B R D floats that memory bandwidth bounds (three reads a step, with the
    backward). Where the bank has few rows against R, one product with the whole bank ([B, N], a matrix product
    that runs near the machine's arithmetic peak) and picking the rows from it is the same numbers, several times
    faster; docs/benchmarks.md measures both."""
    if whole_bank(bank, rows):
        return (v @ bank.T).gather(1, rows)
    return torch.einsum("bkd,bd->bk", bank[rows], v)


def whole_bank(bank: torch.Tensor, rows: torch.Tensor) -> bool:
    """Whether scores() multiplies by the whole bank: few rows against the R read per anchor (rows [B, R]), and
    [B, N] not huge."""
    n = bank.shape[0]
    return n <= WHOLE_BANK_FACTOR * rows.shape[-1] and n * rows.shape[0] <= WHOLE_BANK_MAX


WHOLE_BANK_FACTOR = 32  # the whole-bank product does N / R times the arithmetic; measured faster up to ~50x
WHOLE_BANK_MAX = 2**26  # [B, N] scores held at once (256 MB in fp32)


def random_bank(rows: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """Uniform in [-s, s], s = sqrt(3 / dim), as the reference: each row's expected squared norm is 1,
    so the first scores are on the scale of the normalised embeddings'."""
    s = math.sqrt(3 / dim)
    return torch.rand(rows, dim, generator=generator, device=generator.device) * 2 * s - s


def _first_of_each(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[m] bool, True at the first occurrence of each value; and the values sorted."""
    ordered, order = values.sort(stable=True)
    first = torch.ones_like(values, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    return torch.zeros_like(first).scatter_(0, order, first), ordered


def _among(ordered: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """[m] bool: which values are in the sorted tensor `ordered`."""
    if not len(ordered):
        return torch.zeros_like(values, dtype=torch.bool)
    return ordered[torch.searchsorted(ordered, values).clamp_max(len(ordered) - 1)] == values


def _redraw_repeats(pos: torch.Tensor, n: torch.Tensor, row: torch.Tensor, draw) -> torch.Tensor:
    """Flat draws `pos` (row `row`, bound `n`) with every repeat within a row redrawn until none is left: a
    redraw is kept when its value is new to its row and it is the first of its round to take it."""
    width = int(n.max()) + 1
    first, drawn = _first_of_each(row * width + pos)
    todo, kept = (~first).nonzero().squeeze(1), drawn[:0]
    while len(todo):
        pos[todo] = draw(n[todo])
        fresh = row[todo] * width + pos[todo]
        keep = ~_among(drawn, fresh) & ~_among(kept, fresh) & _first_of_each(fresh)[0]
        kept = torch.cat([kept, fresh[keep]]).sort().values  # the few redraws kept so far
        todo = todo[~keep]
    return pos


def distinct_positions(n: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """[B, k] positions, row b a uniform draw of k of range(n[b]) without replacement (with
    replacement where k > n[b]), as the reference's np.random.choice(..., replace=k > n).

    Where k is at most half of n: k draws with replacement, then the repeats redrawn until none is
    left (nothing depends on which values are which, so the set is the uniform k-subset; a few sorts
    of B x k keys, not a permutation of n per anchor). Where k is more than half of n, redraws would
    mostly collide: the first k of a random permutation."""
    dev = generator.device
    n = n.to(dev)
    pos = torch.empty(len(n), k, dtype=torch.long, device=dev)

    def draw(bound: torch.Tensor) -> torch.Tensor:
        return (torch.rand(bound.shape, generator=generator, device=dev) * bound).long().clamp_max(bound - 1)

    sparse, dense, over = 2 * k <= n, (2 * k > n) & (k <= n), k > n
    if sparse.any():
        rows = sparse.nonzero().squeeze(1)
        bound = n[rows].repeat_interleave(k)
        flat = _redraw_repeats(draw(bound), bound, torch.arange(len(rows), device=dev).repeat_interleave(k), draw)
        pos[rows] = flat.view(len(rows), k)
    if dense.any():
        rows = dense.nonzero().squeeze(1)
        keys = torch.rand(len(rows), int(n[rows].max()), generator=generator, device=dev)
        keys[torch.arange(keys.shape[1], device=dev)[None] >= n[rows][:, None]] = 2.0  # past the row's end: last
        pos[rows] = keys.argsort(1)[:, :k]
    if over.any():
        rows = over.nonzero().squeeze(1)
        pos[rows] = draw(n[rows][:, None].expand(-1, k))
    return pos


class ClassRows:
    """The training rows sorted by class, to map positions among the rows of every class but one to rows."""

    def __init__(self, labels: torch.Tensor):
        self.labels = labels.long()
        self.order = torch.argsort(self.labels, stable=True)
        counts = torch.bincount(self.labels)
        self.count, self.start = counts, torch.cumsum(counts, 0) - counts

    def others(self, index: torch.Tensor) -> torch.Tensor:
        """[B]: how many rows are outside each anchor's class."""
        return len(self.labels) - self.count[self.labels[index]]

    def rows(self, index: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Positions [B, K] among the rows outside each anchor's class, as rows."""
        c = self.labels[index][:, None]
        pos = pos + (pos >= self.start[c]).long() * self.count[c]  # step over the anchor's class block
        return self.order[pos]


@register("crd")
class CRD(FeatureLoss):
    """Tian et al. 2020: base + beta * (NCE with the student as anchor against the teacher's bank
    + NCE with the teacher as anchor against the student's bank). The normalising constant Z of
    each direction is estimated once, from the first batch, as the reference does."""
    distributes = False  # each process would update its own memory bank with its own share's rows

    title = "CRD (Tian et al. 2020)"
    section = "crd"

    def __init__(self, cfg: KDConfig, ctx: LossContext):
        if ctx.num_train < 2:
            raise ValueError(f"crd keeps a memory bank row per training image and draws negatives from the other "
                             f"rows: it needs LossContext.num_train, the training-set size (got {ctx.num_train})")
        super().__init__(cfg, ctx, _last_stages(cfg, ctx))
        self.cfg = cfg.crd
        self.num_train = ctx.num_train
        # Negatives are the other rows: a training set smaller than negatives + 1 caps them.
        self.negatives = min(self.cfg.negatives, ctx.num_train - 1)
        (s, t), = self.pairs
        device, dim = ctx.sample.device, self.cfg.feat_dim
        self.embed_s = nn.Linear(self.student_shapes[s][0], dim).to(device)
        self.embed_t = nn.Linear(self.teacher_shapes[t][0], dim).to(device)
        gen = torch.Generator(device).manual_seed(ctx.seed + _SEED_OFFSET)
        self.register_buffer("memory_s", random_bank(ctx.num_train, dim, gen))
        self.register_buffer("memory_t", random_bank(ctx.num_train, dim, gen))
        self.register_buffer("log_z", torch.full((2,), math.nan, device=device))  # NaN: not estimated yet
        # The generator's state travels in the checkpoint, so a resumed run draws the same negatives.
        self.register_buffer("rng_state", gen.get_state())
        self._gen_device = device  # its state's layout depends on the device kind: draws stay there
        self._gen: torch.Generator | None = None
        self.by_class = None if ctx.train_labels is None else ClassRows(ctx.train_labels.to(device))

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._gen = None  # the next draw continues from the loaded state

    def reduce_teacher(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: pooled(f) for n, f in features.items()}

    def draw_negatives(self, index: torch.Tensor) -> torch.Tensor:
        """[B, K] distinct rows per anchor, as the reference draws them: of the other classes when
        the labels are known, else of every row but the anchor's own."""
        if self._gen is None:
            self._gen = torch.Generator(self._gen_device)
            self._gen.set_state(self.rng_state.cpu())
        index = index.to(self._gen_device)
        if self.by_class is not None:
            rows = self.by_class.rows(index, distinct_positions(self.by_class.others(index), self.negatives, self._gen))
        else:
            pos = distinct_positions(torch.full_like(index, self.num_train - 1), self.negatives, self._gen)
            rows = pos + (pos >= index[:, None]).long()  # skip the anchor: rows above shift up
        self.rng_state.copy_(self._gen.get_state())
        return rows.to(index.device)

    def _normalised(self, logits: torch.Tensor) -> torch.Tensor:
        """log P = logits - log Z per direction ([2, B, 1 + K]); Z = N * mean exp(logits), from the
        first batch, then kept."""
        first = logits.detach().flatten(1).logsumexp(1) - math.log(logits[0].numel()) + math.log(self.num_train)
        self.log_z.copy_(torch.where(self.log_z.isnan(), first, self.log_z))
        return logits - self.log_z[:, None, None]

    def contrast(self, f_s: torch.Tensor, f_t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        index = index.to(self.memory_s.device)
        v_s = F.normalize(self.embed_s(pooled(f_s)), dim=1)
        v_t = F.normalize(self.embed_t(pooled(f_t).detach()), dim=1)  # trains the head, never the teacher
        rows = torch.cat([index[:, None], self.draw_negatives(index)], 1)  # the positive first
        logits = torch.stack([scores(self.memory_t, v_s, rows), scores(self.memory_s, v_t, rows)]) / self.cfg.nce_t
        log_p = self._normalised(logits)
        loss = nce_loss(log_p[0], self.num_train) + nce_loss(log_p[1], self.num_train)
        # After scoring: the positive is the bank's memory of the image, not this step's embedding.
        in_place = not whole_bank(self.memory_s, rows)
        self.memory_s = update_bank(self.memory_s, index, v_s, self.cfg.momentum, in_place)
        self.memory_t = update_bank(self.memory_t, index, v_t, self.cfg.momentum, in_place)
        return loss

    def forward(self, batch: Batch, lam: float) -> dict[str, torch.Tensor]:
        if batch.index is None:
            raise ValueError("crd updates each image's memory bank row: the batch needs Batch.index, "
                             "the images' rows in the training set")
        (s, t), = self.pairs
        crd = self.contrast(batch.student_features[s], batch.teacher_features[t], batch.index)
        parts = self.base(batch, lam)
        return {**parts, "total": parts["total"] + self.cfg.beta * crd, "crd": crd}
