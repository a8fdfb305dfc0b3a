"""Choosing the target's token (subspec_core/sampling.py): logits processing, keyed Gumbel noise, and a
statistical test that the sampled tokens follow `target_probabilities`.

`chi_square_pvalue`, `P_THRESHOLD` and `reference_probabilities` are reused by test_lossless_sampling.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from subspec_core.sampling import (
    TOP_P_ROWS,
    choose_tokens,
    gumbel_noise,
    position_seed,
    process_logits,
    sampling_peak_bytes,
    token_logprobs,
    top_p_workspace_bytes,
)
from subspec_core.types import SamplingParams
from tests.core.live_bytes import LiveBytes

pytestmark = pytest.mark.usefixtures("single_torch_thread")

CPU = torch.device("cpu")

# A correct sampler fails a check at this p-value with probability 1e-6 for a fresh set of seeds; the seeds
# are fixed, so the tests are deterministic, and each test also shows the check rejects a wrong distribution.
P_THRESHOLD = 1e-6


# ----------------------------------------------------------------------------------------------- statistics helpers
def target_probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution `choose_tokens` samples from: softmax of the processed logits (n, V)."""
    return torch.softmax(process_logits(logits, params), dim=-1)


def chi_square_pvalue(counts: torch.Tensor, probs: torch.Tensor, *, min_expected: float = 5.0) -> float:
    """Pearson chi-square goodness-of-fit p-value of category `counts` (K,) against `probs` (K,).

    Categories expected fewer than `min_expected` times are pooled into one bin (merged into the smallest
    other bin if still too small) so the chi-square approximation holds. A count in a category of
    probability 0 is an impossible outcome: p-value 0.
    """
    counts = counts.double().flatten()
    probs = probs.double().flatten()
    probs = probs / probs.sum()
    n = counts.sum()
    if counts[probs == 0].sum() > 0:
        return 0.0
    expected = n * probs
    big = expected >= min_expected
    obs_bins = list(counts[big])
    exp_bins = list(expected[big])
    rest_obs, rest_exp = counts[~big].sum(), expected[~big].sum()
    if rest_exp > 0:
        if rest_exp >= min_expected or not exp_bins:
            obs_bins.append(rest_obs)
            exp_bins.append(rest_exp)
        else:
            i = min(range(len(exp_bins)), key=lambda b: float(exp_bins[b]))
            obs_bins[i] = obs_bins[i] + rest_obs
            exp_bins[i] = exp_bins[i] + rest_exp
    if len(exp_bins) < 2:
        return 1.0
    obs, exp = torch.stack(obs_bins), torch.stack(exp_bins)
    stat = ((obs - exp) ** 2 / exp).sum()
    df = len(exp_bins) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


def total_variation(counts: torch.Tensor, probs: torch.Tensor) -> float:
    counts = counts.double().flatten()
    return float((counts / counts.sum() - probs.double().flatten()).abs().sum() / 2)


def reference_probabilities(logits: list[float], *, temperature: float, top_k: int = 0, top_p: float = 1.0) -> list[float]:
    """The sampling distribution written out plainly: temperature, keep the top_k largest, then the smallest
    set of most likely tokens whose mass reaches top_p (float64 Python; assumes distinct logits)."""
    scaled = [x / temperature for x in logits]
    order = sorted(range(len(scaled)), key=lambda i: -scaled[i])
    kept = order[:top_k] if top_k else order
    top = max(scaled[i] for i in kept)
    z = sum(math.exp(scaled[i] - top) for i in kept)
    mass, nucleus = 0.0, []
    for i in kept:  # most likely first
        if mass >= top_p:
            break
        nucleus.append(i)
        mass += math.exp(scaled[i] - top) / z
    z = sum(math.exp(scaled[i] - top) for i in nucleus)
    return [math.exp(scaled[i] - top) / z if i in nucleus else 0.0 for i in range(len(scaled))]


def test_chi_square_helper_accepts_exact_counts_and_rejects_wrong_ones():
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    assert chi_square_pvalue(torch.tensor([5000, 3000, 2000, 0]), probs) == pytest.approx(1.0)
    assert chi_square_pvalue(torch.tensor([5400, 2800, 1800, 0]), probs) < P_THRESHOLD  # chi-square 65 at df 2
    assert chi_square_pvalue(torch.tensor([5000, 3000, 1999, 1]), probs) == 0.0  # an impossible outcome
    # a classic table value: chi-square 3.84 at df 1 is p = 0.05
    assert chi_square_pvalue(torch.tensor([5098, 4902]), torch.tensor([0.5, 0.5])) == pytest.approx(0.05, abs=2e-3)


# ----------------------------------------------------------------------------------------------- process_logits
PARAM_CASES = [
    dict(temperature=1.0),
    dict(temperature=0.5),
    dict(temperature=2.0, top_k=3),
    dict(temperature=1.0, top_k=1),
    dict(temperature=1.0, top_p=0.6),
    dict(temperature=0.8, top_p=0.95),
    dict(temperature=1.3, top_k=5, top_p=0.7),
    dict(temperature=1.0, top_p=1e-6),  # only the most likely token
    dict(temperature=1.0, top_k=100),  # top_k >= vocab: no-op
]


@pytest.mark.parametrize("case", PARAM_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_process_logits_and_target_probabilities_match_reference(case):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 10, generator=gen) * 2
    params = SamplingParams(**case)
    processed = process_logits(logits, params)
    probs = target_probabilities(logits, params)
    assert processed.shape == logits.shape and probs.shape == logits.shape
    for row in range(logits.shape[0]):
        ref = reference_probabilities(logits[row].tolist(), **case)
        kept = [p > 0 for p in ref]
        assert (torch.isfinite(processed[row]) == torch.tensor(kept)).all(), f"row {row}: kept set"
        assert torch.allclose(processed[row][kept], logits[row][kept] / case["temperature"])
        assert (processed[row][~torch.tensor(kept)] == float("-inf")).all()
        assert probs[row].tolist() == pytest.approx(ref, abs=1e-6)


def test_top_p_over_more_rows_than_one_sort_takes_is_row_by_row_the_same():
    """process_logits sorts TOP_P_ROWS rows at a time (bounded workspace): every row of a tall batch, including
    the last partial chunk, gets exactly the nucleus it gets alone."""
    gen = torch.Generator().manual_seed(3)
    rows = 2 * TOP_P_ROWS + 5
    logits = torch.randn(rows, 50, generator=gen) * torch.linspace(0.5, 4, rows)[:, None]
    params = SamplingParams(temperature=0.9, top_p=0.8)
    together = process_logits(logits, params)
    alone = torch.cat([process_logits(logits[r : r + 1], params) for r in range(rows)])
    assert torch.equal(torch.isfinite(together), torch.isfinite(alone))
    assert torch.equal(together[torch.isfinite(together)], alone[torch.isfinite(alone)])
    kept = torch.isfinite(together).sum(-1)
    assert kept.min() >= 1 and kept.max() < 50  # the nucleus cut something in every chunk's rows, never everything


def test_top_p_keeps_the_token_that_crosses_the_threshold():
    # probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.8 needs 0.5 + 0.3 = 0.8 (reached exactly) -> 2 tokens;
    # top_p 0.81 needs the third token as well.
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64).log().float()
    assert torch.isfinite(process_logits(logits, SamplingParams(top_p=0.81))).tolist() == [[True, True, True, False]]
    assert torch.isfinite(process_logits(logits, SamplingParams(top_p=0.5))).tolist() == [[True, False, False, False]]
    assert torch.isfinite(process_logits(logits, SamplingParams(top_p=0.49))).tolist() == [[True, False, False, False]]


def test_greedy_chooses_the_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0], [2.0, 1.0, 0.0]])
    tokens = choose_tokens(logits=logits, params=SamplingParams(temperature=0.0), seed=0, positions=torch.tensor([5, 6]),
                           first_position=5, num_positions=2)
    assert tokens.tolist() == [1, 0]


# ----------------------------------------------------------------------------------------------- gumbel_noise
def test_gumbel_noise_is_reproducible_per_seed_and_position():
    a = gumbel_noise(seed=5, positions=[3, 4, 9], vocab_size=50, device=CPU)
    b = gumbel_noise(seed=5, positions=[3, 4, 9], vocab_size=50, device=CPU)
    assert a.shape == (3, 50) and a.dtype == torch.float32
    assert torch.equal(a, b)
    # each row depends only on (seed, its position): not on which other positions were asked for, nor their order
    assert torch.equal(gumbel_noise(seed=5, positions=[9], vocab_size=50, device=CPU)[0], a[2])
    assert torch.equal(gumbel_noise(seed=5, positions=[9, 3], vocab_size=50, device=CPU), a[[2, 0]])
    assert torch.equal(gumbel_noise(seed=5, positions=range(0, 10), vocab_size=50, device=CPU)[[3, 4, 9]], a)
    # different seeds or positions give different noise
    assert not torch.equal(gumbel_noise(seed=6, positions=[3], vocab_size=50, device=CPU)[0], a[0])
    assert not torch.equal(a[0], a[1])


def test_position_seed_has_no_collisions_on_a_grid():
    seeds = {position_seed(s, p) for s in range(100) for p in range(100)}
    assert len(seeds) == 100 * 100
    assert all(0 <= x < 2**63 for x in seeds)
    assert position_seed(1, 2) != position_seed(2, 1)


def test_gumbel_noise_has_gumbel_moments():
    noise = gumbel_noise(seed=0, positions=range(40), vocab_size=1000, device=CPU).double()  # 40000 draws
    assert noise.mean().item() == pytest.approx(0.5772156649, abs=0.03)  # Euler-Mascheroni
    assert noise.var().item() == pytest.approx(math.pi**2 / 6, abs=0.06)
    # P(G <= 0) = exp(-1)
    assert (noise <= 0).double().mean().item() == pytest.approx(math.exp(-1), abs=0.01)


# ----------------------------------------------------------------------------------------------- choose_tokens
def test_choose_tokens_greedy_is_argmax_and_ignores_the_seed():
    logits = torch.randn(7, 30, generator=torch.Generator().manual_seed(1))
    positions = torch.arange(10, 17)
    for seed in (0, 1, 99):
        out = choose_tokens(
            logits=logits, params=SamplingParams(temperature=0.0), seed=seed, positions=positions, first_position=10,
            num_positions=7,
        )
        assert torch.equal(out, torch.argmax(logits, dim=-1))


def test_choose_tokens_uses_the_noise_of_each_rows_position():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(5, 40, generator=gen)
    params = SamplingParams(temperature=0.9, top_k=30, top_p=0.95)
    positions = torch.tensor([21, 22, 22, 23, 21])  # rows at the same position share their noise row
    out = choose_tokens(logits=logits, params=params, seed=7, positions=positions, first_position=20, num_positions=5)
    for r in range(5):
        noise = gumbel_noise(seed=7, positions=[int(positions[r])], vocab_size=40, device=CPU)[0]
        assert out[r] == torch.argmax(process_logits(logits[r : r + 1], params)[0] + noise)
    # the same logits at the same position pick the same token (a tree node and a plain step agree)
    same = choose_tokens(
        logits=logits[[0, 0]], params=params, seed=7, positions=torch.tensor([21, 21]), first_position=21, num_positions=1
    )
    assert same[0] == same[1] == out[0]
    # never a token that top-k/top-p removed
    for seed in range(200):
        tokens = choose_tokens(logits=logits, params=params, seed=seed, positions=positions, first_position=20, num_positions=5)
        assert torch.isfinite(process_logits(logits, params).gather(1, tokens[:, None])).all()


STAT_ROWS = torch.tensor(
    [
        [2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0],
        [0.3, -0.2, 1.7, 0.9, -1.2, 0.0, 0.6, -0.4],
        [4.0, 0.0, 0.0, -1.0, -2.0, 1.0, 2.5, 0.2],
    ]
)
STAT_CASES = [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=1.0, top_k=4, top_p=0.9),
]


@pytest.fixture(scope="module")
def seeded_noise() -> torch.Tensor:
    """Noise (seeds, 3, V) for seeds 0..19999 at positions 40, 41, 42 (the engine's noise, drawn once)."""
    return torch.stack([gumbel_noise(seed=s, positions=[40, 41, 42], vocab_size=8, device=CPU) for s in range(20000)])


@pytest.mark.parametrize("case", STAT_CASES, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()))
def test_sampled_tokens_follow_target_probabilities(case, seeded_noise):
    params = SamplingParams(**case)
    positions = torch.tensor([40, 41, 42])
    # choose_tokens is exactly argmax(processed + noise at the row's position): checked on a few seeds ...
    for seed in range(0, 20000, 997):
        direct = choose_tokens(logits=STAT_ROWS, params=params, seed=seed, positions=positions, first_position=40, num_positions=3)
        assert torch.equal(direct, torch.argmax(process_logits(STAT_ROWS, params) + seeded_noise[seed], dim=-1))
    # ... and vectorised over 20000 seeds for the statistics
    draws = torch.argmax(process_logits(STAT_ROWS, params)[None] + seeded_noise, dim=-1)  # (seeds, 3)
    probs = target_probabilities(STAT_ROWS, params)
    for row in range(3):
        counts = torch.bincount(draws[:, row], minlength=8)
        assert chi_square_pvalue(counts, probs[row]) > P_THRESHOLD, f"row {row}: {counts.tolist()} vs {probs[row].tolist()}"
        assert total_variation(counts, probs[row]) < 0.02
        # the check has power: the same draws are rejected against a slightly different distribution
        wrong_temp = target_probabilities(STAT_ROWS[row : row + 1], SamplingParams(**{**case, "temperature": case["temperature"] * 1.15}))[0]
        assert chi_square_pvalue(counts, wrong_temp) < P_THRESHOLD
        unfiltered = target_probabilities(STAT_ROWS[row : row + 1], SamplingParams(temperature=case["temperature"]))[0]
        if float(unfiltered[probs[row] == 0].sum()) > 0.01:  # top-k/top-p removed a detectable mass here
            assert chi_square_pvalue(counts, unfiltered) < P_THRESHOLD


def test_rows_at_different_positions_are_independent(seeded_noise):
    # With identical logits at positions 40 and 41, the pair of draws must be independent (product distribution).
    logits = STAT_ROWS[[1, 1]]
    params = SamplingParams(temperature=1.0)
    draws = torch.argmax(process_logits(logits, params)[None] + seeded_noise[:, :2], dim=-1)  # (seeds, 2)
    p = target_probabilities(logits[:1], params)[0]
    joint = torch.bincount(draws[:, 0] * 8 + draws[:, 1], minlength=64)
    assert chi_square_pvalue(joint, torch.outer(p, p).flatten()) > P_THRESHOLD
    # and the check catches fully correlated draws (noise shared across positions)
    same = torch.argmax(process_logits(logits, params)[None] + seeded_noise[:, :1], dim=-1)
    assert chi_square_pvalue(torch.bincount(same[:, 0] * 8 + same[:, 1], minlength=64), torch.outer(p, p).flatten()) < P_THRESHOLD


# ----------------------------------------------------------------------------------------------- memory
@pytest.mark.parametrize("rows, positions", [(289, 49), (193, 33), (20, 20), (1, 1)])
def test_sampling_and_logprobs_stay_within_the_peak_the_planner_reserves(rows, positions):
    """choose_tokens (temperature, top-k, top-p, Gumbel noise) and then the logprobs of the emitted rows allocate
    at most `sampling_peak_bytes` beyond the logits, and about that much (a bound, not a guess): a sampled verify
    of a 289-node tree must not hold (n, V) arrays several times over."""
    vocab = 2_000
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(rows)) * 3
    depth_of_row = torch.arange(rows) % positions  # each row picks the token at one of `positions` positions
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, logprobs=5)
    with LiveBytes(logits, depth_of_row) as live:
        tokens = choose_tokens(logits=logits, params=params, seed=3, positions=depth_of_row + 100,
                               first_position=100, num_positions=positions)
        emitted = torch.arange(min(rows, positions))
        token_logprobs(logits=logits.index_select(0, emitted), tokens=tokens[emitted], num_top=5)
    bound = sampling_peak_bytes(rows=rows, positions=positions, vocab_size=vocab)
    assert live.peak <= bound
    assert live.peak >= bound - top_p_workspace_bytes(vocab)  # the (n, V) arrays it counts are all there
