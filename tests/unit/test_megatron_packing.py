"""Padded and THD batches: targets, response masks, padding multiples, context-parallel splits."""
import pytest
import torch

from megatron_rence.megatron import packing

SEQS = [([1, 2, 3, 4, 5], 2), ([6, 7, 8], 1), ([9, 10], 2)]  # the last has an empty response


def test_pad_multiple_rules():
    assert packing.pad_multiple() == 1
    assert packing.pad_multiple(tp=4) == 1  # TP without sequence parallel needs nothing
    assert packing.pad_multiple(tp=4, sequence_parallel=True) == 4
    assert packing.pad_multiple(cp=2) == 4
    assert packing.pad_multiple(tp=2, cp=3, sequence_parallel=True) == 6  # 2*3 chunks of S/6, each CP part /2
    # CP part S/2 must split over 4 SP ranks and into 2 chunks: S = 2 * lcm(2, 4) = 8 (lcm(4, 4) = 4 is too short)
    assert packing.pad_multiple(tp=4, cp=2, sequence_parallel=True) == 8
    # FP8, one row: each rank's S / (tp_sp * cp) tokens a multiple of 16 (128 blockwise)
    assert packing.pad_multiple(fp8_align=16) == 16
    assert packing.pad_multiple(tp=8, cp=2, sequence_parallel=True, fp8_align=16) == 8 * 2 * 16
    assert packing.pad_multiple(tp=3, sequence_parallel=True, fp8_align=16) == 48
    assert packing.pad_multiple(tp=2, sequence_parallel=True, fp8_align=128) == 256
    assert packing.pad_multiple(tp=2, fp8_align=16) == 16  # no SP: every TP rank sees the whole sequence
    # rows share the alignment: 8 rows x S=32 tokens / 16 ranks = 16 per rank
    assert packing.pad_multiple(tp=8, cp=2, sequence_parallel=True, fp8_align=16, rows=8) == 32
    assert packing.pad_multiple(fp8_align=16, rows=6) == 8  # 6 * 8 = 48 = 3 * 16
    assert packing.pad_multiple(fp8_align=16, rows=32) == 1


def test_fp8_align_for_recipes():
    assert packing.fp8_align_for(None) == 1
    assert [packing.fp8_align_for(r) for r in ("delayed", "tensorwise", "blockwise")] == [16, 16, 128]
    with pytest.raises(ValueError, match="model.fp8"):
        packing.fp8_align_for("mxfp4")


@pytest.mark.parametrize("tp,cp,sp,align,rows", [(tp, cp, sp, align, rows) for tp in (1, 2, 3, 4, 8)
                                                  for cp in (1, 2, 3) for sp in (False, True)
                                                  for align in (1, 16, 128) for rows in (1, 3, 8)])
def test_pad_multiple_splits_evenly(tp, cp, sp, align, rows):
    """Invariant: at the returned length every CP chunk and SP shard is whole, and each rank's tokens are a
    multiple of the FP8 alignment; the length is the smallest multiple with these properties."""
    m = packing.pad_multiple(tp, cp, sp, align, rows)
    tp_split = tp if sp and tp > 1 else 1

    def fits(length: int) -> bool:
        if cp > 1 and length % (2 * cp):
            return False
        if length % cp or (length // cp) % tp_split:
            return False
        return (rows * length // (cp * tp_split)) % align == 0

    assert fits(m) and fits(3 * m)
    assert not any(fits(length) for length in range(1, m))
    if cp > 1:  # the real split: every CP rank holds 2 chunks of equal size
        assert packing.cp_chunk_indices(m, cp - 1, cp).numel() == m // cp


def test_pad_batch_targets_and_mask():
    b = packing.pad_batch(SEQS, pad_id=0, multiple=4)
    assert b.tokens.shape == (3, 8)
    assert b.tokens[0].tolist() == [1, 2, 3, 4, 5, 0, 0, 0]
    assert b.targets[0].tolist() == [2, 3, 4, 5, -1, -1, -1, -1]
    # prompt_len 2: positions 1..3 predict response tokens 3, 4, 5
    assert b.loss_mask[0].tolist() == [0, 1, 1, 1, 0, 0, 0, 0]
    assert b.loss_mask[1].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    assert b.loss_mask[2].sum() == 0
    assert b.position_ids[1].tolist() == list(range(8))
    per_seq = b.response_logprobs(torch.arange(24.0).view(3, 8))
    assert [t.tolist() for t in per_seq] == [[1.0, 2.0, 3.0], [8.0, 9.0], []]


def test_pack_thd_offsets_and_index():
    b = packing.pack_thd(SEQS, pad_id=0, multiple=4)
    assert b.tokens.tolist() == [[1, 2, 3, 4, 5, 0, 0, 0, 6, 7, 8, 0, 9, 10, 0, 0]]
    assert b.cu_seqlens.tolist() == [0, 5, 8, 10]
    assert b.cu_seqlens_padded.tolist() == [0, 8, 12, 16]
    assert b.max_seqlen == 8 and b.num_sequences == 3
    assert b.position_ids.tolist() == [list(range(8)) + list(range(4)) + list(range(4))]
    assert b.seq_index.tolist() == [0] * 5 + [-1] * 3 + [1] * 3 + [-1] + [2] * 2 + [-1] * 2
    assert b.loss_mask.reshape(-1).nonzero().reshape(-1).tolist() == [1, 2, 3, 8, 9]
    per_seq = packing.unpack_response_logprobs(b, torch.arange(16.0).view(1, 16))
    assert [t.tolist() for t in per_seq] == [[1.0, 2.0, 3.0], [8.0, 9.0], []]
    params = b.packed_seq_params()
    assert params.qkv_format == "thd" and params.cu_seqlens_q_padded is b.cu_seqlens_padded


def test_pack_thd_total_multiple_pads_the_last_sequence():
    # per sequence to 4 (5->8, 3->4, 2->4: 16 tokens), the row to 24: the last sequence takes the 8 extra
    b = packing.pack_thd(SEQS, pad_id=0, multiple=4, total_multiple=24)
    assert b.tokens.shape == (1, 24)
    assert b.cu_seqlens_padded.tolist() == [0, 8, 12, 24]
    assert b.cu_seqlens.tolist() == [0, 5, 8, 10]
    assert b.max_seqlen == 12
    assert b.seq_index.tolist()[12:] == [2, 2] + [-1] * 10
    per_seq = packing.unpack_response_logprobs(b, torch.arange(24.0).view(1, 24))
    assert [t.tolist() for t in per_seq] == [[1.0, 2.0, 3.0], [8.0, 9.0], []]
    assert packing.pack_thd(SEQS, pad_id=0, multiple=4, total_multiple=16).tokens.shape == (1, 16)
    with pytest.raises(ValueError, match="total_multiple=6 must be a multiple of multiple=4"):
        packing.pack_thd(SEQS, pad_id=0, multiple=4, total_multiple=6)


def test_bad_prompt_len_names_the_sequence():
    with pytest.raises(ValueError, match="sequence 1: prompt_len=4"):
        packing.pad_batch([([1, 2], 1), ([1, 2, 3], 4)], pad_id=0)
    with pytest.raises(ValueError, match="prompt_len=0"):
        packing.pack_thd([([1, 2], 0)], pad_id=0)


def test_context_parallel_chunks_cover_every_position_once():
    for cp in (1, 2, 3):
        parts = [packing.cp_chunk_indices(12, r, cp) for r in range(cp)]
        assert sorted(torch.cat(parts).tolist()) == list(range(12))
    # load balancing for causal attention: rank 0 holds the first and the last chunk
    assert packing.cp_chunk_indices(8, 0, 2).tolist() == [0, 1, 6, 7]
    assert packing.cp_chunk_indices(8, 1, 2).tolist() == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="not divisible by 2\\*cp=4"):
        packing.cp_chunk_indices(6, 0, 2)


def test_split_for_cp_keeps_per_sequence_sums():
    packed = packing.pack_thd(SEQS, pad_id=0, multiple=packing.pad_multiple(cp=2))
    padded = packing.pad_batch(SEQS, pad_id=0, multiple=4)
    for batch, split in ((packed, packing.split_packed_for_cp), (padded, packing.split_padded_for_cp)):
        parts = [split(batch, r, 2) for r in range(2)]
        assert sum(p.tokens.numel() for p in parts) == batch.tokens.numel()
        assert sum(p.loss_mask.sum() for p in parts) == batch.loss_mask.sum()
    r1 = packing.split_packed_for_cp(packed, 1, 2)
    # sequence 0 has padded length 8 -> rank 1 holds positions 2..5; sequence 1 (4) -> position 1, 2
    assert r1.tokens.tolist()[0][:6] == [3, 4, 5, 0, 7, 8]
    assert r1.seq_index.tolist()[:6] == [0, 0, 0, -1, 1, 1]


def test_plan_token_budget_balances_ranks_and_packs_first_fit():
    # by cost 8(i2) 7(i4) 5(i0) 3(i1) 2(i3): ranks get [i2, i1, i3] (13 tokens) and [i4, i0] (12 tokens);
    # rank 0 first-fit: [i2 | room 2], i1 opens a bin, i3 fills bin 0; rank 1: 7 + 5 > 10, two bins
    assert packing.plan_token_budget([5, 3, 8, 2, 7], 10, 2) == [[[2, 3], [1]], [[4], [0]]]
    # an item over the budget gets a microbatch of its own
    assert packing.plan_token_budget([12, 1], 10, 1) == [[[0], [1]]]
    # ranks without items run as many (empty = filler) microbatches as the others
    assert packing.plan_token_budget([4], 10, 3) == [[[0]], [[]], [[]]]
    plan = packing.plan_token_budget([3] * 7, 6, 2)
    assert sorted(i for rank in plan for mb in rank for i in mb) == list(range(7))  # every item exactly once
    assert len(plan[0]) == len(plan[1]) == 2
    with pytest.raises(ValueError, match="max_tokens_per_microbatch"):
        packing.plan_token_budget([1], 0, 1)


def test_packed_to_rows_and_cp_positions():
    batch = packing.pack_thd([([1, 2, 3], 1), ([4, 5], 1)], pad_id=0, multiple=4)
    values = torch.arange(8, dtype=torch.float32, requires_grad=True)
    rows = packing.packed_to_rows(batch, values.unsqueeze(0), 3)
    assert rows.tolist() == [[0.0, 1.0, 2.0], [4.0, 5.0, 0.0]]
    rows.sum().backward()  # a gather: gradient 1 on the real positions, 0 on the padding
    assert values.grad.tolist() == [1, 1, 1, 0, 1, 1, 0, 0]
    # cp=2: each sequence (4 tokens) is cut into 4 chunks of 1; rank 0 holds chunks 0 and 3 of each
    assert packing.packed_cp_positions(batch, 0, 2).tolist() == [0, 3, 4, 7]
    assert packing.packed_cp_positions(batch, 1, 2).tolist() == [1, 2, 5, 6]
    local = packing.split_packed_for_cp(batch, 1, 2)
    assert local.tokens[0].tolist() == batch.tokens[0, [1, 2, 5, 6]].tolist()
