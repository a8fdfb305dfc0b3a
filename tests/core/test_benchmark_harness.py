"""The side-by-side benchmark harness (`python -m benchmarks.run`) end to end on the CPU.

What is checked is the harness's contract: every column in the JSON, the identical-tokens check, the
synthetic mechanics and labelled projections, the markdown on stdout. Timings are never asserted.
"""

from __future__ import annotations

import json

from benchmarks.mode_result import COLUMNS, PromptRun, compare_modes, pooled
from benchmarks.report import markdown
from benchmarks.run import main, parse_modes
from benchmarks.synthetic import PAPER_TAU, VERIFY_SIZES


def test_harness_on_default_model_and_tiny_synthetic(default_model_path, tmp_path, capsys) -> None:
    out = tmp_path / "results.json"
    code = main([
        "--num-prompts", "1", "--max-tokens", "8", "--modes", "subspec,vanilla,hf-accelerate", "--max-depth", "4",
        "--warmup-tokens", "2", "--synthetic", "tiny", "--synthetic-repeats", "1", "--out", str(out),
    ])
    stdout = capsys.readouterr().out
    assert code == 0
    doc = json.loads(out.read_text())

    assert [m["mode"] for m in doc["modes"]] == ["subspec", "vanilla", "hf-accelerate"]
    for m in doc["modes"]:
        assert set(COLUMNS) <= set(m), f"{m['mode']} lacks {set(COLUMNS) - set(m)}"
        assert m["status"] == "ok" and m["completion_tokens"] > 0 and m["iterations"] > 0
        assert m["pinned_h2d_gbps"] is None and m["peak_gpu_gib"] is None  # n/a on CPU, never a made-up number
    assert doc["identical_tokens_subspec_vs_vanilla"] is True
    assert doc["agreement"] == {"exact": True, "prompts": 1, "identical": 1, "diverged": [], "lossless": True}
    assert doc["environment"]["substitute"] == doc["config"]["speculation"]["quant_type"]
    assert doc["environment"]["substitute_kernel"]
    env = doc["environment"]  # what ran: on a CPU the device is "cpu" and the CUDA versions are null
    assert env["device"] == "cpu" and env["torch"] and env["compute_capability"] is env["cuda"] is env["cudnn"] is None
    for m in doc["modes"][:2]:  # our engines: PyTorch's attention choice on a CPU, no graph capture tried
        assert set(m["attention"]) == {"prefill_chunk", "draft_root", "draft_level", "verify_tree", "one_token_step"}
        assert m["cuda_graphs"] is None
    assert doc["modes"][2]["attention"] is None  # hf-accelerate is not our engine
    subspec, vanilla = doc["modes"][0], doc["modes"][1]
    assert subspec["identical_to_vanilla"] is True and subspec["streamed_layers"]  # the default preset streams
    assert vanilla["mean_accept_length"] == 1.0 and subspec["mean_accept_length"] >= 1.0
    assert subspec["draft_ms_per_iter"] is not None and vanilla["draft_ms_per_iter"] is None
    assert vanilla["speedup_vs_vanilla"] == 1.0

    syn = doc["synthetic"]
    assert {m: e["status"] for m, e in syn["engines"].items()} == {"vanilla": "ok", "subspec": "ok"}
    assert {str(n) for n in VERIFY_SIZES} <= set(syn["measured"]["verify"])
    assert syn["environment"]["device"] == "cpu" and "attention" in syn["engines"]["subspec"]
    assert syn["measured"]["vanilla_token"]["ms"] > 0 and syn["measured"]["draft_step_ms"] > 0
    paper, measured = syn["projections"]
    assert paper["label"] == measured["label"] == "projection"
    assert paper["tau"] == PAPER_TAU and measured["tau"] == subspec["mean_accept_length"]
    assert paper["tokens_per_s"] > 0

    assert "| mode | status | decode tok/s | TTFT s | tau |" in stdout
    for mode in ("subspec", "vanilla", "hf-accelerate"):
        assert f"| {mode} | ok |" in stdout
    assert "Identical tokens, subspec vs vanilla: yes" in stdout
    assert f"PROJECTION at tau = {PAPER_TAU:.2f}" in stdout


def test_pooling_speedups_and_na_cells() -> None:
    """tau pools tokens over forwards; ratios use decode tokens/s; a missing measurement prints n/a, not 0."""
    spec = pooled("subspec", [
        PromptRun(token_ids=[1, 2, 3, 4, 5, 6, 7], ttft_s=0.5, decode_s=1.0, iterations=2, accepted_tokens=4,
                  draft_s=0.4, verify_s=0.6, decode_h2d_bytes=3 * 10**9, verify_h2d_bytes=2 * 10**9, copy_wait_s=None),
    ], on_cuda=True)
    van = pooled("vanilla", [
        PromptRun(token_ids=[1, 2, 3, 4, 5, 6, 8], ttft_s=0.5, decode_s=3.0, iterations=6, verify_s=3.0,
                  decode_h2d_bytes=6 * 10**9, verify_h2d_bytes=6 * 10**9),
    ], on_cuda=True)
    assert spec.mean_accept_length == 3.0  # (4 accepted + 2 bonus) / 2 forwards
    assert spec.decode_tok_s == 6.0 and van.decode_tok_s == 2.0
    assert spec.verify_h2d_gbps == 2 / 0.6 and spec.draft_ms_per_iter == 200.0  # verify-time copies only
    assert spec.copy_wait_ms_per_iter is None
    assert compare_modes([spec, van]) is False  # the last token differs
    assert spec.speedup_vs_vanilla == 3.0 and spec.speedup_vs_hf_accelerate is None
    doc = {"run": {"model": "m", "suite": "mt_bench", "num_prompts": 1, "max_tokens": 7},
           "environment": {"device": "cpu"}, "pinned_h2d": {"gbps": None, "note": "n/a on CPU"},
           "modes": [spec.as_dict(), van.as_dict()], "identical_tokens_subspec_vs_vanilla": False, "synthetic": None}
    text = markdown(doc)
    assert "| subspec | ok | 6.00 | 0.500 | 3.000 | 2 | 200.00 | 300.00 | n/a |" in text
    assert "Identical tokens, subspec vs vanilla: NO" in text


def test_mode_list() -> None:
    assert parse_modes("subspec, vanilla") == ["subspec", "vanilla"]
    assert parse_modes("none") == []


def test_results_are_on_disk_before_a_later_section_fails(default_model_path, tmp_path, monkeypatch) -> None:
    """Each mode's result is written as soon as it is measured; a crash in the synthetic section keeps them."""
    import benchmarks.run as run_module

    out = tmp_path / "results.json"
    seen_before_synthetic: dict = {}

    def failing_synthetic(*args, **kwargs):
        seen_before_synthetic.update(json.loads(out.read_text()))
        raise RuntimeError("synthetic section exploded")

    monkeypatch.setattr(run_module, "run_synthetic", failing_synthetic)
    code = main(["--num-prompts", "1", "--max-tokens", "4", "--modes", "vanilla", "--warmup-tokens", "0",
                 "--synthetic", "tiny", "--out", str(out)])
    assert code == 1  # the failure is reported ...
    assert [m["mode"] for m in seen_before_synthetic["modes"]] == ["vanilla"]  # ... after the mode was on disk
    doc = json.loads(out.read_text())
    assert doc["modes"][0]["status"] == "ok" and doc["synthetic_error"] == "RuntimeError: synthetic section exploded"


def test_beam_tree_is_a_valid_drafted_shape_tree() -> None:
    """The verify-cost tree used where the drafted tree is smaller: ancestors and depths as a walk gives them."""
    import torch

    from benchmarks.mechanics import beam_tree
    from tests.core.test_tree import make_tree

    for size, topk in ((1, 3), (11, 3), (193, 6), (289, 6)):
        tree = beam_tree(size, topk=topk, vocab_size=50, device=torch.device("cpu"))
        reference = make_tree(tree.parents.tolist())
        assert torch.equal(tree.ancestors, reference.ancestors) and torch.equal(tree.depths, reference.depths)
