"""The optional second opinion: an autoencoder whose reconstruction error is an anomaly map.

It reconstructs the frozen backbone's patch embeddings (the same selected dimensions the kNN scorer uses,
standardized per dimension) through a small convolutional bottleneck, with masked inputs during training (a random
share of positions is zeroed, so the network must infer them from context instead of copying them). Its error map
lives on the patch grid, like the kNN map, so it is cheap: it trains on feature grids, not pixels.

Training uses a validation split of the normal images, early stopping on validation loss (best weights kept) and a
fixed seed. The image score is the maximum of the smoothed error map; the decision (decision.py) calibrates it on
held-out normals exactly like the kNN score.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import threading
from dataclasses import asdict, dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import AE_ASKED, ModelConfig
from .embedder import Embedded
from .errors import ConfigError, ModelFormatError
from .inspection_mask import score_inside
from .parallelism import intra_op_threads
from .progress import progress_bar
from .scorer import RawScore, grid_maps
from .timing import StageTimer

log = logging.getLogger(__name__)

AE_KINDS = AE_ASKED  # the networks built here are the ones a config asks for by name
# the whole-image branch's grid: the part seen as GLOBAL_GRID x GLOBAL_GRID cells, coarse enough that one vector can
# hold the whole layout, fine enough that a missing or moved component fills a cell
GLOBAL_GRID = 8
# the branch's hidden channels: an 8x8 layout of the kept feature dimensions needs far fewer than the feature
# autoencoder's, and the narrower network trains in a fraction of the time (saved per model: older ones keep theirs)
GLOBAL_WIDTH = 64


# the fewest images the whole-image branch keeps out of training, for its early stopping and its threshold
MIN_CALIBRATION = 5
# an update's further training of the whole-image branch (fine_tuned): epochs over the added and replayed images, at
# this share of the fit's learning rate, enough to learn a handful of new layouts without moving far from the fit's
FINE_TUNE_EPOCHS = 40
FINE_TUNE_LR = 0.25
# the fewest times the added grids, and the replayed ones, come back in one of its epochs: the grids a leave-one-out
# fit keeps to replay (calibration_set.CALIBRATION_SET_SIZE), which the fine-tuning was measured with
FINE_TUNE_SHARE = 20


@dataclass
class AEConfig:
    kind: str = "features"
    width: int = 128  # channels of the hidden layers
    bottleneck: int = 32  # channels at 1/4 resolution
    epochs: int = 60
    patience: int = 6
    lr: float = 2e-3
    batch_size: int = 16
    mask: float = 0.3  # share of positions zeroed in training inputs
    val_fraction: float = 0.15
    seed: int = 0

    @classmethod
    def for_kind(cls, kind: str, epochs: int, seed: int) -> "AEConfig":
        """The defaults of ``kind``: the whole-image branch is narrower (:data:`GLOBAL_WIDTH`)."""
        return cls(kind=kind, epochs=epochs, seed=seed, **({"width": GLOBAL_WIDTH} if kind == "global" else {}))

    def validate(self) -> None:
        if self.kind not in AE_KINDS:
            raise ConfigError(f"autoencoder kind must be one of {AE_KINDS}")
        if self.epochs < 1 or self.patience < 1 or self.batch_size < 1 or not 0 < self.val_fraction < 1:
            raise ConfigError("autoencoder epochs, patience and batch size must be >= 1, val_fraction in (0, 1)")


def _block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.GroupNorm(8, cout), nn.SiLU())


class _ConvAE(nn.Module):
    """Encoder to 1/4 resolution and back; output resized to the input grid (any height and width)."""

    def __init__(self, channels: int, width: int, bottleneck: int, depth: int):
        super().__init__()
        enc: list[nn.Module] = [_block(channels, width)]
        for _ in range(depth):
            enc.append(_block(width, width, stride=2))
        enc.append(nn.Conv2d(width, bottleneck, 1))
        self.encoder = nn.Sequential(*enc)
        self.decoder_in = _block(bottleneck, width)
        self.ups = nn.ModuleList([_block(width, width) for _ in range(depth)])
        self.head = nn.Conv2d(width, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sizes = []
        h = x
        for layer in self.encoder:
            sizes.append(h.shape[-2:])
            h = layer(h)
        h = self.decoder_in(h)
        targets = list(reversed(sizes[1:-1]))  # sizes before each stride-2 block, deepest first
        for up, size in zip(self.ups, targets):
            h = up(F.interpolate(h, size=size, mode="bilinear", align_corners=False))
        h = F.interpolate(h, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(h)


class _GlobalAE(nn.Module):
    """The whole-image branch (EfficientAD's global autoencoder, on the feature grid): the pooled grid encoded into
    one vector for the whole part and decoded back. Every cell's reconstruction depends on every other cell, so
    what is missing, added or moved anywhere on the part shows where its layout differs from the good parts'; a
    patch's own neighbourhood, which is all the kNN sees, may look normal there."""

    def __init__(self, channels: int, width: int, bottleneck: int, grid: int):
        super().__init__()
        self.width, self.half = width, max(1, grid // 2)
        self.encoder = nn.Sequential(_block(channels, width), _block(width, width, stride=2))
        self.to_latent = nn.Linear(width * self.half * self.half, bottleneck)
        self.from_latent = nn.Linear(bottleneck, width * self.half * self.half)
        self.decoder = nn.Sequential(_block(width, width), _block(width, width))
        self.head = nn.Conv2d(width, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(x)
        h = self.from_latent(self.to_latent(h.flatten(1))).view(-1, self.width, self.half, self.half)
        h = F.interpolate(F.silu(h), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(self.decoder(h))


class ReconstructionScorer(nn.Module):
    """The autoencoder plus what it needs to score: feature standardization statistics and config. Implements
    the :class:`~anomaly_service.scorer.Scorer` protocol."""

    name = "autoencoder"
    FILE = "autoencoder.pt"

    def __init__(self, config: AEConfig, channels: int, sigma: float = ModelConfig.sigma):
        super().__init__()
        self.config = config
        self.channels = channels
        self.sigma = sigma  # map smoothing: the model's, not saved with the network
        # features: the input is a 1/8-resolution grid already, two downsamplings reach the bottleneck; global: the
        # grid pooled to GLOBAL_GRID cells, through one vector
        # the initial weights from the config's seed, not from whatever drew on torch's global generator before (the
        # fit trains the branch on a thread of its own, beside the coreset; branch_beside.py)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            self.net = (_GlobalAE(channels, config.width, config.bottleneck, GLOBAL_GRID) if config.kind == "global"
                        else _ConvAE(channels, config.width, config.bottleneck, depth=2))
        self.val_ids_: list[int] = []  # the samples a fit kept out of training (fit)
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("std", torch.ones(channels))

    # ------------------------------------------------------------------ inputs
    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, h, w, D)`` embeddings -> standardized ``(B, D, h, w)`` network input and target (the global branch:
        pooled to its grid)."""
        x = x.permute(0, 3, 1, 2)
        z = (x - self.mean[None, :, None, None]) / self.std[None, :, None, None]
        return F.adaptive_avg_pool2d(z, GLOBAL_GRID) if self.config.kind == "global" else z

    @torch.inference_mode()
    def error_grid(self, x: torch.Tensor) -> torch.Tensor:
        """Per-position squared reconstruction error averaged over channels, on the input's grid: ``(B, h, w)``.

        One image at a time: the CPU's convolution and matrix kernels are chosen by the batch's size, and in a batch
        an image's error came out a few float32 steps off its error alone, so a part's fused score depended on which
        parts shared its pass (docs/decisions.md "Same photo, same answer")."""
        return torch.cat([self._error_grid(x[i : i + 1]) for i in range(len(x))])

    def _error_grid(self, x: torch.Tensor) -> torch.Tensor:
        self.eval()
        z = self.prepare(x)
        err = ((self.net(z) - z) ** 2).mean(dim=1)
        if err.shape[-2:] != x.shape[1:3]:  # the global branch's cells, spread over the patch grid
            err = F.interpolate(err[:, None], size=tuple(x.shape[1:3]), mode="bilinear", align_corners=False)[:, 0]
        return err

    # ------------------------------------------------------------------ training
    def score(self, batch: Embedded, timer: StageTimer) -> list[RawScore]:
        """Scorer protocol: per image, the smoothed error map and its maximum."""
        with timer.stage("autoencoder", per=len(batch.shapes)):
            grids = self.error_grid(batch.features).float().cpu().numpy()
            maps = grid_maps(grids, batch, self.sigma)
        return [score_inside(g, m, "map-max", batch.inspect) for g, m in zip(grids, maps)]

    def _training_input(self, grid: torch.Tensor) -> torch.Tensor:
        """A ``(h, w, D)`` grid as training keeps it: the whole-image branch's pooled to its cells once, not once per
        epoch (pooling commutes with the per-channel standardization, so prepare() gives the same input)."""
        if self.config.kind != "global":
            return grid
        return F.adaptive_avg_pool2d(grid.permute(2, 0, 1)[None].float(), GLOBAL_GRID)[0].permute(1, 2, 0)

    def _batches(self, samples: Sequence[torch.Tensor], ids: list[int], gen: torch.Generator | None
                 ) -> list[list[int]]:
        """``ids`` in batches whose samples share a shape (so they stack), shuffled with ``gen`` when given."""
        if gen is not None:
            ids = [ids[j] for j in torch.randperm(len(ids), generator=gen).tolist()]
        groups: dict[tuple[int, ...], list[int]] = {}
        for i in ids:
            groups.setdefault(tuple(samples[i].shape), []).append(i)
        size = self.config.batch_size
        return [g[s : s + size] for g in groups.values() for s in range(0, len(g), size)]

    def _corrupt(self, z: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """``z`` with a seeded share of its positions zeroed. The mask is drawn by the CPU generator on the CPU and
        moved: torch refuses a CPU generator for a draw on a GPU, which failed an update of a model with the branch
        there, and a draw on the CPU is the same wherever the branch trains."""
        keep = (torch.rand(z.shape[0], 1, *z.shape[2:], generator=gen) >= self.config.mask).to(z.device)
        return z * keep

    def fit(self, samples: Sequence[torch.Tensor], progress: bool = True, stop: threading.Event | None = None,
            device: torch.device | str | None = None) -> dict[str, float]:
        """Train on per-image ``(h, w, D)`` feature grids; returns training statistics. The samples kept out of
        training (a seeded ``val_fraction``, for early stopping) stay in ``val_ids_``: a leave-one-out fit
        calibrates the branch on them, the only images it has not learnt. ``stop``, once set, ends the training
        after the current epoch (a fit that failed beside it). It trains where the samples are and is left on
        ``device``, where the model scores (default: there too): a fit's grids come from its patch store in host
        memory, and a branch left there failed the first batch a GPU model scored with it."""
        cfg = self.config
        scoring_device = device
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed)  # all training draws come from it
        n = len(samples)
        if n < 2:
            raise ConfigError("the autoencoder needs at least 2 training images")
        order = torch.randperm(n, generator=gen).tolist()
        n_val = max(1, int(round(n * cfg.val_fraction)))
        if cfg.kind == "global":
            # the whole-image branch's validation split is also the only sample its threshold comes from (a
            # leave-one-out fit, fitting.py): one or two images would make the threshold a good image's own score
            n_val = max(n_val, min(MIN_CALIBRATION, n // 2))
        val_ids, train_ids = order[:n_val], order[n_val:]
        self.val_ids_ = sorted(val_ids)
        # one read of each grid (``samples`` may read each from a fit's patch store: a streamed fit never holds every
        # patch): the standardization statistics of the training split as running sums, and what training keeps.
        # The branch keeps only the pooled cells, pooled once, not once per epoch (pooling commutes with the
        # per-channel standardization, so prepare() gives the same input; the statistics stay the patches')
        total = total2 = None
        count = 0
        training, kept = set(train_ids), []
        for i in range(n):
            grid = samples[i]
            if i in training:
                rows = grid.reshape(-1, grid.shape[-1]).double()
                total = rows.sum(0) if total is None else total + rows.sum(0)
                total2 = (rows * rows).sum(0) if total2 is None else total2 + (rows * rows).sum(0)
                count += len(rows)
            kept.append(self._training_input(grid))
        samples, device = kept, kept[0].device
        mean = total / count
        var = ((total2 - count * mean * mean) / max(count - 1, 1)).clamp_min(0)
        self.mean.copy_(mean.float())
        self.std.copy_(var.sqrt().float().clamp_min(1e-6))
        self.to(device)
        opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)

        def loss_of(ids: list[int], train: bool) -> float:
            total, count = 0.0, 0
            for b in self._batches(samples, ids, gen if train else None):
                z = self.prepare(torch.stack([samples[i].float() for i in b]))
                inp = self._corrupt(z, gen) if train else z
                loss = F.mse_loss(self.net(inp), z)
                if train:
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                total += loss.item() * len(b)
                count += len(b)
            return total / max(count, 1)

        # the branch's steps are many small operations on 8x8 cells: one thread runs them as fast alone and keeps
        # its pace when the machine is busy, where two threads wait on each other (docs/benchmarks.md)
        single = cfg.kind == "global" and device.type == "cpu"
        with intra_op_threads(1) if single else contextlib.nullcontext():
            best, best_state, bad_epochs, history = math.inf, None, 0, []
            with torch.no_grad():
                self.net.eval()
                initial_val = loss_of(val_ids, train=False)
            bar = progress_bar(progress, total=cfg.epochs, desc=f"autoencoder ({cfg.kind})", unit="epoch")
            epoch = 0
            for epoch in range(1, cfg.epochs + 1):
                self.net.train()
                train_loss = loss_of(train_ids, train=True)
                self.net.eval()
                with torch.no_grad():
                    val_loss = loss_of(val_ids, train=False)
                sched.step()
                history.append((train_loss, val_loss))
                bar.update(1)
                bar.set_postfix(train=f"{train_loss:.4f}", val=f"{val_loss:.4f}")
                if val_loss < best - 1e-6:
                    best, bad_epochs = val_loss, 0
                    best_state = {k: v.detach().clone() for k, v in self.net.state_dict().items()}
                else:
                    bad_epochs += 1
                    if bad_epochs >= cfg.patience:
                        break
                if stop is not None and stop.is_set():
                    break
            bar.close()
        if best_state is not None:
            self.net.load_state_dict(best_state)
        self.to(scoring_device if scoring_device is not None else device)
        self.eval()
        log.info("autoencoder (%s): val loss %.4f -> %.4f in %d epochs", cfg.kind, initial_val, best, epoch)
        return {"initial_val_loss": initial_val, "best_val_loss": best, "epochs": epoch,
                "n_train": len(train_ids), "n_val": len(val_ids)}

    def fine_tuned(self, added: Sequence[torch.Tensor], replay: Sequence[torch.Tensor],
                   epochs: int = FINE_TUNE_EPOCHS) -> "ReconstructionScorer":
        """A copy trained further on ``added`` grids (good images an update adds), with ``replay`` grids (training
        images the model kept) in every epoch so that it learns the new images without forgetting the layout it
        learnt. The standardization stays the fit's, and so does the threshold the caller keeps: the added images
        are a handful, and the fit's unseen images set it. This scorer is left untouched (an update makes a new
        model and the old one keeps serving)."""
        cfg = self.config
        clone = copy.deepcopy(self)
        gen = torch.Generator(device="cpu").manual_seed(cfg.seed + len(added))
        device = self.mean.device
        samples = [self._training_input(g.to(device)).float() for g in (*added, *replay)]
        # the added images and the replayed ones each come back about as often together as the larger group, and
        # at least FINE_TUNE_SHARE times an epoch: the added ones are what the update teaches; the replayed ones,
        # outnumbered (a held-out fit keeps only its few held-out grids), were forgotten and the branch flagged the
        # layout the fit had learnt; and with few of both the few steps an epoch taught the added layout only half
        share = max(len(added), len(replay), FINE_TUNE_SHARE)
        weight = max(1, round(share / max(len(added), 1)))
        again = max(1, round(share / len(replay))) if replay else 1
        ids = list(range(len(added))) * weight + list(range(len(added), len(samples))) * again
        opt = torch.optim.AdamW(clone.net.parameters(), lr=cfg.lr * FINE_TUNE_LR, weight_decay=1e-4)
        single = cfg.kind == "global" and device.type == "cpu"
        clone.net.train()
        with intra_op_threads(1) if single else contextlib.nullcontext():
            for _ in range(epochs):
                for b in self._batches(samples, ids, gen):
                    z = clone.prepare(torch.stack([samples[i] for i in b]))
                    loss = F.mse_loss(clone.net(clone._corrupt(z, gen)), z)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
        return clone.eval()

    # ------------------------------------------------------------------ persistence
    def files(self) -> dict[str, bytes]:
        return {self.FILE: self.to_bytes()}

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in self.state_dict().items()}, buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, config: dict, channels: int, device: torch.device,
                   sigma: float = ModelConfig.sigma) -> "ReconstructionScorer":
        try:
            cfg = AEConfig(**config)
            cfg.validate()
            scorer = cls(cfg, channels, sigma)
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
            scorer.load_state_dict(state)
        except (TypeError, ConfigError, RuntimeError, KeyError) as exc:
            raise ModelFormatError(f"autoencoder weights do not match its manifest entry ({exc})") from None
        problem = _weights_problem(scorer.state_dict())
        if problem:
            raise ModelFormatError(f"{cls.FILE}: {problem}")
        return scorer.to(device).eval()

    def describe(self) -> dict:
        return {"config": asdict(self.config), "channels": self.channels,
                "parameters": int(sum(p.numel() for p in self.net.parameters()))}


# What a saved network may hold (docs/model-format.md). A fit clamps each feature's std to STD_MIN and takes its mean
# from features (bounded like the bank's rows, index.ROW_MAX_ABS); its trained weights stay near their start (at
# most 1.06 in the models measured: AdamW moves a weight by about lr, 0.002, a step). A crafted NaN, infinity, zero
# std or 1e30 weight made every fused score NaN and every decision normal, and a negative std flagged every part.
STD_MIN = 1e-6
FEATURE_MAX_ABS = 1e6
WEIGHT_MAX_ABS = 1e3


def _weights_problem(state: dict[str, torch.Tensor]) -> str | None:
    """What no fit writes into the network's ``state`` (a NaN or absurd weight, a std below the fit's clamp), or
    None."""
    for name, value in state.items():
        if not value.is_floating_point() or not value.numel():
            continue
        v = value.detach().float()
        low, high = float(v.min()), float(v.max())
        if name == "std":
            ok = STD_MIN * (1 - 1e-6) <= low <= high <= FEATURE_MAX_ABS  # the clamp's float32 1e-6 is a hair below
            rule = f"within [{STD_MIN:g}, {FEATURE_MAX_ABS:g}]"
        else:
            bound = FEATURE_MAX_ABS if name == "mean" else WEIGHT_MAX_ABS
            ok, rule = -bound <= low <= high <= bound, f"finite and below {bound:g} in magnitude"
        if not ok:
            held = "NaN" if math.isnan(low) or math.isnan(high) else f"{low:g} to {high:g}"
            return f"'{name}' holds {held}, where a fit writes values {rule}"
    return None

