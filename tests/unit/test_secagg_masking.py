"""The threaded masked input and the threaded unmasked sum equal the straightforward computation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securefml.errors import ConfigError, InvalidUpdateError
from securefml.protocols.prg import apply_masks, new_seed
from securefml.protocols.quantize import FixedPoint
from securefml.protocols.secagg_client import MaskJob
from securefml.protocols.secagg_masking import CHUNK, MaskTimes, mask_workers, run_mask_job_threaded, unmask_sum
from securefml.protocols.wire import decode, unpack_array


def _payload(msg: bytes, sender: int, n: int) -> np.ndarray:
    env = decode(msg, sender=sender, views=("vector",))
    return np.array(unpack_array(env.field("vector"), expected_len=n + 1, sender=sender))


def _reference(fp: FixedPoint, x: np.ndarray, weight: float, seed: bytes, plus: list[bytes], minus: list[bytes],
               noise: np.ndarray | None = None) -> np.ndarray:
    """``FixedPoint.encode`` with the same rounding key, then the noise, then ``apply_masks``: one pass each."""
    ref = fp.encode(x, weight, seed=seed)
    if noise is not None:
        ref += noise.astype(fp.dtype)
    apply_masks(ref, plus, minus)
    if fp.bits != 8 * fp.dtype.itemsize:
        ref &= fp.dtype.type(fp.mask)
    return ref


@settings(max_examples=25, deadline=None)
@given(
    n=st.sampled_from([1, 5, CHUNK - 1, CHUNK, CHUNK + 3, 3 * CHUNK + 17]),
    bits=st.sampled_from([12, 16, 24, 32]),
    workers=st.integers(1, 4),
    n_plus=st.integers(0, 3),
    n_minus=st.integers(0, 3),
    weight=st.floats(0.01, 20.0),
    data=st.data(),
)
def test_threaded_masked_input_equals_encode_then_masks(n, bits, workers, n_plus, n_minus, weight, data) -> None:
    fp = FixedPoint(1.0, 10, bits, max_weight=8.0)
    seed_x = data.draw(st.integers(0, 2**32 - 1))
    x = (np.random.default_rng(seed_x).standard_normal(n) * 0.7).astype(np.float32)  # some entries clip
    seed = new_seed()
    plus = [new_seed() for _ in range(n_plus)]
    minus = [new_seed() for _ in range(n_minus)]
    job = MaskJob(x, weight, fp, plus, minus, 3, 1, {"commit": b"c" * 32})
    times: list[MaskTimes] = []
    got = _payload(run_mask_job_threaded(job, workers, rounding_seed=seed, times=times), 3, n)
    assert np.array_equal(got, _reference(fp, x, weight, seed, plus, minus))
    assert 1 <= len(times[0].per_range) <= workers and all(t >= 0 for t in times[0].per_range)


def test_threaded_masked_input_with_ring_noise() -> None:
    fp = FixedPoint(1.0, 10, 32, max_weight=4.0)
    n = 2 * CHUNK + 5
    x = np.linspace(-1.5, 1.5, n, dtype=np.float32)
    noise = np.random.default_rng(1).integers(-1000, 1000, n + 1)
    seed, plus, minus = new_seed(), [new_seed()], [new_seed(), new_seed()]
    job = MaskJob(x, 2.0, fp, plus, minus, 4, 1, {}, ring_noise=noise)
    for workers in (1, 3):
        got = _payload(run_mask_job_threaded(job, workers, rounding_seed=seed), 4, n)
        assert np.array_equal(got, _reference(fp, x, 2.0, seed, plus, minus, noise))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("workers", [1, 2])
def test_non_finite_entry_is_a_typed_error_naming_the_client(bad: float, workers: int) -> None:
    x = np.zeros(2 * CHUNK, dtype=np.float32)
    x[-3] = bad  # in the last range: a worker thread's error reaches the caller
    job = MaskJob(x, 1.0, FixedPoint(1.0, 4), [new_seed()], [], 9, 1, {})
    with pytest.raises(InvalidUpdateError, match="NaN or Inf") as err:
        run_mask_job_threaded(job, workers)
    assert err.value.sender == 9


@pytest.mark.parametrize("weight", [0.0, -1.0, float("nan")])
def test_bad_weight_refused_before_work(weight: float) -> None:
    job = MaskJob(np.zeros(4, np.float32), weight, FixedPoint(1.0, 4), [], [], 2, 1, {})
    with pytest.raises(InvalidUpdateError, match="weight") as err:
        run_mask_job_threaded(job, 1)
    assert err.value.sender == 2


def test_bad_worker_count_and_noise_shape() -> None:
    job = MaskJob(np.zeros(4, np.float32), 1.0, FixedPoint(1.0, 4), [], [], 2, 1, {})
    with pytest.raises(ConfigError):
        run_mask_job_threaded(job, 0)
    job.ring_noise = np.zeros(3, dtype=np.int64)
    with pytest.raises(ConfigError, match="ring noise"):
        run_mask_job_threaded(job, 1)


@settings(max_examples=15, deadline=None)
@given(n=st.sampled_from([1, 7, CHUNK + 1, 2 * CHUNK + 9]), m=st.integers(1, 6), workers=st.integers(1, 3),
       dt=st.sampled_from([np.uint16, np.uint32]))
def test_unmask_sum_equals_add_then_apply_masks(n, m, workers, dt) -> None:
    rng = np.random.default_rng(n + m)
    vectors = [rng.integers(0, np.iinfo(dt).max, n, dtype=dt, endpoint=True) for _ in range(m)]
    plus, minus = [new_seed() for _ in range(2)], [new_seed() for _ in range(3)]
    ref = np.zeros(n, dtype=dt)
    for v in vectors:
        np.add(ref, v, out=ref)
    apply_masks(ref, plus, minus)
    assert np.array_equal(unmask_sum(vectors, plus, minus, workers=workers), ref)


def test_unmask_sum_refuses_mixed_vectors() -> None:
    with pytest.raises(ConfigError):
        unmask_sum([])
    with pytest.raises(ConfigError):
        unmask_sum([np.zeros(3, np.uint32), np.zeros(4, np.uint32)])


def test_worker_count_follows_the_work() -> None:
    assert mask_workers(100_000, 15, cpus=8) == 1  # small vectors: no thread at all
    assert mask_workers(1_000_000, 15, cpus=2) == 2
    assert mask_workers(1_000_000, 15, cpus=1) == 1
    assert mask_workers(10**8, 99, cpus=64) <= 64
    assert mask_workers(CHUNK, 10**6, cpus=8) == 1  # never more ranges than chunks
    for cpus in (1, 2, 4):  # more work never gets fewer workers
        counts = [mask_workers(n, 15, cpus=cpus) for n in (10**3, 10**4, 10**5, 10**6, 10**7)]
        assert counts == sorted(counts)


def test_forked_child_gets_its_own_pool() -> None:
    """A child forked after the pool started (the pipes test forks clients) must not wait on dead threads."""
    import os

    job = MaskJob(np.zeros(2 * CHUNK, np.float32), 1.0, FixedPoint(1.0, 4), [new_seed()], [], 1, 1, {})
    run_mask_job_threaded(job, 2)  # the pool exists in this process now
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            run_mask_job_threaded(job, 2)
            os._exit(0)
        except BaseException:
            os._exit(1)
    import signal
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError("the forked child hung on the parent's thread pool")
