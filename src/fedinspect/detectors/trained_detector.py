"""The part every detector trained by gradient descent shares: the loop, early stopping, scoring, model files.

A subclass (autoencoder, STFPM, reverse distillation, DRAEM, CFLOW) says only what is its own:

- ``name`` (registry name) and ``model_format`` (``"fedinspect.<name>/1"``), class attributes;
- ``input_multiple``: the letterboxed input is padded to a multiple of it (the network's total stride);
- ``frozen_prefixes``: state-dict prefixes that are *not* saved because they come from a weights file
  (a pretrained teacher), e.g. ``("teacher.",)``;
- ``_build_module()``: the plain ``nn.Module`` (teacher included, loaded from its weights; a frozen pretrained
  teacher is its ``teacher`` attribute, whose maps the subclass takes from :meth:`TrainedDetector._teacher_maps`
  so that they run with the detector's ``runtime`` parameter, if it has one);
- ``_training_loss(module, images, generator)``: a scalar loss on a batch of good images (B, 3, H, W)
  in [0, 1]; ``generator`` seeds any randomness of the loss (DRAEM's simulated anomalies);
- ``_anomaly_maps(module, images)``: (B, H, W) anomaly maps at the input's resolution, higher = more
  anomalous (called under ``torch.no_grad`` with the module in eval mode);
- optionally ``_optimizer(module)`` (default Adam), ``_image_score(map)`` (default: the map's maximum) and
  ``_calibrate(module, images)`` (statistics of the good images kept in buffers after training; default none);
- its own constructor parameters, stored under the same names (scikit-learn convention: ``get_params``
  reads the ``__init__`` signature);
- for DP-SGD (:meth:`TrainedDetector.partial_fit` with ``privacy``): a ``normalization`` parameter if its
  trained part has BatchNorm layers (``"group"`` builds them as GroupNorm, see :meth:`TrainedDetector._new_module`),
  or ``dp_sgd_refusal``, the reason it cannot be trained with DP-SGD.

The base does the rest: the letterbox (short side to ``image_size``, aspect ratio kept, no squashing),
a seeded split of the good images into training and validation, Adam, progress bars, early stopping on
the validation loss with the best epoch's weights restored, maps smoothed and brought back to each image's
own size, image score = maximum of the map, and ``save``/``load`` in safetensors + JSON (every tensor
checked against the architecture; no pickle; no path in the settings).
"""

from __future__ import annotations

import copy
import inspect
import json
import math
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors.numpy import save as save_tensors
from torch import nn
from tqdm.auto import tqdm

from fedinspect import __version__
from fedinspect.backbones.runtime import BackboneRuntime, check_agreement, check_runtime
from fedinspect.detectors.model_files import (
    check_image_size,
    check_weights,
    constructor_params,
    file_sha256,
    read_settings,
    read_tensors,
)
from fedinspect.detectors.preprocessing import Letterbox, gaussian_blur
from fedinspect.errors import FedinspectError, ModelFileError, SettingsError
from fedinspect.privacy.dp_sgd import DPSGDSettings, check_history, epsilon_of, train_dp_sgd

WEIGHTS_FILE = "weights.safetensors"
NORMALIZATIONS = ("batch", "group")


class TrainingError(FedinspectError, ValueError):
    """Training cannot start or went wrong (too few images, a loss that is not finite)."""


def _check_positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SettingsError(f"{name} must be an integer of at least {minimum}, got {value!r}")
    return value


def check_normalization(value: Any) -> str:
    """``"batch"`` (BatchNorm, as the papers) or ``"group"`` (GroupNorm: trainable with DP-SGD)."""
    if value not in NORMALIZATIONS:
        raise SettingsError(f"normalization must be one of {list(NORMALIZATIONS)}, got {value!r}")
    return value


def _check_positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise SettingsError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def checked_runtime(value: Any) -> str:
    """``value`` if it is a backbone runtime (:data:`fedinspect.backbones.RUNTIMES`), else SettingsError listing
    them: what runs a trained detector's frozen teacher."""
    try:
        return check_runtime(value)
    except ValueError as error:
        raise SettingsError(f"runtime: {error}") from None


DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str) -> torch.device:
    """``"cpu"``, ``"cuda"`` (an error naming the problem when torch sees no GPU) or ``"auto"`` (CUDA when torch
    sees one, else the CPU)."""
    if device not in DEVICES:
        raise SettingsError(f"device must be one of {list(DEVICES)}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise SettingsError("device 'cuda': torch sees no CUDA GPU here (torch.cuda.is_available() is False)")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


class TrainedDetector:
    """Base of the trained detectors (see the module docstring for what a subclass provides).

    Parameters shared by every subclass (a subclass's ``__init__`` passes them on):

    image_size:
        Short side of the letterboxed input in pixels (the aspect ratio is kept).
    epochs:
        Most passes over the training images; early stopping may end sooner.
    learning_rate:
        Adam's step size.
    batch_size:
        Images per step (images of one padded shape share a batch).
    patience:
        Epochs without a better validation loss before training stops (0: never stop early).
    validation_fraction:
        Share of the good images held out (seeded) for early stopping; 0 trains on all and keeps the
        last epoch.
    sigma:
        Gaussian smoothing of the maps, in letterboxed pixels (0: none).
    seed, progress:
        Seed of every random choice (weights, split, batch order, simulated anomalies); progress bars.
    """

    name: ClassVar[str]
    model_format: ClassVar[str]
    input_multiple: ClassVar[int] = 32
    frozen_prefixes: ClassVar[tuple[str, ...]] = ()
    dp_sgd_refusal: ClassVar[str | None] = None  # why this detector cannot be trained with DP-SGD, if it cannot

    def __init__(
        self,
        image_size: int = 256,
        epochs: int = 20,
        learning_rate: float = 1e-3,
        batch_size: int = 8,
        patience: int = 5,
        validation_fraction: float = 0.1,
        sigma: float = 4.0,
        seed: int = 0,
        progress: bool = False,
    ) -> None:
        self.image_size = check_image_size(image_size)
        self.epochs = _check_positive_int("epochs", epochs)
        self.learning_rate = _check_positive_float("learning_rate", learning_rate)
        self.batch_size = _check_positive_int("batch_size", batch_size)
        self.patience = _check_positive_int("patience", patience, minimum=0)
        if (isinstance(validation_fraction, bool) or not isinstance(validation_fraction, int | float)
                or not 0 <= validation_fraction < 1):
            raise SettingsError(f"validation_fraction must be in [0, 1), got {validation_fraction!r}")
        self.validation_fraction = float(validation_fraction)
        if isinstance(sigma, bool) or not isinstance(sigma, int | float) or not math.isfinite(sigma) or sigma < 0:
            raise SettingsError(f"sigma must be a number >= 0, got {sigma!r}")
        self.sigma = float(sigma)
        self.seed = seed
        self.progress = progress
        # Where the network trains and scores ("auto": CUDA when torch sees a GPU, else the CPU). Not a model
        # parameter: it does not change what is learned beyond float rounding, and a saved model loads anywhere.
        self.device = "auto"
        self.module_: nn.Module | None = None
        self._teacher_runtime: tuple[tuple[Any, ...], BackboneRuntime] | None = None  # (teacher key, runtime)
        self._checked_shapes: set[tuple[int, int]] = set()  # input shapes whose runtime maps were compared to torch

    def torch_device(self) -> torch.device:
        """The device of :attr:`device`: ``"auto"`` is CUDA when torch sees a GPU, else the CPU."""
        return resolve_device(self.device)

    # ------------------------------------------------------------------ what a subclass provides
    def _build_module(self) -> nn.Module:
        raise NotImplementedError

    def _training_loss(self, module: nn.Module, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def _anomaly_maps(self, module: nn.Module, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _new_module(self) -> nn.Module:
        """:meth:`_build_module`, its trained BatchNorm layers replaced by GroupNorm if ``normalization`` is
        ``"group"`` (Opacus's ``ModuleValidator.fix``: gcd(32, channels) groups, affine; a frozen teacher,
        already folded, is left alone).

        The switch is a constructor parameter, so the architecture (and the state dict's keys) is decided
        when the detector is configured: a federation passes the same parameters to every client and to the
        server, and a saved model rebuilds the same layers.
        """
        module = self._build_module()
        if getattr(self, "normalization", "batch") == "group":
            from opacus.validators import ModuleValidator

            module = ModuleValidator.fix(module)
        return module

    def _parameters_to_train(self, module: nn.Module) -> Iterable[nn.Parameter]:
        """What the optimizer updates: every parameter that requires grad (a frozen teacher does not)."""
        return [p for p in module.parameters() if p.requires_grad]

    def _optimizer(self, module: nn.Module) -> torch.optim.Optimizer:
        """Adam at ``learning_rate`` over :meth:`_parameters_to_train` (a subclass may choose its betas)."""
        return torch.optim.Adam(self._parameters_to_train(module), lr=self.learning_rate)

    def _calibrate(self, module: nn.Module, images: list[torch.Tensor]) -> None:
        """After training, with the best weights in eval mode: fit statistics of the good images' scores
        into the module's buffers (saved with the weights). Default: nothing. ``images``: every letterboxed
        good image (training and validation); CFLOW keeps its reference log-likelihood here.
        """

    def _image_score(self, score_map: np.ndarray) -> float:
        """An image's score from its map at its own size: the maximum (a subclass may smooth first)."""
        return float(score_map.max())

    # ------------------------------------------------------------------ the frozen teacher's runtime
    def _teacher_maps(self, module: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The frozen teacher's maps of ``images`` (B, 3, H, W), without gradient: run by the detector's
        ``runtime`` (:mod:`fedinspect.backbones.runtime`) when it is not ``"torch"``, the teacher is frozen and
        the images are on the CPU and need no gradient; by torch eager otherwise (a GPU, say).

        The first batch of each input shape is also run by torch and compared (:meth:`check_teacher_runtime`'s
        gate): a runtime whose maps differ from torch's on the real images is an error, not a silent change.
        """
        teacher = module.teacher
        runtime = getattr(self, "runtime", "torch")
        if (runtime == "torch" or getattr(teacher, "trainable", True) or images.device.type != "cpu"
                or images.requires_grad):
            with torch.no_grad():
                return teacher(images)
        compiled = self._runtime_of(teacher)
        shape = (int(images.shape[2]), int(images.shape[3]))
        if shape not in self._checked_shapes:
            maps, _ = self._compare_teacher(teacher, images)
            self._checked_shapes.add(shape)
            return maps
        return compiled(images)

    def _runtime_of(self, teacher: nn.Module) -> BackboneRuntime:
        """The :class:`BackboneRuntime` of ``teacher`` (built once per backbone, layers and weights file; every
        teacher of this detector is the same frozen network, rebuilt from its weights)."""
        key = (teacher.name, tuple(teacher.layers), str(teacher.weights_path), self.runtime)
        if self._teacher_runtime is None or self._teacher_runtime[0] != key:
            self._teacher_runtime = (key, BackboneRuntime(teacher, self.runtime))
            self._checked_shapes = set()
        return self._teacher_runtime[1]

    def _compare_teacher(self, teacher: nn.Module, images: torch.Tensor
                         ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[float, float]]]:
        """The runtime's maps of ``images`` and, per layer, (max |difference|, cosine) to torch eager's;
        RuntimeError when a layer differs beyond the runtime's gate."""
        with torch.no_grad():
            expected = teacher(images)
        found = self._runtime_of(teacher)(images)
        agreement = {}
        for layer in teacher.layers:
            what = (f"{self.name}: teacher {teacher.name} layer {layer} run by runtime {self.runtime!r} on "
                    f"{images.shape[0]} images of {images.shape[2]}x{images.shape[3]} (use runtime 'torch' "
                    f"to run it in torch)")
            agreement[layer] = check_agreement(expected[layer].numpy(), found[layer].numpy(), self.runtime, what)
        return found, agreement

    def check_teacher_runtime(self, images: Iterable[np.ndarray]) -> dict[str, tuple[float, float]]:
        """Run the frozen teacher on ``images`` (uint8 RGB, letterboxed as :meth:`predict` does) with ``runtime``
        and with torch: per layer, the worst (max |difference|, cosine) over the batches.

        Raises:
            RuntimeError: a layer's maps differ beyond the runtime's gate (f32: max |difference| over
                1e-4 x the largest |torch| value; bf16: cosine below 0.995), naming the layer and the shape.
            SettingsError: the detector has no frozen teacher, or its ``runtime`` is ``"torch"``.
        """
        if self.module_ is not None:
            module = self.module_
        else:
            with torch.random.fork_rng():  # only the pretrained teacher matters: the global seed is left alone
                module = self._new_module()
        teacher = getattr(module, "teacher", None)
        if teacher is None or getattr(teacher, "trainable", True):
            raise SettingsError(f"{self.name} has no frozen teacher to run with a runtime")
        if getattr(self, "runtime", "torch") == "torch":
            raise SettingsError(f"{self.name}: runtime 'torch' is torch itself; nothing to compare")
        letterbox = self.letterbox
        worst: dict[str, tuple[float, float]] = {}
        for batch in self._prediction_batches(images):
            x = torch.stack([letterbox(image) for image in batch])
            _, agreement = self._compare_teacher(teacher, x)
            for layer, (diff, cos) in agreement.items():
                old_diff, old_cos = worst.get(layer, (0.0, 1.0))
                worst[layer] = (max(old_diff, diff), min(old_cos, cos))
        return worst

    # ------------------------------------------------------------------ scikit-learn conventions
    @classmethod
    def _param_names(cls) -> list[str]:
        signature = inspect.signature(cls.__init__)
        return [name for name, p in signature.parameters.items()
                if name not in ("self", "progress") and p.kind is p.POSITIONAL_OR_KEYWORD]

    def get_params(self) -> dict[str, Any]:
        """Constructor parameters (scikit-learn convention), ``progress`` excepted."""
        params = {}
        for name in self._param_names():
            value = getattr(self, name)
            params[name] = list(value) if isinstance(value, tuple) else value
        return params

    @property
    def letterbox(self) -> Letterbox:
        """Resizes the short side to ``image_size`` and pads to ``input_multiple`` (no squashing)."""
        return Letterbox(short_side=self.image_size, multiple=self.input_multiple)

    @property
    def n_parameters_(self) -> int:
        """Number of parameters of the network, frozen ones (a teacher) included."""
        return sum(p.numel() for p in self._check_fitted().parameters())

    def _check_fitted(self) -> nn.Module:
        if self.module_ is None:
            raise RuntimeError(f"this {type(self).__name__} is not trained yet: call fit() or load() first")
        return self.module_

    # ------------------------------------------------------------------ training
    def _shape_batches(self, tensors: Sequence[torch.Tensor], order: Sequence[int]) -> list[list[int]]:
        """Indices in ``order``, cut into batches of at most ``batch_size`` images of one padded shape."""
        by_shape: dict[tuple[int, ...], list[int]] = defaultdict(list)
        batches: list[list[int]] = []
        for index in order:
            group = by_shape[tuple(tensors[index].shape)]
            group.append(index)
            if len(group) == self.batch_size:
                batches.append(group[:])
                group.clear()
        batches.extend(group for group in by_shape.values() if group)
        return batches

    def _mean_loss(self, module: nn.Module, tensors: list[torch.Tensor], seed: int) -> float:
        """Loss over ``tensors`` in eval mode, with a fixed generator (comparable from epoch to epoch)."""
        generator = torch.Generator().manual_seed(seed)
        module.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for batch in self._shape_batches(tensors, range(len(tensors))):
                images = torch.stack([tensors[i] for i in batch]).to(self.torch_device())
                loss = self._training_loss(module, images, generator)
                total += float(loss) * len(batch)
                count += len(batch)
        return total / count

    def _read(self, images: Iterable[np.ndarray], total: int | None) -> list[torch.Tensor]:
        letterbox = self.letterbox
        return [letterbox(image) for image in tqdm(images, total=total, desc="reading", unit="img",
                                                   disable=not self.progress)]

    def fit(self, images: Iterable[np.ndarray], total: int | None = None) -> TrainedDetector:
        """Train on good images (uint8 RGB arrays of any size), stopping early on a held-out share."""
        tensors = self._read(images, total)
        n_validation = max(1, round(self.validation_fraction * len(tensors))) if self.validation_fraction else 0
        if len(tensors) - n_validation < 1:
            raise TrainingError(f"{type(self).__name__} needs at least one training and one validation image "
                                f"(validation_fraction {self.validation_fraction}), got {len(tensors)} images")
        rng = np.random.default_rng(self.seed)
        permutation = rng.permutation(len(tensors))
        validation = [tensors[i] for i in sorted(permutation[:n_validation])]
        train = [tensors[i] for i in sorted(permutation[n_validation:])]
        torch.manual_seed(self.seed)
        module = self._new_module().to(self.torch_device())
        self._train(module, train, validation, rng)
        self.n_train_images_ = len(tensors)  # all images given; the validation share is among them
        self.n_validation_images_ = len(validation)
        return self

    # ------------------------------------------------------------------ federated training
    def initialize(self) -> TrainedDetector:
        """Build the untrained network (seeded): the global model of a federation's round 0."""
        torch.manual_seed(self.seed)
        self.module_ = self._new_module().to(self.torch_device())
        self.module_.eval()
        return self

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """What a federation exchanges: the state dict without the pretrained (frozen) part, detached copies."""
        return {key: value.detach().cpu().clone() for key, value in self._saved_state(self._check_fitted()).items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor], source: str = "state") -> TrainedDetector:
        """Set the weights from :meth:`trainable_state`'s form (e.g. a global model), checked name by name.

        Raises:
            TrainingError: a missing or unexpected tensor, another shape or dtype, or a non-finite value
                (``source`` names where the state came from).
        """
        module = self.module_ if self.module_ is not None else self.initialize().module_
        expected = self._saved_state(module)
        if set(state) != set(expected):
            raise TrainingError(f"{source}: tensors {sorted(set(expected) - set(state))[:5]} missing, "
                                f"{sorted(set(state) - set(expected))[:5]} unexpected for {self.name}")
        for key, value in state.items():
            if not isinstance(value, torch.Tensor) or value.shape != expected[key].shape \
                    or value.dtype != expected[key].dtype:
                raise TrainingError(f"{source}: {key} is {getattr(value, 'dtype', type(value).__name__)} "
                                    f"{tuple(getattr(value, 'shape', ()))}, expected {expected[key].dtype} "
                                    f"{tuple(expected[key].shape)}")
            if value.is_floating_point() and not torch.isfinite(value).all():
                raise TrainingError(f"{source}: {key} holds non-finite values")
        module.load_state_dict(state, strict=False)
        module.eval()
        return self

    def partial_fit(self, images: Iterable[np.ndarray], total: int | None = None, *,
                    proximal_mu: float = 0.0, privacy: DPSGDSettings | Mapping[str, Any] | None = None,
                    privacy_history: Sequence[Sequence[float]] = ()) -> TrainedDetector:
        """Train ``epochs`` more epochs from the current weights on all the images (no validation share, no
        early stopping): one client's local training in a federated round.

        ``proximal_mu`` > 0 adds FedProx's term ``mu / 2 * ||w - w_start||^2`` over the trained parameters,
        which keeps the local model near the global one it started from (Li et al., 2020).

        ``privacy`` (DP-SGD settings, or their dict) trains with DP-SGD (:mod:`fedinspect.privacy.dp_sgd`):
        the unit protected is one training image of this call; ``privacy_history`` is the accountant history
        of this party's earlier calls (rounds), so ``epsilon_`` (at the settings' delta) is cumulative over
        them and this call, whose extended history is ``privacy_history_``. The physical and logical
        batches are the privacy settings' (not ``batch_size``); all images must letterbox to one shape. With
        DP, FedProx's term is added to the noisy gradient (it does not depend on the data: no privacy cost).

        Raises:
            SettingsError: bad settings, or a detector or module that cannot be trained with DP-SGD.
            TrainingError: no image, images of several padded shapes under DP, or a non-finite loss.
        """
        if isinstance(proximal_mu, bool) or not isinstance(proximal_mu, int | float) or not proximal_mu >= 0:
            raise SettingsError(f"proximal_mu must be a number >= 0, got {proximal_mu!r}")
        if privacy is not None:
            privacy = privacy if isinstance(privacy, DPSGDSettings) else DPSGDSettings.from_dict(privacy)
            privacy_history = check_history(privacy_history)
            self._check_dp_sgd()
        elif privacy_history:
            raise SettingsError("privacy_history given without privacy settings")
        tensors = self._read(images, total)
        if not tensors:
            raise TrainingError(f"{self.name}: no training image given")
        module = (self.module_ if self.module_ is not None else self.initialize().module_).to(self.torch_device())
        anchor = [(p, p.detach().clone()) for p in self._parameters_to_train(module)] if proximal_mu else None
        if privacy is None:
            self._train(module, tensors, [], np.random.default_rng(self.seed), anchor=anchor, mu=float(proximal_mu))
        else:
            self._train_private(module, tensors, privacy, privacy_history, anchor=anchor, mu=float(proximal_mu))
        self.n_train_images_ = len(tensors)
        self.n_validation_images_ = 0
        return self

    def _check_dp_sgd(self) -> None:
        """SettingsError if this detector cannot be trained with DP-SGD, naming why."""
        if self.dp_sgd_refusal is not None:
            raise SettingsError(f"{self.name} cannot be trained with DP-SGD: {self.dp_sgd_refusal}")
        if type(self)._calibrate is not TrainedDetector._calibrate:
            raise SettingsError(f"{self.name} cannot be trained with DP-SGD: it calibrates statistics of the "
                                f"training images after training, which DP-SGD does not protect")

    def _private_module(self, module: nn.Module) -> None:
        """SettingsError if ``module``'s trained part mixes the samples of a batch (BatchNorm) or holds a layer
        Opacus refuses; in-place activations are switched off (Opacus's backward hooks need the outputs)."""
        from opacus.validators import ModuleValidator

        batch_norms = [name for name, m in module.named_modules()
                       if isinstance(m, nn.modules.batchnorm._BatchNorm)
                       and any(p.requires_grad for p in m.parameters())]
        if batch_norms:
            raise SettingsError(
                f"{self.name}: BatchNorm layers ({', '.join(batch_norms[:3])}, ...) mix the images of a batch, so "
                f"DP-SGD's per-image clipping would not bound an image's influence: configure the detector with "
                f"normalization='group' (GroupNorm), the same on every client and the server")
        errors = ModuleValidator.validate(module, strict=False)
        if errors:
            raise SettingsError(f"{self.name}: Opacus cannot train this network with DP-SGD: {errors[0]}")
        for m in module.modules():
            if getattr(m, "inplace", False) is True:
                m.inplace = False

    def _train_private(self, module: nn.Module, train: list[torch.Tensor], privacy: DPSGDSettings,
                       privacy_history: Sequence[Sequence[float]],
                       anchor: list[tuple[nn.Parameter, torch.Tensor]] | None = None, mu: float = 0.0) -> None:
        """``epochs`` epochs of DP-SGD over ``train`` (Poisson-sampled batches); the last epoch is kept."""
        shapes = sorted({tuple(t.shape) for t in train})
        if len(shapes) > 1:
            raise TrainingError(f"{self.name}: DP-SGD needs one padded image shape, the letterboxed training images "
                                f"have {len(shapes)} ({shapes[:3]}...); give images of one aspect ratio")
        module.train()
        self._private_module(module)
        optimizer = self._optimizer(module)
        generator = torch.Generator().manual_seed(self.seed)
        start = time.perf_counter()

        def loss_fn(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
            loss = self._training_loss(net, images.to(self.torch_device()), generator)
            if not math.isfinite(float(loss.detach())):
                raise TrainingError(f"{self.name}: the training loss became {float(loss)} under DP-SGD "
                                    f"(learning rate {self.learning_rate}): lower it")
            return loss

        def proximal() -> None:  # FedProx's gradient mu * (w - w_start), added after the noise
            with torch.no_grad():
                for p, start_value in anchor or ():
                    if p.grad is not None:
                        p.grad.add_(p.detach() - start_value, alpha=mu)

        run = train_dp_sgd(module, optimizer, torch.utils.data.TensorDataset(torch.stack(train)), loss_fn, privacy,
                           epochs=self.epochs, seed=self.seed, privacy_history=privacy_history,
                           after_noise=proximal if anchor is not None else None)
        module.eval()
        self.module_ = module
        self.history_ = [{"epoch": epoch, "train_loss": total / seen if seen else math.nan, "seconds": seconds}
                         for epoch, ((total, seen), seconds) in enumerate(zip(run.epoch_losses, run.epoch_seconds,
                                                                              strict=True), start=1)]
        self.best_epoch_ = self.epochs
        self.train_seconds_ = time.perf_counter() - start
        self.privacy_ = privacy
        self.privacy_history_ = run.history
        self.epsilon_ = epsilon_of(run.history, privacy.delta_for(len(train)), privacy.accountant)

    def _train(self, module: nn.Module, train: list[torch.Tensor], validation: list[torch.Tensor],
               rng: np.random.Generator, anchor: list[tuple[nn.Parameter, torch.Tensor]] | None = None,
               mu: float = 0.0) -> None:
        """The epoch loop: Adam, early stopping on ``validation`` (if any), best weights restored, calibration."""
        optimizer = self._optimizer(module)
        generator = torch.Generator().manual_seed(self.seed)
        best_loss, best_state, best_epoch, since_best = math.inf, None, 0, 0
        history: list[dict[str, float]] = []
        start = time.perf_counter()
        bar = tqdm(range(1, self.epochs + 1), desc=f"training {self.name}", unit="epoch", disable=not self.progress)
        for epoch in bar:
            module.train()
            epoch_loss, seen = 0.0, 0
            for batch in self._shape_batches(train, rng.permutation(len(train))):
                images = torch.stack([train[i] for i in batch]).to(self.torch_device())
                loss = self._training_loss(module, images, generator)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise TrainingError(f"{self.name}: the training loss became {value} at epoch {epoch} "
                                        f"(learning rate {self.learning_rate}): lower it")
                if anchor is not None:
                    loss = loss + mu / 2 * sum(((p - start_value) ** 2).sum() for p, start_value in anchor)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                epoch_loss += value * len(batch)
                seen += len(batch)
            record = {"epoch": epoch, "train_loss": epoch_loss / seen, "seconds": time.perf_counter() - start}
            if validation:
                record["validation_loss"] = self._mean_loss(module, validation, self.seed + 1)
            history.append(record)
            monitored = record.get("validation_loss", record["train_loss"])
            bar.set_postfix(loss=f"{record['train_loss']:.4g}", val=f"{monitored:.4g}")
            if not validation or monitored < best_loss:
                best_loss, best_epoch, since_best = monitored, epoch, 0
                best_state = copy.deepcopy(module.state_dict())
            else:
                since_best += 1
                if self.patience and since_best >= self.patience:
                    break
        bar.close()
        module.load_state_dict(best_state)
        module.eval()
        with torch.no_grad():
            self._calibrate(module, train + validation)
        self.module_ = module
        self.history_ = history
        self.best_epoch_ = best_epoch
        self.train_seconds_ = time.perf_counter() - start

    # ------------------------------------------------------------------ inference
    def _prediction_batches(self, images: Iterable[np.ndarray]) -> Iterator[list[np.ndarray]]:
        """Consecutive images of one padded shape, at most ``batch_size`` per batch (order kept)."""
        letterbox = self.letterbox
        batch: list[np.ndarray] = []
        for image in images:
            if batch and (len(batch) == self.batch_size
                          or letterbox.padded_shape(*image.shape[:2]) != letterbox.padded_shape(*batch[0].shape[:2])):
                yield batch
                batch = []
            batch.append(image)
        if batch:
            yield batch

    def predict(self, images: Iterable[np.ndarray], total: int | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """Image anomaly scores (n,) and anomaly maps, each float32 at its image's original size."""
        module = self._check_fitted().to(self.torch_device())
        module.eval()
        letterbox = self.letterbox
        scores: list[float] = []
        maps: list[np.ndarray] = []
        with tqdm(total=total, desc="scoring", unit="img", disable=not self.progress) as bar, torch.no_grad():
            for batch in self._prediction_batches(images):
                images = torch.stack([letterbox(image) for image in batch]).to(self.torch_device())
                raw = self._anomaly_maps(module, images).float().cpu()
                smoothed = gaussian_blur(raw, self.sigma)
                for image, smooth in zip(batch, smoothed, strict=True):
                    restored = letterbox.restore(smooth, image.shape[:2])
                    maps.append(restored)
                    scores.append(self._image_score(restored))
                bar.update(len(batch))
        return np.asarray(scores, dtype=np.float64), maps

    def score_samples(self, images: Iterable[np.ndarray], total: int | None = None) -> np.ndarray:
        """Image anomaly scores only (higher = more anomalous)."""
        return self.predict(images, total)[0]

    # ------------------------------------------------------------------ persistence
    @classmethod
    def config_file(cls) -> str:
        """Name of the settings file in a model folder (the registry finds the detector by it)."""
        return f"{cls.name}.json"

    def _saved_state(self, module: nn.Module) -> dict[str, torch.Tensor]:
        return {key: value.cpu() for key, value in module.state_dict().items()
                if not key.startswith(self.frozen_prefixes)}

    def _teacher_weights_path(self, module: nn.Module) -> Path | None:
        """The weights file of the pretrained part, if any (its hash is saved, never its path)."""
        teacher = getattr(module, "teacher", None)
        return getattr(teacher, "weights_path", None)

    def save(self, directory: str | Path) -> Path:
        """Write the trained weights (safetensors) and the settings (JSON); no pickle, no paths."""
        module = self._check_fitted()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        params = self.get_params()
        params.pop("weights", None)  # a model file never names a file to open; the hash identifies the weights
        teacher_weights = self._teacher_weights_path(module)
        config = {
            "format": self.model_format,
            "fedinspect_version": __version__,
            "params": params,
            "weights_sha256": file_sha256(teacher_weights) if teacher_weights is not None else None,
            "n_train_images": getattr(self, "n_train_images_", None),
            "best_epoch": getattr(self, "best_epoch_", None),
            "history": getattr(self, "history_", None),
        }
        tensors = {key: value.detach().cpu().contiguous().numpy() for key, value in self._saved_state(module).items()}
        (directory / WEIGHTS_FILE).write_bytes(save_tensors(tensors))
        (directory / self.config_file()).write_text(json.dumps(config, indent=2))
        return directory

    @classmethod
    def load(cls, directory: str | Path, progress: bool = False, weights: str | Path | None = None,
             runtime: str | None = None) -> TrainedDetector:
        """Read a model written by :meth:`save`; every tensor must match the architecture (ModelFileError).

        ``runtime`` replaces the saved runtime of the frozen teacher (the maps are the same, checked); a model
        saved before the teacher had a runtime loads with ``"torch"``. A detector without a ``runtime``
        parameter refuses one (SettingsError).
        """
        has_runtime = "runtime" in cls._param_names()
        if runtime is not None:
            if not has_runtime:
                raise SettingsError(f"{cls.name} has no frozen backbone to run with runtime {runtime!r}")
            runtime = checked_runtime(runtime)
        directory = Path(directory)
        config_path, tensors_path = directory / cls.config_file(), directory / WEIGHTS_FILE
        for path in (config_path, tensors_path):
            if not path.is_file():
                raise ModelFileError(f"{path}: missing (is {directory} a fedinspect {cls.name} model folder?)")
        config = read_settings(config_path, cls.model_format)
        params = constructor_params(config, config_path)
        if "weights" in cls._param_names():
            params["weights"] = None if weights is None else str(weights)
        if has_runtime:
            params.setdefault("runtime", "torch")  # saved before the teacher had a runtime: torch eager
            if runtime is not None:  # the caller's choice of how to run the teacher (the maps are the same)
                params["runtime"] = runtime
        try:
            model = cls(**params, progress=progress)
            torch.manual_seed(model.seed)
            module = model._new_module()
        except (TypeError, ValueError) as error:
            raise ModelFileError(f"{config_path}: invalid settings ({error})") from error
        teacher_weights = model._teacher_weights_path(module)
        if teacher_weights is not None:
            check_weights(config, config_path, teacher_weights)
        expected = {key: (tuple(value.shape), value.detach().numpy().dtype)
                    for key, value in model._saved_state(module).items()}
        tensors = read_tensors(tensors_path, expected, what="weights")
        state = {key: torch.from_numpy(value) for key, value in tensors.items()}
        missing, unexpected = module.load_state_dict(state, strict=False)
        missing = [key for key in missing if not key.startswith(cls.frozen_prefixes)]
        if missing or unexpected:  # read_tensors already checked the names; kept as a guard
            raise ModelFileError(f"{tensors_path}: missing {missing}, unexpected {unexpected}")
        module.eval()
        model.module_ = module
        model.n_train_images_ = config.get("n_train_images")
        model.best_epoch_ = config.get("best_epoch")
        model.history_ = config.get("history")
        return model
