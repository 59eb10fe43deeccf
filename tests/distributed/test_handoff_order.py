"""The colocated memory hand-off ordered across processes (docs/design.md, "Memory lifecycle"): 4 gloo ranks,
rollout.sglang.tp=2, so two engine groups {0, 1} and {2, 3}, each engine owned by the group's first rank.

The engine is our real adapter (`SGLangEngine`, which also runs the group's weight transport) over a FAKE
`sglang.Engine` defined here: SGLang's memory release needs a GPU. Like SGLang on a GPU, the fake's start,
memory release and memory resume take a while (here a deliberate sleep, seconds at 70B there), which is what
lets a rank that does not wait for its engine owner show up. Every rank appends timestamped begin / end events
of each phase to its own file (CLOCK_MONOTONIC, shared by the processes of one machine); the test then checks:

- no rank starts building its trainer before every engine of the job has started and released its memory;
- within each engine group, through setup, the first sync and two steps, every engine phase (start, release,
  resume of the weights, resume of the KV cache, generate: the owner's calls, which act on every GPU of the
  group) has ended before a trainer phase that follows it (offload, weight sync, parameter offload, restore:
  on every rank, each on its own GPU) begins on any rank, and every trainer phase has ended on every rank of
  the group before the engine phase that follows it begins. Trainer phases back to back (restore ... offload,
  weight sync -> parameter offload) touch only each rank's own GPU and need no order between ranks.
"""
import asyncio
import json
import os
import pickle
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import launcher

START_S, RELEASE_S, RESUME_S = 1.5, 0.6, 0.6  # the fake SGLang's slow owner-side calls

ALL, OWNER = "all", "owner"  # which ranks of a group run a phase
SYNC = [("offload", ALL), ("resume_weights", OWNER), ("sync", ALL), ("offload_params", ALL),
        ("resume_kv_cache", OWNER)]
STEP = [("generate", OWNER), ("release", OWNER), ("restore", ALL)] + SYNC
SETUP = [("start", OWNER), ("release", OWNER)]
NUM_STEPS = 2
GROUPS = [[0, 1], [2, 3]]


# ---- event log: one jsonl file per rank --------------------------------------------------------------------
_LOG = {"file": None}


def _record(name: str, edge: str) -> None:
    _LOG["file"].write(json.dumps({"t": time.monotonic(), "event": name, "edge": edge}) + "\n")
    _LOG["file"].flush()


class _Timed:
    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        _record(self.name, "begin")

    def __exit__(self, *exc):
        _record(self.name, "end")


def _wrap(owner, attr: str, name: str) -> None:
    """Record `owner.attr` (a function or method) as phase `name`."""
    real = getattr(owner, attr)

    def timed(*args, **kwargs):
        with _Timed(name):
            return real(*args, **kwargs)
    setattr(owner, attr, timed)


# ---- the fake sglang.Engine: the parts of Engine / TokenizerManager the adapter calls ----------------------
class _Req:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


FAKE_IO = SimpleNamespace(GenerateReqInput=_Req, UpdateWeightsFromTensorReqInput=_Req,
                          ReleaseMemoryOccupationReqInput=_Req, ResumeMemoryOccupationReqInput=_Req)


class _SlowTokenizerManager:
    def __init__(self, engine):
        self.engine = engine

    def auto_create_handle_loop(self):
        pass

    async def generate_request(self, obj, request):
        with _Timed("generate"):
            assert not self.engine.released, f"generate with released memory {self.engine.released}"
            ids = self.engine.answer_ids
            yield [{"text": "4", "output_ids": list(ids), "meta_info": {
                "id": "r", "finish_reason": {"type": "stop"}, "weight_version": self.engine.weight_version,
                "output_token_logprobs": [(-0.5, t, None) for t in ids]}} for _ in obj.input_ids]

    async def update_weights_from_tensor(self, obj, request):
        assert obj.load_format == "flattened_bucket" and len(obj.serialized_named_tensors) == 2
        assert "weights" not in self.engine.released, "weights pushed into released memory"
        for payload in obj.serialized_named_tensors:  # one per engine TP rank: each group rank's own buffer
            assert pickle.loads(payload)["flattened_tensor"].numel() > 0
        self.engine.weight_version = obj.weight_version
        return True, "Success"

    async def flush_cache(self):
        return SimpleNamespace(success=True)

    async def release_memory_occupation(self, obj, request):
        with _Timed("release"):
            await asyncio.sleep(RELEASE_S)
            self.engine.released.update(obj.tags)

    async def resume_memory_occupation(self, obj, request):
        name = "resume_kv_cache" if "kv_cache" in obj.tags else "resume_weights"
        with _Timed(name):
            await asyncio.sleep(RESUME_S)
            for tag in obj.tags:
                self.engine.released.remove(tag)  # KeyError for a tag never released, as in SGLang


class SlowFakeEngine:
    """sglang.Engine(**server_kwargs) stand-in: starting takes START_S (SGLang loads the model, profiles memory,
    allocates its pool and captures CUDA graphs on every GPU of its TP group)."""

    answer_ids: list = []

    def __init__(self, **kwargs):
        with _Timed("start"):
            assert kwargs["tp_size"] == 2 and kwargs["enable_memory_saver"]
            time.sleep(START_S)
            self.loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self.loop)
            self.tokenizer_manager = _SlowTokenizerManager(self)
            self.released: set = set()
            self.weight_version = "0"

    def shutdown(self):
        raise AssertionError("the adapter must not call Engine.shutdown")


# ---- one rank ----------------------------------------------------------------------------------------------
def _run(run_dir: str, events_dir: str) -> dict:
    import megatron_rence.rollout.engine as engine_module
    import megatron_rence.weights.sync as sync_module
    from megatron_rence import train
    from megatron_rence.megatron import offload, parallel, step
    from megatron_rence.recipe import load_recipe
    from megatron_rence.rollout.sglang_engine import Backend, SGLangEngine, server_kwargs

    _LOG["file"] = open(Path(events_dir) / f"rank{os.environ['RANK']}.jsonl", "w")

    def build_engine(cfg, hf_config, tokenizer, group=None):
        SlowFakeEngine.answer_ids = tokenizer("4", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        kwargs = server_kwargs(cfg.rollout.sglang, str(Path(run_dir) / "model"), cfg.model.dtype, cfg.train.seed,
                               0, 0)
        return SGLangEngine(kwargs, group, backend=Backend(SlowFakeEngine, FAKE_IO), poll_s=0.05,
                            make_payload=lambda flat, metas: {"flattened_tensor": flat, "metadata": metas},
                            serialize=pickle.dumps)

    engine_module.build_engine = build_engine
    _wrap(step.Trainer, "__init__", "trainer")
    _wrap(sync_module, "push_weights", "sync")
    for name in ("offload", "offload_params", "restore"):
        _wrap(offload.MemoryHandoff, name, name)
    cfg = load_recipe("recipes/demo_cpu.yaml", [
        "rollout.engine=sglang", "rollout.sglang.tp=2", "model.num_layers=2", "model.hidden_size=32",
        "model.ffn_hidden_size=64", "rollout.prompts_per_step=4", "rollout.num_samples=4",
        "train.global_batch_size=16", "train.micro_batch_size=4", "train.offload_params=true",
        "logging.progress_bar=false", "logging.tensorboard=false", "logging.plot=false", "reward.num_workers=0",
        f"train.run_dir={run_dir}"])
    run = train.setup(cfg, resume=False)
    try:
        train.sync_weights(run, version=0)
        for step_index in range(1, NUM_STEPS + 1):
            metrics = train.train_step(run, step_index)
            assert metrics["engine/restarts"] == 0.0
        return {"engine_index": run.engine_index}
    finally:
        train.close(run)
        parallel.destroy()
        _LOG["file"].close()


# ---- the checks --------------------------------------------------------------------------------------------
def _intervals(path: Path) -> dict[str, list[tuple[float, float]]]:
    """event name -> [(begin, end)] in order of occurrence (each phase is recorded exactly once per call)."""
    open_at: dict[str, float] = {}
    out: dict[str, list] = {}
    for line in path.read_text().splitlines():
        e = json.loads(line)
        if e["edge"] == "begin":
            assert e["event"] not in open_at, f"{path.name}: {e['event']} nested in itself"
            open_at[e["event"]] = e["t"]
        else:
            out.setdefault(e["event"], []).append((open_at.pop(e["event"]), e["t"]))
    assert not open_at, f"{path.name}: phases that never ended: {sorted(open_at)}"
    return out


def order_violations(events: dict[int, dict]) -> list[str]:
    """Every breach of the cross-rank order, described (empty: the run was ordered)."""
    problems = []
    released = {g[0]: events[g[0]]["release"][0][1] for g in GROUPS}  # each engine's setup release ended
    for rank, ev in sorted(events.items()):
        built = ev["trainer"][0][0]
        for owner, t_released in released.items():
            if built < t_released:
                problems.append(f"rank {rank} began building its trainer {t_released - built:.2f} s before "
                                f"engine owner {owner} finished starting and releasing its engine")
    sequence = SETUP + SYNC + STEP * NUM_STEPS
    runs_on, totals = dict(sequence), Counter(name for name, _ in sequence)
    for group in GROUPS:
        for rank in group:  # every phase was recorded as often as the protocol runs it: nothing vacuous
            expected = {name: n for name, n in totals.items() if rank == group[0] or runs_on[name] == ALL}
            counts = {name: len(events[rank].get(name, [])) for name in expected}
            assert counts == expected, f"rank {rank}: recorded {counts}, expected {expected}"
        seen: Counter = Counter()
        blocks: list[list] = []  # runs of consecutive engine (owner) or trainer (all ranks) phases
        for name, who in sequence:
            k = seen[name]
            seen[name] += 1
            ranks = group if who == ALL else group[:1]
            phase = [(f"{name}#{k}", r, *events[r][name][k]) for r in ranks]
            if blocks and blocks[-1][0] == who:
                blocks[-1][1].extend(phase)
            else:
                blocks.append([who, phase])
        for (_, done), (_, nxt) in zip(blocks, blocks[1:]):
            last = max(done, key=lambda x: x[3])
            first = min(nxt, key=lambda x: x[2])
            if first[2] < last[3]:
                problems.append(f"group {group}: {first[0]} began on rank {first[1]} {last[3] - first[2]:.2f} s "
                                f"before {last[0]} ended on rank {last[1]}")
    return problems


def test_handoff_phases_are_ordered_across_the_ranks_of_each_engine_group(tmp_path):
    events_dir = tmp_path / "events"
    events_dir.mkdir()
    out = launcher.run(_run, 4, str(tmp_path / "run"), str(events_dir), timeout=600)
    assert [r["engine_index"] for r in out] == [0, -1, 1, -1]
    events = {rank: _intervals(events_dir / f"rank{rank}.jsonl") for rank in range(4)}
    problems = order_violations(events)
    assert not problems, "the hand-off is not ordered across ranks:\n" + "\n".join(problems)


def test_order_check_catches_a_phase_that_starts_early():
    """The checker itself, on hand-made timelines: one phase per second, then one phase moved earlier."""
    def timeline(owner: bool, early: bool) -> dict:
        t, ev = 0.0, {"trainer": [(10.0, 11.0)]}
        for name, who in SETUP:  # engine start 0-1, release 1-2
            if owner:
                ev.setdefault(name, []).append((t, t + 1))
            t += 1
        t = 20.0
        for name, who in SYNC + STEP * NUM_STEPS:  # one phase per second: step 1's release is 26-27
            if owner or who == ALL:
                begin = t - 0.5 if (early and name == "restore" and t == 27.0) else t
                ev.setdefault(name, []).append((begin, t + 1))
            t += 1
        return ev

    ordered = {r: timeline(r % 2 == 0, False) for r in range(4)}
    assert order_violations(ordered) == []
    # trainer phases back to back need no cross-rank order: rank 1 offloads (step 1's sync) while rank 0 restores
    overlap = {**ordered, 1: dict(ordered[1], offload=[ordered[1]["offload"][0], (27.5, 29.0),
                                                       *ordered[1]["offload"][2:]])}
    assert order_violations(overlap) == []
    early = {**ordered, 1: timeline(False, True)}
    assert order_violations(early) == [
        "group [0, 1]: restore#0 began on rank 1 0.50 s before release#1 ended on rank 0"]
    late_trainer = {**ordered, 3: dict(ordered[3], trainer=[(1.5, 3.0)])}
    assert order_violations(late_trainer) == [
        "rank 3 began building its trainer 0.50 s before engine owner 0 finished starting and releasing its engine",
        "rank 3 began building its trainer 0.50 s before engine owner 2 finished starting and releasing its engine"]
