"""Our compact forward against transformers' reference modeling code."""

from __future__ import annotations

import pytest
import torch

from subspec_core.config import EngineConfig
from subspec_core.loading import _load_hf_model, load_tokenizer
from subspec_core.model_source import resolve_model
from tests.core.tiny import TINY_VOCAB, tiny_engine, tiny_hf_model


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(EngineConfig())


@pytest.mark.parametrize("family", ["llama", "llama3", "qwen2", "tied"])
@pytest.mark.parametrize("streamed", [False, True])
def test_tiny_logits_match_transformers(family: str, streamed: bool, tokenizer) -> None:
    """Llama (plain, llama3 rope scaling, tied embeddings) and Qwen2 (q/k/v biases), resident and streamed."""
    hf = tiny_hf_model(family, seed=1)
    ids = torch.randint(0, TINY_VOCAB, (37,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = hf(ids[None]).logits[0].float()
    mode = "vanilla" if streamed else "resident"
    engine = tiny_engine(hf, tokenizer, mode=mode, max_resident_layers=0 if streamed else None, prefill_chunk_size=8)
    ours = engine.prompt_logits(ids.tolist())
    torch.testing.assert_close(ours, reference, atol=2e-4, rtol=1e-4)


def test_llama3_rope_scaling_is_applied(tokenizer) -> None:
    """The llama3 rope variant changes the logits at long positions, and we follow it."""
    plain, scaled = tiny_hf_model("llama", seed=2), tiny_hf_model("llama3", seed=2)
    assert not torch.equal(plain.model.rotary_emb.inv_freq, scaled.model.rotary_emb.inv_freq)


def test_chunked_prefill_equals_one_chunk(tokenizer) -> None:
    ids = list(range(3, 60))
    one = tiny_engine(tiny_hf_model("qwen2"), tokenizer, mode="vanilla", prefill_chunk_size=256).prompt_logits(ids)
    many = tiny_engine(tiny_hf_model("qwen2"), tokenizer, mode="vanilla", prefill_chunk_size=5).prompt_logits(ids)
    torch.testing.assert_close(many, one, atol=1e-4, rtol=1e-4)  # float32 summation order differs per chunk


def test_default_model_logits_match_transformers(default_engines, default_tokenizer) -> None:
    """The real default model (SmolLM2-135M-Instruct GGUF), all layers streamed, against transformers."""
    engine = default_engines("vanilla")
    text = "The SubSpec method streams the target's weights while a 4-bit draft proposes a token tree."
    ids = default_tokenizer(text)["input_ids"]
    hf = _load_hf_model(resolve_model("default", progress=False), torch.float32)
    with torch.no_grad():
        reference = hf(torch.tensor([ids])).logits[0].float()
    ours = engine.prompt_logits(ids)
    torch.testing.assert_close(ours, reference, atol=2e-3, rtol=1e-3)
    assert torch.equal(ours.argmax(-1), reference.argmax(-1))


def test_unsupported_architecture_fails_clearly() -> None:
    from transformers import GPT2Config

    from subspec_core.loading import UnsupportedModelError, shape_from_hf_config

    with pytest.raises(UnsupportedModelError, match="gpt2.*not supported.*llama, qwen2"):
        shape_from_hf_config(GPT2Config())


def test_default_model_streamed_equals_resident(default_engines, default_tokenizer) -> None:
    """Every layer streamed through the 2-slot ring gives the resident model's logits."""
    ids = default_tokenizer("Weights stream layer by layer; the logits must not notice.")["input_ids"]
    streamed = default_engines("vanilla")
    assert streamed.plan.resident_layers == () and streamed.target_layers.streamer is not None
    resident = default_engines("resident")
    assert resident.target_layers.streamer is None
    torch.testing.assert_close(streamed.prompt_logits(ids), resident.prompt_logits(ids), atol=1e-5, rtol=1e-5)
