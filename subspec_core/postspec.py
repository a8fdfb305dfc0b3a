"""Post-speculation: the draft keeps growing the current tree while the verify forward waits on the link, and
an iteration whose whole tree was accepted starts the next one from that extension instead of drafting anew.

    iteration i (fresh)                            iteration i + 1 (chained)
    draft D levels | verify the tree  ........ |   verify c's subtree ......... |
                   | extend P levels (waits)   |   extend P levels (waits)      |
                   |                           |
    levels 1..D: verified;                     a fully accepted tree (the path reaches level D) whose bonus
    levels D+1..D+P: drafted, not verified     token b is a level-(D+1) child c of the path's end: c becomes
                                               the root, its descendants the next tree (no draft step)

    KV slots while a tree is live:   [0, N) committed | [N, N + R) draft rows | [N + R, N + R + V) verify rows
                                     (R = 1 + max_levels * topk, V = verify_size)

Where the work runs: on a simulated link, in the engine's thread, one level per wait on a slot whose copy has
not landed (copies.SimulatedLink.wait_filled), and the levels the waits left right after the verify; on CUDA,
all P levels are launched on a side stream when the verify is (the GPU runs them while the compute stream
waits for copies), and the compute stream waits for the side stream's event after the verify. Either way
exactly P levels are drafted per verify, so the drafts do not depend on timing.

Races, and why there are none:
- The verify writes its target KV rows in its own region [N + R, ...), never in the draft rows the
  extension reads (the draft's own tree rows, deterministic) and writes. Both only read [0, N).
- The verify's attention spans the draft rows, masked: a masked column adds exactly 0 whatever finite value it
  holds, so the extension writing there at the same time (CUDA) cannot change a verify logit.
- Compaction (accepted rows to [N, N + a]) runs after the extension is done (CUDA: after the event), and
  only ever covers draft rows of verified levels; the extension's rows lie past them.
- `rebase` moves the kept nodes' draft rows to sit right after the new committed length and re-numbers the
  tree, so a chained tree is laid out like a fresh one: the tree's size stays within `max_levels`, the
  bucket's mask buffer and the KV capacity, whatever the chain's length (the authors' unbounded growth). A
  rebase keeps the tree's attention bucket while N moves on, so no chain is made once its extension could
  write past that bucket (`settle`); the next tree is grown fresh, in the longer bucket.
- No draft work survives a request: extension levels run only from inside the verify they belong to (the
  wait hook is an argument of that one forward); an abort raises out of it and `abandon` drops the chain
  (on CUDA the compute stream first waits for the side stream, so the next request's KV writes follow it).

The settings, from the simulated link at the GPU regime's ratio (benchmarks/pipeline.py, README): the chain
only pays when whole trees are accepted, so fresh trees are shallow (max_depth 8: accepted whole about half the
time, where depth 32 almost never is) and the extension deep (post_levels 16: a chained tree of up to 15
levels, drafted within the verify's wait for the link; 24 did no better, 31 no longer fit and slowed every
verify).
Deeper fresh trees (12, 16) chained less and were slower; a chained tree cut to 8 levels (so that it too is
accepted whole more often) chained more but emitted fewer tokens per verify, and was slower.

A dead node (not a descendant of the new root) keeps its beam slot with score -inf: static shapes, and no child
of it is picked while a live frontier node has children. When the new root's subtree does not reach the
deepest drafted level (the beam went to other branches), its chained tree is verified without an extension.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from subspec_core.cancel import CancelCheck, raise_if_cancelled
from subspec_core.copies import WhileWaiting
from subspec_core.drafting import TreeDrafter
from subspec_core.tree import TokenTree, select_verify_nodes, subtree
from subspec_core.verify import AcceptedPath


@dataclass(frozen=True)
class PlannedTree:
    """The tree one iteration verifies, and where: `tree` (renumbered when pruned), its depth, the verify
    region's first slot, and whether it came from the last iteration's extension."""

    tree: TokenTree
    kept: torch.Tensor | None  # (size,) drafter node index of each verified node; None: all, in order
    depth: int
    verify_base: int
    chained: bool
    extend: int  # levels the extension drafts during this verify


@dataclass(frozen=True)
class _Chain:
    live: int  # the new root and its descendants: the next tree's nodes
    depth: int  # the deepest level they reach, below the new root


class PostSpeculation:
    """Chain state between iterations and the extension during each verify (see the module docstring)."""

    def __init__(self, *, drafter: TreeDrafter, levels: int, verify_size: int, kv_move: Callable[[int, torch.Tensor], None],
                 device: torch.device) -> None:
        self.drafter = drafter
        self.levels = levels  # P: extension levels per verify
        self.verify_size = verify_size
        self.draft_rows = 1 + drafter.max_levels * drafter.topk  # R
        self._kv_move = kv_move
        self._chain: _Chain | None = None
        cuda = device.type == "cuda"
        self._side = torch.cuda.Stream(device=device) if cuda else None
        self._done = torch.cuda.Event() if cuda else None
        self._device = device

    def plan(self, *, root: torch.Tensor, length: torch.Tensor, committed: int, depth: int, limit: int,
             cancelled: CancelCheck | None) -> PlannedTree:
        """The tree to verify at N = committed: the chained one when the last iteration left one no deeper than
        `limit` (the most levels worth verifying: the tokens still allowed, less the bonus), else a freshly grown
        depth-`depth` tree."""
        drafter, chain = self.drafter, self._chain
        self._chain = None
        chained = chain is not None and 1 <= chain.depth <= limit
        if chained:
            live, levels = chain.live, chain.depth
        else:
            drafter.grow(root_token=root, prefix_length=length, committed=committed, depth=depth,
                         cancelled=cancelled, room=drafter.max_levels)
            live, levels = 1 + depth * drafter.topk, depth
        full = drafter.tree(levels)
        budget = min(self.verify_size, live)
        if budget < full.size:  # pruned, or a chained tree's dead nodes dropped (score -inf sorts last)
            kept = select_verify_nodes(scores=full.scores, budget=budget)
            tree = subtree(full, kept)
        else:
            kept, tree = torch.arange(full.size, device=full.tokens.device), full
        # the extension grows under the frontier only while it has live nodes (a chained tree's may have none)
        growing = levels == drafter.levels
        extend = min(self.levels, drafter.max_levels - levels) if growing else 0
        return PlannedTree(tree=tree, kept=kept, depth=levels, verify_base=committed + self.draft_rows,
                           chained=chained, extend=extend)

    @contextlib.contextmanager
    def overlapping(self, planned: PlannedTree, cancelled: CancelCheck | None) -> Iterator[WhileWaiting | None]:
        """Around the verify forward: yields the wait hook that drafts the extension (None on CUDA, where
        it runs on a side stream); on a normal exit every one of `planned.extend` levels has been drafted."""
        todo = planned.extend
        if self._side is not None:
            main = torch.cuda.current_stream(self._device)
            self._side.wait_stream(main)  # the tree (grown or rebased on the main stream) first
            with torch.cuda.stream(self._side):
                for _ in range(todo):
                    self.drafter.extend()
                self._done.record(self._side)
            try:
                yield None
            finally:
                main.wait_event(self._done)  # also on an abort: nothing after this races the extension
            return

        def one_level() -> bool:
            nonlocal todo
            if todo:
                raise_if_cancelled(cancelled)
                self.drafter.extend()
                todo -= 1
            return todo > 0

        yield one_level if todo else None
        while todo:  # the levels the waits had no time for (no wait, or copies that had landed)
            one_level()

    def candidates(self, planned: PlannedTree, *, path: AcceptedPath, emitted: torch.Tensor) -> torch.Tensor:
        """(3,) long on the device, read with the iteration's tokens: the extension node that carries the bonus
        token under a fully accepted path (else -1), how many nodes its subtree has, and the deepest level it
        reaches (the drafter's numbering). Fixed shapes, no host read."""
        drafter, k = self.drafter, self.drafter.topk
        device = emitted.device
        if planned.extend == 0:
            return torch.tensor([-1, 0, -1], device=device)
        last = path.length - 1
        end = planned.kept.index_select(0, path.nodes.index_select(0, last))  # (1,) drafter index
        bonus = emitted.index_select(0, last)
        first = 1 + planned.depth * k  # the extension's first level: level depth + 1
        level = torch.arange(first, first + k, device=device)
        match = (drafter.parents.index_select(0, level) == end) & (drafter.tokens.index_select(0, level) == bonus)
        match &= path.length == planned.depth + 1  # the accepted path reached the frontier
        node = torch.where(match.any(), level.index_select(0, torch.argmax(match.int()).view(1)), -1)
        size = 1 + drafter.levels * k
        member = drafter.ancestors[:size].index_select(1, node.clamp(min=0))[:, 0] & (node >= 0)
        deepest = torch.where(member, drafter.depths[:size], -1).max().view(1)
        return torch.cat([node, member.sum().view(1), deepest])

    def settle(self, *, node: int, live: int, deepest: int, committed: int) -> None:
        """After the iteration's read: chain when its candidates say so, re-rooting the tree at `node`. Not when
        the new root has no level below it (the chain would verify nothing drafted), nor when the re-rooted
        tree's extension could write past its attention bucket (a rebase keeps the bucket while N moves on;
        a fresh grow picks the longer one)."""
        if node < 0:
            return
        drafter = self.drafter
        level = 1 + (node - 1) // drafter.topk
        assert drafter.bucket is not None
        if deepest - level < 1 or committed + self.draft_rows > drafter.bucket.length:
            return
        drafter.rebase(node=node, committed=committed, kv_move=self._kv_move)
        self._chain = _Chain(live=live, depth=deepest - level)

    def abandon(self) -> None:
        """A request ended or was aborted: drop the chain; on CUDA, order what follows after the side stream."""
        self._chain = None
        if self._side is not None:
            torch.cuda.current_stream(self._device).wait_stream(self._side)
