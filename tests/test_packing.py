import pytest
import torch

from llmq.formats import packing


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (5, 8), (4, 129), (2, 1000), (7, 576)])
def test_pack_unpack_roundtrip_exact(bits, shape):
    g = torch.Generator().manual_seed(bits * 1000 + shape[1])
    codes = torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.uint8)
    packed = packing.pack(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (shape[0], packing.packed_row_bytes(shape[1], bits))
    assert torch.equal(packing.unpack(packed, bits, shape[1]), codes)


def test_layout_is_lsb_first():
    # 4 bits: even column in the low nibble; 2 bits: column 0 in bits 0-1; 3 bits: 8 codes in 3 bytes.
    assert packing.pack(torch.tensor([[1, 2]], dtype=torch.uint8), 4).tolist() == [[0x21, 0, 0, 0]]
    assert packing.pack(torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8), 2)[0, 0].item() == 0b00111001
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0]], dtype=torch.uint8)
    word = sum(int(v) << (3 * i) for i, v in enumerate(codes[0]))
    assert packing.pack(codes, 3).tolist() == [[word & 255, (word >> 8) & 255, word >> 16]]


def test_unpack_rejects_wrong_row_bytes():
    with pytest.raises(ValueError, match="need"):
        packing.unpack(torch.zeros(2, 3, dtype=torch.uint8), 4, 16)
