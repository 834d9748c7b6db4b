"""On the real model (SmolLM2-135M GGUF, or LLMQ_TEST_MODEL): the CLI's checkpoint loads back and computes
what the in-memory fake-quantized model computes."""
import pytest
import torch

import llmq
from llmq import sources
from llmq.cli import main
from llmq.config import QuantScheme
from llmq.inspect import inspect_dir


@pytest.fixture(scope="module")
def fp_model(real_model_path):
    model, _ = sources.load_model(sources.resolve(str(real_model_path)))
    return model


def test_rtn_int4_g128_checkpoint_matches_fake_quant(real_model_path, fp_model, tmp_path):
    out = tmp_path / "q"
    assert main(["quantize", str(real_model_path), str(out), "--bits", "4", "--group-size", "128", "--quiet"]) == 0
    info = inspect_dir(out)
    assert info["quantized_modules"] == 7 * fp_model.config.num_hidden_layers
    assert 4.1 < info["bits_per_weight"] < 4.3  # 4 bits + fp16 scale and 4-bit zero per 128
    q = llmq.load_quantized(out, backend="reference")
    ref = llmq.fake_quantize(fp_model, llmq.quantize(fp_model, QuantScheme(bits=4, group_size=128)))
    x = torch.randint(0, fp_model.config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (q(x).logits - ref(x).logits).abs().max().item()
    assert diff <= 1e-3, diff
    tok = __import__("transformers").AutoTokenizer.from_pretrained(out)
    assert tok.decode(tok("The capital of France")["input_ids"]) == "The capital of France"


def test_from_pretrained_on_smollm2(real_model_path, tmp_path):
    """The transformers hook on the real model: same logits as load_quantized (reference: exact; cpu backend:
    within the stated bf16-activation tolerance), and generate() runs."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "q"
    assert main(["quantize", str(real_model_path), str(out), "--bits", "4", "--group-size", "128", "--quiet"]) == 0
    ref = llmq.load_quantized(out, backend="reference")
    m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    x = torch.randint(0, ref.config.vocab_size, (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y_ref = ref(x).logits
        y_cpu = m(x).logits  # auto: the cpu backend serves int4 g128
        llmq.set_backend(m, "reference")
        assert torch.equal(m(x).logits, y_ref)
    assert ((y_cpu - y_ref).norm() / y_ref.norm()).item() < 1e-2
    assert m.generate(x[:, :8], max_new_tokens=4, do_sample=False).shape == (1, 12)
