"""DK-UXNet (Wu, Li & Zhang, "Semi-supervised medical image segmentation via query distribution
consistency", 2023; code: github.com/Rows21/DK-UXNet): a 3D UX-Net backbone with a kMaX decoder,
trained with a dual contrastive loss between the weak and the strong view of every patch.

Network (paper §2.2): backbone features at encoder stages 2, 3, 4 (1/4, 1/8, 1/16) refine N
cluster centres by k-means cross-attention, deepest first (`semiseg.networks.kmax`); the masks
M = softmax over clusters of <pixel embedding, centre> and an MLP's class distribution per cluster
give p(k | x) = sum_n M_n(x) p_n(k); the predictor returns log p, so inference's softmax gives p.
The query distribution Q (§2.1, MaxQuery) sums the masks over N/K contiguous groups of queries,
one group per class: Q_k(x) = sum_{n in group k} M_n(x).

Loss (eqs. 3-5): L = L_sup + lambda (L_segc + L_qdc), L_sup = cross-entropy + Dice on p (MONAI
DiceCELoss, as all methods here) plus the query-distribution supervision and kMaX-DeepLab's
auxiliary semantic loss (below); L_segc and L_qdc are InfoNCE losses (cosine similarity,
temperature tau) between the two views' p and Q, one vector per patch.

Defaults and their sources:
- AdamW, lr 1e-4 (paper §3.2); weight decay 0.01 and a constant rate (the released code: torch's
  AdamW default, no scheduler; the paper is silent). The run's --optimizer/--lr do not apply;
  set `lr`/`weight_decay` with --option.
- queries 128, query_dim 256, 8 heads, FFN 2048, 2 kMaX layers per scale: the released code /
  kMaX-DeepLab (the paper gives none).
- qd_weight 0.1: the released code's weight of the query-distribution cross-entropy (the paper says
  "ground-truth query distribution Q_d is used to supervise the cluster outputs", no weight).
- semantic_weight 1.0: kMaX-DeepLab trains its pixel decoder with an auxiliary semantic
  segmentation loss (weight 1.0 in its default configuration); here DiceCE on the backbone's own
  1x1 head over the pixel embedding. Neither DK-UXNet's paper nor its code has it. Without it
  the hippocampus run collapsed (benchmarks/results/hippocampus_cpu.md, dk-uxnet notes): the
  embedding never learnt to tell anterior from posterior voxels (a linear probe on it: 68 %
  correct; 90 % with the auxiliary loss), as the cluster head passes no class gradient to it
  while the clusters holding foreground share one class distribution. 0 drops it.
- qd_balanced: the query-distribution NLL is averaged over each class's voxels, then over the
  classes (the code's cross-entropy averages over voxels). On a hippocampus patch 95 % of the
  voxels are background, and a voxel mean left both foreground classes in background clusters.
  With the auxiliary loss alone the classes still collapsed; with both they separated in two
  200-iteration trials, yet a 1000-iteration benchmark row with per-voxel contrast still
  collapsed, and with per-patch contrast (the default) only the ablation rows kept the classes
  apart: the full method lost them after 500 iterations (notes).
- contrast_weight (lambda) 0.1 and temperature (tau) 0.1: the paper names both and gives no value;
  0.1 is SimCLR's temperature (the paper follows SimCLR) and the usual consistency weight (UA-MT).
- segc / qdc switch L_segc / L_qdc off: the paper's ablation rows (Table 2); with both off (its
  first row) the unlabeled patches are not used. L_segc is off by default, a deviation (`--preset
  paper` turns it on): with both terms the 1000-iteration hippocampus row separated the classes by
  iteration 400 and lost both by 700 (0.278, anterior only), without L_segc it kept them (0.819,
  supervised-only VNet 0.816; one seed, benchmarks/results/hippocampus_cpu.md, notes). With both off
  the decoder, trained on the labeled patches alone, never separated the classes (16 labeled, 3 seeds:
  0.281, one class at Dice 0 in each), where the default reached 0.813: L_qdc is what keeps them apart.

Choices where the paper is silent or unclear, and deviations:
- The backbone is the run's --network (`uxnet` is the paper's 3D UX-Net; `vnet`/`unet` work too, as
  the kMaX part only needs `encode` and `decode(..., return_embedding=True)`); the backbone's own
  1x1 head serves the auxiliary semantic loss only, never prediction. Inputs are zero-padded to
  the backbone's size multiple and cropped back.
- kMaX reads the encoder's stage 2-4 outputs, as §2.2.1 states (the released code reads two decoder
  scales, kMaX-DeepLab its pixel decoder's); gradients through the argmax: see `kmax.py`.
- Eq. 4 compares whole outputs, sim(X_i, X_j) with X_i in R^{HWD}: each patch's p (or Q), all its
  voxels and channels, is one vector (SimCLR's sample-level contrast). Its positive is the same
  patch's other view, its negatives all views of the other patches of the step (labeled and
  unlabeled, one contrast for L_l and L_u, so the paper's sum of the two is lambda times the mean
  over all patches); the denominator runs over every k != i, the positive included (SimCLR's
  NT-Xent); both views get gradients (SimCLR). The 1/HWD in front is dropped: on one term per
  patch it would only divide lambda by the patch size. `contrast_level="voxel"` reads Eq. 4
  instead as a mean of per-voxel InfoNCEs (the views are spatially aligned: intensity-only
  augmentation); on the hippocampus benchmark both 1000-iteration rows with it left the posterior
  class empty, all three with per-patch contrast separated the classes (the full method lost them
  again after 500 iterations; benchmarks/results/hippocampus_cpu.md, notes).
- Q is the grouped (K-dimensional) query distribution, which the paper compares to a ground truth;
  queries are split into K near-equal contiguous groups (the released code: 16/4/108 of 128).
- The query-distribution supervision is the mean over voxels of -log Q_y (the released code sums
  over voxels, which ties its scale to the patch size).
- L_sup is applied to both views of a labeled patch (same labels: the views are aligned).
- Cluster classes enter the aggregation as probabilities (kMaX's semantic inference), so p is a
  distribution; the released code weights raw class scores by the masks and applies a softmax.
- A step sees the trainer's batch (2 labeled + 2 unlabeled patches by default) in both views, 8
  volumes; the paper's batch was 2 patches in both views.
- No ramp-up of lambda (the paper has none).

The paper's network is `uxnet` (`paper_network`): the CLI trains on it unless --network names
another. `--preset paper` (semiseg.presets) sets §3.2 literally: AdamW lr 1e-4 (the method's own
optimizer, constant), two training samples a step, each in a weak and a strong view (batch 4: the
trainer's batch 1 labeled + 1 unlabeled), UA-MT's random crop (+ rotation/flip, "following [23]"),
fp32. Its "4000 epochs" give no iteration count (epoch size unstated): the run's --iterations stays.
Ignore label: supported (the supervised losses and the query-distribution NLL leave ignored voxels out).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from semiseg.errors import InputError
from semiseg.labels import IGNORE_INDEX
from semiseg.methods.base import Batch, Method, OptimizerSpec, StepInfo
from semiseg.networks import size_multiples
from semiseg.networks.kmax import KMaXDecoder, aggregate_classes
from semiseg.networks.uxnet import pad_to_multiple


def voxel_info_nce(first: torch.Tensor, second: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE between two views (B, C, *spatial) of B patches, per voxel: each vector's positive is
    its patch's other view at that voxel, the other 2B - 2 vectors there its negatives; cosine
    similarity over C; mean over the 2B anchors and the voxels."""
    with torch.autocast(first.device.type, enabled=False):
        views = F.normalize(torch.cat([first, second]).float().flatten(2), dim=1)  # (2B, C, V)
        count = views.shape[0]
        similarity = torch.einsum("acv,bcv->abv", views, views) / temperature  # (2B anchors, 2B candidates, V)
        similarity = similarity.masked_fill(torch.eye(count, dtype=torch.bool, device=views.device)[..., None], float("-inf"))
        partner = torch.arange(count, device=views.device).roll(count // 2)  # i <-> i + B
        return F.cross_entropy(similarity, partner[:, None].expand(count, views.shape[2]))


def class_balanced_nll(log_probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood averaged over each class's voxels, then over the classes present:
    nll_loss's weighted mean with each class weighted by 1 / its voxel count."""
    counts = torch.bincount(target[target != IGNORE_INDEX], minlength=log_probs.shape[1])
    return F.nll_loss(log_probs, target, weight=1.0 / counts.clamp_min(1).to(log_probs.dtype), ignore_index=IGNORE_INDEX)


def info_nce(first: torch.Tensor, second: torch.Tensor, temperature: float, level: str) -> torch.Tensor:
    """`voxel_info_nce`, or with level "volume" one InfoNCE whose vectors are whole patches (every
    voxel's channels), SimCLR's sample-level contrast."""
    if level == "volume":
        first, second = first.reshape(first.shape[0], -1, 1), second.reshape(second.shape[0], -1, 1)
    return voxel_info_nce(first, second, temperature)


class DKUXNet(Method):
    name = "dk-uxnet"
    uses_strong_view = True
    summary = "kMaX decoder on a UX-Net (--network uxnet), InfoNCE between weak/strong views of outputs and query distributions."
    handles_ignore_label = True
    find_unused_parameters = True  # for DistributedDataParallel: with semantic_weight 0 the backbone's 1x1 head gets no gradient
    paper_network = "uxnet"
    larger_windows = False  # the kMaX queries attend over the whole window: its size changes every voxel's output
    defaults = {
        "contrast_weight": 0.1,  # lambda
        "temperature": 0.1,  # tau
        "contrast_level": "volume",  # "volume": one InfoNCE per patch (Eq. 4, SimCLR); "voxel": one per voxel
        "segc": False,  # the paper has it on (--preset paper); with both terms the hippocampus rows lost the classes
        "qdc": True,
        "qd_weight": 0.1,
        "semantic_weight": 1.0,  # kMaX-DeepLab's auxiliary semantic loss on the backbone head
        "qd_balanced": True,  # query-distribution NLL averaged per class
        "queries": 128,
        "query_dim": 256,
        "layers_per_scale": 2,
        "heads": 8,
        "ffn_dim": 2048,
        "lr": 1e-4,
        "weight_decay": 0.01,
    }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        options = self.options
        if options["contrast_level"] not in ("voxel", "volume"):
            raise InputError("dk-uxnet: contrast_level must be 'voxel' or 'volume'")
        if options["queries"] < self.num_classes:
            raise InputError(f"dk-uxnet needs at least one query per class ({self.num_classes}); got queries={options['queries']}")
        backbone = self.make_network()
        self.networks["backbone"] = backbone
        self.networks["kmax"] = KMaXDecoder(
            backbone.encoder_widths[:-4:-1], backbone.embedding_width, self.num_classes, queries=options["queries"],
            dim=options["query_dim"], layers_per_scale=options["layers_per_scale"], heads=options["heads"], ffn_dim=options["ffn_dim"],
        )
        group = torch.arange(options["queries"]) * self.num_classes // options["queries"]
        self.register_buffer("query_groups", F.one_hot(group, self.num_classes).float(), persistent=False)

    def optimizers(self) -> dict[str, OptimizerSpec]:
        return {"main": OptimizerSpec(networks=["backbone", "kmax"], kind="adamw", lr=self.options["lr"],
                                      weight_decay=self.options["weight_decay"], schedule="constant")}

    def segment(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Log class probabilities, query distribution and the backbone head's logits (each (B, K,
        *spatial)) of images of any size."""
        backbone = self.networks["backbone"]
        depth, height, width = images.shape[2:]
        features = backbone.encode(pad_to_multiple(images, size_multiples(backbone)))
        semantic_logits, embedding = backbone.decode(features, return_embedding=True)
        mask_logits, class_logits = self.networks["kmax"](features[:-4:-1], embedding)
        with torch.autocast(images.device.type, enabled=False):
            masks = mask_logits[..., :depth, :height, :width].float().softmax(1)
            distribution = torch.einsum("bn...,nk->bk...", masks, self.query_groups)
            return aggregate_classes(masks, class_logits.float()), distribution, semantic_logits[..., :depth, :height, :width]

    def training_step(self, labeled: Batch, unlabeled: Batch | None, step: StepInfo) -> dict[str, torch.Tensor]:
        contrast = self.options["segc"] or self.options["qdc"]
        batches = [labeled, unlabeled] if contrast and unlabeled is not None else [labeled]
        weak = torch.cat([b["image"] for b in batches])
        count, n_labeled = weak.shape[0], labeled["image"].shape[0]
        log_probs, distribution, semantic_logits = self.segment(torch.cat([weak, torch.cat([b["image_strong"] for b in batches])]))
        labels = torch.cat([labeled["label"], labeled["label"]])

        def labeled_views(x: torch.Tensor) -> torch.Tensor:
            return torch.cat([x[:n_labeled], x[count : count + n_labeled]])

        query_log = labeled_views(distribution).clamp_min(torch.finfo(torch.float32).tiny).log()
        if self.options["qd_balanced"]:
            query_nll = class_balanced_nll(query_log, labels[:, 0])
        else:
            query_nll = F.nll_loss(query_log, labels[:, 0], ignore_index=IGNORE_INDEX)
        losses = {
            "supervised": self.supervised_loss(labeled_views(log_probs), labels),
            "query_distribution": self.options["qd_weight"] * query_nll,
        }
        if self.options["semantic_weight"]:
            losses["semantic"] = self.options["semantic_weight"] * self.supervised_loss(labeled_views(semantic_logits), labels)
        weight, temperature, level = self.options["contrast_weight"], self.options["temperature"], self.options["contrast_level"]
        if self.options["segc"]:
            probabilities = log_probs.exp()
            losses["segc"] = weight * info_nce(probabilities[:count], probabilities[count:], temperature, level)
        if self.options["qdc"]:
            losses["qdc"] = weight * info_nce(distribution[:count], distribution[count:], temperature, level)
        return losses

    def predictors(self):
        return {"dk-uxnet": lambda images: self.segment(images)[0]}
