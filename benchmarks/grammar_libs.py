"""Grammar engines on our draft trees: llguidance against xgrammar, to choose the one structured outputs use.

Verification needs, for every node of a draft tree, the token mask of the grammar state after the node's
path; drafting needs the same for each frontier node, level by level. So what matters is the host time per
tree node with the state forked or rolled back along the tree, the cost of a fork and of a rollback, the
time to compile a schema, and what installing the library costs. Trees here have our shapes (topk 6, depth
32: 193 nodes, and depth 48: 289 nodes); their first path follows a valid output and the other nodes are
tokens the grammar allows at their parent, so masks are computed deep into the tree, as a well-aligned
draft makes them.

    python -m benchmarks.grammar_libs [--json] [--repeats 3]

The two libraries do not allow the same token splits of a fixed string (after `{"` llguidance allows `id` but
not `i`, xgrammar both), so their masks differ at many nodes: `masks_agree` says at how many they are equal.
Either is a lossless constraint as long as drafting and verification use the same one.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SCHEMAS: dict[str, tuple[dict[str, Any], Any]] = {
    "person": ({"type": "object", "properties": {
        "name": {"type": "string"}, "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "format": "email"}, "bio": {"type": "string"}}, "required": ["name", "age"]},
        {"name": "Ada Lovelace", "age": 36, "email": "ada@example.org",
         "bio": "Mathematician and writer, known for her work on the Analytical Engine and the first algorithm."}),
    "order": ({"type": "object", "properties": {
        "id": {"type": "string", "pattern": "^ORD-[0-9]{6}$"},
        "items": {"type": "array", "items": {"type": "object", "properties": {
            "sku": {"type": "string"}, "quantity": {"type": "integer", "minimum": 1},
            "price": {"type": "number", "minimum": 0}}, "required": ["sku", "quantity", "price"]}, "minItems": 1},
        "status": {"enum": ["pending", "shipped", "delivered"]}}, "required": ["id", "items", "status"]},
        {"id": "ORD-123456", "items": [{"sku": "A-1", "quantity": 2, "price": 9.5},
                                       {"sku": "B-7", "quantity": 1, "price": 120.0}], "status": "shipped"}),
    "event": ({"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 80}, "when": {"type": "string", "format": "date-time"},
        "attendees": {"type": "array", "items": {"type": "string"}},
        "location": {"anyOf": [{"type": "string"}, {"type": "object", "properties": {
            "lat": {"type": "number"}, "lon": {"type": "number"}}, "required": ["lat", "lon"]}]}},
        "required": ["title", "when"]},
        {"title": "Launch review", "when": "2026-12-07T10:00:00Z", "attendees": ["Ana", "Bo", "Chen"],
         "location": {"lat": 48.85, "lon": 2.35}}),
}


@dataclass
class Tree:
    """A draft tree in both encodings: parents (ours) and first-child / next-sibling (xgrammar's)."""

    tokens: list[int]
    parents: list[int]

    def children(self) -> list[list[int]]:
        kids: list[list[int]] = [[] for _ in self.tokens]
        for node, parent in enumerate(self.parents):
            if parent >= 0:
                kids[parent].append(node)
        return kids

    def first_child_next_sibling(self) -> tuple[list[int], list[int]]:
        first = [-1] * len(self.tokens)
        sibling = [-1] * len(self.tokens)
        for kids in self.children():
            if kids:
                first[self.parents[kids[0]]] = kids[0]
                for a, b in zip(kids, kids[1:]):
                    sibling[a] = b
        return first, sibling


def _allowed(bitmask: np.ndarray, vocab: int) -> np.ndarray:
    bits = np.unpackbits(bitmask.view(np.uint8), bitorder="little")[:vocab]
    return np.flatnonzero(bits)


def grammar_tree(ll_tokenizer: Any, grammar: str, path: list[int], *, topk: int, depth: int, vocab: int,
                 seed: int = 0) -> Tree:
    """A tree of 1 + depth * topk nodes: node 0 and the first node of each level follow `path` (a valid output),
    the others are random tokens the grammar allows after a random node of the level above."""
    import llguidance
    import llguidance.numpy as llnp

    rng = random.Random(seed)
    tokens, parents = [path[0]], [-1]
    matchers = {0: llguidance.LLMatcher(ll_tokenizer, grammar)}
    assert matchers[0].consume_token(path[0])
    level = [0]
    mask = llnp.allocate_token_bitmask(1, vocab)
    eos = set(ll_tokenizer.eos_token if isinstance(ll_tokenizer.eos_token, list) else [ll_tokenizer.eos_token])
    for d in range(1, depth + 1):
        nodes = []
        open_nodes = [node for node in level if not matchers[node].is_stopped()]
        if not open_nodes:
            raise RuntimeError(f"every path ends before depth {depth}: give a longer example")
        for k in range(topk):
            if k == 0 and d < len(path):
                parent, token = level[0], path[d]
            else:
                parent = rng.choice(open_nodes)
                llnp.fill_next_token_bitmask(matchers[parent], mask, 0)
                allowed = [t for t in _allowed(mask[0], vocab) if t not in eos]
                if not allowed:
                    open_nodes.remove(parent)
                    parent = open_nodes[0]
                    llnp.fill_next_token_bitmask(matchers[parent], mask, 0)
                    allowed = [t for t in _allowed(mask[0], vocab) if t not in eos]
                token = int(rng.choice(allowed))
            node = len(tokens)
            tokens.append(token)
            parents.append(parent)
            matcher = matchers[parent].deep_copy()
            if matcher.try_consume_tokens([token]) != 1:
                raise RuntimeError("the tree left the grammar")
            matchers[node] = matcher
            nodes.append(node)
        level = nodes
    return Tree(tokens, parents)


def llguidance_tree_masks(matcher: Any, tree: Tree, bitmask: np.ndarray) -> None:
    """Row i: the mask after node i's path (node 0 included), by one depth-first walk that consumes a node's
    token on the way down and rolls it back on the way up (a node the grammar refuses gets an empty row)."""
    import llguidance.numpy as llnp

    kids = tree.children()
    stack: list[tuple[int, bool]] = [(0, True)]
    while stack:
        node, entering = stack.pop()
        if not entering:
            matcher.rollback(1)
            continue
        if matcher.try_consume_tokens([tree.tokens[node]]) != 1:
            bitmask[node] = 0
            continue
        llnp.fill_next_token_bitmask(matcher, bitmask, node)
        stack.append((node, False))
        stack.extend((child, True) for child in reversed(kids[node]))


def _footprint(distribution: str) -> dict[str, Any]:
    """Bytes a distribution and its own requirements occupy on disk (torch is counted apart: the worker needs
    it anyway; triton is not, it is what xgrammar adds on a machine without a GPU build of torch)."""
    seen: set[str] = set()
    total = 0
    pending = [distribution]
    while pending:
        name = pending.pop()
        key = name.lower().replace("_", "-")
        if key in seen or key in ("torch", "numpy", "transformers", "pydantic", "typing-extensions"):
            continue
        seen.add(key)
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        total += sum(Path(dist.locate_file(f)).stat().st_size for f in dist.files or () if Path(dist.locate_file(f)).is_file())
        for requirement in dist.requires or ():
            if "extra ==" in requirement:
                continue
            pending.append(requirement.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].strip())
    return {"packages": sorted(seen), "bytes": total}


def run(repeats: int = 3) -> dict[str, Any]:
    import llguidance
    import llguidance.hf
    import llguidance.numpy as llnp
    import torch

    try:
        import xgrammar as xg
    except ImportError:
        raise SystemExit("benchmarks.grammar_libs compares against xgrammar: pip install xgrammar") from None

    from subspec_core.config import EngineConfig
    from subspec_core.loading import load_tokenizer

    tokenizer = load_tokenizer(EngineConfig())
    vocab = len(tokenizer)
    started = time.perf_counter()
    ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer)
    ll_tokenizer_s = time.perf_counter() - started
    started = time.perf_counter()
    xg_info = xg.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
    xg_compiler = xg.GrammarCompiler(xg_info, cache_enabled=False)
    xg_tokenizer_s = time.perf_counter() - started
    results: dict[str, Any] = {"vocab": vocab, "tokenizer_setup_s": {"llguidance": round(ll_tokenizer_s, 3),
                                                                     "xgrammar": round(xg_tokenizer_s, 3)},
                               "schemas": {}}
    for name, (schema, example) in SCHEMAS.items():
        text = json.dumps(schema)
        timings: dict[str, Any] = {}
        started = time.perf_counter()
        grammar = llguidance.LLMatcher.grammar_from_json_schema(text, defaults={"whitespace_flexible": False})
        llguidance.LLMatcher(ll_tokenizer, grammar)
        timings["compile_s"] = {"llguidance": round(time.perf_counter() - started, 4)}
        started = time.perf_counter()
        compiled = xg_compiler.compile_json_schema(text, any_whitespace=False, separators=(",", ":"))
        timings["compile_s"]["xgrammar"] = round(time.perf_counter() - started, 4)
        path = tokenizer.encode(json.dumps(example, separators=(",", ":")), add_special_tokens=False)
        for depth in (32, 48):
            tree = grammar_tree(ll_tokenizer, grammar, path, topk=6, depth=depth, vocab=vocab)
            n = len(tree.tokens)
            ll_mask = llnp.allocate_token_bitmask(n, vocab)
            xg_mask = xg.allocate_token_bitmask(n, vocab)
            first, sibling = (torch.tensor(x, dtype=torch.long) for x in tree.first_child_next_sibling())
            draft = torch.tensor(tree.tokens, dtype=torch.long)
            ll_s, xg_s = [], []
            for _ in range(repeats):
                matcher = llguidance.LLMatcher(ll_tokenizer, grammar)
                started = time.perf_counter()
                llguidance_tree_masks(matcher, tree, ll_mask)
                ll_s.append(time.perf_counter() - started)
                xg_matcher = xg.GrammarMatcher(compiled)
                started = time.perf_counter()
                # xgrammar's traversal takes the root as consumed already (its row 0 is the mask after it);
                # ours is the bonus token of the last step, not yet consumed
                xg_matcher.accept_token(tree.tokens[0])
                xg_matcher.traverse_draft_tree(first, sibling, draft, xg_mask)
                xg_s.append(time.perf_counter() - started)
            agree = sum(np.array_equal(_allowed(ll_mask[i], vocab), _allowed(xg_mask[i].numpy(), vocab))
                        for i in range(n))
            timings[f"depth{depth}"] = {
                "nodes": n, "masks_agree": f"{agree}/{n}",
                "us_per_node": {"llguidance": round(min(ll_s) / n * 1e6, 1), "xgrammar": round(min(xg_s) / n * 1e6, 1)},
            }
        matcher = llguidance.LLMatcher(ll_tokenizer, grammar)
        matcher.consume_tokens(path[:20])
        xg_matcher = xg.GrammarMatcher(compiled, max_rollback_tokens=-1)
        for token in path[:20]:
            xg_matcher.accept_token(token)
        timings["fork_us"] = {"llguidance": _each_us(matcher.deep_copy), "xgrammar": _each_us(xg_matcher.fork)}
        timings["accept_and_rollback_us"] = {
            "llguidance": _each_us(lambda: (matcher.consume_token(path[20]), matcher.rollback(1))),
            "xgrammar": _each_us(lambda: (xg_matcher.accept_token(path[20]), xg_matcher.rollback(1)))}
        results["schemas"][name] = timings
    results["install"] = {"llguidance": _footprint("llguidance"), "xgrammar": _footprint("xgrammar")}
    results["versions"] = {lib: importlib.metadata.version(lib) for lib in ("llguidance", "xgrammar")}
    results["imports_torch"] = _imports_torch()
    return results


def _imports_torch() -> dict[str, bool]:
    """Whether importing each library imports torch (the API process, which validates schemas, never may)."""
    import subprocess
    import sys

    code = "import sys, {}; print('torch' in sys.modules)"
    return {lib: subprocess.run([sys.executable, "-c", code.format(lib)], capture_output=True, text=True
                                ).stdout.strip() == "True" for lib in ("llguidance", "xgrammar")}


def _each_us(call: Any, times: int = 200) -> float:
    started = time.perf_counter()
    for _ in range(times):
        call()
    return round((time.perf_counter() - started) / times * 1e6, 1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    results = run(args.repeats)
    print(json.dumps(results, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
