"""SupervisedDetector: a binary defect classifier trained on good images and (synthetic or real) defects.

The seed (DIAG, Capogrosso et al. 2024) trains torchvision's ResNet-50 with its fully connected layers replaced
by a binary head: binary cross-entropy, Adam at lr 1e-4, batch 32, 50 epochs, every image resized to
224 x 632, on a GPU. What changed here, for a 2-core CPU and images of every shape:

- **backbone**: ImageNet EfficientNet-Lite0 by default (weights ship offline with its package; about a
  tenth of ResNet-50's multiply-adds); ``backbone="resnet50"`` with ``weights=`` is the seed's network.
- **fine-tuning**: only the last ``trainable_blocks`` units of the trunk (default 3: Lite0's last two
  MBConv blocks and its head convolution; ResNet-50's ``layer4``) and the new head are trained; the frozen
  units' output is computed once per image and kept (``memoize_features``), so an epoch costs a pass
  through the last units only, and refitting on overlapping images (the synthesis study's cells) reuses it.
  BatchNorm keeps its ImageNet statistics (batches are small).
- **images** keep their aspect ratio: the short side is resized to ``image_size`` (224, the seed's short
  side) and the long side follows, padded to a multiple of 32 (:class:`~fedinspect.detectors.preprocessing.
  Letterbox`, as the detectors do); batches group images of one padded shape. No augmentation (the frozen
  features are cached).
- **epochs**: at most ``epochs`` (30) with early stopping: a seeded stratified ``validation_fraction``
  of the training images is held out and the epoch with the best validation average precision (ties: lower
  loss; loss alone when the validation share has one class) is kept, stopping after ``patience`` epochs
  without improvement. Adam, lr 1e-4 and batch 32 are the seed's.

Federated training (:mod:`fedinspect.federation.supervised_task`) uses the same loop through
:meth:`SupervisedDetector.initialize` (fit's starting weights), :meth:`~SupervisedDetector.trainable_state` /
:meth:`~SupervisedDetector.load_trainable_state` (the parameters FedAvg exchanges) and
:meth:`~SupervisedDetector.partial_fit` (more epochs from the current weights, a fresh Adam, no early stopping).

Model files are ``supervised.json`` (settings, training history) and ``model.safetensors`` (every weight,
so loading needs no backbone file); nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fedinspect.errors import ModelFileError, SettingsError

MODEL_FORMAT = "fedinspect.supervised/1"
SETTINGS_FILE = "supervised.json"
WEIGHTS_FILE = "model.safetensors"
FEATURE_BATCH = 16
"""Images of one shape put through the frozen units at a time."""


def check_images(images: Sequence[np.ndarray], what: str = "images") -> list[np.ndarray]:
    """The images as a list of uint8 (H, W, 3) arrays; ValueError naming the first bad one."""
    if isinstance(images, np.ndarray) and images.ndim == 4:
        images = list(images)
    checked = []
    for index, image in enumerate(images):
        array = np.asarray(image)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"{what}[{index}]: expected a uint8 RGB image (H, W, 3), got {array.dtype} "
                             f"{array.shape}")
        checked.append(array)
    if not checked:
        raise ValueError(f"{what}: no image given")
    return checked


def check_labels(labels: Sequence[int], n_images: int) -> np.ndarray:
    """Labels as an int64 array of 0 (good) and 1 (defective), one per image, both classes present."""
    array = np.asarray(labels)
    if array.ndim != 1 or array.shape[0] != n_images:
        raise ValueError(f"labels: expected {n_images} labels (one per image), got shape {array.shape}")
    if not np.isin(array, (0, 1)).all():
        raise ValueError("labels must be 0 (good) or 1 (defective)")
    array = array.astype(np.int64)
    if array.min() == array.max():
        raise ValueError(f"labels: the supervised detector needs good (0) and defective (1) images; only "
                         f"{int(array[0])} given")
    return array


class SupervisedDetector:
    """Binary classifier good/defective on a pretrained backbone (see the module docstring for the recipe).

    Parameters
    ----------
    backbone, weights:
        ``efficientnet_lite0`` (default), ``efficientnet_lite2`` or ``resnet50``; ``weights`` a local file of
        the user's (required for ``resnet50`` unless torchvision's file is in a cache searched).
    image_size:
        Short side after resizing, in pixels (the aspect ratio is kept).
    trainable_blocks, dropout:
        Units of the trunk fine-tuned (counted from its end), and the dropout before the head.
    epochs, lr, batch_size, validation_fraction, patience:
        Adam training; early stopping on the held-out validation share (0: no validation, every epoch runs).
    balanced:
        Weight the positives' loss by negatives / positives (the seed: plain cross-entropy).
    seed, device, progress, memoize_features:
        Seed of the split, the head's initial weights, dropout and batch order; torch device; progress
        bars; keep the frozen units' features per image content for later fits and predictions.
    """

    def __init__(self, backbone: str = "efficientnet_lite0", weights: str | None = None, image_size: int = 224,
                 trainable_blocks: int = 3, dropout: float = 0.2, epochs: int = 30, lr: float = 1e-4,
                 batch_size: int = 32, validation_fraction: float = 0.2, patience: int = 5,
                 balanced: bool = False, seed: int = 0, device: str = "cpu", progress: bool = False,
                 memoize_features: bool = True) -> None:
        from fedinspect.detectors.model_files import check_image_size
        from fedinspect.supervised.model import BACKBONES

        if backbone not in BACKBONES:
            raise SettingsError(f"unknown backbone {backbone!r}; choose from {', '.join(BACKBONES)}")
        self.backbone = backbone
        self.weights = weights
        self.image_size = check_image_size(image_size)
        for name, value in (("trainable_blocks", trainable_blocks), ("epochs", epochs),
                            ("batch_size", batch_size), ("patience", patience)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SettingsError(f"{name} must be a positive integer, got {value!r}")
        if not 0 <= validation_fraction < 1:
            raise SettingsError(f"validation_fraction must be in [0, 1), got {validation_fraction!r}")
        if not lr > 0:
            raise SettingsError(f"lr must be positive, got {lr!r}")
        if not 0 <= dropout < 1:
            raise SettingsError(f"dropout must be in [0, 1), got {dropout!r}")
        self.trainable_blocks = trainable_blocks
        self.dropout = dropout
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.balanced = balanced
        self.seed = seed
        self.device = device
        self.progress = progress
        self.memoize_features = memoize_features
        self._network = None
        self._initial_state: dict[str, torch.Tensor] | None = None
        self._memo: dict[bytes, torch.Tensor] = {}

    # ------------------------------------------------------------------ parameters
    def get_params(self) -> dict[str, Any]:
        """Constructor parameters (scikit-learn convention)."""
        return {name: getattr(self, name) for name in (
            "backbone", "weights", "image_size", "trainable_blocks", "dropout", "epochs", "lr", "batch_size",
            "validation_fraction", "patience", "balanced", "seed", "device", "progress", "memoize_features")}

    @property
    def letterbox(self) -> Any:
        from fedinspect.detectors.preprocessing import Letterbox
        from fedinspect.supervised.model import STRIDE

        return Letterbox(short_side=self.image_size, multiple=STRIDE)

    # ------------------------------------------------------------------ network
    def _build(self, pretrained: bool = True) -> Any:
        from fedinspect.supervised.model import build_network

        if self._network is None:
            network = build_network(self.backbone, self.weights, self.trainable_blocks, self.dropout, pretrained)
            self._network = network.to(self.device)
            self._initial_state = {k: v.detach().clone() for k, v in self._network.state_dict().items()}
        return self._network

    @property
    def network_(self) -> Any:
        """The fitted :class:`~fedinspect.supervised.model.SupervisedNet`."""
        if not self._fitted():
            raise RuntimeError("SupervisedDetector is not fitted: call fit(images, labels) or load a model first")
        return self._network

    def frozen_features(self, images: Sequence[np.ndarray], desc: str = "features") -> list[torch.Tensor]:
        """The frozen units' features (1, C, h, w) of every image, memoised by image content.

        Images of one letterboxed shape go through the frozen units together (``FEATURE_BATCH`` at a time).
        Call it ahead of a timed fit to compute them once (a federation's clients before the rounds).
        """
        from tqdm.auto import tqdm

        network = self._build()
        network.eval()
        images = check_images(images)
        keys = [hashlib.blake2b(image.tobytes(), digest_size=16, person=b"fedinspect-sup").digest()
                + repr(image.shape).encode() for image in images]
        found = {key: self._memo[key] for key in keys if key in self._memo}
        todo: dict[tuple[int, int], list[int]] = {}
        queued: set[bytes] = set()
        for index, (image, key) in enumerate(zip(images, keys, strict=True)):
            if key not in found and key not in queued:  # an image given twice is computed once
                queued.add(key)
                todo.setdefault(self.letterbox.padded_shape(*image.shape[:2]), []).append(index)
        bar = tqdm(total=sum(len(v) for v in todo.values()), desc=desc, unit="img", disable=not self.progress,
                   leave=False)
        for members in todo.values():
            for start in range(0, len(members), FEATURE_BATCH):
                chunk = members[start:start + FEATURE_BATCH]
                out = network.frozen_features(torch.stack([self.letterbox(images[i]) for i in chunk]).to(self.device))
                for position, index in enumerate(chunk):
                    found[keys[index]] = out[position:position + 1].clone()
                bar.update(len(chunk))
        bar.close()
        if self.memoize_features:
            self._memo.update(found)
        return [found[key] for key in keys]

    def _batches(self, features: list[torch.Tensor], indices: np.ndarray, rng: np.random.Generator | None
                 ) -> list[np.ndarray]:
        """Indices grouped by feature shape, in chunks of ``batch_size``; shuffled when ``rng`` is given."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for index in indices:
            groups.setdefault(tuple(features[int(index)].shape), []).append(int(index))
        batches = []
        for members in groups.values():
            order = np.asarray(members)
            if rng is not None:
                order = rng.permutation(order)
            batches += [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if rng is not None:
            batches = [batches[int(i)] for i in rng.permutation(len(batches))]
        return batches

    def _logits(self, features: list[torch.Tensor], indices: np.ndarray) -> np.ndarray:
        network = self._network
        network.eval()
        logits = np.zeros(len(indices), dtype=np.float64)
        position = {int(index): i for i, index in enumerate(indices)}
        with torch.no_grad():
            for batch in self._batches(features, indices, None):
                values = network.logits(torch.cat([features[int(i)] for i in batch]))
                for index, value in zip(batch, values.cpu().numpy(), strict=True):
                    logits[position[int(index)]] = value
        return logits

    # ------------------------------------------------------------------ fitting
    def _pretrained(self) -> Any:
        """The network at the pretrained weights (the head as built: the caller draws a new one)."""
        if self._initial_state is None:  # a loaded model: start again from the pretrained backbone
            self._network = None
            self._memo.clear()
        network = self._build()
        network.load_state_dict(self._initial_state)
        return network

    def _record(self, history: list[dict[str, float | None]], best_epoch: int | None, n_train: int | None,
                n_validation: int | None, seconds: float | None) -> None:
        self.history_ = history
        self.best_epoch_ = best_epoch
        self.n_train_images_ = n_train
        self.n_validation_images_ = n_validation
        self.fit_seconds_ = seconds

    def fit(self, images: Sequence[np.ndarray], labels: Sequence[int]) -> SupervisedDetector:
        """Train on ``images`` (uint8 RGB, any sizes) with ``labels`` (1 defective, 0 good); returns self."""
        from sklearn.model_selection import train_test_split

        images = check_images(images)
        y = check_labels(labels, len(images))
        indices = np.arange(len(images))
        if self.validation_fraction > 0:
            try:
                train_idx, val_idx = train_test_split(indices, test_size=self.validation_fraction, stratify=y,
                                                      random_state=self.seed)
            except ValueError as error:
                raise ValueError(f"cannot hold out a stratified validation share of {self.validation_fraction} "
                                 f"from {int(y.sum())} defective and {int((1 - y).sum())} good images ({error}); "
                                 "give more images or validation_fraction=0") from error
        else:
            train_idx, val_idx = indices, indices[:0]
        start = time.perf_counter()
        network = self._pretrained()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            network.head.reset_parameters()
            features = self.frozen_features(images)
            history, best_epoch = self._train(features, y, train_idx, val_idx, self.epochs, self.seed)
        self._record(history, best_epoch, len(train_idx), len(val_idx), time.perf_counter() - start)
        return self

    def partial_fit(self, images: Sequence[np.ndarray], labels: Sequence[int], epochs: int | None = None,
                    seed: int | None = None) -> SupervisedDetector:
        """Train ``epochs`` (default: the ``epochs`` parameter) more epochs from the current weights; returns self.

        One client's local training in a federated round: every image trains (no validation share, no early
        stopping) and Adam starts afresh (its moments are not kept between calls: after a federation's
        averaging they would push the new global weights by the old updates). ``seed`` (default: the ``seed``
        parameter) draws the dropout masks and the batch order; give each call its own. A detector not yet
        fitted starts from :meth:`initialize`. ``history_`` gets this call's epochs appended.
        """
        images = check_images(images)
        y = check_labels(labels, len(images))
        epochs = self.epochs if epochs is None else epochs
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise SettingsError(f"epochs must be a positive integer, got {epochs!r}")
        seed = self.seed if seed is None else seed
        if not self._fitted():
            self.initialize()
        start = time.perf_counter()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            features = self.frozen_features(images)
            indices = np.arange(len(images))
            history, _ = self._train(features, y, indices, indices[:0], epochs, seed)
        done = len(self.history_)
        for record in history:
            record["epoch"] = done + int(record["epoch"])
        self._record(self.history_ + history, done + epochs, len(images), 0,
                     (self.fit_seconds_ or 0.0) + time.perf_counter() - start)
        return self

    def _train(self, features: list[torch.Tensor], y: np.ndarray, train_idx: np.ndarray, val_idx: np.ndarray,
               epochs: int, seed: int) -> tuple[list[dict[str, float | None]], int]:
        """The training loop: Adam on binary cross-entropy for ``epochs`` epochs from the current weights, the
        batch order of epoch e drawn from ``(seed, e)``; with a validation share, early stopping and the best
        epoch's weights kept. Returns the history and the kept epoch. Dropout draws from torch's current seed."""
        from sklearn.metrics import average_precision_score
        from tqdm.auto import tqdm

        network = self._network
        trainable = [p for p in network.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(trainable, lr=self.lr)
        y_train = y[train_idx]
        pos_weight = None
        if self.balanced:
            pos_weight = torch.tensor((y_train == 0).sum() / max((y_train == 1).sum(), 1), dtype=torch.float32,
                                      device=self.device)
        target = torch.from_numpy(y).float().to(self.device)
        history: list[dict[str, float | None]] = []
        best: tuple[float, float] | None = None
        best_state: dict[str, torch.Tensor] | None = None
        best_epoch, waited = 0, 0
        bar = tqdm(range(1, epochs + 1), desc="epochs", unit="epoch", disable=not self.progress, leave=False)
        for epoch in bar:
            network.train()
            rng = np.random.default_rng([seed, epoch])
            total, seen = 0.0, 0
            for batch in self._batches(features, train_idx, rng):
                logits = network.logits(torch.cat([features[int(i)] for i in batch]))
                loss = F.binary_cross_entropy_with_logits(logits, target[batch], pos_weight=pos_weight)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += float(loss.detach()) * len(batch)
                seen += len(batch)
            record: dict[str, float | None] = {"epoch": epoch, "train_loss": total / seen,
                                               "val_loss": None, "val_ap": None}
            if len(val_idx):
                val_logits = self._logits(features, val_idx)
                val_y = y[val_idx]
                record["val_loss"] = float(F.binary_cross_entropy_with_logits(
                    torch.from_numpy(val_logits), torch.from_numpy(val_y).double(),
                    pos_weight=None if pos_weight is None else pos_weight.double().cpu()))
                if 0 < val_y.sum() < len(val_y):
                    record["val_ap"] = float(average_precision_score(val_y, val_logits))
                key = (record["val_ap"] if record["val_ap"] is not None else 0.0, -record["val_loss"])
                if best is None or key > best:
                    best, best_epoch, waited = key, epoch, 0
                    best_state = {k: v.detach().clone() for k, v in network.state_dict().items()}
                else:
                    waited += 1
            else:
                best_epoch = epoch
            history.append(record)
            bar.set_postfix(loss=f"{record['train_loss']:.3f}", val_ap=record["val_ap"])
            if len(val_idx) and waited >= self.patience:
                break
        if best_state is not None:
            network.load_state_dict(best_state)
        network.eval()
        return history, best_epoch

    # ------------------------------------------------------------------ weights (federated training)
    def _fitted(self) -> bool:
        return self._network is not None and hasattr(self, "history_")

    def initialize(self) -> SupervisedDetector:
        """The weights :meth:`fit` starts from: the pretrained backbone and a head drawn from ``seed`` (a
        federation's round-0 global model); the training record is emptied. Returns self."""
        network = self._pretrained()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            network.head.reset_parameters()
        network.eval()
        self._record([], None, 0, 0, 0.0)
        return self

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Copies of the trained parameters (the last units' and the head's; what FedAvg exchanges). BatchNorm
        statistics stay at their ImageNet values and the frozen units are the backbone's: neither travels."""
        return {key: p.detach().cpu().clone() for key, p in self.network_.named_parameters() if p.requires_grad}

    def load_trainable_state(self, state: dict[str, torch.Tensor], source: str = "state",
                             n_train_images: int | None = None) -> SupervisedDetector:
        """Set the trained parameters from :meth:`trainable_state`'s form (e.g. a global model); returns self.

        A detector not yet fitted is :meth:`initialize`'d first. The training record is emptied (the weights
        come from elsewhere); ``n_train_images`` is recorded as ``n_train_images_`` (e.g. a federation's total).

        Raises:
            TrainingError: a missing or unexpected tensor, another shape or dtype, or a non-finite value
                (``source`` names where the state came from).
        """
        from fedinspect.detectors.trained_detector import TrainingError

        if not self._fitted():
            self.initialize()
        expected = {key: p for key, p in self._network.named_parameters() if p.requires_grad}
        if set(state) != set(expected):
            raise TrainingError(f"{source}: not the supervised network's trainable parameters (missing "
                                f"{sorted(set(expected) - set(state))[:3]}, unexpected "
                                f"{sorted(set(state) - set(expected))[:3]})")
        for key, value in state.items():
            if not isinstance(value, torch.Tensor) or value.shape != expected[key].shape \
                    or value.dtype != expected[key].dtype:
                raise TrainingError(f"{source}: {key} is {getattr(value, 'dtype', type(value).__name__)} "
                                    f"{tuple(getattr(value, 'shape', ()))}, expected {expected[key].dtype} "
                                    f"{tuple(expected[key].shape)}")
            if not torch.isfinite(value).all():
                raise TrainingError(f"{source}: {key} holds non-finite values")
        with torch.no_grad():
            for key, value in state.items():
                expected[key].copy_(value)
        self._network.eval()
        self._record([], None, n_train_images, 0, None)
        return self

    # ------------------------------------------------------------------ scoring
    def decision_function(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Logits of "defective", float64 (n,)."""
        self.network_  # noqa: B018 - raises when not fitted
        images = check_images(images)
        features = self.frozen_features(images, "scoring")
        return self._logits(features, np.arange(len(images)))

    def predict_proba(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Probability that each image is defective, float64 (n,) (the seed's sigmoid output)."""
        logits = self.decision_function(images)
        return 1.0 / (1.0 + np.exp(-logits))

    def predict(self, images: Sequence[np.ndarray], threshold: float = 0.5) -> np.ndarray:
        """1 (defective) where the probability exceeds ``threshold``, else 0."""
        return (self.predict_proba(images) > threshold).astype(np.int64)

    def cam(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Class-activation maps (logit units: positive argues "defective"), float32 at each image's size."""
        network = self.network_
        images = check_images(images)
        maps = []
        with torch.no_grad():
            for image, frozen in zip(images, self.frozen_features(images, "cam"), strict=True):
                grid = network.class_activation_maps(frozen)
                padded = F.interpolate(grid[None], size=tuple(self.letterbox(image).shape[1:]), mode="bilinear",
                                       align_corners=False)[0, 0]
                maps.append(self.letterbox.restore(padded.cpu(), image.shape[:2]))
        return maps

    # ------------------------------------------------------------------ files
    def save(self, directory: str | Path, trained_by: str | None = None) -> Path:
        """Write ``supervised.json`` and ``model.safetensors`` into ``directory``; returns it.

        ``trained_by`` is a note for the settings file when the weights were not made by :meth:`fit` (e.g. a
        federation's global model, set by :meth:`load_trainable_state`).
        """
        from safetensors.torch import save_file

        network = self.network_
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILE))
        params = {**self.get_params(), "weights": None}
        config = {"format": MODEL_FORMAT, "params": params, "history": self.history_,
                  "best_epoch": self.best_epoch_, "n_train_images": self.n_train_images_,
                  "n_validation_images": self.n_validation_images_, "fit_seconds": self.fit_seconds_}
        if trained_by is not None:
            config["trained_by"] = trained_by
        (directory / SETTINGS_FILE).write_text(json.dumps(config, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path, device: str = "cpu", progress: bool = False) -> SupervisedDetector:
        """A detector saved by :meth:`save` (every problem is a ModelFileError naming the file)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from fedinspect.detectors.model_files import constructor_params, read_settings

        directory = Path(directory)
        settings_path, weights_path = directory / SETTINGS_FILE, directory / WEIGHTS_FILE
        config = read_settings(settings_path, MODEL_FORMAT)
        params = constructor_params(config, settings_path)
        params.update(device=device, progress=progress)
        try:
            detector = cls(**params)
        except (TypeError, ValueError) as error:
            raise ModelFileError(f"{settings_path}: settings do not fit this fedinspect ({error})") from error
        if not weights_path.is_file():
            raise ModelFileError(f"{weights_path}: missing (the model's weights)")
        try:
            state = load_file(str(weights_path))
        except (SafetensorError, OSError, ValueError) as error:
            raise ModelFileError(f"{weights_path}: corrupt weights file ({error})") from error
        network = detector._build(pretrained=False)
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise ModelFileError(f"{weights_path}: does not fit {detector.backbone}: {error}") from error
        if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
            raise ModelFileError(f"{weights_path}: holds NaN or infinite weights")
        network.to(device).eval()
        detector._initial_state = None  # not the pretrained weights: fit() rebuilds them
        detector.history_ = config.get("history", [])
        detector.best_epoch_ = config.get("best_epoch")
        detector.n_train_images_ = config.get("n_train_images")
        detector.n_validation_images_ = config.get("n_validation_images")
        detector.fit_seconds_ = config.get("fit_seconds")
        return detector
