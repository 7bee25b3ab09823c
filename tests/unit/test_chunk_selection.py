"""Chunked selection: layers split into chunks, a fraction of the parameters per round, none starved."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from securefml.data import make_digits_fewshot
from securefml.defenses import make_defense
from securefml.errors import ConfigError
from securefml.experiment import RunConfig, run_experiment
from securefml.meta import LEARNERS, MetaConfig
from securefml.models import make_model
from securefml.protocols import PROTOCOLS
from securefml.rounds import ClientUpdate, RoundOutput
from securefml.selection import (
    CHUNK_SEPARATOR,
    ChunkedLayout,
    ChunkRotation,
    LayerSelector,
    TopKImportance,
    chunk_layout,
    make_selector,
)
from securefml.server import Server
from securefml.testing import layer_layouts
from securefml.updates import LayerLayout, ParamRole, Role


@settings(max_examples=60, deadline=None)
@given(layout=layer_layouts(min_layers=1, max_layers=5, max_layer_size=80), max_chunk=st.integers(1, 60))
def test_chunks_partition_the_same_flat_vector(layout, max_chunk):
    chunked = chunk_layout(layout, max_chunk)
    assert chunked.numel == layout.numel
    params = {n: torch.randn(p.shape) for lay in layout.layers for p in lay.params for n in [p.name]}
    flat = layout.flatten(params)
    assert torch.equal(chunked.flatten(params), flat)
    back = chunked.unflatten(flat)
    assert set(back) == set(params) and all(torch.equal(back[n], params[n]) for n in params)
    spans = list(chunked.slices().values())
    assert spans[0].start == 0 and spans[-1].stop == layout.numel
    assert all(a.stop == b.start for a, b in zip(spans, spans[1:]))  # contiguous, in order, no overlap
    assert all(0 < s.stop - s.start <= max_chunk for s in spans)
    for name in layout.layer_names:  # each layer is exactly the union of its chunks
        own = [s for n, s in chunked.slices().items() if ChunkedLayout.layer_of_chunk(n) == name]
        whole = layout.slices([name])[name]
        assert own[0].start == whole.start and own[-1].stop == whole.stop


@settings(max_examples=50, deadline=None)
@given(layout=layer_layouts(min_layers=1, max_layers=5, max_layer_size=40),
       fraction=st.floats(0.1, 1.0), per_budget=st.integers(1, 6), staggered=st.booleans())
def test_every_chunk_is_sent_in_every_window_of_G_plans(layout, fraction, per_budget, staggered):
    sel = ChunkRotation(fraction, chunks_per_budget=per_budget, staggered=staggered)
    s = sel.chunk_size(layout.numel)
    chunked = chunk_layout(layout, s)
    g = sel.groups
    assert g == math.ceil(1 / fraction - 1e-9)
    plans = [set(sel.select(chunked, torch.zeros(chunked.numel), torch.ones(chunked.numel))) for _ in range(3 * g + 1)]
    for start in range(len(plans) - g + 1):
        assert set().union(*plans[start:start + g]) == set(chunked.layer_names)
    for p in plans:  # about d / G entries each, up to one chunk either way
        assert chunked.numel_of(p) <= layout.numel / g + s + 1e-9
        if all(len(q) for q in sel.partition(chunked)):
            assert chunked.numel_of(p) >= layout.numel / g - s - 1e-9


def test_declared_rate_chunks_follow_their_layers_chunks():
    # the rate is called `lr_fc`: only its declared role ties it to `fc`, chunk by chunk
    base = LayerLayout([("fc.weight", (8, 8)), ("fc.bias", (8,)), ("lr_fc.weight", (8, 8)), ("lr_fc.bias", (8,))],
                       roles={"lr_fc.weight": ParamRole(Role.LEARNED_RATE, of="fc.weight"),
                              "lr_fc.bias": ParamRole(Role.LEARNED_RATE, of="fc.bias")})
    sel = ChunkRotation(0.5, chunks_per_budget=2)
    chunked = chunk_layout(base, sel.chunk_size(base.numel))
    rates = chunked.layers_with_role(Role.LEARNED_RATE)
    assert rates and all(n.startswith("lr_fc#") for n in rates)
    assert {chunked.owner(n) for n in rates} == set(chunked.layers_with_role(Role.WEIGHT))
    assert all(chunked.numel_of([n]) == chunked.numel_of([chunked.owner(n)]) for n in rates)
    seen: set[str] = set()
    for _ in range(4):
        plan = set(sel.plan(chunked))
        model = {n for n in plan if chunked.role_of(n) is Role.WEIGHT}
        assert {n for n in plan if n in rates} == {n for n in rates if chunked.owner(n) in model}
        seen |= plan
    assert seen == set(chunked.layer_names)


def test_a_role_less_layout_has_no_name_fallback():
    # undeclared, `alpha.fc` is a weight layer of its own: chunked and rotated like any other
    base = LayerLayout([("fc.weight", (8, 8)), ("alpha.fc.weight", (8, 8))])
    sel = ChunkRotation(0.5, chunks_per_budget=1)
    chunked = chunk_layout(base, sel.chunk_size(base.numel))
    assert not chunked.has_roles
    assert sel.partition(chunked) == (("fc#0",), ("alpha.fc#0",))


def test_metasgd_rates_travel_with_their_chunks_in_a_run():
    torch.set_num_threads(1)
    res = run_experiment(RunConfig(dataset="digits-fewshot", algorithm="metasgd", rounds=2, clients_per_round=2,
                                   seed=0, select="chunks:0.5", inner_steps=1,
                                   dataset_options={"n_train": 4, "n_heldout": 2, "k_shot": 2, "query": 2}))
    for rec in res.history[1:]:
        sent = set(rec["uploaded_layers"])
        rates = {n for n in sent if n.startswith("alpha.")}
        assert rates and {n.removeprefix("alpha.") for n in rates} == sent - rates


def test_refusals_are_typed_and_name_the_problem():
    base = LayerLayout([("fc.weight", (4, 4))])
    with pytest.raises(ConfigError, match="ChunkedLayout"):
        ChunkRotation(0.5).plan(base)
    with pytest.raises(ConfigError, match="fraction"):
        ChunkRotation(0.0)
    with pytest.raises(ConfigError, match="already chunked"):
        ChunkedLayout(chunk_layout(base, 4), 2)
    with pytest.raises(ConfigError, match="separator"):
        chunk_layout(LayerLayout([(f"a{CHUNK_SEPARATOR}b.w", (3,))]), 2)
    with pytest.raises(ConfigError, match="whole vectors"):
        chunk_layout(base, 4).unflatten(torch.zeros(4), ["fc#0"])


def test_state_round_trips():
    base = LayerLayout([("a.w", (10, 10)), ("b.w", (10,))])
    sel = ChunkRotation(0.3)
    chunked = chunk_layout(base, sel.chunk_size(base.numel))
    sel.plan(chunked)
    again = make_selector("chunks:0.3")
    assert isinstance(again, ChunkRotation)
    again.load_state_dict(sel.state_dict())
    assert again.plan(chunked) == sel.plan(chunked)


def test_a_federation_with_a_half_budget_alternates_disjoint_halves_at_half_the_bytes():
    torch.set_num_threads(1)
    cfg = dict(dataset="digits-fewshot", rounds=5, clients_per_round=4, seed=1)
    full = run_experiment(RunConfig(**cfg))
    half = run_experiment(RunConfig(**cfg, select="chunks:0.5", defense="cclip"))
    per_round_full = full.metrics["bytes_uploaded"] / 5
    sent = [set(h["uploaded_layers"]) for h in half.history]
    chunks = set().union(*sent)
    assert all(CHUNK_SEPARATOR in n for n in chunks)
    # round 0 sends everything (no aggregate to plan from); then two disjoint halves alternate
    assert sent[0] == chunks and sent[1] | sent[2] == chunks and not sent[1] & sent[2]
    assert sent[1] == sent[3] and sent[2] == sent[4]
    later = (half.metrics["bytes_uploaded"] - per_round_full) / 4
    assert 0.4 < later / per_round_full < 0.6
    assert half.metrics["personalized"]["accuracy"] > 0


# -- the server's plans: every parameter at least every R rounds, whatever the aggregates ----------
_DATA = make_digits_fewshot(n_train=3, n_heldout=1, k_shot=2, query=2, seed=0)


def _server(selector: LayerSelector, algorithm: str) -> Server:
    learner = LEARNERS.create(algorithm, model=make_model(_DATA, hidden=(8, 6), seed=0),
                              config=MetaConfig(inner_steps=1))
    server = Server(learner, PROTOCOLS.create("plaintext"), make_defense("mean"), selector=selector,
                    server_optimizer="adam", server_lr=0.01)
    if isinstance(selector, ChunkRotation):  # as run_experiment installs it
        server.layout = chunk_layout(server.layout, selector.chunk_size(server.layout.numel))
    return server


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(["chunks", "topk"]), fraction=st.floats(0.05, 1.0),
       algorithm=st.sampled_from(["fomaml", "metasgd"]), data=st.data())
def test_server_dictated_plans_cover_every_parameter_within_R_rounds(kind, fraction, algorithm, data):
    """State R: ``chunks`` R = ceil(1 / fraction); dictated ``topk`` R = L model layers.

    The aggregates the server plans from are arbitrary (an adversary may have shaped them):
    per-layer scores of random sign and magnitudes over 12 orders, so a ranking-driven plan
    meets arbitrary orders of layer scores.
    """
    selector: LayerSelector = (ChunkRotation(fraction) if kind == "chunks"
                               else TopKImportance(fraction, server_dictated=True))
    server = _server(selector, algorithm)
    layout = server.layout
    r_bound = selector.groups if isinstance(selector, ChunkRotation) else len(layout.layers_with_role(Role.WEIGHT))
    masks = []
    for rnd in range(3 * r_bound + 2):
        plan = server.plan(rnd)
        assert plan.layers is not None
        masks.append(layout.mask(plan.layers))
        gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**32 - 1)))
        scores = (torch.randn(len(layout.layer_names), generator=gen)
                  * 10 ** torch.randint(-6, 7, (len(layout.layer_names),), generator=gen)).tolist()
        agg = torch.cat([torch.full((layout.numel_of([n]),), s) for n, s in zip(layout.layer_names, scores)])
        server._step(RoundOutput(agg * masks[-1], {n: float(n in plan.layers) for n in layout.layer_names}, (0,)))
        # a declared rate (Meta-SGD) travels exactly when its weight does
        assert all(layout.owner(n) in plan.layers for n in plan.layers)
        assert all(n in plan.layers for n in layout.layer_names if layout.owner(n) in plan.layers)
    assert bool(masks[0].all())  # round 0: everything (no aggregate to plan from)
    for start in range(len(masks) - r_bound + 1):
        window = torch.stack(masks[start:start + r_bound]).any(dim=0)
        assert bool(window.all()), (kind, fraction, start)


def test_rate_chunks_are_found_by_role_for_the_adversary():
    server = _server(ChunkRotation(0.5), "metasgd")
    rates = server._learned_rate_layers()
    assert rates and all(CHUNK_SEPARATOR in n and server.layout.role_of(n) is Role.LEARNED_RATE for n in rates)
    assert server.layout.numel_of(rates) == server.layout.numel // 2


@pytest.mark.slow
@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="target not met: chunks:0.5 stays 6.6 +- 4.4 points below all layers (3 seeds) "
                   "after the server-step fix (docs/selection.md)")
def test_half_budget_trains_the_bundled_mlp_within_2_points_of_all_layers():
    """Issue target (digits-fewshot FOMAML, 10 per round, 200 rounds, seed 0).

    Not met (3 seeds after the server-step fix: docs/selection.md, benchmarks/json/selection.json),
    so the test is a strict xfail: the day it holds, it fails until the marker goes.
    """
    torch.set_num_threads(1)
    cfg = dict(dataset="digits-fewshot", algorithm="fomaml", rounds=200, clients_per_round=10, seed=0, last_k=5)
    full = run_experiment(RunConfig(**cfg)).metrics["personalized_last_k"]["mean"]
    half = run_experiment(RunConfig(**cfg, select="chunks:0.5"))
    gaps: dict[str, int] = {}
    last: dict[str, int] = {}
    for rec in half.history:
        for n in rec["uploaded_layers"]:
            gaps[n] = max(gaps.get(n, 0), rec["round"] - last.get(n, -1))
            last[n] = rec["round"]
    assert max(gaps.values()) <= 2  # every chunk at least every R = 2 rounds in the run itself
    assert half.metrics["personalized_last_k"]["mean"] >= full - 0.02


@settings(max_examples=30, deadline=None)
@given(sent=st.lists(st.sets(st.integers(0, 5)), min_size=1, max_size=6), seed=st.integers(0, 2**16),
       weights=st.lists(st.floats(0.5, 20.0), min_size=6, max_size=6))
def test_the_server_step_averages_each_chunk_over_exactly_its_senders(sent, seed, weights):
    """Hypothesis 1 of the half-budget gap, ruled out: per chunk the round's aggregate is the
    weighted mean over the clients that sent that chunk (any mix of chunk sets, as staggered
    plans produce), a chunk nobody sent has weight 0, and an SGD step moves only what was sent."""
    learner = LEARNERS.create("fedavg", model=torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2)),
                              config=MetaConfig(inner_steps=1))
    layout = chunk_layout(learner.layout(), 5)  # 7 chunks: 0#0..0#3, 1#0..1#2
    names = layout.layer_names
    gen = torch.Generator().manual_seed(seed)
    full = [torch.randn(layout.numel, generator=gen) for _ in sent]
    ups = [ClientUpdate(i, layout.gather(full[i], [names[k] for k in ks]), tuple(names[k] for k in sorted(ks)),
                        weights[i]) for i, ks in enumerate(sent) if ks]
    if not ups:
        return
    server = Server(learner, PROTOCOLS.create("plaintext"), make_defense("mean"), server_optimizer="sgd", server_lr=1.0)
    server.layout = layout
    out = server.collect(0, ups, server.context(0))
    for name, s in layout.slices().items():
        senders = [u for u in ups if name in u.layers]
        total = sum(u.weight for u in senders)
        assert out.layer_weight[name] == pytest.approx(total)
        zero = torch.zeros(s.stop - s.start)
        want = sum((u.weight * full[u.client_id][s] for u in senders), zero) / total if senders else zero
        torch.testing.assert_close(out.aggregate[s], want, rtol=1e-5, atol=1e-6)
    before = server.global_vector.clone()
    server._step(out)
    moved = server.global_vector - before
    for name, s in layout.slices().items():
        if out.layer_weight[name] == 0:
            assert torch.equal(moved[s], torch.zeros(s.stop - s.start))
        else:
            torch.testing.assert_close(moved[s], out.aggregate[s])
