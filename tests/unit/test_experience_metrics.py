"""rollout_metrics of a graded batch: the fallback shares next to the reward (hand-counted)."""
from megatron_rence.data.prompts import Prompt
from megatron_rence.experience import Experience, rollout_metrics
from megatron_rence.rewards.math import GradeResult
from megatron_rence.rollout.types import Completion


def test_rollout_metrics_report_fallback_shares():
    prompts = [Prompt("a", "a", [1], "7"), Prompt("b", "b", [1], "3")]
    completions = [[Completion([5, 6], [-0.1, -0.2], "stop", 0, t) for t in row]
                   for row in (["\\boxed{7}", "7"], ["3", "no idea"])]
    grades = [[GradeResult(1.0, "7", "ok", source="boxed"), GradeResult(1.0, "7", "ok", source="last_number")],
              [GradeResult(1.0, "3", "ok", source="last_number"), GradeResult(0.0, None, "no_answer")]]
    m = rollout_metrics(Experience(prompts, completions, grades), positive_threshold=0.5)
    assert m["reward/mean"] == 0.75 and m["reward/no_answer_frac"] == 0.25
    assert m["reward/fallback_frac"] == 2 / 3  # 3 answers extracted, 2 by last_number
    assert m["reward/correct_fallback_frac"] == 2 / 3  # all 3 are correct
