"""The one training loop every method runs on.

Each iteration draws a labeled batch and (for semi-supervised methods) an unlabeled batch, asks the
method for its loss terms, back-propagates their sum once, steps every optimizer, and lets the
method update its non-trained state. Progress is reported as events (dicts) to a callback and to a
JSONL log beside the checkpoints; a `should_stop` callback cancels cleanly with a valid checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from semiseg.checkpoint import load_training_state, load_weights, save_checkpoint
from semiseg.config import TrainConfig
from semiseg.datasets import load_dataset, select_split
from semiseg import distributed
from semiseg.devices import describe
from semiseg.errors import InputError, OutputExistsError
from semiseg.inference import predict_probabilities
from semiseg.labels import IGNORE_INDEX, check_label_mapping
from semiseg.metrics import dice
from semiseg.methods import build_method, method_class
from semiseg.methods.base import Method, NetworkSpec, StepInfo
from semiseg.models import ModelRecord, load_method_weights, load_model, method_weights, read_record
from semiseg.networks import build_network, pooling_options, pools_per_axis, size_multiple
from semiseg.preprocessing import cached_case, compute_plan
from semiseg.sampling import IterationBatches, PatchDataset, Volumes

EventCallback = Callable[[dict[str, Any]], None]


def _drop_partial_last_line(log: Path) -> None:
    """A run killed while writing its log leaves half a line; the resumed run's lines must not join it."""
    if not log.exists():
        return
    with open(log, "rb+") as handle:
        text = handle.read()
        if text and not text.endswith(b"\n"):
            handle.truncate(text.rfind(b"\n") + 1)


class Cancelled(Exception):
    pass


class Trainer:
    def __init__(self, config: TrainConfig, on_event: EventCallback | None = None, should_stop: Callable[[], bool] | None = None):
        self.config = config
        self.on_event = on_event
        self.should_stop = should_stop or (lambda: False)
        self.distribution = distributed.Distribution()
        self.output = Path(config.output)
        self.log_path = self.output / "log.jsonl"

    # Events -----------------------------------------------------------------------------------
    def emit(self, event: dict[str, Any]) -> None:
        if not self.distribution.is_main:
            return
        event = {"time": time.time(), **event}
        with open(self.log_path, "a") as log:
            log.write(json.dumps(event) + "\n")
        if self.on_event is not None:
            self.on_event(event)

    # Setup ------------------------------------------------------------------------------------
    def _prepare_output(self) -> None:
        config = self.config
        has_checkpoint = (self.output / "last").exists() or (self.output / "best").exists()
        if config.resume:
            if not (self.output / "last").exists():
                raise InputError(f"{self.output}: nothing to resume (no last/ checkpoint there)")
            _drop_partial_last_line(self.log_path)
        elif has_checkpoint:
            if not config.overwrite:
                raise OutputExistsError(f"{self.output} already holds a training run; use --resume to continue it or --overwrite to replace it")
            for name in ("last", "best", "log.jsonl"):
                target = self.output / name
                shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
        self.output.mkdir(parents=True, exist_ok=True)

    def _setup(self) -> None:
        config = self.config
        if config.iterations < 1 or config.batch_size < 1:
            raise InputError("iterations and batch size must be at least 1")
        self.emit({"type": "start", "device": describe(self.device), "processes": self.distribution.world_size,
                   "config": config.to_dict()})
        self.dataset = load_dataset(config.data, config.unlabeled)
        self.split = select_split(self.dataset, config.labeled, config.validation, config.unlabeled_cases, config.seed)
        start_from = self.output / "last" if config.resume else config.initial_checkpoint
        start = read_record(start_from) if start_from else None
        if start is not None and config.resume:
            self.split = start.split
        method_cls = method_class(config.method)
        ignore_label = config.ignore_label if config.ignore_label is not None else self.dataset.ignore_label
        if start is not None:
            self.plan = start.plan
            if ignore_label is not None and ignore_label != self.plan.ignore_label:  # fine-tuning on partial labels
                check_label_mapping(self.plan.channel_values, ignore_label)
                self.plan = dataclasses.replace(self.plan, ignore_label=ignore_label)
        else:
            probe = build_network(config.network, 1, 2, **config.network_options)
            self.plan = compute_plan(self.dataset, self.split, size_multiple(probe), config.patch_size, ignore_label=ignore_label,
                                     per_axis_pooling=pools_per_axis(config.network, config.network_options))
        self.emit({"type": "dataset", "description": self.dataset.describe(), "labeled": len(self.split.labeled),
                   "unlabeled": len(self.split.unlabeled) if method_cls.uses_unlabeled else 0,
                   "validation": len(self.split.validation), "patch_size": list(self.plan.patch_size)})

        seed_everything(config.seed)
        network_options = dict(config.network_options)
        if self.plan.pooling is not None and pools_per_axis(config.network, network_options) and \
                any(stride == 1 for stage in self.plan.pooling for stride in stage):  # anisotropic: pool as planned
            network_options.update(pooling_options(config.network, self.plan.pooling, self.plan.kernel_sizes))
        self.method: Method = build_method(config.method, self.plan.in_channels, self.plan.num_classes, NetworkSpec(config.network, network_options),
                                           dict(config.method_options), ignore_label=self.plan.ignore_label is not None)
        if config.initial_checkpoint and not config.resume:
            self._initialise_from(config.initial_checkpoint)
        # channels_last_3d: convolutions on tensor cores read NDHWC without transposing (opt-in).
        self.method.to(self.device, memory_format=torch.channels_last_3d if config.channels_last else None)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # the patch size is fixed: pick the fastest conv algorithms once
        if config.compile:
            for net in self.method.networks.values():
                net.compile()  # in place: parameter names (checkpoints, EMA, DDP) are unchanged
        self.model = distributed.wrap(self.method, self.distribution, self.device)
        torch.manual_seed(config.seed + self.distribution.rank)  # ranks draw different noise and dropout
        self.optimizers, self.schedulers = self._make_optimizers()
        self.amp_dtype = _amp_dtype(self.device) if config.amp else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.iteration = 0
        self.best = -1.0
        self.history: list[dict] = []
        if config.resume:
            self._restore(self.output / "last")

    def _initialise_from(self, path: str) -> None:
        model = load_model(path, "cpu")
        weights = method_weights(model.method)
        if model.record.method == self.config.method:
            load_method_weights(self.method, weights, path)
            return
        # Another method's checkpoint: every network of ours starts from its first predicting network.
        source = next(iter(model.method.predictors()))
        for net in self.method.networks.values():
            net.load_state_dict(model.method.networks[source].state_dict())

    def _make_optimizers(self):
        config = self.config
        optimizers, schedulers = {}, {}
        self.stage_starts = self.method.stage_starts(config.iterations)
        for name, spec in self.method.optimizers().items():
            params = [p for net in spec.networks for p in self.method.networks[net].parameters()]
            kind = spec.kind or config.optimizer
            lr = spec.lr if spec.lr is not None else config.lr
            decay = spec.weight_decay if spec.weight_decay is not None else config.weight_decay
            if kind == "sgd":
                optimizer = torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=decay, nesterov=config.nesterov)
            elif kind in ("adamw", "adam"):
                cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
                optimizer = cls(params, lr=lr, weight_decay=decay, betas=spec.betas or (0.9, 0.999))
            else:
                raise InputError(f"unknown optimizer '{kind}' (use sgd or adamw)")
            schedule = spec.schedule or config.lr_schedule
            schedulers[name] = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(schedule, config.iterations, self.stage_starts))
            optimizers[name] = optimizer
        return optimizers, schedulers

    def _volumes(self, ids: list[str], with_labels: bool) -> Volumes:
        by_id = {c.case_id: c for c in self.dataset.cases}
        images, labels = [], []
        for index, case_id in enumerate(ids):
            image, label = cached_case(by_id[case_id], self.plan, with_labels)
            images.append(image)
            labels.append(label)
            self.emit({"type": "prepare", "done": index + 1, "total": len(ids), "case": case_id})
        return Volumes(images, labels if with_labels else None)

    def _loaders(self):
        config = self.config
        pin = self.device.type == "cuda"

        def loader(volumes: Volumes, seed: int):
            dataset = PatchDataset(volumes, self.plan.patch_size, seed, strong_view=self.method.uses_strong_view,
                                   augmentation=config.augmentation)
            batches = IterationBatches(self.iteration, config.iterations, config.batch_size,
                                       self.distribution.rank, self.distribution.world_size)
            # Own generator: creating a loader iterator must not draw from the global RNG that the
            # methods use, or a resumed run would diverge from an uninterrupted one.
            return DataLoader(dataset, batch_sampler=batches, num_workers=config.workers, pin_memory=pin,
                              prefetch_factor=4 if config.workers else None, generator=torch.Generator().manual_seed(seed))

        labeled = loader(self._volumes(self.split.labeled, True), config.seed)
        unlabeled = None
        if self.method.uses_unlabeled:
            if not self.split.unlabeled:
                raise InputError(f"method '{config.method}' needs unlabeled scans, and the split left none (lower --labeled or add --unlabeled)")
            unlabeled = loader(self._volumes(self.split.unlabeled, False), config.seed + 1)
        return labeled, unlabeled

    # Loop -------------------------------------------------------------------------------------
    def run(self) -> Path:
        """Train to the iteration budget (or until cancelled); return the best (else last) checkpoint."""
        self.distribution, self.device = distributed.start(self.config.device)
        try:
            if self.distribution.is_main:
                self._prepare_output()
            distributed.barrier(self.distribution)
            self._setup()
            return self._loop()
        finally:
            distributed.stop(self.distribution)

    def _loop(self) -> Path:
        validation = self._volumes(self.split.validation, True) if self.split.validation else None
        labeled_loader, unlabeled_loader = self._loaders()
        unlabeled_batches = iter(unlabeled_loader) if unlabeled_loader is not None else None
        config = self.config
        self._train_mode()
        running: dict[str, torch.Tensor] = {}
        started, started_at = self.iteration, time.perf_counter()
        cancelled = False
        first_step = config.compile
        for labeled in labeled_loader:
            # Under DDP the cancel flag is a collective with a host sync: poll it at log boundaries only.
            poll = not self.distribution.enabled or self.iteration % config.log_every == 0
            if poll and distributed.broadcast_flag(self.should_stop(), self.distribution, self.device):
                cancelled = True
                break
            unlabeled = next(unlabeled_batches) if unlabeled_batches is not None else None
            if self.iteration in self.stage_starts:
                for optimizer in self.optimizers.values():
                    optimizer.state.clear()  # a new stage: no momentum (or Adam moments) carried over
            tick = time.perf_counter()
            losses = self._step(self._to_device(labeled), self._to_device(unlabeled) if unlabeled else None)
            if first_step:  # torch.compile compiles during the first step: report what it cost
                first_step = False
                self._synchronize()
                self.emit({"type": "compile", "iteration": self.iteration + 1, "seconds": time.perf_counter() - tick})
            for key, value in losses.items():
                running[key] = running.get(key, 0.0) + value.detach()
            self.iteration += 1
            if self.iteration % config.log_every == 0 or self.iteration == config.iterations:
                self._emit_iteration(running, started, started_at)
                running = {}
            if validation is not None and (self.iteration % config.validate_every == 0 or self.iteration == config.iterations):
                self._validate(validation)
            elif self.iteration % config.validate_every == 0:
                self._save("last", with_training_state=True)
        self._save("last", with_training_state=True)
        distributed.barrier(self.distribution)
        best = self.output / "best"
        if not best.exists():
            self._save("best", with_training_state=False)
        self.emit({"type": "cancelled" if cancelled else "end", "iteration": self.iteration, "best_dice": self.best, "checkpoint": str(best)})
        return best

    def _train_mode(self) -> None:
        self.method.train()
        if self.config.frozen_norm_statistics:
            # A few fine-tuning patches (foreground-oversampled, batch 2) would replace the running statistics
            # the model was trained with: on the bundled model that alone cost 0.01 Dice on a held-out case
            # (benchmarks/results/finetune_recipes.md).
            for module in self.method.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}  # pinned on CUDA: asynchronous
        if self.config.channels_last:  # images in the networks' memory format; labels stay as they are
            batch = {k: v.contiguous(memory_format=torch.channels_last_3d) if v.is_floating_point() and v.dim() == 5 else v
                     for k, v in batch.items()}
        return batch

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _step(self, labeled, unlabeled) -> dict[str, torch.Tensor]:
        step = StepInfo(self.iteration, self.config.iterations)
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            losses = self.model(labeled, unlabeled, step)
        total = sum(losses.values())
        self.scaler.scale(total).backward()
        for optimizer in self.optimizers.values():
            self.scaler.step(optimizer)
        self.scaler.update()
        for scheduler in self.schedulers.values():
            scheduler.step()
        self.method.after_step(step)
        return losses

    def _emit_iteration(self, running: dict[str, torch.Tensor], started: int, started_at: float) -> None:
        count = self.config.log_every if self.iteration % self.config.log_every == 0 else self.iteration % self.config.log_every
        losses = {k: float(v) / count for k, v in distributed.mean_across_ranks(running, self.distribution).items()}
        elapsed = time.perf_counter() - started_at
        per_iteration = elapsed / max(self.iteration - started, 1)
        self.emit({
            "type": "iteration", "iteration": self.iteration, "iterations": self.config.iterations,
            "loss": sum(losses.values()), "losses": losses,
            "lr": {name: opt.param_groups[0]["lr"] for name, opt in self.optimizers.items()},
            "sec_per_iter": per_iteration, "eta_s": per_iteration * (self.config.iterations - self.iteration),
        })

    @torch.no_grad()
    def _validate(self, validation: Volumes) -> None:
        self.method.eval()
        predictors = list(self.method.predictors().values())
        per_case = []
        shard = slice(self.distribution.rank, None, self.distribution.world_size)
        # (channel, label value) of each named foreground class
        classes = [(c, v) for c, v in enumerate(self.plan.channel_values) if v != 0 and v in self.plan.class_names]
        for image, label in zip(validation.images[shard], validation.labels[shard]):
            probabilities = predict_probabilities(np.asarray(image), predictors, self.plan.patch_size, self.device,
                                                  self.method.inference_overlap)
            prediction = probabilities.mean(0).argmax(0)
            label = np.asarray(label)
            annotated = label != IGNORE_INDEX if self.plan.ignore_label is not None else True  # ignored voxels count neither way
            per_case.append([dice((prediction == c) & annotated, label == c) for c, _ in classes])
        self._train_mode()
        per_case = distributed.gather(per_case, self.distribution)
        per_class = np.nanmean(np.array(per_case, dtype=float), axis=0)
        dice_mean = float(np.nanmean(per_class))
        names = [self.plan.class_names[v] for _, v in classes]
        self.history.append({"iteration": self.iteration, "dice_mean": dice_mean})
        improved = dice_mean > self.best
        if improved:
            self.best = dice_mean
        self.emit({"type": "validation", "iteration": self.iteration, "dice_mean": dice_mean, "cases": len(per_case),
                   "dice_per_class": dict(zip(names, per_class.tolist())), "best": improved})
        self._save("last", with_training_state=True)
        if improved:
            self._save("best", with_training_state=False)

    # Checkpoints ------------------------------------------------------------------------------
    def _record(self) -> ModelRecord:
        return ModelRecord(
            method=self.method.name, method_options=dict(self.method.options), network=self.method.network_spec.name,
            network_options=dict(self.method.network_spec.options), in_channels=self.plan.in_channels, num_classes=self.plan.num_classes, plan=self.plan,
            split=self.split, data=str(self.config.data), seed=self.config.seed, iteration=self.iteration,
            iterations=self.config.iterations, train_config=self.config.to_dict(),
            best_dice_mean=self.best if self.best >= 0 else None, validation_history=self.history,
        )

    def _save(self, name: str, with_training_state: bool) -> None:
        if not self.distribution.is_main:
            return
        state = None
        if with_training_state:
            state = {
                "iteration": self.iteration,
                "best": self.best,
                "history": self.history,
                "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "schedulers": {k: s.state_dict() for k, s in self.schedulers.items()},
                "scaler": self.scaler.state_dict(),
                "rng": rng_state(),
            }
        path = save_checkpoint(self.output / name, method_weights(self.method), self._record().to_dict(), state)
        self.emit({"type": "checkpoint", "name": name, "path": str(path), "iteration": self.iteration})

    def _restore(self, folder: Path) -> None:
        record = read_record(folder)
        load_method_weights(self.method, load_weights(folder, record.weights_sha256), str(folder))
        state = load_training_state(folder)
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(state["optimizers"][name])
        for name, scheduler in self.schedulers.items():
            scheduler.load_state_dict(state["schedulers"][name])
        self.scaler.load_state_dict(state["scaler"])
        self.iteration, self.best, self.history = state["iteration"], state["best"], state["history"]
        set_rng_state(state["rng"])
        self.emit({"type": "resume", "iteration": self.iteration})


STEP_EVERY, STEP_FACTOR = 2500, 0.1  # UA-MT's lr_ = base_lr * 0.1 ** (iter_num // 2500)
LR_SCHEDULES = ("poly", "step", "constant")


def lr_factor(schedule: str, iterations: int, stage_starts: Sequence[int] = ()) -> Callable[[int], float]:
    """The multiplier of the initial learning rate for the step after `it` completed iterations.
    With stage starts, the schedule restarts at each one and runs over that stage's iterations."""
    if schedule not in LR_SCHEDULES:
        raise InputError(f"unknown learning-rate schedule '{schedule}' (use {', '.join(LR_SCHEDULES)})")
    bounds = [0, *sorted(stage_starts), iterations]

    def factor(it: int) -> float:
        stage = max(i for i in range(len(bounds) - 1) if bounds[i] <= it or i == 0)
        start, length = bounds[stage], max(bounds[stage + 1] - bounds[stage], 1)
        if schedule == "poly":
            return max(0.0, 1.0 - (it - start) / length) ** 0.9
        if schedule == "step":
            return STEP_FACTOR ** ((it - start) // STEP_EVERY)
        return 1.0

    return factor


def _amp_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA where supported (no gradient scaler needed), else fp16; the CPU trains in float32."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    numpy = state["numpy"]
    np.random.set_state(tuple(numpy))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train(config: TrainConfig, on_event: EventCallback | None = None, should_stop: Callable[[], bool] | None = None) -> Path:
    return Trainer(config, on_event, should_stop).run()
