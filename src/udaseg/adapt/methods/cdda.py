"""CDDA: class-wise depth-distribution similarity to an offline source bank, on DACS.

Paper: the CDDA paper of uda-semantic-segmentation/CDDA (2025; no arXiv version is known, the
release's README gives no citation). It plugs into DACS self-training ("DACS: Domain Adaptation
via Cross-domain Mixed Sampling", Tranheden et al., WACV 2021, arXiv 2007.08702) as used by
DAFormer (arXiv 2111.14887), HRDA and MIC (arXiv 2212.01322).
Reference: uda-semantic-segmentation/CDDA (Apache-2.0; a fork of lhoyer/MIC),
``mmseg/models/uda/depthMetric.py`` and ``dacs.py``; re-implemented from
``shared/spec/cdda_spec.md`` part 1. No code copied. The bank (N source crops drawn like
training and their class x depth histograms) is :mod:`udaseg.data.cdda_bank`, built by
``udaseg prepare cdda-bank``; the ``depth`` view is :mod:`udaseg.data.depth` (maps written by
``udaseg depth``). CDDA changes no network; it adds three hooks to the loop:

* :class:`CDDARefiner` (LabelRefiner): histogram, bank search, gates, class-wise re-weighting;
* :class:`CDDASourceReplacement` (Mixer): ClassMix with the best-matching bank crop as source;
* :class:`CDDAGuidance` (AuxLoss, stage "target"): the soft-label guidance loss.

Every iteration t, for each target crop (teacher arg-max pseudo-label yhat over ALL pixels,
depth bins b(x) = int(d'(x)) of the ``cdda``-transformed map, K = 19 classes, 256 bins)::

    N_t[c, b] = #{x : yhat(x) = c, b(x) = b}                  (bincount, spec 3)
    n[c]      = sum_b N[c, b];   C_t = {c : n_t[c] > 0}
    rho_m     = cos(n_m, n_t)                                    (19-d class counts)
    kappa_m,c = cos(N_m[c, :], N_t[c, :])        norms clamped to eps = 1e-8 (0 for empty rows)
    omega_m,c = 2 sum_b min(N_m[c, b], N_t[c, b]) / (n_m[c] + n_t[c])      (raw counts)
    s_m,c     = (kappa + omega) / 2  for c in C_t, else 0          (s in [0, 1])
    S_m       = rho_m sum_c s_m,c;    m* = argmax_m S_m  over the WHOLE bank (first maximum)
    mu        = S_m* / |C_t|;         s* = s_m*,.

    tau(t)    = tau0 - delta k(t),  k(t) = 0 if t < 10000 else min(floor((t - 10000)/1000) + 1, 30)

Re-weighting (spec 7.1, ``reweight_mask: class``) when mu > tau_rw(t), for c in C_t minus the
source's absent classes (SYNTHIA: 9, 14, 16), s = max(s*_c, 0)::

    s > 0.75:          w(x) = 1                 where yhat(x) = c and max P(x) >= tau_pl
    s < 0.10:          w(x) = 0                 where yhat(x) = c
    otherwise:         w(x) = (s - 0.10)/0.65   where yhat(x) = c
    then the pseudo-label crop margins (PL crop v1 rows / v2 mask) are applied again (w x valid)

The same gate replaces, for ClassMix only, source crop i by bank crop m*_i (spec 9); the
supervised source and FD losses (computed earlier) and MIC keep the original source batch, MIC
reads the re-weighted weights (it reads ``ctx.pseudo``).

Guidance (spec 8) when mu > tau_rl(t): missing classes M = {c : n_t[c] = 0, n_m*[c] > 0},
pi_c(b) = N_m*[c, b] / sum_c' N_m*[c', b] (0 where the bin is empty), clamped to 0.99999::

    y(x)      = one-hot(yhat(x));  y_c(x) = pi_c(b(x)) for c in M where pi_c(b(x)) > 0
    y_yhat(x) = 1 - sum_{c in M} y_c(x)   where that mass was added
    L_guide   = mean_{batch, pixels} w_g(x) sum_c -y_c(x) log softmax(z(x))_c,   w_g = 0.1 q

with z the student's logits on the clean, un-augmented target batch (HRDA: the fused output of
a training forward), bilinearly up-sampled (align_corners=False); q the un-re-weighted DACS
weight without the crop margins. The step runs when some gated crop has a missing class whose
pi support meets a depth bin present in the crop.

Defaults are the official configs (GTA->CS DAFormer: tau_rw 0.56, tau_rl 0.54, delta 0.0025;
the other five are in the benchmark configs), breakpoints 0.1 / 0.75, guidance factor 0.1.

Differences from the reference (each number-changing one a named switch):
- ``reweight_mask: class`` (default) implements the intended per-class mask; the released code
  masks with the FIRST ROW of the pseudo-label map (a bug the reported numbers were obtained
  with: confident pixels of whole columns whose top pixel is c get 1, whole rows i whose top
  pixel at column i is c get the ramp value; square crops only). ``legacy_first_row``
  reproduces it (classes applied in ascending order; a non-square crop is an error).
- ``negative_mass: clamp`` (default; the spec calls the release's behaviour a bug) clamps the
  pseudo-label entry of the soft target at 0 and renormalises the row when two missing classes
  add more than 1; ``legacy`` keeps the negative entry.
- ``guidance_gate: any`` (default; the spec calls the release's "last (image, missing class)
  pair evaluated decides" a bug) runs the step when any pair passes the depth-overlap test;
  ``legacy_last`` reproduces the release.
- ``guidance_hard_term: true`` (release) keeps the 0.1 q hard pseudo-label CE on every clean
  target pixel that the soft-label loss implies; ``false`` keeps only pixels that got soft mass
  (same normalisation).
- ``absent_classes: auto`` drops SYNTHIA's classes {9, 14, 16} from the re-weighting when the
  bank's source is SYNTHIA (as the release's ``synthia`` switch).
- The guidance loss is summed into the target-stage backward (one backward per stage, the
  loop's contract, so DDP ranks call backward equally often); the release back-propagates it on
  its own before the mixed pass: the gradients are the same, the order of the student's random
  draws (dropout, HRDA detail crop) differs.
- Thresholds are a pure function of the step (the release mutates them in place, so a resumed
  run restarted its schedule); ``schedule_start/every/count`` are settings.
- The search keeps the bank resident on the training device once (raw counts plus per-row
  norms), computes kappa as one einsum and the min-sum in chunks of ``chunk_size`` entries; the
  release copied two N x 19 x 256 tensors to the GPU every iteration (same values).
- Bank crops are regenerated from (image, box, flip) records with an LRU cache instead of PNG
  files (the same crops: :mod:`udaseg.data.cdda_bank`).

Host synchronisation: one small read per iteration (the gates and m*), needed to fetch the bank
crops and to skip the guidance pass when closed (``host_gate: false`` runs the pass every
iteration multiplied by the gate, without reading). Gate rates are logged as
``cdda_rw_open`` / ``cdda_rl_open`` / ``cdda_guide_open`` (fraction of crops, or 0/1 for the
step) and counted in the checkpointed buffers ``rw_open``, ``rl_open``, ``guide_steps``,
``crops``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...data.cdda_bank import SourceBank, class_depth_histogram
from ...errors import ConfigError
from ..hooks import MixedBatch, PseudoLabels, StepContext
from ..mixing import ClassMix, ClassMixConfig

__all__ = [
    "CDDAConfig",
    "CDDARefiner",
    "CDDASourceReplacement",
    "CDDAGuidance",
    "class_depth_histogram",
    "BankIndex",
    "similarity",
    "search",
    "threshold_at",
    "reweight",
    "soft_labels",
    "guidance_gate",
    "open_bank",
    "build",
]

SYNTHIA_ABSENT = (9, 14, 16)
_WHERE = "model.methods.cdda"


@dataclass
class CDDAConfig:
    """CDDA settings (``model.methods.cdda``); defaults: GTA->CS DAFormer's config."""

    bank: str | None = None
    """The source bank folder (``udaseg prepare cdda-bank --config TRAIN.yaml --out BANK``)."""
    bank_root: str | None = None
    """Override of the source dataset root stored in the bank (a moved dataset)."""
    depth_key: str = "depth"
    """The target batch's depth view (``data.target.views: [depth]``)."""
    tau_rw: float = 0.56
    """Initial re-weighting / replacement threshold on mu."""
    tau_rl: float = 0.54
    """Initial relabel (guidance) threshold on mu."""
    delta: float = 0.0025
    """Decrement of both thresholds per schedule step."""
    schedule_start: int = 10000
    schedule_every: int = 1000
    schedule_count: int = 30
    reweight: bool = True
    reweight_mask: Literal["class", "legacy_first_row"] = "class"
    low: float = 0.10
    """Below this per-class similarity the class's weight is 0."""
    high: float = 0.75
    """Above it confident pixels of the class get weight 1; in between the linear ramp."""
    absent_classes: str | list[int] = "auto"
    """Classes the source never labels, left out of the re-weighting: ``auto`` ({9, 14, 16}
    when the bank's source is SYNTHIA, else none) or explicit ids."""
    replace_source: bool = True
    mix_include_ignore: bool = True
    """ClassMix option (keep 255 among the candidate classes, as DACS)."""
    guidance: bool = True
    guidance_factor: float = 0.1
    guidance_gate: Literal["any", "legacy_last"] = "any"
    negative_mass: Literal["clamp", "legacy"] = "clamp"
    guidance_hard_term: bool = True
    pi_clamp: float = 0.99999
    host_gate: bool = True
    """Read the guidance gate on the host and skip the pass when closed (else always run it)."""
    chunk_size: int = 2048
    """Bank entries per chunk of the min-sum (temporary B x chunk x 19 x 256 floats)."""
    eps: float = 1e-8
    cache_size: int = 64
    """Decoded bank crops kept in memory."""

    def __post_init__(self) -> None:
        # method blocks are plain dicts: command-line overrides arrive as strings
        for name in ("tau_rw", "tau_rl", "delta", "low", "high", "guidance_factor", "pi_clamp", "eps"):
            setattr(self, name, float(getattr(self, name)))
        for name in ("schedule_start", "schedule_every", "schedule_count", "chunk_size", "cache_size"):
            setattr(self, name, int(getattr(self, name)))
        for name, allowed in (("reweight_mask", ("class", "legacy_first_row")),
                              ("guidance_gate", ("any", "legacy_last")),
                              ("negative_mass", ("clamp", "legacy"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{_WHERE}.{name}: {getattr(self, name)!r}; choose from {allowed}")
        if not 0.0 <= self.low < self.high:
            raise ConfigError(f"{_WHERE}: need 0 <= low < high, got {self.low}, {self.high}")
        if self.schedule_every < 1 or self.schedule_count < 0 or self.chunk_size < 1:
            raise ConfigError(f"{_WHERE}: schedule_every and chunk_size >= 1, schedule_count >= 0")
        if not (isinstance(self.absent_classes, str) and self.absent_classes == "auto"):
            if isinstance(self.absent_classes, str):
                raise ConfigError(f"{_WHERE}.absent_classes: 'auto' or a list of class ids")
            self.absent_classes = [int(c) for c in self.absent_classes]


# ----------------------------------------------------------------------------------------------
# schedule


def threshold_at(step: int, tau0: float, delta: float, start: int = 10000, every: int = 1000,
                 count: int = 30) -> float:
    """tau(t) = tau0 - delta k(t), k(t) = 0 before ``start``, then floor((t - start)/every) + 1,
    at most ``count`` (spec 6): tau(9999) = tau0, tau(10000) = tau0 - delta, tau(>= 39000) =
    tau0 - 30 delta."""
    t = int(step)
    k = 0 if t < start else min((t - start) // every + 1, count)
    return float(tau0) - float(delta) * k


# ----------------------------------------------------------------------------------------------
# similarity and search


class BankIndex:
    """The bank's histograms resident on one device, with their per-row statistics.

    ``hist`` (N, K, B) float32 raw counts, ``n`` (N, K) class counts, ``norm`` (N, K) row norms
    and ``cnorm`` (N,) norms of ``n``, all clamped to ``eps`` (computed once)."""

    def __init__(self, hist: Tensor, device: torch.device | str = "cpu", eps: float = 1e-8):
        self.hist = torch.as_tensor(hist).to(device=device, dtype=torch.float32)
        self.n = self.hist.sum(-1)
        self.norm = self.hist.norm(dim=-1).clamp_min(eps)
        self.cnorm = self.n.norm(dim=-1).clamp_min(eps)
        self.eps = eps

    def __len__(self) -> int:
        return int(self.hist.shape[0])

    @property
    def device(self) -> torch.device:
        return self.hist.device


def similarity(bank: Tensor, target: Tensor, eps: float = 1e-8, bank_n: Tensor | None = None,
               bank_norm: Tensor | None = None, bank_cnorm: Tensor | None = None
               ) -> tuple[Tensor, Tensor]:
    """Per-class similarity s (T, M, K) and class-composition cosine rho (T, M) of T target
    histograms (T, K, B) against M bank histograms (M, K, B) (module docstring, spec 5).
    The bank statistics may be passed precomputed (:class:`BankIndex`)."""
    bank, target = bank.float(), target.float()
    if bank_n is None:
        bank_n = bank.sum(-1)
    if bank_norm is None:
        bank_norm = bank.norm(dim=-1).clamp_min(eps)
    if bank_cnorm is None:
        bank_cnorm = bank_n.norm(dim=-1).clamp_min(eps)
    t_n = target.sum(-1)                                           # (T, K)
    t_norm = target.norm(dim=-1).clamp_min(eps)                   # (T, K)
    t_cnorm = t_n.norm(dim=-1).clamp_min(eps)                     # (T,)
    rho = (t_n @ bank_n.t()) / (t_cnorm[:, None] * bank_cnorm[None])
    kappa = torch.einsum("mkb,tkb->tmk", bank, target) / (t_norm[:, None] * bank_norm[None])
    inter = torch.minimum(bank[None], target[:, None]).sum(-1)    # (T, M, K)
    omega = 2.0 * inter / (t_n[:, None] + bank_n[None]).clamp_min(eps)
    present = (t_n > 0)[:, None]                                  # c in C_t
    s = torch.where(present, 0.5 * (kappa + omega), torch.zeros_like(kappa))
    return s, rho


@dataclass
class SearchResult:
    """Best bank match per target crop: ``m_star`` (T,) int64, ``mu`` (T,), ``s_star`` (T, K),
    ``rho`` (T,), and the full scores ``score`` (T, N) S_m."""

    m_star: Tensor
    mu: Tensor
    s_star: Tensor
    rho: Tensor
    score: Tensor


@torch.no_grad()
def search(index: BankIndex, target: Tensor, chunk_size: int = 2048) -> SearchResult:
    """Exhaustive top-1 search of every target histogram (T, K, B) over the whole bank, in
    chunks of ``chunk_size`` bank entries (the same argmax as one pass), on the bank's device."""
    target = target.to(index.device, torch.float32)
    scores = []
    for lo in range(0, len(index), chunk_size):
        hi = min(lo + chunk_size, len(index))
        s, rho = similarity(index.hist[lo:hi], target, index.eps, index.n[lo:hi],
                            index.norm[lo:hi], index.cnorm[lo:hi])
        scores.append(rho * s.sum(-1))
    score = torch.cat(scores, dim=1)                               # (T, N)
    m_star = score.argmax(dim=1)
    # s* and rho of the chosen entries (T pairs)
    s_all, rho_all = similarity(index.hist[m_star], target, index.eps, index.n[m_star],
                                index.norm[m_star], index.cnorm[m_star])
    ar = torch.arange(target.shape[0], device=target.device)
    s_star, rho = s_all[ar, ar], rho_all[ar, ar]
    n_classes = (target.sum(-1) > 0).sum(-1).clamp_min(1).to(s_star.dtype)
    mu = rho * s_star.sum(-1) / n_classes
    return SearchResult(m_star=m_star, mu=mu, s_star=s_star, rho=rho, score=score)


# ----------------------------------------------------------------------------------------------
# re-weighting


def reweight(
    weight: Tensor,
    label: Tensor,
    confident: Tensor,
    s_star: Tensor,
    apply: Tensor,
    valid: Tensor | None = None,
    low: float = 0.10,
    high: float = 0.75,
    mode: str = "class",
) -> Tensor:
    """Class-wise re-weighting of pseudo-label weights (spec 7).

    Args:
        weight: (B, H, W) current weights (DACS q, crop margins included).
        label: (B, H, W) pseudo-labels (values >= K are left alone).
        confident: (B, H, W) bool, max class score >= the pseudo-label threshold.
        s_star: (B, K) per-class similarity of the best match.
        apply: (B, K) bool: the crop's gate is open and the class is re-weighted (c in C_t, not
            one of the source's absent classes).
        valid: (B, H, W) crop mask multiplied into every written value (PL crop margins).
        mode: ``class`` (intended) or ``legacy_first_row`` (the release, square crops only).
    """
    b, h, w = label.shape
    k = s_star.shape[1]
    s = s_star.float().clamp_min(0.0)
    ramp = ((s - low) / (high - low)).clamp(0.0, 1.0)              # 0 below low
    hi_cls = apply & (s > high)
    set_cls = apply & ~(s > high)
    new = torch.zeros_like(weight)
    changed = torch.zeros_like(label, dtype=torch.bool)
    if mode == "class":
        in_range = (label >= 0) & (label < k)
        lab = torch.where(in_range, label, torch.zeros_like(label)).reshape(b, -1).long()
        hi_pix = hi_cls.gather(1, lab).view(b, h, w) & confident & in_range
        set_pix = set_cls.gather(1, lab).view(b, h, w) & in_range
        val = ramp.gather(1, lab).view(b, h, w).to(weight.dtype)
        new = torch.where(hi_pix, torch.ones_like(new), torch.where(set_pix, val, new))
        changed = hi_pix | set_pix
    elif mode == "legacy_first_row":
        if h != w:
            raise ConfigError(
                f"{_WHERE}.reweight_mask: legacy_first_row needs square crops (the release indexes "
                f"rows with a column mask), got {h}x{w}; use reweight_mask: class")
        row0 = label[:, 0, :]                                      # (B, W)
        for c in range(k):
            col = row0 == c                                        # (B, W)
            hi_pix = col[:, None, :] & confident & hi_cls[:, c, None, None]
            rows = col[:, :, None].expand(b, h, w) & set_cls[:, c, None, None]
            new = torch.where(hi_pix, torch.ones_like(new), new)
            new = torch.where(rows, ramp[:, c, None, None].to(new.dtype).expand_as(new), new)
            changed = changed | hi_pix | rows
    else:
        raise ConfigError(f"{_WHERE}.reweight_mask: {mode!r}; choose class or legacy_first_row")
    if valid is not None:
        new = new * valid.to(new.dtype)
    return torch.where(changed, new, weight)


# ----------------------------------------------------------------------------------------------
# soft labels and the guidance gate


def depth_conditional(match_hist: Tensor, missing: Tensor, pi_clamp: float = 0.99999) -> Tensor:
    """pi (B, K, bins): P(class | bin) of the matched crops for the missing classes (0 elsewhere),
    0 for empty bins, clamped to ``pi_clamp`` so no value equals the one-hot 1."""
    col = match_hist.sum(1, keepdim=True)
    pi = torch.where(col > 0, match_hist / col.clamp_min(1.0), torch.zeros_like(match_hist))
    return pi.clamp(max=pi_clamp) * missing[..., None].to(pi.dtype)


def _bins(depth: Tensor, bins: int) -> tuple[Tensor, Tensor]:
    if depth.ndim == 4:
        depth = depth[:, 0]
    idx = depth.long()
    ok = (idx >= 0) & (idx < bins)
    return torch.where(ok, idx, torch.zeros_like(idx)), ok


def depth_overlap(pi: Tensor, depth: Tensor) -> Tensor:
    """(B, K) bool: the bins with pi_c > 0 meet the depth bins present in the crop."""
    b, k, nb = pi.shape
    idx, ok = _bins(depth, nb)
    present = torch.zeros(b, nb, dtype=torch.bool, device=pi.device)
    present.scatter_(1, torch.where(ok, idx, torch.zeros_like(idx)).reshape(b, -1), ok.reshape(b, -1))
    return ((pi > 0) & present[:, None]).any(-1)


def guidance_gate(missing: Tensor, overlap: Tensor, rule: str = "any") -> Tensor:
    """0-dim bool: whether the guidance step runs. ``any``: some (crop, missing class) pair
    passes the depth-overlap test; ``legacy_last``: the last pair evaluated (crops in order,
    classes ascending) decides, as the release. No pair: closed."""
    pairs = missing.reshape(-1)
    if rule == "any":
        return (pairs & overlap.reshape(-1)).any()
    if rule == "legacy_last":
        order = torch.arange(1, pairs.numel() + 1, device=pairs.device) * pairs
        last = order.argmax()
        return pairs.any() & overlap.reshape(-1)[last]
    raise ConfigError(f"{_WHERE}.guidance_gate: {rule!r}; choose any or legacy_last")


def soft_labels(label: Tensor, depth: Tensor, match_hist: Tensor, missing: Tensor,
                pi_clamp: float = 0.99999, negative_mass: str = "clamp") -> tuple[Tensor, Tensor]:
    """Soft targets (B, K, H, W) of spec 8.1 and the added mass (B, H, W).

    ``label`` (B, H, W) pseudo-labels, ``depth`` (B, [1,] H, W) bins, ``match_hist`` (B, K, bins)
    the matched bank crops' counts, ``missing`` (B, K) bool the classes to add (already gated).
    ``negative_mass``: ``clamp`` clamps the pseudo-label entry at 0 and renormalises rows whose
    added mass exceeds 1; ``legacy`` keeps the negative entry. Pixels whose label is outside
    0..K-1 keep an all-zero row unless mass is added."""
    b, k, nb = match_hist.shape
    h, w = label.shape[-2:]
    pi = depth_conditional(match_hist.float(), missing, pi_clamp)
    idx, ok = _bins(depth, nb)
    pix = pi.gather(2, idx.reshape(b, 1, -1).expand(b, k, -1)).view(b, k, h, w)
    pix = pix * ok[:, None].to(pix.dtype)
    in_range = (label >= 0) & (label < k)
    lab = torch.where(in_range, label, torch.zeros_like(label)).long()
    onehot = F.one_hot(lab, k).permute(0, 3, 1, 2).to(pix.dtype) * in_range[:, None].to(pix.dtype)
    added = pix.sum(1)
    y = torch.where(pix > 0, pix, onehot)
    over = (onehot.sum(1) + added) > 1                             # one-hot plus added mass
    pl_entry = 1.0 - added
    if negative_mass == "clamp":
        pl_entry = pl_entry.clamp_min(0.0)
    elif negative_mass != "legacy":
        raise ConfigError(f"{_WHERE}.negative_mass: {negative_mass!r}; choose clamp or legacy")
    y = torch.where((onehot > 0) & over[:, None], pl_entry[:, None].expand_as(y), y)
    if negative_mass == "clamp":
        total = y.sum(1, keepdim=True)
        y = torch.where((added > 1)[:, None], y / total.clamp_min(1e-12), y)
    return y, added


# ----------------------------------------------------------------------------------------------
# the bank


def open_bank(path: str, root: str | None = None, cache_size: int = 64) -> SourceBank:
    """Open the configured bank (tests replace this with an in-memory one)."""
    return SourceBank.open(path, root=root, cache_size=cache_size)


@dataclass
class CDDAStep:
    """What the refiner found this iteration (``ctx.state["cdda"]``), for the mixer and loss."""

    result: SearchResult
    gate_rw: Tensor          # (B,) bool
    gate_rl: Tensor          # (B,) bool
    missing: Tensor          # (B, K) bool, gated by tau_rl
    match_hist: Tensor       # (B, K, bins) counts of the matched bank crops
    guide_open: Tensor       # 0-dim bool
    guide_weight: Tensor     # (B, H, W) w_g = factor x un-re-weighted DACS weight, no margins
    label: Tensor            # (B, H, W) the pseudo-labels the histograms were built from
    depth: Tensor            # (B, [1,] H, W)
    _host: tuple | None = None

    def host(self) -> tuple[list[bool], list[int], bool]:
        """(gate_rw per crop, m* per crop, guide gate) read on the host once per iteration."""
        if self._host is None:
            packed = torch.cat([self.gate_rw.long(), self.result.m_star.long(),
                                self.guide_open.long().reshape(1)]).tolist()
            b = self.gate_rw.shape[0]
            self._host = ([bool(v) for v in packed[:b]], packed[b:2 * b], bool(packed[-1]))
        return self._host


class CDDARefiner(nn.Module):
    """CDDA's :class:`~udaseg.adapt.hooks.LabelRefiner`: target histograms, the bank search,
    the gates and the class-wise re-weighting; leaves a :class:`CDDAStep` in
    ``ctx.state["cdda"]``. Its counters are checkpointed buffers; the bank is not (it is
    opened from ``cfg.bank`` at the first step, or given as ``bank``)."""

    hook_kind = "refiner"

    def __init__(self, cfg: CDDAConfig | None = None, bank: SourceBank | None = None) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else CDDAConfig()
        self.bank = bank
        self._index: BankIndex | None = None
        self._absent: tuple[int, ...] | None = None
        self._checked = False
        for name in ("rw_open", "rl_open", "guide_steps", "crops", "steps"):
            self.register_buffer(name, torch.zeros((), dtype=torch.int64))

    # ---- bank ------------------------------------------------------------------------------
    def get_bank(self) -> SourceBank:
        if self.bank is None:
            if not self.cfg.bank:
                raise ConfigError(
                    f"{_WHERE}.bank: no source bank given; build one with `udaseg prepare "
                    "cdda-bank --config TRAIN.yaml --out BANK` and set model.methods.cdda.bank: BANK")
            self.bank = open_bank(self.cfg.bank, self.cfg.bank_root, self.cfg.cache_size)
        return self.bank

    def absent_classes(self) -> tuple[int, ...]:
        if self._absent is None:
            if self.cfg.absent_classes == "auto":
                src = (self.get_bank().header.get("source") or {}).get("name", "")
                self._absent = SYNTHIA_ABSENT if "synthia" in str(src).lower() else ()
            else:
                self._absent = tuple(self.cfg.absent_classes)
        return self._absent

    def index(self, device: torch.device) -> BankIndex:
        if self._index is None or self._index.device != torch.device(device):
            self._index = BankIndex(self.get_bank().hist, device, self.cfg.eps)
        return self._index

    def _check(self, ctx: StepContext, pseudo: PseudoLabels) -> None:
        if self._checked:
            return
        bank = self.get_bank()
        bank.check_crop_size(tuple(ctx.target["image"].shape[-2:]), _WHERE + ".bank")
        k = pseudo.prob.shape[1] if pseudo.prob is not None else None
        if k is not None and int(bank.hist.shape[1]) != k:
            raise ConfigError(f"{_WHERE}.bank: the bank has {bank.hist.shape[1]} classes, the "
                              f"model {k}; rebuild it for this label set")
        self._checked = True

    # ---- the hook ----------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, ctx: StepContext, pseudo: PseudoLabels) -> PseudoLabels:
        cfg = self.cfg
        depth = ctx.target.get(cfg.depth_key)
        if depth is None:
            raise ConfigError(
                f"{_WHERE}: the target batch has no {cfg.depth_key!r} view; add `views: [depth]` "
                "to data.target (maps in <root>/depth_any/, written by `udaseg depth`)")
        if pseudo.prob is None:
            raise ValueError("CDDARefiner needs the teacher's class scores (PseudoLabels.prob)")
        self._check(ctx, pseudo)
        label = pseudo.label
        depth = depth.to(label.device)
        bank = self.get_bank()
        k, nb = int(bank.hist.shape[1]), int(bank.hist.shape[2])
        hist_t = class_depth_histogram(label, depth, k, nb)
        index = self.index(label.device)
        res = search(index, hist_t, cfg.chunk_size)

        sched = (cfg.schedule_start, cfg.schedule_every, cfg.schedule_count)
        tau_rw = threshold_at(ctx.step, cfg.tau_rw, cfg.delta, *sched)
        tau_rl = threshold_at(ctx.step, cfg.tau_rl, cfg.delta, *sched)
        gate_rw = res.mu > tau_rw
        gate_rl = res.mu > tau_rl

        n_t = hist_t.sum(-1)
        match_hist = index.hist[res.m_star]
        n_m = match_hist.sum(-1)
        missing = (n_t == 0) & (n_m > 0) & gate_rl[:, None]
        absent = self.absent_classes()
        if absent:
            missing[:, list(absent)] = False
        if cfg.guidance:
            pi = depth_conditional(match_hist, missing, cfg.pi_clamp)
            guide_open = guidance_gate(missing, depth_overlap(pi, depth), cfg.guidance_gate)
        else:
            guide_open = torch.zeros((), dtype=torch.bool, device=label.device)

        # un-re-weighted DACS weight without the crop margins (the guidance weight)
        if ctx.pseudo_from_probs is not None:
            base = ctx.pseudo_from_probs(pseudo.prob).weight
        else:
            base = pseudo.weight
        guide_weight = cfg.guidance_factor * base.expand_as(label.float())

        weight = pseudo.weight
        if cfg.reweight:
            thr = ctx.pseudo_threshold if ctx.pseudo_threshold is not None else 0.968
            confident = pseudo.prob.max(dim=1).values >= thr
            apply = (n_t > 0) & gate_rw[:, None]
            if absent:
                apply[:, list(absent)] = False
            weight = reweight(pseudo.weight.expand_as(label.float()), label, confident,
                              res.s_star, apply, pseudo.valid, cfg.low, cfg.high, cfg.reweight_mask)

        ctx.state["cdda"] = CDDAStep(res, gate_rw, gate_rl, missing, match_hist, guide_open,
                                     guide_weight, label, depth)
        self.rw_open += gate_rw.sum()
        self.rl_open += gate_rl.sum()
        self.guide_steps += guide_open.long()
        self.crops += gate_rw.numel()
        self.steps += 1
        ctx.losses["cdda_mu"] = res.mu.mean()
        ctx.losses["cdda_rw_open"] = gate_rw.float().mean()
        ctx.losses["cdda_rl_open"] = gate_rl.float().mean()
        ctx.losses["cdda_guide_open"] = guide_open.float()
        return dataclasses.replace(pseudo, weight=weight)

    def gate_rates(self) -> dict[str, float]:
        """How often each gate opened so far (host read; for reports)."""
        crops, steps = max(int(self.crops), 1), max(int(self.steps), 1)
        return {"rw_open": int(self.rw_open) / crops, "rl_open": int(self.rl_open) / crops,
                "guide_steps": int(self.guide_steps) / steps}


class CDDASourceReplacement:
    """CDDA's :class:`~udaseg.adapt.hooks.Mixer`: ClassMix with source crop i replaced by the
    best bank match m*_i where the re-weighting gate is open (spec 9). ``ctx.source`` itself is
    not changed (the supervised, FD and MIC passes see the original batch)."""

    hook_kind = "mixer"

    def __init__(self, core: CDDARefiner, inner=None) -> None:
        self.core = core
        self.inner = inner if inner is not None else ClassMix()

    def __call__(self, ctx: StepContext, pseudo: PseudoLabels) -> MixedBatch:
        step: CDDAStep | None = ctx.state.get("cdda")
        if step is None or not self.core.cfg.replace_source:
            return self.inner(ctx, pseudo)
        gates, m_star, _ = step.host()
        if not any(gates):
            return self.inner(ctx, pseudo)
        image = ctx.source["image"].clone()
        label = ctx.source["label"]
        label = (label[:, 0] if label.ndim == 4 else label).clone()
        bank = self.core.get_bank()
        for i, (g, m) in enumerate(zip(gates, m_star, strict=True)):
            if g:
                img, lbl = bank.crop(int(m))
                image[i] = img.to(image.device, image.dtype, non_blocking=True)
                label[i] = lbl.to(label.device, label.dtype, non_blocking=True)
        mix_ctx = dataclasses.replace(ctx, source={**ctx.source, "image": image, "label": label})
        return self.inner(mix_ctx, pseudo)


class CDDAGuidance:
    """CDDA's guidance loss as an :class:`~udaseg.adapt.hooks.AuxLoss` (stage "target", log
    name ``cdda_guide``): the soft-label CE of the student on the clean target batch."""

    hook_kind = "aux_loss"
    name = "cdda_guide"
    stage = "target"

    def __init__(self, core: CDDARefiner) -> None:
        self.core = core

    def __call__(self, ctx: StepContext) -> Tensor:
        cfg = self.core.cfg
        step: CDDAStep | None = ctx.state.get("cdda")
        zero = torch.zeros((), device=ctx.target["image"].device)
        if step is None or not cfg.guidance:
            return zero
        if cfg.host_gate and not step.host()[2]:
            return zero
        image = ctx.target["image"]
        y, added = soft_labels(step.label, step.depth, step.match_hist, step.missing,
                               cfg.pi_clamp, cfg.negative_mass)
        out = ctx.student(image)
        z = out.logits
        if tuple(z.shape[-2:]) != tuple(y.shape[-2:]):
            z = F.interpolate(z, size=tuple(y.shape[-2:]), mode="bilinear", align_corners=False)
        ce = -(y * torch.log_softmax(z.float(), dim=1)).sum(1)     # (B, H, W)
        if not cfg.guidance_hard_term:
            ce = ce * (added > 0).to(ce.dtype)
        loss = (step.guide_weight.to(ce.dtype) * ce).mean()
        if not cfg.host_gate:
            loss = loss * step.guide_open.to(loss.dtype)
        return loss


def build(settings: dict, student) -> list:
    """The method-catalog builder (``model.methods.cdda``): the refiner, the source-replacing
    mixer (when ``replace_source``) and the guidance loss (when ``guidance``). The bank is
    opened at the first training step."""
    from ...configparse import config_from_dict

    cfg = config_from_dict(CDDAConfig, settings, _WHERE)
    core = CDDARefiner(cfg)
    hooks: list = [core]
    if cfg.replace_source:
        hooks.append(CDDASourceReplacement(core, ClassMix(ClassMixConfig(cfg.mix_include_ignore))))
    if cfg.guidance:
        hooks.append(CDDAGuidance(core))
    return hooks
