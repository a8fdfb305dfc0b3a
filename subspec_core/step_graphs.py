"""The plain one-token decoding step (modes vanilla and resident) replayed as CUDA graphs.

A one-token step is bound by kernel launches, not arithmetic: ~30 small ops per layer. Its graphs follow the
draft's (drafting.py): every tensor a replay touches is a persistent buffer (the token, its position N, the
hidden state, the rotary tables, a (1, L) mask per attention length L), so shapes are static within a length
bucket and N is read on the device, never on the host. The position comes as a device tensor; the host only
picks the bucket from its own count of N.

    head[L]      token, N -> hidden x, rotary tables, mask (columns <= N visible)      one graph per bucket
    layer[i, w, L]  x -> x through decoder layer i with weights w                     w: the layer's resident
                                                                                      weights, or each ring slot
A streamed layer's wait and release stay outside its graph, on the host's schedule, exactly as in an eager
forward (the copy engine's events order the replay like any kernel). The graphed step attends under a mask
over L slots with the masked calls' kernel (memory-efficient); the eager step attends unmasked over N + 1.
"""

from __future__ import annotations

import logging
import math

import torch

from subspec_core.attention import attention_kernel
from subspec_core.drafting import draft_buckets
from subspec_core.kv_cache import KVCache
from subspec_core.model import MASK_ALIGN, DenseLinears, LayerSource, Linears, RotaryTables, decoder_layer, gqa_mask
from subspec_core.offload import TargetLayers
from subspec_core.weights import ModelShape, SharedWeights

log = logging.getLogger(__name__)


class StepGraphs:
    """Captured head and layer graphs of the one-token step, per attention length (see the module docstring)."""

    def __init__(self, *, shape: ModelShape, shared: SharedWeights, kv_cache: KVCache, layers: TargetLayers,
                 backend: object, device: torch.device) -> None:
        self.shape, self.shared, self.kv_cache, self.layers = shape, shared, kv_cache, layers
        self.backend = backend
        dtype = shared.embed.dtype
        long = dict(dtype=torch.long, device=device)
        self.token = torch.zeros(1, **long)
        self.position = torch.zeros(1, **long)
        self.x = torch.zeros(1, shape.hidden_size, dtype=dtype, device=device)
        rotary = RotaryTables.build(shape, shared, self.position, dtype)
        self.rotary = RotaryTables(rotary.cos.clone(), rotary.sin.clone())
        self.lengths = draft_buckets(capacity=kv_cache.capacity, tree_size=1)
        group = shape.num_heads // shape.num_kv_heads
        self.columns = torch.arange(kv_cache.capacity, **long)
        self.masks = {length: torch.zeros(1, 1, group, -(-length // MASK_ALIGN) * MASK_ALIGN, dtype=dtype,
                                          device=device)[..., :length] for length in self.lengths}
        kv_cache.keep_views(self.lengths)
        self.head: dict[int, torch.cuda.CUDAGraph] = {}
        self.layer: dict[tuple[int, int, int], torch.cuda.CUDAGraph] = {}  # (layer, weights data_ptr, L)

    @property
    def captured(self) -> bool:
        return bool(self.head)

    def bucket(self, prefix_length: int) -> int:
        """The shortest attention length holding slots [0, N]."""
        return next(length for length in self.lengths if length > prefix_length)

    def _weights(self) -> list[tuple[int, Linears]]:
        """Every (layer, linears) a step may run: the resident layers, and each streamed layer in each ring slot
        it can land in. The ring hands out copy p (from 0, again after a reset) as layer order[p % n] in slot
        p % S, so the pairs repeat with period lcm(n, S): with n a multiple of S a layer always has one slot."""
        out: list[tuple[int, Linears]] = [(i, linears) for i, linears in self.layers.resident.items()]
        streamer = self.layers.streamer
        if streamer is not None:
            n, slots = len(streamer.order), streamer.num_slots
            pairs = {(streamer.order[p % n], p % slots) for p in range(math.lcm(n, slots))}
            out += [(i, DenseLinears(streamer.slot_views[s])) for i, s in sorted(pairs)]
        return out

    @staticmethod
    def _key(layer: int, linears: Linears, length: int) -> tuple[int, int, int]:
        return layer, linears._w["qkv_weight"].data_ptr(), length  # type: ignore[attr-defined]

    def _head_step(self, length: int) -> None:
        self.x.copy_(torch.nn.functional.embedding(self.token, self.shared.embed))
        rotary = RotaryTables.build(self.shape, self.shared, self.position, self.x.dtype)
        self.rotary.cos.copy_(rotary.cos)
        self.rotary.sin.copy_(rotary.sin)
        bias = torch.zeros(1, length, dtype=self.x.dtype, device=self.x.device)
        bias.masked_fill_(self.columns[:length] > self.position, float("-inf"))
        group = self.shape.num_heads // self.shape.num_kv_heads
        self.masks[length].copy_(gqa_mask(bias, group))

    def _layer_step(self, layer: int, linears: Linears, length: int) -> None:
        with attention_kernel(self.backend):  # type: ignore[arg-type]
            self.x.copy_(decoder_layer(shape=self.shape, shared=self.shared, layer=layer, linears=linears,
                                       kv_cache=self.kv_cache, x=self.x, rotary=self.rotary, mask=self.masks[length],
                                       slots=self.position, kv_length=length))

    def capture(self) -> bool:
        """Capture every graph (CUDA only); False, eager, if that fails. Warm-up and capture write KV row 0 of
        every layer (position 0): call it at build, before any request."""
        device = self.x.device
        if device.type != "cuda":
            return False
        heads, layers = {}, {}
        try:
            side = torch.cuda.Stream(device=device)
            side.wait_stream(torch.cuda.current_stream(device))
            weights = self._weights()
            with torch.cuda.stream(side):  # warm-up off the capture: lazy init, cuBLAS workspaces, allocator
                for length in self.lengths:
                    self._head_step(length)
                    for layer, linears in weights:
                        self._layer_step(layer, linears, length)
            torch.cuda.current_stream(device).wait_stream(side)
            pool = None
            for length in sorted(self.lengths, reverse=True):  # longest first: the shorter reuse its blocks
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self._head_step(length)
                pool = graph.pool()
                heads[length] = graph
                for layer, linears in weights:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        self._layer_step(layer, linears, length)
                    layers[self._key(layer, linears, length)] = graph
        except Exception as exc:  # noqa: BLE001 - the eager path is correct, only slower
            log.warning("capturing the one-token step as CUDA graphs failed (%s: %s); stepping eagerly",
                        type(exc).__name__, exc)
            return False
        self.head, self.layer = heads, layers
        return True

    def forward(self, *, token: torch.Tensor, position: torch.Tensor, prefix_length: int,
                layers: LayerSource) -> torch.Tensor:
        """Hidden state (1, hidden) of `token` (1,) at slot and position N (`position` (1,) on the device, the same
        N as `prefix_length` on the host), replaying the graphs; `layers` hands out each layer as in an eager
        forward (the ring's waits, cancel checks)."""
        length = self.bucket(prefix_length)
        with torch.inference_mode():  # the buffers were made under it (at build); a caller outside may update them
            self.token.copy_(token)
            self.position.copy_(position)
            self.head[length].replay()
            for i in range(self.shape.num_layers):
                linears = layers.acquire(i)
                graph = self.layer.get(self._key(i, linears, length))
                if graph is None:  # a (layer, slot) pair the ring's cycle was not expected to produce: run it eagerly
                    self._layer_step(i, linears, length)
                else:
                    graph.replay()
                layers.release(i)
        return self.x
