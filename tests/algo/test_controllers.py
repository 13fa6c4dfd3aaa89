import pytest
import torch

from agpo_megatron.algo.controllers import (
    AdaptiveClipConfig,
    AdaptiveClipController,
    AdaptiveKLConfig,
    AdaptiveKLController,
    FixedClipController,
    FixedKLController,
)


def _kl(**overrides: float) -> AdaptiveKLController:
    # No smoothing unless asked, so that every step's error is the measured one.
    kwargs = {"init_beta": 0.1, "target_kl": 0.01, "horizon": 10.0, "ema_decay": 0.0} | overrides
    return AdaptiveKLController(AdaptiveKLConfig(**kwargs))


def _clip(**overrides: float) -> AdaptiveClipController:
    kwargs = {
        "init_eps_low": 0.2,
        "init_eps_high": 0.28,
        "target_kl": 0.01,
        "horizon": 10.0,
        "ema_decay": 0.0,
        "eps_min": 0.1,
        "eps_max": 0.3,
    } | overrides
    return AdaptiveClipController(AdaptiveClipConfig(**kwargs))


# ----------------------------------------------------------------------------- KL coefficient


@pytest.mark.parametrize(
    "measured, expected_beta",
    [
        (0.02, 0.1 * (1 + 0.2 / 10)),  # error +1.0 saturates at +0.2
        (0.011, 0.1 * (1 + 0.1 / 10)),  # error +0.1
        (0.01, 0.1),  # on target
        (0.005, 0.1 * (1 - 0.2 / 10)),  # error -0.5 saturates at -0.2
        (-0.5, 0.1 * (1 - 0.2 / 10)),  # a negative k1 estimate is just "below target"
    ],
)
def test_kl_controller_moves_beta_towards_target(measured, expected_beta):
    assert _kl().update(measured) == pytest.approx(expected_beta)


def test_kl_controller_respects_bounds():
    ctl = _kl(init_beta=0.1, beta_max=0.1005)
    assert ctl.update(1.0) == pytest.approx(0.1005)
    assert ctl.update(1.0) == pytest.approx(0.1005)

    ctl = _kl(init_beta=0.1, beta_min=0.099)
    assert ctl.update(0.0) == pytest.approx(0.099)
    assert ctl.update(0.0) == pytest.approx(0.099)


def test_kl_controller_ema_starts_at_first_measurement():
    ctl = _kl(ema_decay=0.5)
    assert ctl.update(0.02) == pytest.approx(0.102)  # ema = 0.02, not 0.5 * 0.02
    assert ctl.update(0.0) == pytest.approx(0.102)  # ema = 0.01 = target: beta unchanged
    assert ctl.ema_kl == pytest.approx(0.01)


def test_kl_controller_accepts_a_zero_dim_tensor():
    assert _kl().update(torch.tensor(0.02)) == pytest.approx(0.102)


def test_kl_controller_state_dict_round_trip():
    ctl = _kl(ema_decay=0.9)
    for kl in (0.02, 0.03, 0.001):
        ctl.update(kl)
    restored = _kl(ema_decay=0.9)
    restored.load_state_dict(ctl.state_dict())
    assert restored.state_dict() == ctl.state_dict()
    assert restored.num_updates == 3
    assert restored.update(0.05) == ctl.update(0.05)

    with pytest.raises(ValueError, match="state_dict"):
        restored.load_state_dict({"beta": 0.1})


def test_fixed_kl_controller_is_constant():
    ctl = FixedKLController(0.05)
    assert ctl.update(10.0) == 0.05
    assert ctl.update(0.0) == 0.05
    assert ctl.state_dict() == {}
    ctl.load_state_dict({})
    with pytest.raises(ValueError, match="beta"):
        FixedKLController(-0.1)


def test_a_non_finite_kl_leaves_the_controllers_unchanged():
    """A non-finite KL comes from a step runtime/nonfinite.py skipped (no update): nothing to learn from."""
    for ctl in (_kl(), FixedKLController(0.1), _clip(), FixedClipController(0.2, 0.2)):
        ctl.update(0.05)
        before = ctl.state_dict(), getattr(ctl, "beta", None), getattr(ctl, "eps", None)
        for bad in (float("nan"), float("inf")):
            ctl.update(bad)
        assert (ctl.state_dict(), getattr(ctl, "beta", None), getattr(ctl, "eps", None)) == before


def test_factories_pick_fixed_without_settings():
    from agpo_megatron.algo.controllers import clip_controller, kl_controller

    assert isinstance(kl_controller(None, 0.01), FixedKLController)
    assert isinstance(clip_controller(None, (0.2, 0.28)), FixedClipController)
    assert clip_controller(None, (0.2, 0.28)).eps == (0.2, 0.28)
    assert isinstance(kl_controller(AdaptiveKLConfig(init_beta=0.1, target_kl=0.01), 0.0), AdaptiveKLController)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"target_kl": 0.0}, "target_kl"),
        ({"horizon": 0.5}, "horizon"),
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"beta_min": 0.0}, "beta_min"),
        ({"beta_min": 0.5, "beta_max": 0.1, "init_beta": 0.2}, "beta_max"),
        ({"init_beta": 2.0}, "init_beta"),
    ],
)
def test_kl_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AdaptiveKLConfig(**kwargs)


# ----------------------------------------------------------------------------- clip range


def test_clip_controller_shrinks_when_kl_is_high_and_widens_when_low():
    assert _clip().update(0.02) == pytest.approx((0.2 * 0.98, 0.28 * 0.98))
    assert _clip().update(0.001) == pytest.approx((0.2 * 1.02, 0.28 * 1.02))
    assert _clip().update(0.01) == pytest.approx((0.2, 0.28))


def test_clip_controller_respects_bounds():
    ctl = _clip()
    for _ in range(100):
        eps_low, eps_high = ctl.update(0.0)
    assert (eps_low, eps_high) == pytest.approx((0.3, 0.3))

    ctl = _clip()
    for _ in range(100):
        eps_low, eps_high = ctl.update(1.0)
    assert (eps_low, eps_high) == pytest.approx((0.1, 0.1))


def test_clip_controller_state_dict_round_trip():
    ctl = _clip(ema_decay=0.8)
    for kl in (0.02, 0.0, 0.05):
        ctl.update(kl)
    restored = _clip(ema_decay=0.8)
    restored.load_state_dict(ctl.state_dict())
    assert restored.state_dict() == ctl.state_dict()
    assert restored.update(0.003) == ctl.update(0.003)


def test_fixed_clip_controller_is_constant():
    ctl = FixedClipController(0.2, 0.28)
    assert ctl.update(1.0) == (0.2, 0.28)
    assert ctl.state_dict() == {}
    with pytest.raises(ValueError, match="eps_low"):
        FixedClipController(1.0, 0.2)
    with pytest.raises(ValueError, match="eps_high"):
        FixedClipController(0.2, -0.1)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"eps_min": 0.0}, "eps_min"),
        ({"eps_max": 1.0}, "eps_max"),
        ({"init_eps_low": 0.01}, "init_eps_low"),
        ({"init_eps_high": 0.5}, "init_eps_high"),
        ({"target_kl": -1.0}, "target_kl"),
    ],
)
def test_clip_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        AdaptiveClipConfig(**kwargs)
