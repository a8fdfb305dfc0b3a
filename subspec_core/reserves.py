"""What a process holds on the GPU besides its tensors, and the working memory around them: the sizes of the
planner's reserve rows, each with the code or the source it is a bound for.

Figures from outside this repository (read 2026-12):
- CUDA context: 300-500 MiB with CUDA 12's lazy module loading (the default on Linux since CUDA 12.2,
  NVIDIA developer forums, "How to enable the CUDA's lazy module loading"), largest on Hopper; 700+ MiB
  without it (PyTorch forums, "High gpu memory overhead").
- cuBLAS: PyTorch binds a workspace per (cuBLAS handle, CUDA stream) pair from the caching allocator, by
  default CUBLAS_WORKSPACE_CONFIG ":4096:8" = 32 MiB on sm90 and ":4096:2:16:8" = 8.1 MiB elsewhere
  (aten/src/ATen/cuda/CublasHandlePool.cpp); builds on CUDA >= 12.2 leave cuBLAS its own default workspace
  (32 MiB on Hopper, 4 MiB before) and keep a cuBLASLt one per (handle, stream), 1-32 MiB by GPU.
- Caching allocator (c10/cuda/CUDACachingAllocator.cpp): a freed block is reused only by the stream that
  freed it; a request over 10 MiB gets its own segment rounded up to 2 MiB, smaller ones share 20 MiB and
  2 MiB segments; a cached block larger than a request is split, and blocks cached in one forward's sizes
  serve another's only in part (E. Yang, "When does fragmentation occur in the CUDA caching allocator?",
  pytorch/devlogs, 2026).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from subspec_core.config import SpeculationConfig
from subspec_core.kv_cache import KVCache
from subspec_core.quant import substitute_bytes_per_layer
from subspec_core.sampling import PROMPT_SCORE_ROWS, sampling_peak_bytes
from subspec_core.weights import LayerLayout, ModelShape

MiB = 2**20

CUDA_CONTEXT_BYTES = 512 * MiB  # the top of the range above: a plan made without the card must hold on any
CUBLAS_WORKSPACE_BYTES = 32 * MiB  # per stream that multiplies: the largest of the figures above (Hopper's)
SEGMENT_ROUNDING_BYTES = 1 * MiB  # expected loss per tensor of its own segment (over 10 MiB): rounded up to 2 MiB
OWN_SEGMENT_BYTES = 10 * MiB
SHARED_SEGMENT_BYTES = 20 * MiB  # where tensors under 10 MiB are packed: the last one is partly empty
# The working rows (activations, logits, sampling) are freed and requested again in other shapes every step
# (prefill chunk, verify tree, one-token step): this share of them may sit in split, cached blocks. A margin,
# not a measurement: calibrate it on a GPU (torch.cuda.memory_reserved() against memory_allocated()).
WORKING_SET_FRAGMENTATION = 1 / 8

# quant.py quantizes a streamed layer's fused linears one at a time (QuantizedLinears: qkv, o, gate_up, down),
# each freeing its temporaries before the next: the planner reserves this much per weight of the largest one,
# beyond its result (the contract quant.py keeps; tests/core/test_fit.py measures it on a CPU).
# int4: the weight in float32 (4) and then its int32 codes (4), the arithmetic between done in place, with
# the group statistics (~0.25); quantize_int4 today holds a float32 copy and two float32 temporaries at once
# (~11.75: an xfail in test_fit.py until it works in place). bitsandbytes 4-bit: the weight copied to the
# device (2) and the kernel's output; int8: the weight and its float16 copy (2 + 2).
QUANT_TEMP_BYTES_PER_WEIGHT = {"int4": 8.5, "nf4": 2.5, "fp4": 2.5, "int8": 4.5}

# Streams that run matmuls, each with its own cuBLAS workspace: the compute stream, and with CUDA graphs (the
# draft's, drafting.TreeDrafter.capture_cuda_graphs, or the one-token step's, step_graphs.py) the warm-up stream
# and the capture stream; the batched draft level's warm-up stream (batch_graphs.py, with max_num_seqs > 1) and
# post-speculation's side stream (postspec.py) are one more each.
MATMUL_STREAMS_EAGER = 1
MATMUL_STREAMS_GRAPHED = 3


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def activation_bytes(*, shape: ModelShape, dtype: torch.dtype, rows: int, kv_length: int, device_type: str) -> int:
    """Rough peak working memory of one forward's decoder layers over `rows` tokens attending to `kv_length` slots."""
    b = dtype_bytes(dtype)
    hidden = rows * (shape.hidden_size * 4 + shape.q_size + 2 * shape.kv_size + 3 * shape.intermediate_size) * b
    # attention scores where the math kernel materialises them: on a CPU; on CUDA the engine runs the fused
    # kernels (memory-efficient, flash: issue #18), which keep one float32 logsumexp per query head
    scores = rows * shape.num_heads * (kv_length if device_type != "cuda" else 1) * 4
    # the additive mask, repeated per query head of a kv head (GQA folded into rows): built once per forward
    mask = rows * (shape.num_heads // shape.num_kv_heads) * kv_length * b
    return hidden + scores + mask


def logits_buffer_bytes(*, rows: int, vocab_size: int) -> int:
    """`model.compute_logits` over `rows` rows: lm_head's output in the model dtype (at most 2 bytes) and its
    float32 copy, (rows, V) each."""
    return rows * vocab_size * (2 + 4)


def draft_step_bytes(*, shape: ModelShape, dtype: torch.dtype, topk: int, capacity: int, device_type: str) -> int:
    """The CUDA-graph pool of the draft: the root step and the level step share one pool (`pool=root.pool()`),
    replayed in turn, so it holds the larger, the level step: a forward of `topk` rows over the whole cache, then
    three (topk, V) float32 at once: the logits, their tempered log-softmax and expand_frontier's candidates. A
    batched level (batch_graphs.py) is the same with `topk` every sequence's rows, each masked over its region."""
    forward = activation_bytes(shape=shape, dtype=dtype, rows=topk, kv_length=capacity, device_type=device_type)
    return forward + 3 * topk * shape.vocab_size * 4


def sampling_reserve_bytes(*, shape: ModelShape, rows: int, positions: int, prompt_rows: int) -> int:
    """The largest sampling or logprob peak beyond the logits: choosing `rows` tokens at `positions` positions
    (a verify tree or one step), or prompt logprobs scored `prompt_rows` rows at a time (their log-softmax)."""
    prompt = prompt_rows * shape.vocab_size * 4
    return max(sampling_peak_bytes(rows=rows, positions=positions, vocab_size=shape.vocab_size), prompt)


def linear_shapes(shape: ModelShape) -> dict[str, tuple[int, int]]:
    """(out, in) of each fused linear of a decoder layer, as quant.py quantizes them."""
    h, i = shape.hidden_size, shape.intermediate_size
    return {"qkv": (shape.q_size + 2 * shape.kv_size, h), "o": (h, shape.q_size), "gate_up": (2 * i, h), "down": (h, i)}


def quantize_working_bytes(shape: ModelShape, quant_type: str) -> tuple[str, int]:
    """The largest linear's name and the device memory quantizing it takes beyond its result."""
    name, (out, inp) = max(linear_shapes(shape).items(), key=lambda item: item[1][0] * item[1][1])
    return name, int(QUANT_TEMP_BYTES_PER_WEIGHT[quant_type] * out * inp)


def substitute_tensor_bytes(shape: ModelShape, speculation: SpeculationConfig) -> list[int]:
    """Sizes of one substitute's persistent tensors: packed weights and block statistics of each linear."""
    sizes = []
    for out, inp in linear_shapes(shape).values():
        weights = out * inp
        sizes.append(weights if speculation.quant_type == "int8" else weights // 2)
        sizes.append(4 * out if speculation.quant_type == "int8" else 4 * -(-weights // speculation.quant_block_size))
    return sizes


def rounding_bytes(tensor_sizes: list[int]) -> int:
    """What the caching allocator's segment rounding can lose over persistent tensors of these sizes."""
    own = sum(1 for n in tensor_sizes if n > OWN_SEGMENT_BYTES)
    shared = sum(n for n in tensor_sizes if n <= OWN_SEGMENT_BYTES)
    return own * SEGMENT_ROUNDING_BYTES + (SHARED_SEGMENT_BYTES if shared else 0)


@dataclass(frozen=True)
class PlanSizes:
    """A plan's byte counts before its layers are placed (`plan_sizes`), and its device total for a resident count."""

    layer: int
    substitute: int
    substitute_tensors: tuple[int, ...]  # one substitute's persistent tensors (for the allocator's rounding)
    ring: int
    kv: int
    work: int  # activations + logits buffers
    sampling: int
    tree: int
    graph_pool: int
    workspaces: int
    context: int
    quantize: int  # quantizing the largest linear, beyond its result (0 without substitutes)
    quantized: str  # that linear's name
    shared: int

    def load_temporaries(self, streamed: int) -> int:
        """Quantizing at load needs `quantize` bytes while the ring, KV cache and working rows do not exist yet (they
        are allocated after the layers are placed, into the memory the temporaries gave back): only the excess."""
        if not streamed or not self.quantize:
            return 0
        return max(0, self.quantize - (self.ring + self.kv + self.work + self.sampling))

    def fragmentation(self, resident: int, streamed: int, *, device_type: str) -> int:
        if device_type != "cuda":
            return 0
        persistent = [self.shared, self.kv] + [self.layer] * resident
        if streamed:
            persistent += list(self.substitute_tensors) * streamed + [self.layer] * (self.ring // self.layer)
        return rounding_bytes(persistent) + int(WORKING_SET_FRAGMENTATION * (self.work + self.sampling))

    def device_total(self, resident: int, streamed: int, *, device_type: str) -> int:
        return (self.shared + self.kv + self.work + self.tree + self.sampling + self.graph_pool + self.workspaces
                + self.context + resident * self.layer + (self.substitute * streamed + self.ring if streamed else 0)
                + self.load_temporaries(streamed) + self.fragmentation(resident, streamed, device_type=device_type))


def plan_sizes(*, shape: ModelShape, dtype: torch.dtype, mode: str, speculation: SpeculationConfig, capacity: int,
               chunk: int, max_model_len: int, stream_slots: int, shared_bytes: int, device_type: str,
               cuda_graphs: bool, max_num_seqs: int = 1) -> PlanSizes:
    """The sizes of a plan in `mode` with prefill chunks of `chunk` rows and a KV cache of `capacity` slots per
    sequence, for `max_num_seqs` sequences: a KV region and tree buffers each, and one verify forward (and one
    batched draft step) over all their rows; sampling runs per sequence, so its peak is one tree's."""
    speculative, cuda = mode == "subspec", device_type == "cuda"
    graphed = cuda and cuda_graphs
    post = speculative and speculation.post_levels > 0
    seq_rows = speculation.verify_size if speculative else 1  # one sequence's verify (or one-token step)
    tree_rows = seq_rows * max_num_seqs
    prompt_rows = min(chunk, max_model_len, PROMPT_SCORE_ROWS)  # a prefill chunk's logits, scored this many at a time
    work = max(
        # a batched verify's logits are computed one sequence at a time (batch.py): one tree's at once
        activation_bytes(shape=shape, dtype=dtype, rows=tree_rows, kv_length=capacity, device_type=device_type)
        + logits_buffer_bytes(rows=seq_rows, vocab_size=shape.vocab_size),
        activation_bytes(shape=shape, dtype=dtype, rows=min(chunk, max_model_len), kv_length=capacity,
                         device_type=device_type)
        + logits_buffer_bytes(rows=prompt_rows, vocab_size=shape.vocab_size),
    )
    layer = LayerLayout.for_shape(shape).numel * dtype_bytes(dtype)
    quantized, quantize = quantize_working_bytes(shape, speculation.quant_type)
    out_rows = sum(out for out, _ in linear_shapes(shape).values())
    substitute = substitute_bytes_per_layer(shape.linear_params_per_layer, out_rows, quant_type=speculation.quant_type,
                                            block_size=speculation.quant_block_size)
    # the captured pool and the warm-up's cached blocks: of the draft's level step (one sequence's, Engine.generate),
    # or of the one-token step; and post-speculation's side stream caches one draft step's temporaries of its own
    step_rows = speculation.topk if speculative else 1
    step = draft_step_bytes(shape=shape, dtype=dtype, topk=step_rows, capacity=capacity, device_type=device_type)
    # the batched draft levels' graphs (batch_graphs.py) have a pool and a warm-up stream of their own. They are
    # captured lazily, as the batch grows from 1 to max_num_seqs sequences, and a pool only reuses a freed block
    # for a request no larger, so each may hold a level of every width: the sum over 1..max_num_seqs sequences'
    # topk rows (a full batch's level alone would undercount). Batched plain steps run eagerly.
    batched = sum(draft_step_bytes(shape=shape, dtype=dtype, topk=step_rows * seqs, capacity=capacity,
                                   device_type=device_type) for seqs in range(1, max_num_seqs + 1)
                  ) if speculative and max_num_seqs > 1 else 0
    streams = (MATMUL_STREAMS_GRAPHED if graphed else MATMUL_STREAMS_EAGER) + post + bool(graphed and batched)
    return PlanSizes(
        layer=layer,
        substitute=substitute if speculative else 0,
        substitute_tensors=tuple(substitute_tensor_bytes(shape, speculation)) if speculative else (),
        ring=stream_slots * layer,
        kv=KVCache.bytes_needed(num_layers=shape.num_layers, num_kv_heads=shape.num_kv_heads, head_dim=shape.head_dim,
                                capacity=capacity, dtype=dtype) * max_num_seqs,
        work=work,
        sampling=sampling_reserve_bytes(shape=shape, rows=seq_rows,
                                        positions=speculation.verify_depth + 1 if speculative
                                        else 1, prompt_rows=prompt_rows),
        # ancestor matrices, per sequence
        tree=(seq_rows * seq_rows + (1 + speculation.draft_levels * speculation.topk) ** 2) * max_num_seqs
        if speculative else 0,
        graph_pool=(2 * (step + batched) if graphed else 0) + (step if post and cuda else 0),
        workspaces=CUBLAS_WORKSPACE_BYTES * streams if cuda else 0,
        context=CUDA_CONTEXT_BYTES if cuda else 0,
        quantize=quantize if speculative else 0,
        quantized=quantized,
        shared=shared_bytes,
    )
