import pytest

from tqc.options import ALL_NAMES, QuantOption, resolve_group_size


@pytest.mark.parametrize("name", ALL_NAMES)
def test_names_round_trip(name):
    assert QuantOption.parse(name).name == name


@pytest.mark.parametrize("bad", ["5", "4+3", "rtn5", "fp8", "", "4+2+2"])
def test_unknown_options_are_refused_with_the_choices(bad):
    with pytest.raises(ValueError, match="choose from"):
        QuantOption.parse(bad)


def test_bits_per_weight_counts_scales():
    assert QuantOption.parse("4+4").bits_per_weight(128) == 8.25
    assert QuantOption.parse("3").bits_per_weight(128) == 3.125
    assert QuantOption.parse("rtn4").bits_per_weight(128) == 4.25  # scale and zero point


def test_group_size_falls_back_where_128_does_not_divide():
    assert resolve_group_size(576, 128) == 64  # SmolLM2's hidden size
    assert resolve_group_size(1536, 128) == 128
    with pytest.raises(ValueError):
        resolve_group_size(100, 128)
