import numpy as np
import pytest

from genmodels.noise import NoiseField, concat_noise, make_noise

SPEC = {"z": NoiseField((3,), "normal"), "u": NoiseField((1, 2, 2), "uniform")}


def test_same_seed_same_noise_and_other_seed_differs():
    a, b = make_noise(SPEC, 7, 5), make_noise(SPEC, 7, 5)
    c = make_noise(SPEC, 8, 5)
    for k in SPEC:
        assert np.array_equal(a[k], b[k])
        assert not np.array_equal(a[k], c[k])


def test_row_depends_only_on_seed_and_index():
    whole = make_noise(SPEC, 11, 10)
    tail = make_noise(SPEC, 11, 4, start=6)
    parts = concat_noise([make_noise(SPEC, 11, 3), make_noise(SPEC, 11, 3, start=3), make_noise(SPEC, 11, 4, start=6)])
    for k in SPEC:
        assert np.array_equal(whole[k][6:], tail[k])
        assert np.array_equal(whole[k], parts[k])


def test_distributions_and_shapes():
    noise = make_noise({"u": NoiseField((1000,), "uniform"), "z": NoiseField((1000,), "normal")}, 0, 4)
    assert noise["u"].shape == (4, 1000) and noise["u"].dtype == np.float32
    assert float(noise["u"].min()) >= 0 and float(noise["u"].max()) < 1
    assert abs(float(noise["z"].mean())) < 0.05 and abs(float(noise["z"].std()) - 1) < 0.05
    # rows are independent streams, not copies
    assert not np.array_equal(noise["z"][0], noise["z"][1])


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, True])
def test_bad_seed_is_refused(seed):
    with pytest.raises((ValueError, TypeError), match="seed"):
        make_noise(SPEC, seed, 1)


def test_numpy_integer_seed_accepted():
    assert np.array_equal(make_noise(SPEC, np.int64(3), 2)["z"], make_noise(SPEC, 3, 2)["z"])


