"""The memorisation figures: longest copied substring and share of copied pieces."""

from charlstm_jax.novelty import longest_copy, novelty

TEXT = "All animals are equal, but some animals are more equal than others."


def test_longest_copy_finds_the_longest_verbatim_stretch():
    sample = "Xsome animals are moreY and pigs"
    assert longest_copy(sample, TEXT) == "some animals are more"
    assert longest_copy("zzz", TEXT) == ""
    assert longest_copy(TEXT, TEXT) == TEXT


def test_share_of_copied_pieces():
    copied = novelty(TEXT[:30], TEXT, piece_length=10)
    assert copied.pieces == 21 and copied.copied_pieces == 21 and copied.copied_share == 1.0
    new = novelty("qwertyuiopasdfghjkl", TEXT, piece_length=10)
    assert new.copied_pieces == 0 and new.copied_share == 0.0
    half = novelty("All animalsqqqqqqqqqq", TEXT, piece_length=10)
    assert half.copied_pieces == 2  # "All animal", "ll animals"
    assert "longest copied substring: 11 characters" in half.summary()


def test_short_sample_has_no_pieces():
    short = novelty("All", TEXT)
    assert short.pieces == 0 and short.copied_share == 0.0
