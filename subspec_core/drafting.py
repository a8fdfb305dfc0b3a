"""Growing the draft tree: a global beam of `topk` nodes per depth, by cumulative draft log-probability.

The draft never prefills: it attends to the target's KV rows for the committed prefix [0, N) and writes
its own rows only at scratch slots N + j (j = tree node index), which the verification forward overwrites.

Static shapes within a bucket, no host synchronisation. A grow attends over the first L cache slots: L is
the shortest bucket (room for a prefix of 256 * 2^i slots and a tree; the last, the capacity) holding N and
the tree's 1 + depth * topk rows, picked on the host from the engine's own count of N. Every tensor a step
reads or writes is a persistent device buffer (N, the root token, the frontier, the bucket's (topk, L) mask
view), so within a bucket every step dispatches the same ops on the same shapes whatever N and the depth,
and nothing reads a device value on the host: each bucket's root and level steps are captured once as CUDA
graphs and replayed.

    Node numbering (topk = 2, depth 2):        0 (root, slot N, position N)
                                              /          \\
                      slot N+1, position N+1 1            2 slot N+2
                                            / \\
                                           3   4   level 2: slots N+3, N+4, position N+2
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from subspec_core.cancel import CancelCheck, raise_if_cancelled
from subspec_core.kv_cache import CAPACITY_ALIGN
from subspec_core.tree import TokenTree, expand_frontier

log = logging.getLogger(__name__)

# (tokens (n,), positions (n,), slots (n,), bias (n, L) additive mask over slots [0, L)) -> float32 logits (n, V)
DraftLogitsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# One draft step's inputs, as DraftLogitsFn takes them: (tokens, positions, slots, bias)
DraftRows = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class DraftGuide(Protocol):
    """What a constrained draft may propose (constrained.TreeMasks): (1, V) and (topk, V) boolean masks."""

    def root(self) -> torch.Tensor: ...  # after the root
    def level(self, nodes: torch.Tensor, tokens: torch.Tensor, parents: torch.Tensor) -> torch.Tensor: ...  # after each

# The shortest prefix a draft bucket holds; longer buckets hold twice the prefix of the one before.
SMALLEST_BUCKET_PREFIX = 256


def draft_buckets(*, capacity: int, tree_size: int, smallest: int = SMALLEST_BUCKET_PREFIX) -> tuple[int, ...]:
    """Attention lengths a draft step may use: room for a prefix of smallest * 2^i slots and a whole tree,
    rounded up to CAPACITY_ALIGN (so a mask row stays aligned), while shorter than the cache; then `capacity`
    (room for the longest prefix: the cache is sized the same way)."""
    lengths = []
    prefix = smallest
    while (length := -(-(prefix + tree_size) // CAPACITY_ALIGN) * CAPACITY_ALIGN) < capacity:
        lengths.append(length)
        prefix *= 2
    return (*lengths, capacity)


@dataclass
class DraftBucket:
    """One attention length L and the drafter's buffers seen at that length: views with fixed strides, so a
    step at this length always touches the same addresses (what its captured graphs replay)."""

    length: int  # L: a step attends over cache slots [0, L)
    columns: torch.Tensor  # (L,) the cache slot of each mask column
    root_bias: torch.Tensor  # (1, L) the root's additive mask
    bias: torch.Tensor  # (topk, L) the frontier's mask rows
    root_graph: torch.cuda.CUDAGraph | None = None  # set by TreeDrafter.capture_cuda_graphs
    level_graph: torch.cuda.CUDAGraph | None = None


class TreeDrafter:
    """Grows draft trees of up to 1 + max_depth * topk nodes into persistent buffers, one draft forward per level.

    With `max_levels` > max_depth the buffers hold that many levels: post-speculation (postspec.py) extends a
    grown tree past its frontier with `extend` and re-roots it at an accepted extension node with `rebase`.
    """

    def __init__(
        self, *, draft_logits: DraftLogitsFn, topk: int, max_depth: int, capacity: int, temperature: float,
        dtype: torch.dtype, device: torch.device, smallest_bucket: int = SMALLEST_BUCKET_PREFIX,
        max_levels: int | None = None,
    ) -> None:
        self.draft_logits = draft_logits
        self.topk = topk
        self.max_depth = max_depth
        self.max_levels = max_depth if max_levels is None else max_levels
        self.capacity = capacity
        self.inv_temperature = 1.0 / temperature
        self.levels = 0  # levels of the tree in the buffers (the frontier's depth)
        self.bucket: DraftBucket | None = None  # the bucket of the tree in the buffers
        k, size = topk, 1 + self.max_levels * topk
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
        self._rebased = False  # a rebase rewrote the rows above: the next grow restores them
        self._level1_ancestors = self.ancestors[: k + 1].clone()
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
        self._staged: dict[int, torch.Tensor] = {}  # a guided level's allowed tokens, by rows (stage_allowed)
        # The masks: one buffer each, seen by bucket L as a contiguous (rows, L) view of its first rows * L
        # elements; a grow's root step rewrites its bucket's view whole, so buckets need not agree.
        columns = torch.arange(capacity, **long)
        root_bias = torch.zeros(capacity, dtype=dtype, device=device)
        bias = torch.zeros(k * capacity, dtype=dtype, device=device)
        self.buckets = tuple(
            DraftBucket(length, columns[:length], root_bias[:length].view(1, length), bias[: k * length].view(k, length))
            for length in draft_buckets(capacity=capacity, tree_size=size, smallest=smallest_bucket)
        )

    @property
    def bucket_lengths(self) -> tuple[int, ...]:
        return tuple(bucket.length for bucket in self.buckets)

    @property
    def graphed(self) -> bool:
        """Whether grow() replays captured CUDA graphs instead of launching each op."""
        return all(bucket.level_graph is not None for bucket in self.buckets)

    def bucket_for(self, *, committed: int, depth: int) -> DraftBucket:
        """The shortest bucket holding every slot a grow of `depth` levels at N = committed touches: the prefix,
        the root at N and the 1 + depth * topk tree rows (the last level's slots are written into its mask)."""
        needed = committed + 1 + depth * self.topk
        for bucket in self.buckets:
            if bucket.length >= needed:
                return bucket
        raise ValueError(f"a depth-{depth} tree at N = {committed} needs {needed} slots; the cache has "
                         f"{self.capacity}")

    def capture_cuda_graphs(self) -> bool:
        """Capture every bucket's root and level steps as CUDA graphs (CUDA only); False, eager, if it fails.

        Possible because every buffer a step touches is persistent and every shape fixed within a bucket: a
        bucket's graphs serve every level of every tree it is picked for. All graphs share one memory pool,
        captured longest bucket first so the shorter steps reuse its blocks: replays never overlap and no
        graph leaves a result in the pool, so the pool holds about one step's temporaries. All are captured
        here, at build, not on a bucket's first use: a capture synchronises the device, which would cost a
        request an extra host sync. The warm-up runs write draft scratch rows at slot prefix_length (0 here),
        so call it before any request has filled the cache. Cancel checks stay between replays.
        """
        device = self.tokens.device
        if device.type != "cuda":
            return False
        captured = []
        try:
            side = torch.cuda.Stream(device=device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):  # warm-up off the capture: lazy init, cuBLAS workspaces, allocator
                for bucket in self.buckets:
                    for _ in range(2):
                        self.root_step(bucket)
                        self.level_step(bucket)
            torch.cuda.current_stream(device).wait_stream(side)
            pool = None
            for bucket in sorted(self.buckets, key=lambda b: -b.length):
                root, level = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
                with torch.cuda.graph(root, pool=pool):
                    self.root_step(bucket)
                pool = root.pool()
                with torch.cuda.graph(level, pool=pool):
                    self.level_step(bucket)
                captured.append((bucket, root, level))
        except Exception as exc:  # noqa: BLE001 - the eager path is correct, only slower
            log.warning("capturing the draft step as a CUDA graph failed (%s: %s); drafting eagerly",
                        type(exc).__name__, exc)
            return False
        for bucket, root, level in captured:
            bucket.root_graph, bucket.level_graph = root, level
        return True

    def grow(self, *, root_token: torch.Tensor, prefix_length: torch.Tensor, depth: int, committed: int | None = None,
             cancelled: CancelCheck | None = None, room: int | None = None) -> TokenTree:
        """Draft a tree of 1 + depth * topk nodes with `depth` draft forwards (root, then levels 1..depth-1).

        root_token (1,): the last committed token, whose KV is not in the cache yet; prefix_length (1,): N on
        the device, and `committed`: the same N on the host, which picks the attention bucket (no device read;
        None: the whole cache, right at any N, as a caller that does not track N gets it).
        The returned tree's tensors are views of this drafter's buffers, valid until the next grow. `cancelled`
        is asked before each draft forward (an abort waits at most one level); when it turns true,
        `GenerationCancelled` is raised. `room`: levels the bucket must hold (default `depth`), so that
        `extend` can add levels to this tree in the same bucket.
        """
        bucket = self.start_tree(root_token=root_token, prefix_length=prefix_length, depth=depth, committed=committed,
                                 room=room)
        raise_if_cancelled(cancelled)
        self._run(self.root_step, bucket, bucket.root_graph)
        for _ in range(depth - 1):
            raise_if_cancelled(cancelled)
            self._run(self.level_step, bucket, bucket.level_graph)
        return self.finish_tree(bucket, depth)

    def start_tree(self, *, root_token: torch.Tensor, prefix_length: torch.Tensor, depth: int,
                   committed: int | None = None, room: int | None = None) -> DraftBucket:
        """Begin a grow (see `grow`): forget the last tree, take the root and N, pick the bucket. A batched grow
        (batch_drafting.py) calls it, the steps' halves and `finish_tree` itself."""
        if not 1 <= depth <= self.max_depth:
            raise ValueError(f"depth must be in [1, {self.max_depth}], got {depth}")
        levels = depth if room is None else max(room, depth)
        bucket = self.buckets[-1] if committed is None else self.bucket_for(committed=committed, depth=levels)
        self._begin_tree()
        self.root_token.copy_(root_token)
        self.prefix_length.copy_(prefix_length)
        return bucket

    def finish_tree(self, bucket: DraftBucket, depth: int) -> TokenTree:
        """Record the grown tree (extendable by post-speculation) and return it, cut to `depth` levels."""
        self.bucket, self.levels = bucket, depth
        return self.tree(depth)

    def _begin_tree(self) -> None:
        """Forget the tree in the buffers (a grow cut short by a cancel leaves no tree to extend) and restore
        the level-1 rows a rebase rewrote."""
        self.bucket, self.levels = None, 0
        if self._rebased:
            self.parents[1 : self.topk + 1] = 0
            self.ancestors[: self.topk + 1].copy_(self._level1_ancestors)
            self._rebased = False

    def extend(self) -> None:
        """One more level under the tree in the buffers (the frontier's draft forward, then its best children):
        the same captured level step in the same bucket as the grow, so shapes stay static."""
        assert self.bucket is not None and self.levels < self.max_levels, "extend needs a grown tree with room"
        self._run(self.level_step, self.bucket, self.bucket.level_graph)
        self.levels += 1

    def rebase(self, *, node: int, committed: int, kv_move: Callable[[int, torch.Tensor], None]) -> None:
        """Re-root the tree in the buffers at `node`, a level-(l + 1) node whose ancestors (the root and l levels)
        were just committed as KV rows [base, committed): as if a tree rooted at `node` had been grown at
        N = committed. Live nodes are `node` and its descendants; the rest of its levels are dead: score -inf,
        never chosen as parents while a live node is left, never verified.

        Node numbering stays level-major: `node` becomes 0 and level l + 1 + i becomes level i. Each kept
        node's draft KV row moves with it (`kv_move(dest_start, source_slots)`, KVCache.compact) from slot
        base + old index to committed + new index, and the frontier's mask rows shift their columns the same
        way; columns [0, committed) become visible (the committed path's target KV rows replace the draft's).
        Runs eagerly, on the host's schedule: fixed shapes except a copy sized by the levels kept.
        """
        bucket, k = self.bucket, self.topk
        assert bucket is not None and self.levels >= 1
        level = 1 + (node - 1) // k  # node's depth, l + 1
        shift = level * k  # old index of new node j >= 1 is j + shift
        new_levels = self.levels - level
        assert new_levels >= 0
        device = self.tokens.device
        size = self.tokens.shape[0]
        kept = 1 + new_levels * k
        index = torch.arange(size, device=device)
        valid = index < kept
        old = torch.where(index == 0, node, (index + shift).clamp(max=size - 1))  # new j -> old index
        self.tokens.copy_(self.tokens.index_select(0, old))
        self.parents.copy_((self.parents.index_select(0, old) - shift).clamp(min=0))
        self.parents[0] = -1
        ancestors = self.ancestors.index_select(0, old).index_select(1, old) & valid[:, None] & valid[None, :]
        self.ancestors.copy_(ancestors)
        live = self.ancestors[:, 0]
        # path scores from the new root (0, as a grown root's: select_verify_nodes keeps it first)
        scores = self.scores.index_select(0, old)
        self.scores.copy_(torch.where(live, scores - scores[:1], float("-inf")))
        self.frontier_scores.sub_(scores[:1])
        # draft KV rows: old slot base + old index -> committed + new index (gather first: the ranges overlap)
        old_base = self.prefix_length.clone()
        kv_move(committed, old_base + old[:kept])
        # the frontier: new node numbers, slots and mask columns; dead rows keep finite logits (they see
        # themselves) but score -inf, so no child of theirs is picked while a live row has children
        self.frontier_nodes.sub_(shift)
        self.frontier_scores.masked_fill_(~live.index_select(0, self.frontier_nodes), float("-inf"))
        self.prefix_length.fill_(committed)
        torch.add(self.prefix_length, self.frontier_nodes, out=self.slots)
        columns = bucket.columns
        source = torch.where(columns == committed, old_base + node,
                             columns - committed + old_base + shift).clamp(max=bucket.length - 1)
        shifted = bucket.bias.index_select(1, source)
        shifted.masked_fill_(columns < committed, 0.0).masked_fill_(columns >= committed + kept, float("-inf"))
        bucket.bias.copy_(shifted)
        self.levels = new_levels
        self._rebased = True

    def grow_guided(self, *, root_token: torch.Tensor, prefix_length: torch.Tensor, depth: int, committed: int,
                    guide: DraftGuide, cancelled: CancelCheck | None = None) -> TokenTree:
        """`grow`, with each level's candidates restricted to the tokens `guide` allows after their parent's path
        (a constrained request). Eager, with one host read per level in `guide`: the captured graphs and the
        unconstrained path stay as they are."""
        bucket = self.start_tree(root_token=root_token, prefix_length=prefix_length, depth=depth, committed=committed)
        raise_if_cancelled(cancelled)
        self.root_step(bucket, allowed=guide.root())
        allowed = self.guide_frontier(guide)
        for _ in range(depth - 1):
            raise_if_cancelled(cancelled)
            self.level_step(bucket, allowed=allowed)
            allowed = self.guide_frontier(guide)  # the last level's: for its verify rows
        return self.tree(depth)  # not extendable: post-speculation leaves constrained requests alone

    def stage_allowed(self, allowed: torch.Tensor) -> torch.Tensor:
        """`allowed` (rows, V: the root's 1 or a level's topk) copied into this drafter's buffer for that many rows,
        made on first use: a guided level that reads its masks there is the same ops on the same addresses every
        time, so it can be captured and replayed (batch_graphs.py) whatever the grammar allows."""
        buffer = self._staged.get(allowed.shape[0])
        if buffer is None:
            buffer = self._staged[allowed.shape[0]] = torch.empty_like(allowed)
        return buffer.copy_(allowed)

    def guide_frontier(self, guide: DraftGuide) -> torch.Tensor:
        """Add the level just grown (the frontier) to `guide`'s tree: what may follow each of its nodes (topk, V),
        the next level's `allowed` (one host read)."""
        return guide.level(self.frontier_nodes, self.tokens, self.parents)

    @staticmethod
    def _run(step, bucket: DraftBucket, graph: torch.cuda.CUDAGraph | None) -> None:  # type: ignore[no-untyped-def]
        if graph is None:
            step(bucket)
        else:
            graph.replay()

    def root_step(self, bucket: DraftBucket, allowed: torch.Tensor | None = None) -> None:
        """Draft forward of the root (1 row), then level 1: the root's topk best children (among `allowed` (1, V)
        tokens, for a constrained request)."""
        self.root_update(bucket, self.draft_logits(*self.root_inputs(bucket)), allowed)

    def root_inputs(self, bucket: DraftBucket) -> DraftRows:
        """The root step's draft forward inputs: the root at slot and position N, seeing the prefix and itself."""
        n = self.prefix_length
        bucket.root_bias.fill_(0.0).masked_fill_(bucket.columns > n, float("-inf"))  # the prefix and the root itself
        return self.root_token, n, n, bucket.root_bias

    def root_update(self, bucket: DraftBucket, logits: torch.Tensor, allowed: torch.Tensor | None = None) -> None:
        """Level 1 from the root's draft logits (1, V): its topk best children, and the frontier's next inputs."""
        n, k = self.prefix_length, self.topk
        logprobs = torch.log_softmax(logits * self.inv_temperature, dim=-1)
        if allowed is not None:
            logprobs = logprobs.masked_fill(~allowed, float("-inf"))
        scores, tokens = torch.topk(logprobs.view(-1), k)  # the root's path score is 0
        self.tokens[:1] = self.root_token
        self.tokens[1 : k + 1] = tokens
        self.scores[1 : k + 1] = scores
        self.frontier_nodes.copy_(self.level1_nodes)
        self.frontier_tokens.copy_(tokens)
        self.frontier_scores.copy_(scores)
        self.positions.copy_(n.expand(k)).add_(1)
        torch.add(n, self.level1_nodes, out=self.slots)
        bucket.bias.copy_(bucket.root_bias.expand(k, -1)).scatter_(1, self.slots[:, None], 0.0)  # + each node itself

    def level_step(self, bucket: DraftBucket, allowed: torch.Tensor | None = None) -> None:
        """Draft forward of the frontier (topk rows), then the next level: the global topk of their children (each
        frontier row's among its `allowed` (topk, V) tokens, for a constrained request)."""
        self.level_update(bucket, self.draft_logits(*self.level_inputs(bucket)), allowed)

    def level_inputs(self, bucket: DraftBucket) -> DraftRows:
        """The level step's draft forward inputs: the frontier's topk rows, each seeing the prefix and its path."""
        return self.frontier_tokens, self.positions, self.slots, bucket.bias

    def level_update(self, bucket: DraftBucket, logits: torch.Tensor, allowed: torch.Tensor | None = None) -> None:
        """The next level from the frontier's draft logits (topk, V): the global topk of their children."""
        logprobs = torch.log_softmax(logits * self.inv_temperature, dim=-1)
        if allowed is not None:
            logprobs = logprobs.masked_fill(~allowed, float("-inf"))
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
        bucket.bias.copy_(bucket.bias.index_select(0, rows).scatter_(1, self.slots[:, None], 0.0))
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
