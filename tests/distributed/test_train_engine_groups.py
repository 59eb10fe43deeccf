"""The training loop with a multi-rank engine group (rollout.sglang.tp=2) on 2 gloo ranks: every rank of the
group gets an engine object and the full weights at each sync, only the owner generates, and an engine
restart (dummy weights) makes every rank re-sync and the step retry.

SGLang cannot run here (no CUDA); the engine is a recording test double put in place of `build_engine`.
"""
import launcher
import torch

from megatron_rence.rollout.engine import EngineRestartedError
from megatron_rence.rollout.types import Completion


class RecordingEngine:
    """Test double of an SGLang group member: records syncs; the owner answers "4" and can fake one restart."""

    def __init__(self, tokenizer, group, restart_once: bool):
        import torch.distributed as dist

        self.is_owner = group is None or dist.get_rank(group) == 0
        self.group_size = 1 if group is None else dist.get_world_size(group)
        self.answer_ids = tokenizer("4", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        self.weight_version = 0
        self.synced: dict[int, set] = {}
        self.embedding_loads: list[int] = []  # the version of each full sync (the embedding comes once per sync)
        self.generate_calls = 0
        self.restart_pending = restart_once

    def generate(self, prompts, params, n):
        assert self.is_owner
        self.generate_calls += 1
        if self.restart_pending:
            self.restart_pending = False
            raise EngineRestartedError("restarted with dummy weights (test)")
        ids = self.answer_ids
        return [[Completion(list(ids), [-0.5] * len(ids), "stop", self.weight_version, "4") for _ in range(n)]
                for _ in prompts]

    def update_weights(self, bucket, version):
        self.synced.setdefault(version, set()).update(name for name, _ in bucket)
        self.embedding_loads += [version for name, _ in bucket if name == "model.embed_tokens.weight"]
        self.weight_version = version

    def release_memory(self):
        pass

    def resume_memory(self, tags=None):
        pass

    def shutdown(self):
        pass


def _run(run_dir: str) -> dict:
    import megatron_rence.rollout.engine as engine_module
    from megatron_rence import train
    from megatron_rence.megatron import parallel
    from megatron_rence.recipe import load_recipe

    engines = []

    def build_engine(cfg, hf_config, tokenizer, group=None):
        engines.append(RecordingEngine(tokenizer, group, restart_once=True))
        return engines[-1]

    engine_module.build_engine = build_engine
    cfg = load_recipe("recipes/demo_cpu.yaml", [
        "rollout.engine=sglang", "rollout.sglang.tp=2", "model.num_layers=2", "model.hidden_size=32",
        "model.ffn_hidden_size=64", "rollout.prompts_per_step=4", "rollout.num_samples=4",
        "train.global_batch_size=16", "train.micro_batch_size=4", "logging.progress_bar=false",
        "logging.tensorboard=false", "logging.plot=false", "reward.num_workers=1", f"train.run_dir={run_dir}"])
    run = train.setup(cfg, resume=False)
    try:
        train.sync_weights(run, version=0)
        metrics = train.train_step(run, 1)
        engine = engines[0] if engines else None
        return {"engine_index": run.engine_index, "feed": run.engine_ranks, "num_engines": run.num_engines,
                "group_size": engine.group_size, "owner": engine.is_owner, "calls": engine.generate_calls,
                "synced": {v: sorted(names) for v, names in engine.synced.items()}, "loads": engine.embedding_loads,
                "restarts": metrics["engine/restarts"], "sequences": metrics.get("train/num_sequences"),
                "reward": metrics["reward/mean"]}
    finally:
        train.close(run)
        parallel.destroy()


def test_engine_group_ranks_all_receive_weights_and_restart_resyncs(tmp_path):
    out = launcher.run(_run, 2, str(tmp_path / "run"), timeout=300)
    owner, member = out
    assert (owner["engine_index"], member["engine_index"]) == (0, -1) and owner["num_engines"] == 1
    assert owner["feed"] == member["feed"] == [0, 1] and owner["group_size"] == member["group_size"] == 2
    assert owner["owner"] and not member["owner"]
    assert owner["calls"] == 2 and member["calls"] == 0  # the restart, then the retried rollout
    assert owner["restarts"] == member["restarts"] == 1.0
    # version 0: the first sync and the re-sync after the restart; version 1: after the optimizer step
    for r in out:
        assert r["loads"] == [0, 0, 1]
        assert sorted(r["synced"]) == [0, 1]
        assert r["synced"][0] == r["synced"][1] == owner["synced"][1]
        assert "model.embed_tokens.weight" in r["synced"][1] and "model.layers.1.mlp.down_proj.weight" in r["synced"][1]
    assert owner["reward"] >= 0.0 and torch.isfinite(torch.tensor(owner["reward"]))
