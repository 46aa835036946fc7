"""SupervisedDetector: a tiny separable problem drawn here, metrics against scikit-learn, files, CAM, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, f1_score, precision_score, recall_score, roc_auc_score

from fedinspect.errors import ModelFileError, SettingsError
from fedinspect.supervised import SupervisedDetector, detection_scores

SIZE, SQUARE = 128, 28


def draw(n: int, seed: int) -> tuple[list[np.ndarray], np.ndarray, list[tuple[int, int] | None]]:
    """Noisy grey images; every second one has a bright square (the defect) at a random place."""
    rng = np.random.default_rng(seed)
    images, labels, boxes = [], [], []
    for index in range(n):
        image = rng.normal(110, 8, (SIZE, SIZE)).clip(0, 255)
        box = None
        if index % 2:
            top, left = (int(v) for v in rng.integers(4, SIZE - SQUARE - 4, 2))
            image[top:top + SQUARE, left:left + SQUARE] = 240
            box = (top, left)
        images.append(np.repeat(image.astype(np.uint8)[..., None], 3, axis=2))
        labels.append(int(box is not None))
        boxes.append(box)
    return images, np.array(labels), boxes


@pytest.fixture(scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on a loaded 2-core machine spin-wait
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def fitted(one_thread):
    images, labels, _ = draw(32, seed=0)
    detector = SupervisedDetector(image_size=SIZE, epochs=5, lr=1e-3, batch_size=8, validation_fraction=0.25,
                                  patience=3, seed=0)
    return detector.fit(images, labels)


@pytest.fixture(scope="module")
def test_set():
    return draw(16, seed=1)


def test_separable_problem_is_ranked_perfectly(fitted, test_set) -> None:
    images, labels, _ = test_set
    probabilities = fitted.predict_proba(images)
    assert probabilities.shape == (16,) and ((probabilities >= 0) & (probabilities <= 1)).all()
    scores = detection_scores(labels, probabilities)
    assert scores["ap"] == pytest.approx(1.0) and scores["auroc"] == pytest.approx(1.0)
    assert (fitted.predict(images) == labels).all()
    assert fitted.n_train_images_ == 24 and fitted.n_validation_images_ == 8
    assert 1 <= fitted.best_epoch_ <= len(fitted.history_) <= 5


def test_detection_scores_against_sklearn_and_by_hand() -> None:
    labels = [1, 0, 1, 0]
    scores = [0.9, 0.8, 0.7, 0.1]
    result = detection_scores(labels, scores)
    # by hand: positives at ranks 1 and 3 -> AP = (1/1 + 2/3) / 2; at 0.5 three predicted defective, two right
    assert result["ap"] == pytest.approx((1 + 2 / 3) / 2)
    assert result["precision"] == pytest.approx(2 / 3) and result["recall"] == 1.0
    assert result["f1"] == pytest.approx(0.8) and result["auroc"] == pytest.approx(0.75)
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 200)
    s = rng.random(200) + 0.3 * y
    result = detection_scores(y, s, threshold=0.6)
    predicted = (s > 0.6).astype(int)
    assert result["ap"] == pytest.approx(average_precision_score(y, s))
    assert result["precision"] == pytest.approx(precision_score(y, predicted))
    assert result["recall"] == pytest.approx(recall_score(y, predicted))
    assert result["f1"] == pytest.approx(f1_score(y, predicted))
    assert result["auroc"] == pytest.approx(roc_auc_score(y, s))
    with pytest.raises(ValueError, match="both"):
        detection_scores([1, 1], [0.2, 0.3])


def test_refit_with_the_same_seed_gives_the_same_scores(fitted, test_set) -> None:
    images, _, _ = test_set
    before = fitted.decision_function(images)
    again = SupervisedDetector(**fitted.get_params())
    again._memo = fitted._memo  # the frozen features are the same: skip recomputing them
    train_images, train_labels, _ = draw(32, seed=0)
    again.fit(train_images, train_labels)
    np.testing.assert_allclose(again.decision_function(images), before, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip(fitted, test_set, tmp_path) -> None:
    images, _, _ = test_set
    fitted.save(tmp_path / "model")
    loaded = SupervisedDetector.load(tmp_path / "model")
    np.testing.assert_array_equal(loaded.predict_proba(images), fitted.predict_proba(images))
    np.testing.assert_array_equal(loaded.cam(images[:2])[1], fitted.cam(images[:2])[1])
    assert loaded.get_params() == {**fitted.get_params(), "weights": None}
    assert loaded.history_ == fitted.history_


def test_model_files_are_checked(fitted, tmp_path) -> None:
    folder = fitted.save(tmp_path / "model")
    config = json.loads((folder / "supervised.json").read_text())
    (folder / "supervised.json").write_text(json.dumps({**config, "params": {**config["params"],
                                                                              "weights": "/etc/passwd"}}))
    with pytest.raises(ModelFileError, match="weights file"):
        SupervisedDetector.load(folder)
    (folder / "supervised.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelFileError, match=r"model\.safetensors"):
        SupervisedDetector.load(folder)
    (folder / "supervised.json").write_text(json.dumps({**config, "format": "other/1"}))
    with pytest.raises(ModelFileError, match="format"):
        SupervisedDetector.load(folder)


def test_cam_mean_is_the_logit_and_peaks_on_the_square(fitted, test_set) -> None:
    images, _, boxes = test_set
    network = fitted.network_
    frozen = torch.cat(fitted.frozen_features(images[:4], "test"))
    with torch.no_grad():
        cams = network.class_activation_maps(frozen)
        np.testing.assert_allclose(cams.mean(dim=(1, 2)).numpy(), network.logits(frozen).numpy(), atol=1e-4)
    maps = fitted.cam(images)
    for image, cam, box in zip(images, maps, boxes, strict=True):
        assert cam.shape == image.shape[:2] and cam.dtype == np.float32
        if box is None:
            continue
        inside = np.zeros(cam.shape, dtype=bool)
        inside[box[0]:box[0] + SQUARE, box[1]:box[1] + SQUARE] = True
        assert cam[inside].mean() > cam[~inside].mean()
    # on the 4 x 4 grid of 32-pixel feature cells, the peak is the square's cell or a neighbour of one
    positives = [i for i, box in enumerate(boxes) if box is not None]
    with torch.no_grad():
        grids = network.class_activation_maps(torch.cat(fitted.frozen_features([images[i] for i in positives], "test")))
    near = 0
    for grid, index in zip(grids, positives, strict=True):
        top, left = boxes[index]
        row, col = np.unravel_index(int(grid.argmax()), tuple(grid.shape))
        rows, cols = range(top // 32, (top + SQUARE - 1) // 32 + 1), range(left // 32, (left + SQUARE - 1) // 32 + 1)
        near += min(abs(row - r) for r in rows) <= 1 and min(abs(col - c) for c in cols) <= 1
    assert near == len(positives)

def test_images_of_another_aspect_keep_it(fitted) -> None:
    wide = np.full((64, 200, 3), 100, dtype=np.uint8)
    (cam,) = fitted.cam([wide])
    assert cam.shape == (64, 200)
    assert fitted.predict_proba([wide, wide[:, :150]]).shape == (2,)


def test_bad_input_is_refused(fitted, one_thread) -> None:
    good = np.zeros((64, 64, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"images\[1\]: expected a uint8 RGB"):
        fitted.predict_proba([good, good.astype(np.float32)])
    with pytest.raises(ValueError, match="only 0 given"):
        SupervisedDetector(epochs=1).fit([good, good], [0, 0])
    with pytest.raises(ValueError, match="expected 2 labels"):
        SupervisedDetector(epochs=1).fit([good, good], [0, 1, 1])
    with pytest.raises(ValueError, match="stratified validation"):
        SupervisedDetector(epochs=1, validation_fraction=0.5).fit([good, good, good], [0, 0, 1])
    with pytest.raises(RuntimeError, match="not fitted"):
        SupervisedDetector().predict_proba([good])
    with pytest.raises(SettingsError, match="backbone"):
        SupervisedDetector(backbone="vgg")
    with pytest.raises(SettingsError, match="epochs"):
        SupervisedDetector(epochs=0)
    with pytest.raises(SettingsError, match="validation_fraction"):
        SupervisedDetector(validation_fraction=1.0)


def _twin(fitted: SupervisedDetector, **changes) -> SupervisedDetector:
    """A new detector of ``fitted``'s settings (and ``changes``) sharing its memoised frozen features."""
    twin = SupervisedDetector(**{**fitted.get_params(), **changes})
    twin._memo = fitted._memo  # the same backbone, image size and frozen units: the same features
    return twin


def test_trainable_state_is_the_trained_parameters_and_round_trips(fitted, test_set, tmp_path) -> None:
    from fedinspect.detectors.trained_detector import TrainingError

    state = fitted.trainable_state()
    network = fitted.network_
    assert set(state) == {key for key, p in network.named_parameters() if p.requires_grad}
    assert "head.weight" in state and not any(key.startswith("frozen.") for key in state)
    state["head.bias"] += 1.0  # a copy: the detector is not changed through it
    assert not torch.equal(state["head.bias"], network.head.bias.detach())
    state = fitted.trainable_state()
    other = _twin(fitted)  # not fitted: starts from initialize(), then takes the state
    assert not torch.equal(other.initialize().trainable_state()["head.weight"], state["head.weight"])
    other.load_trainable_state(state, n_train_images=7)
    assert all(torch.equal(value, state[key]) for key, value in other.trainable_state().items())
    images, _, _ = test_set  # the trainable parameters are all that differs: the same probabilities
    np.testing.assert_array_equal(other.predict_proba(images), fitted.predict_proba(images))
    assert other.history_ == [] and other.n_train_images_ == 7
    folder = other.save(tmp_path / "global", trained_by="a test")
    assert json.loads((folder / "supervised.json").read_text())["trained_by"] == "a test"
    np.testing.assert_array_equal(SupervisedDetector.load(folder).predict_proba(images), fitted.predict_proba(images))
    with pytest.raises(TrainingError, match=r"client_3: .*missing \['head.bias'\]"):
        other.load_trainable_state({k: v for k, v in state.items() if k != "head.bias"}, source="client_3")
    with pytest.raises(TrainingError, match=r"head.weight is torch.float32 \(3,\)"):
        other.load_trainable_state({**state, "head.weight": torch.zeros(3)})
    with pytest.raises(TrainingError, match="non-finite"):
        other.load_trainable_state({**state, "head.bias": torch.full_like(state["head.bias"], float("nan"))})


def test_fit_without_validation_is_initialize_then_partial_fit(fitted) -> None:
    images, labels, _ = draw(16, seed=0)
    # without dropout (fit draws its masks after the head, from one seed; partial_fit from its own seed)
    settings = {"validation_fraction": 0.0, "epochs": 2, "batch_size": 8, "dropout": 0.0}
    fit = _twin(fitted, **settings).fit(images, labels)
    partial = _twin(fitted, **settings).initialize().partial_fit(images, labels)
    for key, value in fit.trainable_state().items():
        torch.testing.assert_close(partial.trainable_state()[key], value, rtol=1e-6, atol=1e-7)
    assert [r["epoch"] for r in partial.history_] == [1, 2] and partial.best_epoch_ == 2
    assert partial.n_train_images_ == 16 and partial.n_validation_images_ == 0


def test_partial_fit_continues_from_the_weights_with_a_fresh_adam(fitted) -> None:
    images, labels, _ = draw(16, seed=0)
    lr = 1e-3
    one = _twin(fitted, lr=lr, batch_size=16).initialize()
    start = one.trainable_state()
    one.partial_fit(images, labels, epochs=1, seed=3)
    first = one.trainable_state()
    # one batch, one step of a new Adam: every parameter moves by lr * g / (|g| + eps), i.e. lr where g is not tiny
    assert abs(float(first["head.bias"] - start["head.bias"])) == pytest.approx(lr, rel=1e-4)
    assert max(float((first[k] - start[k]).abs().max()) for k in start) <= lr * (1 + 1e-3)  # float32 rounding
    one.partial_fit(images, labels, epochs=1, seed=4)
    assert [r["epoch"] for r in one.history_] == [1, 2] and len(one.history_) == 2
    # a second detector given the first call's weights and the second call's seed gets the same weights:
    # nothing but the weights carries over between calls (no reset, no Adam moments)
    two = _twin(fitted, lr=lr, batch_size=16).load_trainable_state(first).partial_fit(images, labels, 1, seed=4)
    restart = _twin(fitted, lr=lr, batch_size=16).initialize().partial_fit(images, labels, 1, seed=4)
    for key, value in one.trainable_state().items():
        torch.testing.assert_close(two.trainable_state()[key], value, rtol=1e-6, atol=1e-7)
    assert any(not torch.equal(first[k], v) for k, v in one.trainable_state().items())
    assert any(not torch.allclose(restart.trainable_state()[k], v) for k, v in one.trainable_state().items())
    with pytest.raises(SettingsError, match="epochs"):
        one.partial_fit(images, labels, epochs=0)
