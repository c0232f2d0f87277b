"""Forward kernel of the Mosaic GPU backend (Hopper, sm_90), both modes: TMA, mbarriers, wgmma.

Warp specialised like jax's FlashAttention-3 (`ops/gpu/attention_mgpu.py`): a CTA runs two compute warpgroups,
each owning 64 resident rows of Q in shared memory, and one memory warpgroup that streams K and V (and, with the
time bias, the keys' timestamps) through a ring of `MAX_CONCURRENT_STEPS` shared-memory slots with TMA,
signalling `*_ready` barriers and waiting on `*_free` barriers that both consumers arrive on. The two compute
warpgroups ping-pong on a `turn` barrier so one's Q K^T wgmma overlaps the other's elementwise work.

The stream is not the whole sequence: from lengths and num_targets each CTA computes the key blocks it needs
(`_common.row_schedule`): mask-free steps, masked steps, then at most a couple of candidate-diagonal steps.
In the cached mode the main steps are the cached prefix's blocks and the diagonal steps stream the rows' own
key blocks for the self term (`_common.cached_row_schedule`).

Scores: silu (accumulated unnormalised, scaled by 1/normalizer once at the end) or softmax (online, running
max / sum per row in registers; the row log-sum-exp is a second output for the backward; a row with no valid
key gets output 0 and LSE 0). Biases (ALiBi over the collapsed position, log-bucketed time difference) are
added to alpha q.k in registers from iotas, the per-head slopes and the timestamp vectors.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kernels.hstu_attention import scores as sc
from kernels.hstu_attention.backends.mosaic_gpu._common import (
    COL,
    COMPUTE_WGS,
    FULL,
    FULL_MODE,
    MAX_CONCURRENT_STEPS,
    ROW,
    WG_TILE,
    bias_tile,
    broadcast,
    cached_row_schedule,
    carries_bias,
    fori_steps,
    interpret_params,
    interpreting,
    iota,
    load_vector,
    mma_from_registers,
    pair_distance,
    pair_mask,
    producer,
    row_schedule,
    run_steps,
    smem,
)
from kernels.hstu_attention.common import KernelParams, silu


def forward(q, k, v, lengths, hist, alibi, ts, tslopes, params: KernelParams, mode=FULL_MODE, prefix=None):
    """(out, lse): out [B, L, H, Dv]; lse float32 [B, H, L] for softmax, None for silu. 128 rows per CTA.

    Cached mode (`mode.cached`): (lengths, hist) are (prefix_len, num_queries), `prefix` is (k_prefix, v_prefix,
    prefix_timestamps or None), and k, v are the rows' own keys and values (streamed only for the self term).
    """
    batch, seq_len, heads, dqk = q.shape
    dv = v.shape[-1]
    dtype = q.dtype
    bq, bk, slots = WG_TILE, params.blocks.block_k, MAX_CONCURRENT_STEPS
    tile_rows = COMPUTE_WGS * bq
    num_tiles = seq_len // tile_rows
    spec, score = params.spec, params.score
    share_qo = dqk == dv
    softmax, time_on = score.softmax, score.time

    def body(*refs):
        refs = list(refs)
        take = lambda on=True: refs.pop(0) if on else None
        len_ref, hist_ref, q_ref, k_ref, v_ref = (take() for _ in range(5))
        alibi_ref, tslope_ref, ts_ref = take(score.alibi), take(time_on), take(time_on)
        kp_ref, vp_ref, pts_ref = take(mode.cached), take(mode.cached), take(mode.cached and time_on)
        out_ref, lse_ref = take(), take(softmax)
        q_smem2, o_smem2, p_smem2, k_ring, v_ring = (take() for _ in range(5))
        k_ready, v_ready, q_ready, k_free, v_free, turn = (take() for _ in range(6))
        tsr_smem2, ts_ring, tsr_ready, ts_ready, ts_free = (take(time_on) for _ in range(5))
        lse_smem2 = take(softmax)
        assert not refs
        b, h, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
        # Launch the heaviest (last) row tiles first.
        r0 = (num_tiles - 1 - lax.axis_index("q_seq")) * tile_rows
        length, hist_len = len_ref[b], hist_ref[b]
        if mode.cached:
            sched = cached_row_schedule(r0, tile_rows, bk, length, hist_len, spec, mode.self_term)
        else:
            sched = row_schedule(r0, tile_rows, bk, length, hist_len, spec)
        live = hist_len if mode.cached else length  # rows past it get exactly 0

        def take_turn():
            # Ping-pong: one warpgroup's wgmma overlaps the other's elementwise work.
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

        @pl.when(wg < COMPUTE_WGS)
        def _compute():
            plgpu.set_max_registers(232, action="increase")
            q_smem = q_smem2.at[wg]
            staging = None if p_smem2 is None else p_smem2.at[wg]
            row0 = r0 + wg * bq
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, bq), h], q_smem, q_ready.at[wg])
            if time_on:
                plgpu.copy_gmem_to_smem(ts_ref.at[b, pl.ds(row0, bq)], tsr_smem2.at[wg], tsr_ready.at[wg])
            plgpu.barrier_wait(q_ready.at[wg])
            rows = iota((bq, bk), 0) + row0
            cols0 = iota((bq, bk), 1)
            slopes = (None if alibi_ref is None else alibi_ref[h], None if tslope_ref is None else tslope_ref[h])
            row_ts = None
            if time_on:
                plgpu.barrier_wait(tsr_ready.at[wg])
                row_ts = load_vector(tsr_smem2.at[wg], ROW)

            @pl.when(sched.n_steps > 0)
            def _():
                plgpu.barrier_wait(k_ready.at[0])

            pl.when(wg == 1)(take_turn)

            def scores_of(s, slot, kind):
                """alpha q.k (+ bias) of step s, float32 [bq, bk]; releases the K (and timestamp) slot."""

                def qk(scores_ref):
                    plgpu.wgmma(scores_ref, q_smem, k_ring.at[slot].transpose((1, 0)))
                    take_turn()
                    return scores_ref[...]

                z = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])
                z = z * params.alpha
                if not score.has_bias:
                    return z
                cols = cols0 + sched.block(s) * bk
                dist = pair_distance(mode, rows, cols, length, hist_len) if score.alibi else None
                dt = None
                if time_on:
                    plgpu.barrier_wait(ts_ready.at[slot])
                    col_ts = load_vector(ts_ring.at[slot], COL)
                    plgpu.barrier_arrive(ts_free.at[slot])
                    dt = (broadcast(row_ts, (bq, bk), ROW) - broadcast(col_ts, (bq, bk), COL)).astype(jnp.float32)
                return z + bias_tile(score, dist, dt, *slopes) if carries_bias(mode, kind) else z

            def wait_v_and_turn(slot):
                plgpu.barrier_arrive(turn)
                plgpu.barrier_wait(v_ready.at[slot])
                plgpu.barrier_wait(turn)

            def release_v(s, slot):
                nxt = s + 1

                @pl.when(nxt < sched.n_steps)
                def _():
                    plgpu.barrier_wait(k_ready.at[lax.rem(nxt, jnp.int32(slots))])

                # The slot may only be refilled once the asynchronous P @ V has read it.
                plgpu.wgmma_wait(0)
                plgpu.barrier_arrive(v_free.at[slot])

            def silu_step(s, acc_ref, kind):
                slot = lax.rem(s, jnp.int32(slots))
                if score.has_bias:
                    p = silu(scores_of(s, slot, kind))
                else:
                    # Kept op for op as before biases existed, so bias-free results stay bit-identical.
                    def qk(scores_ref):
                        plgpu.wgmma(scores_ref, q_smem, k_ring.at[slot].transpose((1, 0)))
                        take_turn()
                        return scores_ref[...]

                    raw = pl.run_scoped(qk, plgpu.ACC((bq, bk), jnp.float32))
                    plgpu.barrier_arrive(k_free.at[slot])
                    p = silu(raw * params.alpha)
                if kind != FULL:
                    cols = cols0 + sched.block(s) * bk
                    p = jnp.where(pair_mask(mode, kind, rows, cols, length, hist_len, spec), p, 0.0)
                p = p.astype(dtype)
                wait_v_and_turn(slot)
                mma_from_registers(acc_ref, p, v_ring.at[slot], staging)
                release_v(s, slot)

            def softmax_step(s, carry, kind):
                acc, m_i, l_i = carry
                slot = lax.rem(s, jnp.int32(slots))
                z = scores_of(s, slot, kind)
                valid = None
                if kind != FULL:
                    cols = cols0 + sched.block(s) * bk
                    valid = pair_mask(mode, kind, rows, cols, length, hist_len, spec)
                    z = jnp.where(valid, z, sc.MASK_VALUE)
                m_new = jnp.maximum(m_i, z.max(axis=1))
                corr = jnp.exp(m_i - m_new)
                p = jnp.exp(z - broadcast(m_new, (bq, bk), ROW))
                if valid is not None:
                    p = jnp.where(valid, p, 0.0)
                l_i = l_i * corr + p.sum(axis=1)
                acc = acc * broadcast(corr, (bq, dv), ROW)
                p16 = p.astype(dtype)
                wait_v_and_turn(slot)

                if staging is None:
                    # Compiled: accumulate P @ V into the rescaled carry in place, as FA3 does (one register tile).
                    def pv_in_place(acc_ref):
                        mma_from_registers(acc_ref, p16, v_ring.at[slot], None)
                        release_v(s, slot)

                    return pl.run_state(pv_in_place)(plgpu.ACC.init(acc)), m_new, l_i

                # Interpreted: the GPU interpreter does not model pl.run_state, so P @ V goes to a fresh
                # accumulator that is added to the carry (same sum; the compiled path is checked on a GPU by
                # `experiments/gpu_check.py`, which runs these tests compiled).
                def pv(pv_ref):
                    mma_from_registers(pv_ref, p16, v_ring.at[slot], staging)
                    release_v(s, slot)
                    return pv_ref[...]

                return acc + pl.run_scoped(pv, plgpu.ACC((bq, dv), jnp.float32)), m_new, l_i

            out_rows = iota((bq, dv), 0) + row0
            if softmax:
                vec = lambda x: plgpu.layout_cast(jnp.full((bq,), x, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
                acc0 = plgpu.layout_cast(jnp.zeros((bq, dv), jnp.float32), plgpu.Layout.WGMMA)
                acc, m_i, l_i = fori_steps(softmax_step, (acc0, vec(sc.MASK_VALUE), vec(0.0)), sched.ranges)
                pl.when(wg == 0)(take_turn)
                inv_l, lse = sc.softmax_finish(m_i, l_i)
                acc = jnp.where(out_rows < live, acc * broadcast(inv_l, (bq, dv), ROW), 0.0)
                lse_smem2.at[wg][...] = lse
            else:

                def accumulate(acc_ref):
                    run_steps(silu_step, acc_ref, sched.ranges)
                    return acc_ref[...]

                acc = pl.run_scoped(accumulate, plgpu.ACC((bq, dv), jnp.float32))
                pl.when(wg == 0)(take_turn)
                acc = jnp.where(out_rows < live, acc * params.acc_scale, 0.0)
            o_smem = q_smem if share_qo else o_smem2.at[wg]
            o_smem[...] = acc.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(o_smem, out_ref.at[b, pl.ds(row0, bq), h])
            if softmax:
                plgpu.copy_smem_to_gmem(lse_smem2.at[wg], lse_ref.at[b, h, pl.ds(row0, bq)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == COMPUTE_WGS)
        def _memory():
            kv = lambda ref: lambda start: ref.at[b, pl.ds(start, bk), h]
            tsv = lambda ref: lambda start: ref.at[b, pl.ds(start, bk)]
            # Cached mode: prefix blocks for the main steps, the rows' own blocks for the self-term steps.
            pick = lambda view, own, pre: (view(pre), view(own)) if mode.cached else view(own)
            streams = [(pick(kv, k_ref, kp_ref), k_ring), (pick(kv, v_ref, vp_ref), v_ring)]
            ready, free = [k_ready, v_ready], [k_free, v_free]
            if time_on:
                streams.append((pick(tsv, ts_ref, pts_ref), ts_ring))
                ready.append(ts_ready)
                free.append(ts_free)
            producer(sched, bk, streams, tuple(ready), tuple(free), slots)

    scratch = [
        smem((COMPUTE_WGS, bq, dqk), dtype),
        None if share_qo else smem((COMPUTE_WGS, bq, dv), dtype),
        smem((COMPUTE_WGS, bq, bk), dtype) if interpreting(params) else None,
        smem((slots, bk, dqk), dtype),
        smem((slots, bk, dv), dtype),
        plgpu.Barrier(num_barriers=slots),
        plgpu.Barrier(num_barriers=slots),
        plgpu.Barrier(num_barriers=COMPUTE_WGS),
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=slots),
        plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=slots),
        plgpu.Barrier(num_arrivals=COMPUTE_WGS),
    ]
    if time_on:
        scratch += [
            plgpu.SMEM((COMPUTE_WGS, bq), jnp.int32),
            plgpu.SMEM((slots, bk), jnp.int32),
            plgpu.Barrier(num_barriers=COMPUTE_WGS),
            plgpu.Barrier(num_barriers=slots),
            plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=slots),
        ]
    if softmax:
        scratch.append(plgpu.SMEM((COMPUTE_WGS, bq), jnp.float32))
    out_type = jax.ShapeDtypeStruct((batch, seq_len, heads, dv), dtype)
    if softmax:
        out_type = [out_type, jax.ShapeDtypeStruct((batch, heads, seq_len), jnp.float32)]
    extra_in = [x for x, on in ((alibi, score.alibi), (tslopes, time_on), (ts, time_on)) if on]
    if mode.cached:
        kp, vp, pts = prefix
        extra_in += [kp, vp] + ([pts] if time_on else [])
    outs = plgpu.kernel(
        body,
        out_type=out_type,
        scratch_types=scratch,
        grid=(heads, num_tiles, batch),
        grid_names=("heads", "q_seq", "batch"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params(params),
    )(lengths, hist, q, k, v, *extra_in)
    return (outs[0], outs[1]) if softmax else (outs, None)
