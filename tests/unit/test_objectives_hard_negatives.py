"""Hard-negative selection (objective.hard_negative_samples): over-sample K' completions, keep k per group with
the sampled positive fraction and the negatives most likely under the sampling policy."""
import pytest
import torch

from megatron_rence.config import Config
from megatron_rence.data.prompts import Prompt
from megatron_rence.experience import Experience, keep_hard_negatives
from megatron_rence.objectives.groups import hard_negative_selection
from megatron_rence.rewards.math import GradeResult
from megatron_rence.rollout.types import Completion


def test_selection_by_hand():
    # K'=6, k=4; positives at 0 and 3 (P'=2): n_pos = floor(4 * 2/6 + 1/2) = 1 -> the first positive (0);
    # 3 negatives of [1, 2, 4, 5] with hardness [-1.0, -0.2, -0.5, -0.2]: 2 and 5 (tie -0.2, earlier first), then 4.
    is_pos = torch.tensor([[True, False, False, True, False, False]])
    hard = torch.tensor([[0.0, -1.0, -0.2, 0.0, -0.5, -0.2]])
    assert hard_negative_selection(is_pos, hard, 4).tolist() == [[0, 2, 4, 5]]
    # 5 positives of 6: floor(4 * 5/6 + 1/2) = 3 positives (0, 1, 2) and the only negative (5)
    is_pos = torch.tensor([[True, True, True, True, True, False]])
    assert hard_negative_selection(is_pos, hard, 4).tolist() == [[0, 1, 2, 5]]
    # 1 positive of 12 with k=8: floor(8/12 + 1/2) = 1 positive (clipped to >= 1 anyway), 7 hardest negatives
    is_pos = torch.zeros(1, 12, dtype=torch.bool)
    is_pos[0, 7] = True
    hard = -torch.arange(12, dtype=torch.float32).unsqueeze(0)  # sample j has hardness -j: earlier is harder
    assert hard_negative_selection(is_pos, hard, 8).tolist() == [[0, 1, 2, 3, 4, 5, 6, 7]]
    hard = torch.arange(12, dtype=torch.float32).unsqueeze(0)  # later is harder: negatives 11..8, 6, 5, 4
    assert hard_negative_selection(is_pos, hard, 8).tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]
    # groups without a negative or without a positive keep their first k samples
    assert hard_negative_selection(torch.ones(1, 6, dtype=torch.bool), hard[:, :6], 4).tolist() == [[0, 1, 2, 3]]
    assert hard_negative_selection(torch.zeros(1, 6, dtype=torch.bool), hard[:, :6], 4).tolist() == [[0, 1, 2, 3]]


def test_selection_invariants_on_random_groups():
    gen = torch.Generator().manual_seed(0)
    for k, k_big in [(2, 2), (2, 5), (4, 8), (8, 12), (8, 16), (16, 24)]:
        is_pos = torch.rand(64, k_big, generator=gen) < torch.rand(64, 1, generator=gen)
        hard = torch.randn(64, k_big, generator=gen)
        index = hard_negative_selection(is_pos, hard, k)
        assert index.shape == (64, k)
        for g in range(64):
            row, pos = index[g].tolist(), is_pos[g]
            assert row == sorted(set(row))  # k distinct samples, ascending
            num_pos, total = int(pos.sum()), k_big
            if 0 < num_pos < total:
                kept_pos = int(pos[row].sum())
                assert 1 <= kept_pos <= k - 1
                assert abs(kept_pos / k - num_pos / total) <= 0.5 / k + 1e-9 or kept_pos in (1, k - 1)
                kept_neg = [j for j in row if not pos[j]]
                dropped_neg = [j for j in range(total) if not pos[j] and j not in row]
                if dropped_neg:  # every kept negative is at least as likely as every dropped one
                    assert min(hard[g, kept_neg]) >= max(hard[g, dropped_neg])
                assert [j for j in row if pos[j]] == [j for j in range(total) if pos[j]][:kept_pos]
            else:
                assert row == list(range(k))


def experience(rewards: list[list[float]], mean_logprobs: list[list[float]]) -> Experience:
    prompts = [Prompt(str(i), "q", [3, 4], "1") for i in range(len(rewards))]
    completions = [[Completion([5, 6], [m, m], "stop", 0, "x") for m in row] for row in mean_logprobs]
    grades = [[GradeResult(r, "x", "ok") for r in row] for row in rewards]
    return Experience(prompts, completions, grades)


def test_keep_hard_negatives_on_an_experience():
    exp = experience([[1, 0, 0, 1, 0, 0], [1, 1, 1, 1, 1, 1]],
                     [[-0.1, -3.0, -0.4, -0.1, -0.9, -0.2], [-1.0] * 6])
    kept, metrics = keep_hard_negatives(exp, 4, 0.5)
    assert kept.group_size == 4
    assert kept.rewards.tolist() == [[1, 0, 0, 0], [1, 1, 1, 1]]
    assert kept.mean_rollout_logprobs()[0].tolist() == pytest.approx([-0.1, -0.4, -0.9, -0.2])
    # kept negatives -0.4, -0.9, -0.2 (mean -0.5) versus all four negatives (mean -1.125); group 1 has none
    assert metrics["groups/hard_neg_logprob_kept"] == pytest.approx(-0.5)
    assert metrics["groups/hard_neg_logprob_all"] == pytest.approx(-1.125)


def test_train_phase_trains_on_k_of_the_oversampled_completions():
    from megatron_rence.objectives import get_objective
    from megatron_rence.config import samples_per_prompt
    from megatron_rence.phases import train_phase

    cfg = Config()
    cfg.rollout.num_samples, cfg.objective.hard_negative_samples = 4, 2
    assert samples_per_prompt(cfg) == 6

    class Recorder:
        def logprobs(self, sequences, temperature):
            return [torch.zeros(len(t) - p) for t, p in sequences]

        def train_step(self, sequences, objective, rewards, old_logprobs, ref_logprobs, group_size, normalizer,
                       rollout_logprobs=None):
            self.got = (len(sequences), group_size, rewards.tolist())
            return {"loss/total": 0.0}

    trainer = Recorder()
    exp = experience([[1, 0, 0, 1, 0, 0]], [[-0.1, -3.0, -0.4, -0.1, -0.9, -0.2]])
    metrics = train_phase(exp, trainer, None, get_objective(cfg.objective), cfg)
    assert trainer.got == (4, 4, [1, 0, 0, 0]) and metrics["groups/hard_neg_logprob_kept"] == pytest.approx(-0.5)
