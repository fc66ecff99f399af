"""Text encoders and the caption embedding cache."""

from pathlib import Path

import torch

from memguard.data.text import CaptionEmbeddings, MiniLMEncoder


def test_minilm_token_states() -> None:
    encoder = MiniLMEncoder(max_length=12)
    states, mask = encoder.encode_with_mask(["a red circle on a white background", ""])
    assert states.shape == (2, 12, 384) and mask.shape == (2, 12)
    assert mask[1].sum() == 2  # the empty caption is [CLS] [SEP]
    again = encoder.encode(["a red circle on a white background"])
    torch.testing.assert_close(states[:1], again, atol=1e-5, rtol=1e-5)  # batch size aside
    assert not torch.allclose(states[0], states[1])


class CountingEncoder(MiniLMEncoder):
    calls = 0

    def encode(self, captions):
        CountingEncoder.calls += len(captions)
        return super().encode(captions)


def test_each_caption_is_encoded_once_and_cached(tmp_path: Path) -> None:
    encoder = CountingEncoder(max_length=8)
    captions = ["a", "b", "a", "c", "b"]
    table = CaptionEmbeddings(encoder, captions, cache_dir=tmp_path)
    assert CountingEncoder.calls == 4  # a, b, c and the empty caption
    assert table.table.shape == (4, 8, 384)
    torch.testing.assert_close(
        table.table[table.rows(["c"])][0], encoder.encode(["c"])[0], atol=1e-5, rtol=1e-5
    )
    torch.testing.assert_close(table.unconditional, encoder.encode([""])[0], atol=1e-5, rtol=1e-5)
    calls = CountingEncoder.calls
    cached = CaptionEmbeddings(encoder, captions, cache_dir=tmp_path)
    assert CountingEncoder.calls == calls
    assert torch.equal(cached.table, table.table)
