"""Growing the draft tree: a global beam of `topk` nodes per depth, by cumulative draft log-probability.

The draft never prefills: it attends to the target's KV rows for the committed prefix [0, N) and writes
its own rows only at scratch slots N + j (j = tree node index), which the verification forward overwrites.

Static shapes, no host synchronisation. Every tensor a draft step reads or writes is a persistent device
buffer of fixed shape: N, the root token, the frontier's tokens, positions, slots and scores, and the
(topk, capacity) attention mask, which covers the WHOLE cache (masked columns cost a little arithmetic,
and keep the shapes independent of N). So every level step dispatches the same ops on the same shapes
whatever N and the depth, and nothing in drafting ever reads a device value on the host: a level step can
be captured once as a CUDA graph and replayed at every depth of every iteration.

    Node numbering (topk = 2, depth 2):        0 (root, slot N, position N)
                                              /          \\
                      slot N+1, position N+1 1            2 slot N+2
                                            / \\
                                           3   4   level 2: slots N+3, N+4, position N+2
"""

from __future__ import annotations

from typing import Callable

import logging

import torch

from subspec_core.cancel import CancelCheck, raise_if_cancelled
from subspec_core.tree import TokenTree, expand_frontier

log = logging.getLogger(__name__)

# (tokens (n,), positions (n,), slots (n,), bias (n, capacity) additive mask) -> float32 logits (n, V)
DraftLogitsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class TreeDrafter:
    """Grows draft trees of up to 1 + max_depth * topk nodes into persistent buffers, one draft forward per level."""

    def __init__(
        self, *, draft_logits: DraftLogitsFn, topk: int, max_depth: int, capacity: int, temperature: float,
        dtype: torch.dtype, device: torch.device,
    ) -> None:
        self.draft_logits = draft_logits
        self.topk = topk
        self.max_depth = max_depth
        self.capacity = capacity
        self.inv_temperature = 1.0 / temperature
        k, size = topk, 1 + max_depth * topk
        long = dict(dtype=torch.long, device=device)
        # The tree. Depths, the root's row and level 1's parents and ancestors never change: set once.
        self.tokens = torch.zeros(size, **long)
        self.parents = torch.zeros(size, **long)
        self.parents[0] = -1
        self.depths = torch.tensor([0] + [1 + (j - 1) // k for j in range(1, size)], **long)
        self.scores = torch.zeros(size, dtype=torch.float32, device=device)
        self.ancestors = torch.zeros(size, size, dtype=torch.bool, device=device)
        self.ancestors[: k + 1, 0] = True
        self.ancestors[: k + 1, : k + 1] |= torch.eye(k + 1, dtype=torch.bool, device=device)
        # Inputs of a grow (copied in, so a captured graph always reads the same addresses).
        self.prefix_length = torch.zeros(1, **long)  # N
        self.root_token = torch.zeros(1, **long)
        # The frontier: the level whose draft forward runs next.
        self.level1_nodes = torch.arange(1, k + 1, **long)
        self.frontier_nodes = self.level1_nodes.clone()  # (k,) node indices
        self.frontier_tokens = torch.zeros(k, **long)
        self.frontier_scores = torch.zeros(k, dtype=torch.float32, device=device)
        self.positions = torch.zeros(k, **long)
        self.slots = torch.zeros(k, **long)
        self.columns = torch.arange(capacity, **long)  # cache slot of each mask column
        self.root_bias = torch.zeros(1, capacity, dtype=dtype, device=device)  # (1, C) additive mask
        self.bias = torch.zeros(k, capacity, dtype=dtype, device=device)  # (k, C) the frontier's mask rows
        self._root_graph: torch.cuda.CUDAGraph | None = None  # set by capture_cuda_graphs
        self._level_graph: torch.cuda.CUDAGraph | None = None

    @property
    def graphed(self) -> bool:
        """Whether grow() replays captured CUDA graphs instead of launching each op."""
        return self._level_graph is not None

    def capture_cuda_graphs(self) -> bool:
        """Capture the root step and the level step once as CUDA graphs (CUDA only); False, eager, if it fails.

        Possible because every buffer a step touches is persistent and every shape static: the same graph
        serves every level of every tree. The warm-up runs write draft scratch rows at slot prefix_length (0
        here), so call it before any request has filled the cache. Cancel checks stay between replays.
        """
        device = self.tokens.device
        if device.type != "cuda":
            return False
        try:
            side = torch.cuda.Stream(device=device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm-up off the capture: lazy init, cuBLAS workspaces, allocator
                for _ in range(2):
                    self.root_step()
                    self.level_step()
            torch.cuda.current_stream(device).wait_stream(side)
            root, level = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            with torch.cuda.graph(root):
                self.root_step()
            with torch.cuda.graph(level, pool=root.pool()):
                self.level_step()
        except Exception as exc:  # noqa: BLE001 - the eager path is correct, only slower
            log.warning("capturing the draft step as a CUDA graph failed (%s: %s); drafting eagerly",
                        type(exc).__name__, exc)
            return False
        self._root_graph, self._level_graph = root, level
        return True

    def grow(self, *, root_token: torch.Tensor, prefix_length: torch.Tensor, depth: int,
             cancelled: CancelCheck | None = None) -> TokenTree:
        """Draft a tree of 1 + depth * topk nodes with `depth` draft forwards (root, then levels 1..depth-1).

        root_token (1,): the last committed token, whose KV is not in the cache yet; prefix_length (1,): N.
        Both are device tensors; the returned tree's tensors are views of this drafter's buffers, valid
        until the next grow. `cancelled` is asked before each draft forward (an abort waits at most one
        level); when it turns true, `GenerationCancelled` is raised.
        """
        if not 1 <= depth <= self.max_depth:
            raise ValueError(f"depth must be in [1, {self.max_depth}], got {depth}")
        self.root_token.copy_(root_token)
        self.prefix_length.copy_(prefix_length)
        raise_if_cancelled(cancelled)
        self._run(self.root_step, self._root_graph)
        for _ in range(depth - 1):
            raise_if_cancelled(cancelled)
            self._run(self.level_step, self._level_graph)
        return self.tree(depth)

    @staticmethod
    def _run(step, graph: torch.cuda.CUDAGraph | None) -> None:  # type: ignore[no-untyped-def]
        if graph is None:
            step()
        else:
            graph.replay()

    def root_step(self) -> None:
        """Draft forward of the root (1 row), then level 1: the root's topk best children."""
        n, k = self.prefix_length, self.topk
        self.root_bias.fill_(0.0).masked_fill_(self.columns > n, float("-inf"))  # the prefix and the root itself
        logits = self.draft_logits(self.root_token, n, n, self.root_bias)  # (1, V)
        logprobs = torch.log_softmax(logits * self.inv_temperature, dim=-1)
        scores, tokens = torch.topk(logprobs.view(-1), k)  # the root's path score is 0
        self.tokens[:1] = self.root_token
        self.tokens[1 : k + 1] = tokens
        self.scores[1 : k + 1] = scores
        self.frontier_nodes.copy_(self.level1_nodes)
        self.frontier_tokens.copy_(tokens)
        self.frontier_scores.copy_(scores)
        self.positions.copy_(n.expand(k)).add_(1)
        torch.add(n, self.level1_nodes, out=self.slots)
        self.bias.copy_(self.root_bias.expand(k, -1)).scatter_(1, self.slots[:, None], 0.0)  # + each node itself

    def level_step(self) -> None:
        """Draft forward of the frontier (topk rows), then the next level: the global topk of their children."""
        logits = self.draft_logits(self.frontier_tokens, self.positions, self.slots, self.bias)  # (k, V)
        logprobs = torch.log_softmax(logits * self.inv_temperature, dim=-1)
        rows, tokens, scores = expand_frontier(parent_scores=self.frontier_scores, logprobs=logprobs, topk=self.topk)
        nodes = self.frontier_nodes + self.topk  # the next level's node indices
        parent_nodes = self.frontier_nodes.index_select(0, rows)
        self.tokens.index_copy_(0, nodes, tokens)
        self.parents.index_copy_(0, nodes, parent_nodes)
        self.scores.index_copy_(0, nodes, scores)
        ancestors = self.ancestors.index_select(0, parent_nodes).scatter_(1, nodes[:, None], True)
        self.ancestors.index_copy_(0, nodes, ancestors)
        # the next forward: the new level at the next position, in its own slots, seeing its parents' view + itself
        torch.add(self.prefix_length, nodes, out=self.slots)
        self.bias.copy_(self.bias.index_select(0, rows).scatter_(1, self.slots[:, None], 0.0))
        self.positions.add_(1)
        self.frontier_nodes.copy_(nodes)
        self.frontier_tokens.copy_(tokens)
        self.frontier_scores.copy_(scores)

    def tree(self, depth: int) -> TokenTree:
        """The last grown tree, cut to `depth` levels (views of the buffers)."""
        size = 1 + depth * self.topk
        return TokenTree(
            tokens=self.tokens[:size], parents=self.parents[:size], depths=self.depths[:size],
            scores=self.scores[:size], ancestors=self.ancestors[:size, :size],
        )
