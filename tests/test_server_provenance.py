"""Provenance spans and sampled-sequence records (rl/server/provenance.py).

The store and the resolution are tested on their own first (a fake clock, hand-made records),
then through the official SDK against the server on the tiny model: sampling with
`record_stability_info=True`, datums built the way tinker-cookbook 0.6.1's
`recipes/rl_loop.py` builds them (`Datum.with_provenance`, placeholder zeros as prompt
targets), and `forward_backward` with `importance_sampling` and `stable_reinforce`.
"""

from __future__ import annotations

import dataclasses
import math
import time

import httpx
import pytest
import tinker
from tinker import types

from rl import types as rt
from rl.errors import InvalidRequestError
from rl.server import ServerConfig, build_service, start_in_thread
from rl.server.keys import KeyStore
from rl.server.provenance import SequenceRecord, SequenceStore, record_sample, resolve
from samplers.config import SamplerConfig
from trainers.config import TrainerConfig

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


# -- the store, on a fake clock -------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def a_record(session: str = "s1", tokens=(7, 8, 9), prompt=(1, 2, 3, 4)) -> SequenceRecord:
    (record,) = record_sample(
        session, f"{session}:sample:0", prompt, [(tokens, [-0.5] * len(tokens))], 1.0, -1, 1.0
    )
    return record


def test_store_ttl_slides_with_each_use():
    clock = Clock()
    store = SequenceStore(ttl_s=100, max_bytes=2**20, clock=clock)
    store.add("alice", {"a": a_record(), "b": a_record()})
    clock.now = 90
    store.touch("alice", ["a"])  # a training request used it: its day restarts
    clock.now = 150
    assert isinstance(store.get("alice", "a"), SequenceRecord)
    assert store.get("alice", "b") == "expired"
    clock.now = 189
    assert isinstance(store.get("alice", "a"), SequenceRecord)
    clock.now = 191
    assert store.get("alice", "a") == "expired"
    assert store.snapshot() == {}
    assert store.dropped() == {("alice", "expired"): 2}


def test_store_cap_evicts_least_recently_used_first():
    clock = Clock()
    size = a_record().nbytes
    store = SequenceStore(ttl_s=100, max_bytes=2 * size, clock=clock)
    store.add("alice", {"a": a_record()})
    store.add("alice", {"b": a_record()})
    store.touch("alice", ["a"])  # b is now the least recently used
    store.add("alice", {"c": a_record()})
    assert store.get("alice", "b") == "evicted"
    assert all(isinstance(store.get("alice", k), SequenceRecord) for k in "ac")
    assert store.snapshot() == {"alice": (2, 2 * size)}
    # Each tenant has its own cap and its own ids: bob's records evict nothing of alice's,
    # and alice's ids are unknown to bob.
    store.add("bob", {"x": a_record(), "y": a_record()})
    assert store.snapshot()["alice"] == (2, 2 * size)
    assert store.get("bob", "a") == "unknown"
    # One request's sequences share its prompt: each is charged a share of it.
    shared = record_sample("s1", "s1:sample:0", range(100), [([1], [-1.0])] * 4, 1.0, -1, 1.0)
    assert shared[0].prompt is shared[3].prompt
    assert shared[0].nbytes < a_record(prompt=range(100)).nbytes


def test_store_forgets_a_session_that_ended():
    store = SequenceStore(ttl_s=100, max_bytes=2**20)
    store.add("alice", {"a": a_record("s1"), "b": a_record("s2")})
    store.end_session("s1")
    assert store.get("alice", "a") == "session ended"
    assert isinstance(store.get("alice", "b"), SequenceRecord)


# -- resolution, without the server ---------------------------------------------------------

PROMPT = [1, 2, 3, 4, 5]
SAMPLED = [11, 12, 13]
RECORDED_LOGPROBS = [-0.25, -0.5, -0.75]


def rl_loop_datum(
    sequence_id: str = "seq",
    *,
    advantage: float = 1.0,
    logprobs: list[float] | None = None,
    tokens: list[int] | None = None,
) -> rt.Datum:
    """The datum recipes/rl_loop.py builds: prompt + sampled[:-1] in, [0]*ob_len + sampled as
    targets, spans [Prompt(0, P), Sampled(0, S-1)] and [Prompt(1, P-1), Sampled(0, S)]."""
    ob_len = len(PROMPT) - 1
    p, s = len(PROMPT), len(SAMPLED)
    return rt.Datum(
        model_input=rt.ModelInput.from_ints(tokens or PROMPT + SAMPLED[:-1]),
        loss_fn_inputs={
            "target_tokens": [0] * ob_len + SAMPLED,
            "logprobs": logprobs or [0.0] * ob_len + [-9.0] * s,
            "advantages": [0.0] * ob_len + [advantage] * s,
        },
        model_input_spans=[
            rt.PromptSpan(sequence_id=sequence_id, length=p),
            rt.SampledSpan(sequence_id=sequence_id, length=s - 1),
        ],
        loss_fn_input_spans=[
            rt.PromptSpan(sequence_id=sequence_id, offset=1, length=p - 1),
            rt.SampledSpan(sequence_id=sequence_id, length=s),
        ],
    )


@pytest.fixture
def store() -> SequenceStore:
    store = SequenceStore(ttl_s=100, max_bytes=2**20)
    (record,) = record_sample(
        "s1", "s1:sample:0", PROMPT, [(SAMPLED, RECORDED_LOGPROBS)], 0.7, -1, 1.0
    )
    store.add("alice", {"seq": record})
    return store


def test_resolve_fills_logprobs_from_the_record_and_strips_spans(store):
    resolved = resolve(store, "alice", "s1", "stable_reinforce", [rl_loop_datum()])
    (datum,) = resolved.data
    assert datum.model_input_spans is None and datum.loss_fn_input_spans is None
    assert datum.loss_fn_inputs["logprobs"].tolist() == pytest.approx([0.0] * 4 + RECORDED_LOGPROBS)
    assert resolved.used == {"seq"}
    # The record makes sending them unnecessary.
    datum = rl_loop_datum()
    inputs = {k: v for k, v in datum.loss_fn_inputs.items() if k != "logprobs"}
    without = datum.model_copy(update={"loss_fn_inputs": inputs})
    (filled,) = resolve(store, "alice", "s1", "stable_reinforce", [without]).data
    assert filled.loss_fn_inputs["logprobs"].tolist() == pytest.approx(
        [0.0] * 4 + RECORDED_LOGPROBS
    )
    # Other losses check the spans the same way but keep the client's logprobs.
    lenient = resolve(store, "alice", "s1", "importance_sampling", [rl_loop_datum()])
    assert lenient.data[0].loss_fn_inputs["logprobs"].tolist() == [0.0] * 4 + [-9.0] * 3
    assert lenient.data[0].model_input_spans is None


@pytest.mark.parametrize(
    ("datum", "session", "words"),
    [
        (rl_loop_datum("nope"), "s1", "'nope', which this session has no record of"),
        (rl_loop_datum(), "s2", "sampled in another session"),
        (rl_loop_datum(tokens=[*PROMPT, 11, 99]), "s1", "at position 6 the datum has token 99"),
        (rl_loop_datum(tokens=[1, 2, 9, 4, 5, 11, 12]), "s1", "model_input does not match"),
    ],
)
def test_resolve_errors_name_datum_span_and_sequence(store, datum, session, words):
    good = [rl_loop_datum()] if session == "s1" else []  # datums before it pass
    with pytest.raises(InvalidRequestError, match=words) as info:
        resolve(store, "alice", session, "stable_reinforce", [*good, datum])
    assert str(info.value).startswith(f"datum {len(good)}: ")


def test_resolve_checks_targets_of_sampled_spans_and_advantages(store):
    datum = rl_loop_datum()
    targets = datum.loss_fn_inputs["target_tokens"].tolist()
    wrong_target = datum.model_copy(
        update={
            "loss_fn_inputs": {
                **datum.loss_fn_inputs,
                "target_tokens": rt.to_tensor_data([*targets[:-1], 5], "target_tokens"),
            }
        }
    )
    with pytest.raises(InvalidRequestError, match="target_tokens does not match"):
        resolve(store, "alice", "s1", "stable_reinforce", [wrong_target])
    advantages = [0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0]  # position 3 is a prompt position
    on_prompt = datum.model_copy(
        update={
            "loss_fn_inputs": {**datum.loss_fn_inputs, "advantages": rt.to_tensor_data(advantages)}
        }
    )
    with pytest.raises(InvalidRequestError, match=r"datum 0: advantages\[3\] = 0.5 is nonzero"):
        resolve(store, "alice", "s1", "stable_reinforce", [on_prompt])
    plain = rt.Datum(model_input=datum.model_input, loss_fn_inputs=datum.loss_fn_inputs)
    with pytest.raises(InvalidRequestError, match=r"datum 0: .* needs provenance on every datum"):
        resolve(store, "alice", "s1", "stable_reinforce", [plain])
    too_long = rl_loop_datum().model_copy(
        update={
            "loss_fn_input_spans": [
                rt.PromptSpan(sequence_id="seq", offset=2, length=4),
                rt.SampledSpan(sequence_id="seq", length=3),
            ]
        }
    )
    with pytest.raises(InvalidRequestError, match="reaches position 6 of sequence 'seq'"):
        resolve(store, "alice", "s1", "stable_reinforce", [too_long])
    # A lenient loss accepts spans naming sequences without a record (sampled without
    # record_stability_info, as the cookbook does for importance_sampling).
    assert resolve(store, "alice", "s1", "importance_sampling", [rl_loop_datum("nope")]).data


def test_datum_spans_come_in_pairs_and_tile_their_fields():
    datum = rl_loop_datum()
    with pytest.raises(ValueError, match="model_input_spans cover 6 positions but model_input"):
        rt.Datum(
            model_input=datum.model_input,
            loss_fn_inputs=datum.loss_fn_inputs,
            model_input_spans=[rt.SampledSpan(sequence_id="seq", length=6)],
            loss_fn_input_spans=datum.loss_fn_input_spans,
        )
    with pytest.raises(ValueError, match="come as a pair"):
        rt.Datum(
            model_input=datum.model_input,
            loss_fn_inputs=datum.loss_fn_inputs,
            model_input_spans=datum.model_input_spans,
        )
    assert rt.Datum.model_validate(datum.model_dump()) == datum  # the record round-trips


# -- through the SDK ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def server_env(ray_local, tiny_model, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("TINKER_TELEMETRY", "0")
    config = ServerConfig(
        port=0,
        home=str(tmp_path_factory.mktemp("server")),
        models=tiny_model,
        sampler=SamplerConfig(engine="torch", sync_mode="adapter", num_threads=1),
        trainer=TrainerConfig(dtype="float32", num_threads=1),
        long_poll_s=2.0,
    )
    keys = KeyStore(config.resolved_keys_file())
    env = {"alice": keys.add("alice"), "bob": keys.add("bob")}
    service = build_service(config)
    running = start_in_thread(config, service)
    yield {"url": running.url, "keys": env, "running": running}
    running.stop()
    service.close()


def sdk(server_env, who: str) -> tinker.ServiceClient:
    return tinker.ServiceClient(base_url=server_env["url"], api_key=server_env["keys"][who])


@pytest.fixture(scope="module")
def alice(server_env):
    return sdk(server_env, "alice")


@pytest.fixture(scope="module")
def trained(alice, tiny_model):
    """Alice's training client and a sampling client of its weights that records."""
    client = alice.create_lora_training_client(tiny_model, rank=4, seed=3).result()
    sampler = client.save_weights_and_get_sampling_client(record_stability_info=True).result()
    return client, sampler


SDK_PROMPT = types.ModelInput.from_ints([1, 2, 3, 4, 5, 6])
PARAMS = types.SamplingParams(max_tokens=5, temperature=1.0, seed=7, stop=[])


def with_provenance(
    prompt: types.ModelInput,
    sequence: types.SampledSequence,
    advantage: float,
    logprobs: list[float] | None = None,
) -> types.Datum:
    """Exactly recipes/rl_loop.py's datum, spans by its `with_sampled_provenance`."""
    sampled, ob_len = sequence.tokens, prompt.length - 1
    model_input = prompt.append(types.EncodedTextChunk(tokens=sampled[:-1]))
    datum = types.Datum(
        model_input=model_input,
        loss_fn_inputs={
            "target_tokens": [0] * ob_len + sampled,
            "logprobs": [0.0] * ob_len + (logprobs or sequence.logprobs),
            "advantages": [0.0] * ob_len + [advantage] * len(sampled),
        },
    )
    seq = sequence.sequence_id
    return datum.with_provenance(
        model_input=[
            types.PromptProvenanceSpan(sequence_id=seq, length=prompt.length),
            types.SampledProvenanceSpan(sequence_id=seq, length=len(sampled) - 1),
        ],
        loss_fn_inputs=[
            types.PromptProvenanceSpan(sequence_id=seq, offset=1, length=prompt.length - 1),
            types.SampledProvenanceSpan(sequence_id=seq, length=len(sampled)),
        ],
    )


def sample(sampler, n: int = 2) -> list[types.SampledSequence]:
    sequences = sampler.sample(SDK_PROMPT, n, PARAMS).result().sequences
    assert all(len(s.tokens) == PARAMS.max_tokens for s in sequences)  # stop=[]: full length
    return sequences


def test_stable_reinforce_trains_on_recorded_sequences(trained):
    client, sampler = trained
    first, second = sample(sampler)
    assert first.sequence_id != second.sequence_id and ":seq:" in first.sequence_id
    data = [with_provenance(SDK_PROMPT, first, 1.0), with_provenance(SDK_PROMPT, second, -1.0)]
    right = client.forward(data, "stable_reinforce").result()
    assert math.isfinite(right.metrics["loss:sum"])
    # The sampler's logprobs are the trainer's (same weights, fp32): nothing leaves the band.
    assert right.metrics["masked_fraction:mean"] == 0.0
    # The record overrides the client's logprobs: wrong ones give the same loss.
    wrong = [
        with_provenance(SDK_PROMPT, first, 1.0, logprobs=[-7.0] * 5),
        with_provenance(SDK_PROMPT, second, -1.0, logprobs=[-0.01] * 5),
    ]
    assert client.forward(wrong, "stable_reinforce").result().metrics == right.metrics
    # importance_sampling takes the client's logprobs (its contract), spans or not.
    spans_is = client.forward(wrong, "importance_sampling").result().metrics["loss:sum"]
    right_is = client.forward(data, "importance_sampling").result().metrics["loss:sum"]
    assert spans_is != pytest.approx(right_is)
    out = client.forward_backward(data, "stable_reinforce").result()
    assert out.metrics["loss:sum"] == pytest.approx(right.metrics["loss:sum"], rel=1e-6)
    assert client.optim_step(types.AdamParams(learning_rate=1e-2)).result().metrics


def test_spans_are_accepted_with_other_losses(alice, trained, tiny_model):
    client, _ = trained
    unrecorded = client.save_weights_and_get_sampling_client().result()  # not recording
    (sequence,) = sample(unrecorded, 1)
    with_spans = [with_provenance(SDK_PROMPT, sequence, 1.0)]
    plain = [
        types.Datum(
            model_input=with_spans[0].model_input, loss_fn_inputs=with_spans[0].loss_fn_inputs
        )
    ]
    for loss in ("importance_sampling", "ppo"):
        got = client.forward(with_spans, loss).result()
        assert got.metrics == client.forward(plain, loss).result().metrics
    with pytest.raises(tinker.RequestFailedError, match="sampled without record_stability_info"):
        client.forward(with_spans, "stable_reinforce").result()


def test_bad_provenance_is_a_user_error_naming_datum_span_and_sequence(
    server_env, alice, trained, tiny_model
):
    client, sampler = trained
    (sequence,) = sample(sampler, 1)
    good = with_provenance(SDK_PROMPT, sequence, 1.0)
    bob_client = sdk(server_env, "bob").create_lora_training_client(tiny_model, rank=4).result()
    bob_sampler = bob_client.save_weights_and_get_sampling_client(
        record_stability_info=True
    ).result()
    (bobs,) = sample(bob_sampler, 1)
    tokens = good.model_input.to_ints()
    mismatched = types.Datum(
        model_input=types.ModelInput.from_ints([*tokens[:-1], (tokens[-1] + 1) % 1000]),
        loss_fn_inputs=good.loss_fn_inputs,
        model_input_spans=good.model_input_spans,
        loss_fn_input_spans=good.loss_fn_input_spans,
    )
    untiled = types.Datum(  # the SDK's Datum checks tiling only in with_provenance
        model_input=good.model_input,
        loss_fn_inputs=good.loss_fn_inputs,
        model_input_spans=good.model_input_spans[:1],
        loss_fn_input_spans=good.loss_fn_input_spans,
    )
    on_prompt = with_provenance(SDK_PROMPT, sequence, 1.0)
    advantages = on_prompt.loss_fn_inputs["advantages"].tolist()
    advantages[0] = 0.5
    on_prompt = types.Datum(
        model_input=good.model_input,
        loss_fn_inputs={**good.loss_fn_inputs, "advantages": advantages},
        model_input_spans=good.model_input_spans,
        loss_fn_input_spans=good.loss_fn_input_spans,
    )
    unknown = "no-such-session:seq:0:0"
    cases = [
        (
            with_provenance(SDK_PROMPT, dataclasses.replace(sequence, sequence_id=unknown), 1.0),
            f"datum 1: model_input_spans\\[0\\] .* names sequence '{unknown}', which this session "
            "has no record of",
        ),
        (
            with_provenance(SDK_PROMPT, bobs, 1.0),
            f"'{bobs.sequence_id}', which this session has no",
        ),
        (mismatched, "datum 1: model_input_spans\\[1\\] .* model_input does not match"),
        (untiled, "datum 1: model_input_spans cover 6 positions but model_input has 10"),
        (on_prompt, "datum 1: advantages\\[0\\] = 0.5 is nonzero"),
        (
            types.Datum(model_input=good.model_input, loss_fn_inputs=good.loss_fn_inputs),
            "datum 1: loss_fn='stable_reinforce' needs provenance on every datum",
        ),
    ]
    before = client.forward([good], "stable_reinforce").result().metrics
    for bad, words in cases:
        with pytest.raises(tinker.RequestFailedError, match=words) as info:
            client.forward_backward([good, bad], "stable_reinforce").result()
        assert info.value.category == types.RequestErrorCategory.User
    with pytest.raises(tinker.RequestFailedError, match="cover 6 positions"):
        client.forward([untiled], "importance_sampling").result()  # tiling: every loss
    # Nothing changed: no gradient was accumulated, the client goes on.
    with pytest.raises(tinker.RequestFailedError, match="no gradient"):
        client.optim_step(types.AdamParams(learning_rate=1.0)).result()
    assert client.forward([good], "stable_reinforce").result().metrics == before


def test_records_expire_and_show_in_metrics(server_env, trained):
    client, sampler = trained
    store = server_env["running"].state.sequences
    (sequence,) = sample(sampler, 1)
    datum = with_provenance(SDK_PROMPT, sequence, 1.0)
    metrics = httpx.get(server_env["url"] + "/metrics").text
    recorded = [
        line for line in metrics.splitlines() if line.startswith("engineroom_sequences_recorded")
    ]
    assert any('tenant="alice"' in line and float(line.split()[-1]) >= 1 for line in recorded)
    ttl = store.ttl_s
    store.ttl_s = 0.2  # the server's --sequence_record_ttl_s, shortened for the test
    try:
        time.sleep(0.5)
        with pytest.raises(tinker.RequestFailedError, match="whose record expired"):
            client.forward([datum], "stable_reinforce").result()
    finally:
        store.ttl_s = ttl
    metrics = httpx.get(server_env["url"] + "/metrics").text
    assert 'engineroom_sequences_dropped_total{reason="expired",tenant="alice"}' in metrics


def test_sequence_records_are_bounded_by_config():
    config = ServerConfig(sequence_record_ttl_s=60, max_sequence_record_mib_per_tenant=0.5)
    assert (config.sequence_record_ttl_s, config.max_sequence_record_mib_per_tenant) == (60, 0.5)
    with pytest.raises(InvalidRequestError, match="sequence_record_ttl_s"):
        ServerConfig(sequence_record_ttl_s=0)


def test_in_process_client_passes_spans_to_a_trainer_that_ignores_them(server_env, tiny_model):
    service = server_env["running"].state.service
    client = service.create_lora_training_client(tiny_model, rank=4, seed=5)
    datum = rl_loop_datum("not-resolved-in-process")
    plain = rt.Datum(model_input=datum.model_input, loss_fn_inputs=datum.loss_fn_inputs)
    for loss in ("importance_sampling", "stable_reinforce"):
        with_spans = client.forward([datum], loss).result().metrics
        assert with_spans == client.forward([plain], loss).result().metrics
    service.release(client, "test over")
