"""Shared test base for every `kernels.hstu_attention` backend; one subclass per backend sets the knobs.

Each check compares a backend (Pallas ones in interpret mode on CPU) with `hstu_attention_reference` and
`jax.grad` of it. Interpreters allocate outputs poisoned with NaN (asserted by `test_interpreter_poisons`),
and every check asserts finite outputs, so an element a kernel forgets to write fails the test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax import export

from kernels.hstu_attention import BlockSizes, hstu_attention, hstu_attention_reference
from kernels.hstu_attention.registry import BACKENDS
from ranking_attention_cases import INTERPRET, RankingAttentionBackendTests


# The tile sets each Pallas backend declares for the benchmark's sweep (`Backend.tuning`).
TUNING_CANDIDATES = {name: list(b.tuning) for name, b in BACKENDS.items() if b.default_blocks is not None}


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention problem: shapes, per-row lengths / targets and the static mask options."""

    name: str
    batch: int
    seq_len: int
    heads: int
    dqk: int
    dv: int
    lengths: tuple[int, ...]
    num_targets: tuple[int, ...] | None
    contextual_len: int = 0
    max_attn_len: int | None = None


CASES = [
    # lengths 0 and L; num_targets 1, all, 0; L a multiple of no block; Dqk != Dv.
    Case("mixed", 3, 37, 2, 16, 8, (37, 20, 0), (1, 20, 0)),
    # H = 1, Dv > Dqk, num_targets None.
    Case("one_head", 2, 24, 1, 8, 16, (24, 13), None),
    # Contextual prefix longer than one row's history (row 2: hist 2 < n = 3).
    Case("contextual", 3, 33, 2, 16, 16, (33, 9, 2), (4, 2, 0), contextual_len=3),
    Case("window", 2, 30, 2, 16, 8, (30, 17), (3, 0), max_attn_len=5),
    Case("contextual_window", 2, 40, 1, 8, 8, (40, 26), (6, 26), contextual_len=2, max_attn_len=4),
]

TOLERANCES = {
    # (rtol, atol as a fraction of the reference's largest magnitude)
    jnp.dtype(jnp.float32): (2e-5, 2e-6),
    jnp.dtype(jnp.bfloat16): (3e-2, 1.5e-2),
}


def make_inputs(case: Case, dtype, seed: int = 0):
    """Random q, k, v (padding positions random too, not zero) and int32 lengths / targets."""
    keys = jax.random.split(jax.random.key(seed), 3)
    shape = (case.batch, case.seq_len, case.heads)
    q = jax.random.normal(keys[0], (*shape, case.dqk), jnp.float32)
    k = jax.random.normal(keys[1], (*shape, case.dqk), jnp.float32)
    v = jax.random.normal(keys[2], (*shape, case.dv), jnp.float32)
    lengths = jnp.asarray(case.lengths, jnp.int32)
    targets = None if case.num_targets is None else jnp.asarray(case.num_targets, jnp.int32)
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), lengths, targets


def assert_close(actual, expected, dtype, what: str) -> None:
    actual = np.asarray(jnp.asarray(actual, jnp.float32))
    expected = np.asarray(jnp.asarray(expected, jnp.float32))
    assert np.isfinite(actual).all(), f"{what}: non-finite values (unwritten or NaN elements)"
    rtol, atol_frac = TOLERANCES[jnp.dtype(dtype)]
    atol = atol_frac * max(float(np.abs(expected).max()), 1e-3)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol, err_msg=what)


@functools.lru_cache(maxsize=None)
def compiled_fwd_bwd(implementation: str, blocks, normalizer: float, contextual_len: int, max_attn_len, interpret):
    """jit(forward + VJP) of one backend for one static configuration, shared by every test that uses it.

    `implementation=None` means the reference under plain autodiff. Caching by static configuration lets
    tests that reuse a shape (sweep examples, padding and extreme-input checks) skip recompiling the
    interpreted kernels, which is where almost all of the test time goes.
    """

    def attention(q, k, v, lengths, targets):
        kwargs = dict(normalizer=normalizer, contextual_len=contextual_len, max_attn_len=max_attn_len)
        if implementation is None:
            return hstu_attention_reference(q, k, v, lengths, targets, **kwargs)
        return hstu_attention(
            q, k, v, lengths, targets, implementation=implementation, interpret=interpret, block_sizes=blocks,
            **kwargs,
        )

    def fwd_bwd(q, k, v, lengths, targets, d_out):
        out, vjp = jax.vjp(lambda q, k, v: attention(q, k, v, lengths, targets), q, k, v)
        return out, vjp(d_out.astype(out.dtype))

    return jax.jit(fwd_bwd)


class HSTUAttentionBackendTests(RankingAttentionBackendTests):
    """Subclass with IMPLEMENTATION set; the knobs below trade coverage for interpret-mode time."""

    IMPLEMENTATION: str = ""
    DTYPES: tuple = (jnp.float32, jnp.bfloat16)
    # Small tiles so that tiny test shapes still span several blocks (skipped, mask-free and masked ones).
    BLOCKS: tuple[BlockSizes | None, ...] = (None,)
    CASES: tuple[Case, ...] = tuple(CASES)
    BF16_CASES: tuple[str, ...] = ("mixed",)
    HYPOTHESIS_EXAMPLES: int = 5
    SWEEP_SEQ_LENS: tuple[int, ...] = (16, 23, 40)
    EXPORT_PLATFORMS: tuple[str, ...] = ()

    @pytest.fixture(autouse=True)
    def _runs_here(self):
        """Compiled mode (GESR_KERNEL_TESTS=compiled) runs only the backends this host's device can run."""
        if not INTERPRET:
            backend = BACKENDS[self.IMPLEMENTATION]
            platform = "gpu" if jax.default_backend() == "cuda" else jax.default_backend()
            if not backend.runs_on(platform, jax.devices()[0]) and self.IMPLEMENTATION != "xla":
                pytest.skip(f"compiled mode: {self.IMPLEMENTATION} does not run on {jax.devices()[0].device_kind}")

    # --- helpers -------------------------------------------------------------------------------------
    def blocks_for(self, index: int) -> BlockSizes | None:
        return self.BLOCKS[index % len(self.BLOCKS)]

    def run_case(self, case: Case, blocks, q, k, v, lengths, targets, d_out, *, implementation=""):
        """(out, (dq, dk, dv)) of this backend (or, with implementation=None, of the reference)."""
        impl = self.IMPLEMENTATION if implementation == "" else implementation
        fn = compiled_fwd_bwd(impl, blocks, float(case.seq_len), case.contextual_len, case.max_attn_len, INTERPRET)
        return fn(q, k, v, lengths, targets, d_out)

    def check_case(self, case: Case, dtype, blocks: BlockSizes | None, seed: int = 0) -> None:
        q, k, v, lengths, targets = make_inputs(case, dtype, seed)
        d_out = jax.random.normal(jax.random.key(seed + 7), (*q.shape[:3], case.dv), jnp.float32)
        out, grads = self.run_case(case, blocks, q, k, v, lengths, targets, d_out)
        assert out.dtype == dtype and out.shape == (*q.shape[:3], case.dv)
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        ref_out, ref_grads = self.run_case(case, None, *f32, lengths, targets, d_out, implementation=None)
        assert_close(out, ref_out, dtype, f"{case.name} forward")
        rows = np.arange(case.seq_len)[None, :] >= np.asarray(lengths)[:, None]
        assert (np.asarray(out, np.float32)[rows] == 0).all(), "rows beyond lengths must be exactly zero"
        for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
            assert g.dtype == dtype
            assert_close(g, rg, dtype, f"{case.name} {name}")

    # --- tests ---------------------------------------------------------------------------------------
    @pytest.mark.parametrize("case_index", range(len(CASES)))
    def test_float32_forward_and_grads(self, case_index):
        if jnp.float32 not in self.DTYPES:
            pytest.skip(f"{self.IMPLEMENTATION} does not take float32")
        self.check_case(self.CASES[case_index], jnp.float32, self.blocks_for(case_index))

    def test_bfloat16_forward_and_grads(self):
        # Backends that also take float32 see each case with the other tile choice here; bf16-only ones keep
        # the float32 test's pairing so later tests reuse these compiled kernels.
        shift = 1 if jnp.float32 in self.DTYPES else 0
        for index, case in enumerate(self.CASES):
            if case.name in self.BF16_CASES:
                self.check_case(case, jnp.bfloat16, self.blocks_for(index + shift), seed=3)

    def test_padding_invariance(self):
        """The same rows padded further (with random values) give the same outputs and gradients."""
        dtype = self.DTYPES[0]
        case = self.CASES[0]
        q, k, v, lengths, targets = make_inputs(case, dtype, seed=11)
        d_out = jax.random.normal(jax.random.key(3), (*q.shape[:3], case.dv), jnp.float32)
        extra = 19
        noise = lambda x, i: jax.random.normal(jax.random.key(i), (case.batch, extra, *x.shape[2:]), jnp.float32)
        pad = lambda x, i: jnp.concatenate([x, noise(x, i).astype(dtype)], 1)
        # Same normalizer (case.seq_len): it is the model's constant, never a function of the padded L.
        longer = dataclasses.replace(case, seq_len=case.seq_len + extra)
        fn = compiled_fwd_bwd(self.IMPLEMENTATION, self.blocks_for(0), float(case.seq_len), 0, None, INTERPRET)
        out_short, grads_short = self.run_case(case, self.blocks_for(0), q, k, v, lengths, targets, d_out)
        out_long, grads_long = fn(pad(q, 1), pad(k, 2), pad(v, 3), lengths, targets, pad(d_out, 4))
        assert longer.seq_len == out_long.shape[1]
        assert_close(out_long[:, : case.seq_len], out_short, dtype, "output with extra padding")
        assert (np.asarray(out_long[:, case.seq_len :], np.float32) == 0).all()
        for g_short, g_long in zip(grads_short, grads_long):
            assert_close(g_long[:, : case.seq_len], g_short, dtype, "gradient with extra padding")
            assert (np.asarray(g_long[:, case.seq_len :], np.float32) == 0).all()

    def test_interpreter_poisons(self):
        """The interpreter this backend runs under fills unwritten outputs with NaN (so the checks above bite)."""
        if not INTERPRET:
            pytest.skip("compiled mode: no interpreter")
        unwritten = self.unwritten_output()
        if unwritten is None:
            pytest.skip(f"{self.IMPLEMENTATION} is not a Pallas backend")
        assert np.isnan(np.asarray(unwritten, np.float32)).all()

    def unwritten_output(self) -> jax.Array | None:
        """Output of a kernel that writes nothing, run the way this backend runs its kernels in tests."""
        return None

    def test_extreme_inputs_stay_finite(self):
        """Huge scores (silu saturating both ways), an empty row and an all-candidate row: no NaN or Inf."""
        dtype = self.DTYPES[0]
        # Same static shape and tiles as CASES[1], so the compiled kernels are reused.
        case = dataclasses.replace(self.CASES[1], name="extreme", lengths=(0, self.CASES[1].seq_len))
        case = dataclasses.replace(case, num_targets=case.lengths)
        q, k, v, lengths, targets = make_inputs(case, dtype)
        q = q * 300.0
        d_out = jnp.ones((*q.shape[:3], case.dv), jnp.float32)
        out, grads = self.run_case(case, self.blocks_for(1), q, k, v, lengths, targets, d_out)
        for x in (out, *grads):
            assert np.isfinite(np.asarray(x, np.float32)).all()
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        ref_out, ref_grads = self.run_case(case, None, *f32, lengths, targets, d_out, implementation=None)
        assert_close(out, ref_out, dtype, "extreme forward")
        for g, rg in zip(grads, ref_grads):
            assert_close(g, rg, dtype, "extreme gradient")

    def test_hypothesis_sweep(self):
        dtype = self.DTYPES[0]
        blocks = self.blocks_for(0)

        @settings(max_examples=self.HYPOTHESIS_EXAMPLES, deadline=None, derandomize=True)
        @given(data=st.data())
        def sweep(data):
            # A few physical lengths (one block multiple, one not, one spanning several blocks) so compiled
            # kernels are reused across examples; lengths and targets vary freely. The slow sweep frees L.
            seq_len = data.draw(st.sampled_from(self.SWEEP_SEQ_LENS), label="L")
            batch = 3
            lengths = data.draw(st.lists(st.integers(0, seq_len), min_size=batch, max_size=batch), label="lengths")
            targets = [data.draw(st.integers(0, n), label="num_targets") for n in lengths]
            case = Case("sweep", batch, seq_len, 1, 8, 8, tuple(lengths), tuple(targets))
            self.check_case(case, dtype, blocks, seed=seq_len)

        sweep()

    @pytest.mark.slow
    def test_hypothesis_sweep_free_lengths(self):
        """The long sweep: any L in [1, 48], B in [1, 3], two heads, Dqk != Dv, forward and gradients."""
        dtype = self.DTYPES[0]

        @settings(max_examples=60, deadline=None, derandomize=True)
        @given(data=st.data())
        def sweep(data):
            seq_len = data.draw(st.integers(1, 48), label="L")
            batch = data.draw(st.integers(1, 3), label="B")
            lengths = data.draw(st.lists(st.integers(0, seq_len), min_size=batch, max_size=batch), label="lengths")
            targets = [data.draw(st.integers(0, n), label="num_targets") for n in lengths]
            contextual = data.draw(st.sampled_from([0, 0, 2]), label="contextual_len")
            window = data.draw(st.sampled_from([None, None, 3]), label="max_attn_len")
            case = Case("sweep", batch, seq_len, 2, 16, 8, tuple(lengths), tuple(targets), contextual, window)
            self.check_case(case, dtype, self.blocks_for(seq_len), seed=seq_len)

        sweep()

    def test_integer_inputs_get_no_cotangent(self):
        """lengths / num_targets are integer inputs: their cotangents are float0 (traced, not run)."""
        case = self.CASES[1]
        q, k, v, lengths, _ = make_inputs(case, self.DTYPES[0])

        def cotangents(q, lengths, targets):
            f = lambda q, n, t: hstu_attention(
                q, k, v, n, t, normalizer=8.0, implementation=self.IMPLEMENTATION, interpret=INTERPRET,
                block_sizes=self.blocks_for(1),
            )
            out, vjp = jax.vjp(f, q, lengths, targets)
            return vjp(jnp.ones_like(out))

        dq, d_lengths, d_targets = jax.eval_shape(cotangents, q, lengths, jnp.ones_like(lengths))
        assert dq.shape == q.shape and dq.dtype == q.dtype
        assert d_lengths.dtype == jax.dtypes.float0 and d_targets.dtype == jax.dtypes.float0

    @pytest.mark.parametrize("platform", ["tpu", "cuda"])
    def test_export_lowering(self, platform):
        """Forward + backward lower for the real accelerator (compiled, not interpreted) on this CPU host."""
        if platform not in self.EXPORT_PLATFORMS:
            pytest.skip(f"{self.IMPLEMENTATION} does not target {platform}")
        export_fwd_bwd(self.IMPLEMENTATION, platform)

    @pytest.mark.parametrize("candidate", range(max(len(c) for c in TUNING_CANDIDATES.values())))
    def test_export_lowering_of_tuning_candidates(self, candidate):
        """Each tile set the benchmark sweeps lowers at the benchmark's head dim 128 and L = 1024, with
        candidates (Mosaic GPU checks its shared-memory budget while lowering), so a GPU session spends no
        time on tiles that cannot compile."""
        candidates = TUNING_CANDIDATES.get(self.IMPLEMENTATION, [])
        if candidate >= len(candidates):
            pytest.skip(f"{self.IMPLEMENTATION} has {len(candidates)} tuning candidates")
        for platform in self.EXPORT_PLATFORMS:
            export_fwd_bwd(self.IMPLEMENTATION, platform, seq_len=1024, head_dim=128, contextual_len=0,
                           block_sizes=candidates[candidate])


def export_fwd_bwd(implementation: str, platform: str, *, seq_len: int = 256, head_dim: int = 64,
                   contextual_len: int = 2, max_attn_len: int | None = None,
                   block_sizes: BlockSizes | None = None, value_dim: int | None = None) -> export.Exported:
    """jax.export of value_and_grad through `implementation` for `platform`, bf16, lengths and targets traced."""
    q = jax.ShapeDtypeStruct((2, seq_len, 2, head_dim), jnp.bfloat16)
    v = jax.ShapeDtypeStruct((2, seq_len, 2, value_dim or head_dim), jnp.bfloat16)
    ints = jax.ShapeDtypeStruct((2,), jnp.int32)

    def loss(q, k, v, lengths, targets):
        out = hstu_attention(
            q, k, v, lengths, targets, normalizer=float(seq_len), implementation=implementation,
            contextual_len=contextual_len, max_attn_len=max_attn_len, block_sizes=block_sizes,
        )
        return jnp.sum(out.astype(jnp.float32))

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    with abstract_gpu_mesh(implementation):
        return export.export(fn, platforms=[platform], disabled_checks=checks)(q, q, v, ints, ints)


@contextlib.contextmanager
def abstract_gpu_mesh(implementation: str):
    """Triton lowering reads the target GPU's compute capability: name an H100 instead of a local one."""
    if implementation != "pallas_triton":
        yield
        return
    from jax._src.mesh import AbstractDevice, AbstractMesh

    device = AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    with jax.sharding.use_abstract_mesh(AbstractMesh((1,), ("x",), abstract_device=device)):
        yield
