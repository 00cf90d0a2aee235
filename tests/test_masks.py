"Mask codecs round-trip: both X-ray RLE dialects decode what they encode, on random masks of any shape."
import numpy as np
from hypothesis import given, settings, strategies as st

from xr0_lib.data.masks import rle_decode_siim, rle_encode_siim, rle_decode_chexmask, rle_encode_chexmask


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 20), st.integers(1, 20), st.integers(0, 2**31 - 1))
def test_rle_round_trips(h, w, seed):
    m = (np.random.default_rng(seed).random((h, w)) > 0.5).astype(np.uint8)
    assert np.array_equal(rle_decode_siim(rle_encode_siim(m), h, w), m)
    assert np.array_equal(rle_decode_chexmask(rle_encode_chexmask(m), h, w), m)
