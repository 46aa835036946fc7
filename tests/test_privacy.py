"""Privacy: accountants against published values and closed forms, obfuscation, DP mechanisms, attacks."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from opacus.accountants import RDPAccountant
from scipy.optimize import brentq
from scipy.stats import norm

from fedinspect.privacy.accounting import epsilon, noise_multiplier_for
from fedinspect.privacy.bank_dp import BankPrivacy, clip_rows, private_centres, privatize_embeddings, sample_patches
from fedinspect.privacy.membership import membership_auc, score_membership_auc
from fedinspect.privacy.obfuscation import (
    Obfuscation,
    average_blocks,
    parse_methods,
    shuffle_blocks,
    switch_rows,
    unshuffle_blocks,
    unswitch_rows,
)


def exact_gaussian_epsilon(noise_multiplier: float, delta: float) -> float:
    """Tight epsilon of one Gaussian mechanism (Balle & Wang 2018, Theorem 8), by root finding."""

    def gap(eps: float) -> float:
        z = noise_multiplier
        return norm.cdf(0.5 / z - eps * z) - math.exp(eps) * norm.cdf(-0.5 / z - eps * z) - delta

    return brentq(gap, 0.0, 200.0)


# ---------------------------------------------------------------- accountant
def test_rdp_accountant_matches_the_published_opacus_value() -> None:
    # Opacus's own test (accountants_test.py): z = 1.5, q = 0.04, 90 epochs, delta 1e-5 -> 7.32911117143
    assert epsilon(1.5, 1e-5, sample_rate=0.04, steps=int(90 / 0.04)) == pytest.approx(7.32911117143, abs=1e-8)


def test_noise_for_a_target_is_close_to_the_published_opacus_value() -> None:
    # Opacus's test: target epsilon 8, q = 0.04, 90 epochs, delta 1e-5 -> 1.4253 (the bisection of older
    # releases; within the search's epsilon tolerance of 0.01, the noise may differ by about 1%)
    z = noise_multiplier_for(8.0, 1e-5, sample_rate=0.04, steps=int(90 / 0.04))
    assert z == pytest.approx(1.425307617, rel=0.01)
    assert 8.0 - 0.01 <= epsilon(z, 1e-5, 0.04, int(90 / 0.04)) <= 8.0


@pytest.mark.parametrize("z", [0.8, 1.0, 2.0, 5.0])
def test_prv_accountant_is_tight_for_one_gaussian_release(z: float) -> None:
    exact = exact_gaussian_epsilon(z, 1e-5)
    assert exact - 1e-6 <= epsilon(z, 1e-5, accountant="prv") <= exact + 0.02
    assert epsilon(z, 1e-5, accountant="rdp") >= exact  # RDP is an upper bound


def test_rdp_of_one_gaussian_release_equals_its_closed_form() -> None:
    z, delta = 2.0, 1e-5
    alphas = np.array(RDPAccountant.DEFAULT_ALPHAS, dtype=float)
    rdp = alphas / (2 * z**2)  # Mironov 2017, Proposition 7
    converted = rdp - (np.log(delta) + np.log(alphas)) / (alphas - 1) + np.log((alphas - 1) / alphas)
    assert epsilon(z, delta) == pytest.approx(converted.min(), rel=1e-12)


def test_composition_of_k_gaussians_is_one_gaussian_with_noise_over_sqrt_k() -> None:
    assert epsilon(2.0, 1e-5, steps=4, accountant="prv") == pytest.approx(exact_gaussian_epsilon(1.0, 1e-5), abs=0.02)


@pytest.mark.parametrize("target", [1.0, 5.0, 10.0])
def test_noise_for_a_target_epsilon_reaches_it(target: float) -> None:
    z = noise_multiplier_for(target, 1e-5)
    assert target - 0.02 <= epsilon(z, 1e-5) <= target
    assert epsilon(z * 0.97, 1e-5) > target  # and is (nearly) the smallest such noise


@pytest.mark.parametrize("kwargs", [{"noise_multiplier": 0.0}, {"noise_multiplier": 1.0, "delta": 0.0},
                                    {"noise_multiplier": 1.0, "sample_rate": 1.5},
                                    {"noise_multiplier": 1.0, "accountant": "moments"}])
def test_accountant_rejects_bad_input(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        epsilon(**kwargs)


def test_an_unreachable_budget_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="needs more noise"):
        noise_multiplier_for(0.1, 1e-5)


# ---------------------------------------------------------------- obfuscation
@pytest.fixture
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(22, 30, 3), dtype=np.uint8)  # not multiples of 4


def test_average_replaces_each_block_by_its_mean(image: np.ndarray) -> None:
    out = average_blocks(image, 2)
    for top, left in [(0, 0), (2, 4), (20, 28)]:
        block = image[top:top + 2, left:left + 2].astype(float)
        assert (out[top:top + 2, left:left + 2] == np.round(block.mean(axis=(0, 1)))).all()
    bottom = image[20:22, 28:30]
    assert average_blocks(image[:21, :29], 2)[20, 28].tolist() == image[20, 28].tolist()  # 1x1 border block
    assert out.shape == image.shape and out.dtype == image.dtype
    assert (average_blocks(bottom, 2) == np.round(bottom.astype(float).mean(axis=(0, 1)))).all()


@pytest.mark.parametrize("block", [3, 4])
def test_shuffle_is_a_keyed_permutation_inside_each_block(image: np.ndarray, block: int) -> None:
    out = shuffle_blocks(image, block, key=7)
    assert not (out == image).all()
    for top in range(0, 22, block):
        for left in range(0, 30, block):  # pixels stay in their block
            a = image[top:top + block, left:left + block].reshape(-1, 3)
            b = out[top:top + block, left:left + block].reshape(-1, 3)
            assert sorted(map(tuple, a)) == sorted(map(tuple, b))
    assert (unshuffle_blocks(out, block, key=7) == image).all()
    assert not (unshuffle_blocks(out, block, key=8) == image).all()
    # every full block uses the same permutation (the seed's Shuffle_Key)
    index = np.arange(block * block * 4).reshape(2 * block, 2 * block)
    moved = shuffle_blocks(index, block, key=7)
    assert ((moved[:block, :block] - index[:block, :block]) == (moved[block:, block:] - index[block:, block:])).all()


def test_switch_row_is_a_keyed_row_permutation(image: np.ndarray) -> None:
    out = switch_rows(image, key=3)
    assert sorted(map(bytes, out)) == sorted(map(bytes, image))
    assert not (out == image).all()
    assert (unswitch_rows(out, key=3) == image).all()
    assert not (unswitch_rows(out, key=4) == image).all()


def test_combined_obfuscation_is_restored_by_its_key_only(image: np.ndarray) -> None:
    secret = Obfuscation(("switch_row", "shuffle"), key=11)
    assert secret.methods == ("shuffle", "switch_row")  # canonical order
    assert (secret.restore(secret(image)) == image).all()
    assert not (Obfuscation(("shuffle", "switch_row"), key=12).restore(secret(image)) == image).all()
    averaged = Obfuscation(("average", "shuffle", "switch_row"), key=11)
    assert (averaged.restore(averaged(image)) == average_blocks(image, 2)).all()  # averaging is not invertible
    assert "key" not in averaged.to_dict()


def test_restore_map_brings_a_map_back_to_the_image_grid() -> None:
    secret = Obfuscation("shuffle,switch_row", key=5)
    truth = np.random.default_rng(1).random((16, 24)).astype(np.float32)
    assert np.allclose(secret.restore_map(secret(truth), (16, 24)), truth)
    assert secret.prepare(np.zeros((40, 60, 3), np.uint8), 16).shape == (16, 24, 3)


def test_obfuscation_rejects_unknown_methods_and_negative_keys() -> None:
    assert parse_methods("none") == () and parse_methods(" shuffle , average") == ("average", "shuffle")
    with pytest.raises(ValueError, match="blur"):
        parse_methods("average,blur")
    with pytest.raises(ValueError, match="key"):
        Obfuscation("shuffle", key=-1)


# ---------------------------------------------------------------- DP mechanisms
def test_clipping_bounds_norms_and_keeps_small_rows() -> None:
    rows = np.random.default_rng(0).normal(size=(500, 16)) * np.linspace(0.1, 10, 500)[:, None]
    clipped = clip_rows(rows, 4.0)
    norms = np.linalg.norm(rows, axis=1)
    assert np.linalg.norm(clipped, axis=1).max() <= 4.0 + 1e-9
    assert np.allclose(clipped[norms <= 4.0], rows[norms <= 4.0])
    assert np.allclose(clipped[norms > 4.0] / np.linalg.norm(clipped[norms > 4.0], axis=1, keepdims=True),
                       rows[norms > 4.0] / norms[norms > 4.0, None])  # directions kept


def test_per_embedding_noise_has_the_calibrated_scale_and_is_seeded() -> None:
    privacy = BankPrivacy(unit="embedding", noise_multiplier=0.5, clip_norm=2.0)
    zeros = np.zeros((4000, 50), np.float32)
    noisy = privatize_embeddings(zeros, privacy, seed=1)
    assert noisy.std() == pytest.approx(0.5 * 2 * 2.0, rel=0.02)  # z * sensitivity (2C, replacement)
    assert (privatize_embeddings(zeros, privacy, seed=1) == noisy).all()
    assert not (privatize_embeddings(zeros, privacy, seed=2) == noisy).all()


def test_budget_resolution_uses_the_accountant() -> None:
    per_patch = BankPrivacy(unit="embedding", epsilon=1.0)
    assert per_patch.resolved_epsilon() <= 1.0
    assert per_patch.resolved_noise_multiplier() == pytest.approx(noise_multiplier_for(1.0))
    image = BankPrivacy(unit="image", noise_multiplier=3.0, iterations=2)
    # sums and counts released together with multiplier z each: one Gaussian with z / sqrt(2), 3 releases
    assert image.resolved_epsilon() == pytest.approx(epsilon(3.0 / math.sqrt(2), steps=3))
    block = BankPrivacy(unit="image", epsilon=5.0).report()
    assert block["unit"] == "image" and block["epsilon"] <= 5.0 and block["accountant"] == "rdp"
    assert {"mechanism", "epsilon", "delta", "noise_multiplier", "clip_norm"} <= set(block)
    with pytest.raises(ValueError, match="epsilon must be positive"):
        BankPrivacy(unit="image")
    with pytest.raises(ValueError, match="unit"):
        BankPrivacy(unit="pixel", epsilon=1.0)


def test_patch_sampling_does_not_look_at_values() -> None:
    rng = np.random.default_rng(0)
    images = [rng.normal(size=(n, 4)) for n in (30, 10, 3)]
    chosen = sample_patches(images, 5, seed=9)
    other = sample_patches([-10 * x for x in images], 5, seed=9)
    assert [len(c) for c in chosen] == [5, 5, 3]
    assert all(np.allclose(-10 * a, b) for a, b in zip(chosen, other, strict=True))


def test_noisy_centres_find_separated_clusters_when_noise_is_small() -> None:
    rng = np.random.default_rng(0)
    means = np.array([[5.0, 0, 0, 0], [-5.0, 0, 0, 0]])
    images = [means[i % 2] + 0.1 * rng.normal(size=(20, 4)) for i in range(400)]
    privacy = BankPrivacy(unit="image", noise_multiplier=0.01, clip_norm=10.0, patches_per_image=8, clusters=2,
                          iterations=3)
    centres = private_centres(images, privacy, seed=0)
    assert len(centres) == 2 and np.linalg.norm(centres, axis=1).max() <= 10.0 + 1e-6
    assert np.abs(np.sort(centres[:, 0]) - [-5.0, 5.0]).max() < 0.1


def test_noisy_centres_stay_inside_the_clip_ball_and_are_never_empty_at_high_noise() -> None:
    images = [np.random.default_rng(i).normal(size=(30, 8)) for i in range(5)]
    centres = private_centres(images, BankPrivacy(unit="image", epsilon=0.5, clip_norm=1.0), seed=0)
    assert 1 <= len(centres) <= 8 and np.linalg.norm(centres, axis=1).max() <= 1.0 + 1e-6


@pytest.mark.parametrize("unit", ["embedding", "image"])
def test_with_dp_no_raw_embedding_value_is_sent(mvtec_category: Path, unit: str) -> None:
    from fedinspect.data.images import read_image
    from fedinspect.federation.client import FederatedClient, RoundSettings
    from fedinspect.federation.update import ClientUpdate

    images = {"widget": sorted((mvtec_category / "train" / "good").glob("*.png"))}
    plain = RoundSettings(image_size=64, local_coreset_ratio=0.5, precision="float32")
    detector = plain.detector()
    raw = detector.embed([read_image(p) for p in images["widget"]])

    def sent(settings: RoundSettings) -> np.ndarray:
        update, _ = FederatedClient("c", images).fit(settings, detector)
        return ClientUpdate.from_bytes(update.to_bytes("float32")).categories["widget"].embeddings

    assert np.isin(sent(plain), raw).all()  # without DP the update is made of raw values: the check can fail
    private = sent(replace(plain, dp_unit=unit, dp_epsilon=10.0))
    assert len(private)
    # no sent row is a raw (or clipped raw) row, and values coincide no more than float32 chance allows
    for reference in (raw, clip_rows(raw, plain.dp_clip_norm).astype(np.float32)):
        assert not (private[:, None, :] == reference[None, :, :]).all(axis=2).any()
        assert np.isin(private, reference).mean() < 1e-3


# ---------------------------------------------------------------- attacks
def test_membership_auc_is_one_when_the_bank_holds_the_members_and_half_for_strangers() -> None:
    rng = np.random.default_rng(0)
    members = [rng.normal(size=(10, 6)) for _ in range(8)]
    others = [rng.normal(size=(10, 6)) for _ in range(8)]
    assert membership_auc(np.concatenate(members), members, others) == 1.0
    bank = rng.normal(size=(500, 6))
    assert 0.2 < membership_auc(bank, members, others) < 0.8
    with pytest.raises(ValueError):
        membership_auc(bank, [], others)


def test_cell_patches_are_centred_on_their_grid_cells() -> None:
    from fedinspect.detectors.patchcore import PatchCore
    from fedinspect.privacy.inversion import cell_patches

    detector = PatchCore(image_size=64)
    yy, xx = np.mgrid[0:64, 0:96]
    image = np.stack([yy * 3, xx * 2, np.zeros_like(yy)], axis=-1).astype(np.uint8)
    patches = cell_patches(detector, image, 16)
    stride = detector.features.stride
    cells_w = 96 // stride
    assert len(patches) == len(detector.embed_per_image([image])[0])
    letterboxed = detector.letterbox(image).permute(1, 2, 0).numpy()
    for cell in (0, 5, cells_w + 3, len(patches) - 1):
        i, j = divmod(cell, cells_w)
        centre = letterboxed[i * stride + stride // 2, j * stride + stride // 2]
        assert np.allclose(patches[cell][8, 8], centre)


def test_inversion_decoder_learns_an_invertible_embedding() -> None:
    from fedinspect.privacy.inversion import InversionAttack, PatchPairs, similarity

    rng = np.random.default_rng(0)
    patches = rng.random((600, 4, 4, 3)).astype(np.float32)
    mixing = rng.normal(size=(48, 48))
    pairs = PatchPairs(patches.reshape(600, -1) @ mixing, patches)  # an invertible "backbone"
    attack = InversionAttack(hidden=128, epochs=40, seed=0).fit(pairs)
    psnr, _ = similarity(attack.reconstruct(pairs.embeddings[:100]), patches[:100])
    chance, _ = similarity(np.full_like(patches[:100], 0.5), patches[:100])
    assert psnr > chance + 3.0
    assert attack.loss_curve_[-1] < attack.loss_curve_[0]


# ---------------------------------------------------------------- end to end
@pytest.mark.slow
def test_federate_with_dp_obfuscation_and_attacks(tiny_dataset: Path, tmp_path: Path) -> None:
    from fedinspect.cli import main

    out = tmp_path / "run"
    code = main(["-q", "federate", "--data", str(tiny_dataset), "--out", str(out), "--clients", "2",
                 "--image-size", "64", "--no-centralized", "--no-shared-comparison", "--dp-epsilon", "1",
                 "--dp-unit", "image", "--obfuscate", "average+shuffle", "--obfuscation-key", "77",
                 "--attack-data", str(tiny_dataset)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    block = results["privacy"]
    assert block["unit"] == "image" and block["epsilon"] <= 1.0 and block["delta"] == 1e-5
    assert block["noise_multiplier"] > 1 and block["clip_norm"] > 0 and block["accountant"] == "rdp"
    assert results["obfuscation"]["methods"] == ["average", "shuffle"]
    assert "obfuscation_key" not in (out / "results.json").read_text()  # the key is a secret
    attacks = results["attacks"]
    assert {"inversion_psnr", "inversion_ssim", "membership_auc"} <= set(attacks)
    assert 0.0 <= attacks["membership_auc"] <= 1.0 and math.isfinite(attacks["inversion_psnr"])


def test_obfuscate_without_a_key_is_refused(tiny_dataset: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    from fedinspect.cli import main

    monkeypatch.delenv("FEDINSPECT_OBFUSCATION_KEY", raising=False)
    code = main(["-q", "federate", "--data", str(tiny_dataset), "--out", str(tmp_path), "--obfuscate", "shuffle"])
    assert code != 0 and "key" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_privacy_study_writes_its_table_and_plot(tiny_dataset: Path, tmp_path: Path) -> None:
    from fedinspect.federation.client import RoundSettings
    from fedinspect.federation.privacy_study import STUDY_FILE, PrivacyStudy, run_privacy_study
    from fedinspect.federation.runner import FederationConfig

    config = FederationConfig(clients=2, centralized=False, compare_shared=False, write_maps=False,
                              settings=RoundSettings(image_size=64))
    study = PrivacyStudy(epsilons=(1.0, None), obfuscations=("", "average,shuffle"), attack_images=6)
    results = run_privacy_study(tiny_dataset, tmp_path, tiny_dataset, config, study, progress=False)
    rows = json.loads((tmp_path / STUDY_FILE).read_text())["rows"]
    assert len(rows) == len(study.cells()) == 5
    plain = next(r for r in rows if r["obfuscation"] == "none" and r["unit"] == "none")
    assert plain["membership_auc"] > 0.9  # raw patches in the bank give members away
    private = next(r for r in rows if r["obfuscation"] == "none" and r["unit"] == "image")
    assert private["epsilon"] <= 1.0 and private["membership_auc"] < plain["membership_auc"]
    assert {r["unit"] for r in rows} == {"none", "image", "embedding"}
    report = (tmp_path / "report.md").read_text()
    assert (tmp_path / "privacy_pareto.png").stat().st_size > 0 and "(privacy_pareto.png)" in report
    assert (tmp_path / "obfuscation_examples.png").stat().st_size > 0 and "(obfuscation_examples.png)" in report
    assert results["rows"] == rows


def test_privacy_settings_travel_through_the_flower_run_config() -> None:
    from fedinspect.federation import flower_app
    from fedinspect.federation.client import RoundSettings
    from fedinspect.federation.runner import FederationConfig

    config = FederationConfig(settings=RoundSettings(obfuscation="average,shuffle", obfuscation_key=42,
                                                     dp_unit="image", dp_epsilon=5.0, dp_clusters=4))
    restored, _ = flower_app.config_from_run_config(flower_app.run_config_from_config(config))
    assert restored == config
    assert restored.settings.bank_privacy() == config.settings.bank_privacy()
    with pytest.raises(ValueError, match="unit"):
        RoundSettings(dp_unit="pixel", dp_epsilon=1.0)


def test_score_membership_auc_by_hand() -> None:
    # members score 1 and 3, non-members 2 and 4: minus scores rank (m1, n2, m3, n4) -> pairs won 3 of 4
    assert score_membership_auc([1.0, 3.0], [2.0, 4.0]) == 0.75
    assert score_membership_auc([0.1, 0.2], [0.5, 0.9]) == 1.0  # members look normal to the model
    assert score_membership_auc([5.0], [5.0]) == 0.5
    with pytest.raises(ValueError, match="at least one member"):
        score_membership_auc([], [1.0])
