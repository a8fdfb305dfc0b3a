"""Our compact forward against transformers' reference modeling code."""

from __future__ import annotations

import pytest
import torch

from subspec_core.architecture import UnsupportedModelError, shape_from_hf_config
from subspec_core.build import build_engine
from subspec_core.config import EngineConfig
from subspec_core.loading import load_hf_model, load_tokenizer
from subspec_core.model_source import resolve_model
from subspec_core.startup import StartupLog
from tests.core.tiny import FAMILIES, TINY_VOCAB, tiny_engine, tiny_hf_config, tiny_hf_model


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(EngineConfig())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("streamed", [False, True])
def test_tiny_logits_match_transformers(family: str, streamed: bool, tokenizer) -> None:
    """Llama (plain, llama3 rope scaling, tied embeddings), Qwen2 (q/k/v biases), Qwen3 (q/k norms), Mistral,
    Phi-3 (fused checkpoint tensors; LongRoPE within its original context), resident and streamed."""
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
    hf = load_hf_model(resolve_model("default", progress=False), torch.float32)
    with torch.no_grad():
        reference = hf(torch.tensor([ids])).logits[0].float()
    ours = engine.prompt_logits(ids)
    torch.testing.assert_close(ours, reference, atol=2e-3, rtol=1e-3)
    assert torch.equal(ours.argmax(-1), reference.argmax(-1))


def test_unsupported_architecture_fails_clearly() -> None:
    from transformers import Gemma2Config, Gemma3TextConfig, GPT2Config

    with pytest.raises(UnsupportedModelError, match="gpt2.*not supported.*llama, mistral, qwen2, qwen3, phi3"):
        shape_from_hf_config(GPT2Config())
    for config in (Gemma2Config(), Gemma3TextConfig()):  # Gemma's decoder is not the Llama-shaped one
        with pytest.raises(UnsupportedModelError, match=r"Gemma models are not supported: .*soft-capping"):
            shape_from_hf_config(config, max_model_len=2048)
    with pytest.raises(UnsupportedModelError, match="partial rotary"):
        shape_from_hf_config(tiny_hf_config("phi3").__class__(partial_rotary_factor=0.5), max_model_len=2048)


def test_sliding_window_is_refused_only_where_it_would_change_attention(tokenizer) -> None:
    """A window of W tokens changes attention only for keys W or more positions back: exact up to W tokens."""
    window = 40
    config = tiny_hf_config("mistral")
    config.sliding_window = window
    with pytest.raises(UnsupportedModelError, match=rf"sliding window of {window} .*max_model_len <= {window} \(it is 41\)"):
        shape_from_hf_config(config, max_model_len=window + 1)
    assert shape_from_hf_config(config, max_model_len=window).architecture == "mistral"
    hf = tiny_hf_model("mistral", seed=3)
    hf.config.sliding_window = window
    ids = torch.randint(0, TINY_VOCAB, (window,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = hf(ids[None]).logits[0].float()
    engine = tiny_engine(hf, tokenizer, mode="resident", max_resident_layers=None, max_model_len=window)
    torch.testing.assert_close(engine.prompt_logits(ids.tolist()), reference, atol=2e-4, rtol=1e-4)
    qwen = tiny_hf_config("qwen2")
    qwen.layer_types = ["sliding_attention"] * qwen.num_hidden_layers
    qwen.sliding_window = window
    with pytest.raises(UnsupportedModelError, match="sliding window"):
        shape_from_hf_config(qwen, max_model_len=2048)


def test_longrope_is_exact_only_within_its_original_context() -> None:
    from tests.core.tiny import LONGROPE_ORIGINAL

    config = tiny_hf_config("phi3-longrope")
    assert shape_from_hf_config(config, max_model_len=LONGROPE_ORIGINAL).architecture == "phi3"
    with pytest.raises(UnsupportedModelError, match=rf"LongRoPE .*max_model_len <= {LONGROPE_ORIGINAL}"):
        shape_from_hf_config(config, max_model_len=LONGROPE_ORIGINAL + 1)


@pytest.fixture(scope="module")
def tokenizer_dir(tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("family, storage", [(f, "shards") for f in FAMILIES]
                         + [("tied", "one file"), ("qwen3", "one file"), ("phi3", "bin")])
def test_checkpoint_loads_layer_by_layer_to_transformers_logits(family, storage, tokenizer_dir, tmp_path) -> None:
    """The real loading path (build_engine on a saved checkpoint: safetensors shards with their index, one
    safetensors file, or a pytorch_model.bin that transformers must materialise first) reads each family's tensor
    names into our layout: Phi-3's fused q/k/v and gate/up, Qwen3's q/k norms, tied embeddings without an
    lm_head tensor."""
    hf = tiny_hf_model(family, seed=4)
    if storage == "bin":
        hf.config.save_pretrained(tmp_path)
        torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    else:
        hf.save_pretrained(tmp_path, max_shard_size="60KB" if storage == "shards" else "50GB")
    assert (tmp_path / "model.safetensors.index.json").is_file() == (storage == "shards")
    ids = torch.randint(0, TINY_VOCAB, (29,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = hf(ids[None]).logits[0].float()
    config = EngineConfig(model=str(tmp_path), tokenizer=str(tokenizer_dir), device="cpu", dtype="float32",
                          mode="vanilla", max_resident_layers=1, max_model_len=256, prefill_chunk_size=8)
    lines: list[str] = []
    engine = build_engine(config, progress=False, phases=StartupLog(emit=lines.append))
    load = next(line for line in lines if line.startswith("start-up: load"))
    assert ("materialised first" in load) == (storage == "bin") and ("layer by layer" in load) == (storage != "bin")
    assert engine.plan.resident_layers == (0,) and engine.plan.streamed_layers == (1, 2)
    torch.testing.assert_close(engine.prompt_logits(ids.tolist()), reference, atol=2e-4, rtol=1e-4)


def test_default_model_streamed_equals_resident(default_engines, default_tokenizer) -> None:
    """Every layer streamed through the 2-slot ring gives the resident model's logits."""
    ids = default_tokenizer("Weights stream layer by layer; the logits must not notice.")["input_ids"]
    streamed = default_engines("vanilla")
    assert streamed.plan.resident_layers == () and streamed.target_layers.streamer is not None
    resident = default_engines("resident")
    assert resident.target_layers.streamer is None
    torch.testing.assert_close(streamed.prompt_logits(ids), resident.prompt_logits(ids), atol=1e-5, rtol=1e-5)
