"""Server-side custom losses: the graph rebuilder's allow-list (trainers/custom_graph.py), the
trainer running a rebuilt graph in one pass, and the official SDK's `create_custom_loss` +
`forward_backward_custom` against the server, compared with the SDK's own client-side path.

Graphs are traced with the SDK's own tracing code (`trace_loss`, `encode_graph`), so the
wire form tested is the one SDK 0.38 sends.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random

import pytest
import torch
from tinker.lib.public_interfaces.custom_loss import encode_graph, run_loss_handle, trace_loss

from rl.errors import InvalidRequestError
from rl.types import Datum, ModelInput, TensorData
from trainers.custom_graph import MAX_INPUTS, MAX_NODES, build, from_config
from trainers.validation import prepare_batch

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

PPO_RANKS = {"logprobs": 1, "logprobs_old": 1, "advantages": 1}


def ppo_like(logprobs, logprobs_old, advantages):
    ratio = torch.exp(logprobs - logprobs_old)
    clipped = torch.clamp(ratio, 0.8, 1.2)
    loss = -torch.minimum(ratio * advantages, clipped * advantages).sum()
    return loss, {"custom/ratio:mean": ratio.mean(), "custom/tokens:sum": (advantages != 0).sum()}


def wide(logprobs, mask, scale, table):
    """Rank 0, 1 and 2 inputs, methods, kwargs, slices, an attribute, inf and a dtype."""
    n = logprobs.shape[0]
    soft = torch.nn.functional.log_softmax(table, dim=-1)[:, 0]
    kept = torch.where(mask > 0, logprobs, torch.zeros_like(logprobs))
    head = kept[1:].float().clamp(max=float("inf")).mean(dim=0)
    loss = -(kept * scale).sum() / n + head.square() + (soft * mask).sum().detach()
    return loss, {"custom/soft:mean": soft.mean(), "custom/n:sum": mask.to(torch.float64).sum()}


WIDE_RANKS = {"logprobs": 1, "mask": 1, "scale": 0, "table": 2}


def config_of(fn, ranks) -> dict:
    """The trainer's loss_fn_config for `fn`, traced and encoded by the SDK."""
    handle = trace_loss(fn, ranks, "test-session")
    return {
        "name": handle.name,
        "inputs": [i.model_dump() for i in handle.inputs],
        "graph": encode_graph(handle).model_dump(mode="json"),
    }


def rebuilt(fn, ranks):
    config = config_of(fn, ranks)
    return build(config["name"], config["inputs"], config["graph"])


# -- the rebuilt graph computes what the function computes ------------------------------------


@pytest.mark.parametrize(
    ("fn", "ranks", "make"),
    [
        (
            ppo_like,
            PPO_RANKS,
            lambda g: [torch.randn(9, generator=g), torch.randn(9, generator=g)],
        ),
        (
            wide,
            WIDE_RANKS,
            lambda g: [
                (torch.rand(9, generator=g) > 0.3).float(),
                torch.tensor(0.7),
                torch.randn(9, 5, generator=g),
            ],
        ),
    ],
)
def test_rebuilt_graph_gives_the_functions_value_and_gradient(fn, ranks, make):
    graph = rebuilt(fn, ranks)
    g = torch.Generator().manual_seed(0)
    logprobs = (-torch.rand(9, generator=g) * 3).requires_grad_(True)
    inputs = make(g)
    got_loss, got_metrics = graph(logprobs, *inputs)
    (got_grad,) = torch.autograd.grad(got_loss, logprobs)
    want_loss, want_metrics = fn(logprobs, *inputs)
    (want_grad,) = torch.autograd.grad(want_loss, logprobs)
    assert got_loss.item() == pytest.approx(want_loss.item(), rel=1e-6)
    assert torch.allclose(got_grad, want_grad, atol=1e-7)
    assert got_metrics.keys() == want_metrics.keys()
    for key in want_metrics:
        assert got_metrics[key].item() == pytest.approx(want_metrics[key].item(), rel=1e-6)


def test_the_specs_json_example_by_hand():
    """The PPO-like graph as the spec prints it, on numbers worked out by hand: ratios
    e^0.5 = 1.65 (clipped to 1.2) and e^-1 = 0.37 (clipped to 0.8), advantages 2 and -1."""
    graph = build("ppo_like", [dict(name=k, rank=v) for k, v in PPO_RANKS.items()], SPEC_GRAPH)
    loss, metrics = graph(
        torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0]), torch.tensor([2.0, -1.0])
    )
    # min(1.65 * 2, 1.2 * 2) = 2.4; min(0.37 * -1, 0.8 * -1) = -0.8; loss = -(2.4 - 0.8)
    assert loss.item() == pytest.approx(-1.6, rel=1e-6)
    assert metrics["custom/ratio:mean"].item() == pytest.approx((math.exp(0.5) + math.exp(-1)) / 2)


def test_batch_loss_sums_losses_and_reduces_metrics_as_the_sdk_does():
    """Per-datum losses summed, :sum metrics summed, :mean averaged: the SDK's own
    `run_loss_handle` on the same datums gives the same numbers."""
    from tinker import types as tt

    handle = trace_loss(ppo_like, PPO_RANKS, "s")
    graph = rebuilt(ppo_like, PPO_RANKS)
    rng = torch.Generator().manual_seed(1)
    lengths = (4, 7, 2)
    logprobs = [-torch.rand(n, generator=rng) for n in lengths]
    inputs = [
        {"logprobs_old": -torch.rand(n, generator=rng), "advantages": torch.randn(n, generator=rng)}
        for n in lengths
    ]
    data = [
        tt.Datum(
            model_input=tt.ModelInput.from_ints(list(range(n))),
            loss_fn_inputs={"target_tokens": list(range(n)), **x},
        )
        for n, x in zip(lengths, inputs, strict=True)
    ]
    want_loss, want_metrics = run_loss_handle(handle, data, logprobs)
    loss, metrics = graph.batch_loss(logprobs, inputs, torch.device("cpu"))
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-6)
    assert metrics["loss:sum"] == pytest.approx(want_loss.item(), rel=1e-6)
    for key, value in want_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-6)
    assert metrics["custom/tokens:sum"] == sum(lengths)  # summed, not averaged


def test_configs_are_rebuilt_once_and_cached_by_content():
    config = config_of(ppo_like, PPO_RANKS)
    first = from_config(config)
    assert from_config(json.loads(json.dumps(config))) is first
    renamed = {**config, "name": "other"}
    assert from_config(renamed) is not first


# -- the allow-list ----------------------------------------------------------------------------

SPEC_GRAPH = {
    "format": 1,
    "nodes": [
        {"op": "placeholder", "name": "logprobs", "target": "logprobs", "args": [], "kwargs": {}},
        {"op": "placeholder", "name": "logprobs_old", "target": "logprobs_old"},
        {"op": "placeholder", "name": "advantages", "target": "advantages"},
        {
            "op": "call_function",
            "name": "sub",
            "target": "operator.sub",
            "args": [{"ref": "logprobs"}, {"ref": "logprobs_old"}],
        },
        {"op": "call_function", "name": "exp", "target": "torch.exp", "args": [{"ref": "sub"}]},
        {
            "op": "call_function",
            "name": "clamp",
            "target": "torch.clamp",
            "args": [{"ref": "exp"}, 0.8, 1.2],
        },
        {
            "op": "call_function",
            "name": "mul",
            "target": "operator.mul",
            "args": [{"ref": "exp"}, {"ref": "advantages"}],
        },
        {
            "op": "call_function",
            "name": "mul_1",
            "target": "operator.mul",
            "args": [{"ref": "clamp"}, {"ref": "advantages"}],
        },
        {
            "op": "call_function",
            "name": "minimum",
            "target": "torch.minimum",
            "args": [{"ref": "mul"}, {"ref": "mul_1"}],
        },
        {"op": "call_method", "name": "sum_1", "target": "sum", "args": [{"ref": "minimum"}]},
        {
            "op": "call_function",
            "name": "neg",
            "target": "operator.neg",
            "args": [{"ref": "sum_1"}],
        },
        {"op": "call_method", "name": "mean", "target": "mean", "args": [{"ref": "exp"}]},
        {
            "op": "output",
            "name": "output",
            "target": "output",
            "args": [{"tuple": [{"ref": "neg"}, {"dict": {"custom/ratio:mean": {"ref": "mean"}}}]}],
        },
    ],
}
INPUTS = [{"name": k, "rank": v} for k, v in PPO_RANKS.items()]


def with_node(index: int, **fields) -> dict:
    """SPEC_GRAPH with node `index`'s fields replaced."""
    graph = copy.deepcopy(SPEC_GRAPH)
    graph["nodes"][index].update(fields)
    return graph


def refused(graph, inputs=INPUTS) -> str:
    with pytest.raises(InvalidRequestError) as caught:
        build("ppo_like", inputs, graph)
    return str(caught.value)


@pytest.mark.parametrize(
    ("target", "op"),
    [
        ("os.system", "call_function"),
        ("posix.system", "call_function"),
        ("subprocess.run", "call_function"),
        ("builtins.eval", "call_function"),
        ("builtins.exec", "call_function"),
        ("builtins.__import__", "call_function"),
        ("builtins.open", "call_function"),
        ("eval", "call_function"),
        ("torch.load", "call_function"),
        ("torch.save", "call_function"),
        ("torch.ops.aten.exp", "call_function"),
        ("torch.exp.__globals__", "call_function"),
        ("pickle.loads", "call_function"),
        ("backward", "call_method"),
        ("item", "call_method"),
        ("numpy", "call_method"),
        ("register_hook", "call_method"),
        ("__reduce_ex__", "call_method"),
        ("exp_", "call_method"),
        ("__class__", "call_method"),
    ],
)
def test_operations_outside_the_allow_list_are_named_user_errors(target, op):
    message = refused(with_node(4, op=op, target=target))
    assert "node 'exp'" in message and repr(target) in message and "allow-list" in message


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"op": "call_module", "target": "linear"}, "calls a module"),
        ({"op": "get_attr", "target": "weight"}, "captured attribute"),
        ({"target": "getattr", "args": [{"ref": "sub"}, "__class__"]}, "getattr reads only"),
        ({"target": "getattr", "args": [{"ref": "sub"}, ["shape"]]}, "getattr reads only"),
        ({"args": [{"ref": "nowhere"}]}, "'nowhere', which is not an earlier node"),
        ({"args": [{"ref": "mean"}]}, "'mean', which is not an earlier node"),  # a later node
        ({"args": [{"pickle": "gASVAA=="}]}, "not an encoded value"),
        ({"args": [{"ref": "sub", "extra": 1}]}, "not an encoded value"),
        ({"args": [{"float": "1e999"}]}, "float '1e999' is not one of"),
        ({"args": [{"dtype": "object"}]}, "dtype 'object' is not one of"),
        ({"kwargs": {"out": {"ref": "sub"}}}, "out= argument"),
        ({"args": [[[[[[[[[[1]]]]]]]]]]}, "nested deeper"),
        ({"op": "placeholder"}, "misplaced"),
        ({"op": "no_such_op"}, "unknown op"),
        ({"name": "sub"}, "not unique"),
        ({"args": {"ref": "sub"}}, "args must be a list"),
        ({"code": "import os"}, "nothing else"),
    ],
)
def test_malformed_or_forbidden_nodes_are_named_user_errors(change, words):
    assert words in refused(with_node(4, **change))


def test_inputs_outputs_metrics_and_size_are_checked():
    too_many = [{"name": "logprobs", "rank": 1}] + [
        {"name": f"x{i}", "rank": 1} for i in range(MAX_INPUTS)
    ]
    assert f"1 to {MAX_INPUTS}" in refused(SPEC_GRAPH, too_many)
    assert "first input must be logprobs" in refused(SPEC_GRAPH, INPUTS[1:] + INPUTS[:1])
    assert "first input must be logprobs" in refused(SPEC_GRAPH, [{"name": "logprobs", "rank": 0}])
    assert "ranks are 0, 1 or 2" in refused(SPEC_GRAPH, [{"name": "logprobs", "rank": 3}])
    assert "must match" in refused(SPEC_GRAPH, [*INPUTS[:2], {"name": "Adv", "rank": 1}])
    renamed = [*INPUTS[:2], {"name": "advantages_x", "rank": 1}]
    assert "must be the placeholder of input 'advantages_x'" in refused(SPEC_GRAPH, renamed)
    for key in ("loss:sum", "custom/Ratio:mean", "custom/ratio:max", "custom/:sum", "ratio"):
        graph = copy.deepcopy(SPEC_GRAPH)
        graph["nodes"][-1]["args"][0]["tuple"][1] = {"dict": {key: {"ref": "mean"}}}
        assert f"metric key {key!r}" in refused(graph)
    constant = copy.deepcopy(SPEC_GRAPH)
    constant["nodes"][-1]["args"][0]["tuple"][0] = 1.0
    assert "returned loss must be a tensor" in refused(constant)
    no_output = copy.deepcopy(SPEC_GRAPH)
    no_output["nodes"].pop()
    assert "must be the output" in refused(no_output)
    huge = copy.deepcopy(SPEC_GRAPH)
    filler = [
        {"op": "call_function", "name": f"n{i}", "target": "torch.exp", "args": [{"ref": "sub"}]}
        for i in range(MAX_NODES)
    ]
    huge["nodes"][4:4] = filler
    assert f"at most {MAX_NODES}" in refused(huge)
    assert "format" in refused({**SPEC_GRAPH, "format": 2})
    assert "graph must be" in refused([SPEC_GRAPH])


def test_python_arithmetic_cannot_build_huge_values():
    """Without a tensor operand, arithmetic takes numbers only: no string or shape blow-up."""
    graph = copy.deepcopy(SPEC_GRAPH)
    graph["nodes"][3:3] = [
        {"op": "call_function", "name": "shape", "target": "getattr"},
        {"op": "call_function", "name": "big", "target": "operator.mul"},
    ]
    graph["nodes"][3]["args"] = [{"ref": "logprobs"}, "shape"]
    graph["nodes"][4]["args"] = [{"ref": "shape"}, 10**9]
    rebuilt_graph = build("ppo_like", INPUTS, graph)
    with pytest.raises(InvalidRequestError, match=r"node 'big' \(call_function 'operator.mul'\)"):
        rebuilt_graph(torch.zeros(3), torch.zeros(3), torch.zeros(3))
    graph["nodes"][4]["args"] = ["x", 10**9]
    with pytest.raises(InvalidRequestError, match="takes tensors or numbers"):
        build("ppo_like", INPUTS, graph)(torch.zeros(3), torch.zeros(3), torch.zeros(3))
    graph["nodes"][4].update(target="operator.pow", args=[7, 10**6])
    with pytest.raises(InvalidRequestError, match="too large"):
        build("ppo_like", INPUTS, graph)(torch.zeros(3), torch.zeros(3), torch.zeros(3))


def test_runtime_failures_name_the_node():
    graph = build("ppo_like", INPUTS, SPEC_GRAPH)
    with pytest.raises(InvalidRequestError, match=r"node 'sub' \(call_function 'operator.sub'\)"):
        graph(torch.zeros(3), torch.zeros(4), torch.zeros(3))
    not_scalar = copy.deepcopy(SPEC_GRAPH)
    not_scalar["nodes"][-1]["args"][0]["tuple"][0] = {"ref": "minimum"}
    with pytest.raises(InvalidRequestError, match="scalar tensor as its loss"):
        build("ppo_like", INPUTS, not_scalar)(torch.zeros(3), torch.zeros(3), torch.zeros(3))


# -- the trainer's validation ------------------------------------------------------------------


def datum(n: int, rng: random.Random, **inputs) -> Datum:
    tokens = [rng.randrange(100) for _ in range(n + 1)]
    return Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], **inputs},
    )


def test_custom_batches_take_any_keys_at_their_declared_ranks():
    config = config_of(wide, WIDE_RANKS)
    rng = random.Random(0)

    def ok(n):
        return datum(
            n,
            rng,
            mask=[1.0] * n,
            scale=TensorData(data=[0.5], dtype="float32", shape=[]),
            table=TensorData.from_numpy(torch.zeros(n, 3).numpy()),
            unread=[1.0, 2.0],  # sent along (the SDK sends every key), not read
        )

    batch = prepare_batch([ok(3), ok(5)], "custom", config, vocab_size=100, max_context=64)
    assert batch.custom is not None and batch.custom.input_names == ("mask", "scale", "table")
    assert batch.datums[0].inputs["scale"].ndim == 0 and "unread" not in batch.datums[0].inputs
    # A scalar that the protobuf wire turned into one value is still a scalar.
    one = ok(3)
    one.loss_fn_inputs["scale"] = TensorData(data=[0.5], dtype="float32", shape=[1])
    prepare_batch([one], "custom", config, vocab_size=100, max_context=64)

    def error(data, cfg=config) -> str:
        with pytest.raises(InvalidRequestError) as caught:
            prepare_batch(data, "custom", cfg, vocab_size=100, max_context=64)
        return str(caught.value)

    missing = ok(4)
    del missing.loss_fn_inputs["table"]
    assert "datum 1: loss_fn_inputs is missing ['table']" in error([ok(3), missing])
    flat = ok(4)
    flat.loss_fn_inputs["table"] = TensorData(data=[0.0] * 4, dtype="float32", shape=[4])
    assert "datum 0: loss_fn_inputs['table'] has rank 1" in error([flat])
    top_k = config_of(ppo_like, {"logprobs": 2, "logprobs_old": 1, "advantages": 1})
    one_d = datum(3, rng, logprobs_old=[0.0] * 3, advantages=[1.0] * 3)
    assert "rank 1, but custom loss 'ppo_like' declares logprobs" in error([one_d], top_k)
    assert "loss_fn_config with keys" in error([ok(3)], {"loss_id": "abc"})
    # Found before the model runs (a shared pass would otherwise fail the others' calls too):
    # inputs that do not fit the graph, and a loss with no gradient.
    ppo = config_of(ppo_like, PPO_RANKS)
    long = datum(3, rng, logprobs_old=[0.0] * 4, advantages=[1.0] * 3)
    assert "datum 0: custom loss 'ppo_like': node 'sub' (call_function 'operator.sub')" in error(
        [long], ppo
    )

    def detached(logprobs, advantages):
        loss = (logprobs.detach() * advantages).sum()
        return loss, {}

    flat_config = config_of(detached, {"logprobs": 1, "advantages": 1})
    assert "does not depend on logprobs" in error(
        [datum(3, rng, advantages=[1.0] * 3)], flat_config
    )
    bad_token = ok(2)
    bad_token.loss_fn_inputs["target_tokens"] = TensorData(data=[5, 150], dtype="int64", shape=[2])
    assert "token id 150 at flat index 1 is outside" in error([bad_token])


# -- in the trainer: one pass, the same numbers as the built-in ppo ---------------------------


def test_a_ppo_graph_trains_exactly_as_the_builtin_ppo(tiny_model):
    """The spec's PPO-like loss as a graph and the built-in `ppo` (the same objective, with
    no weights) on twin adapters: the same loss, gradient norm and weights after 2 steps."""
    from rl.types import AdamParams, LoraConfig
    from trainers import TrainerConfig
    from trainers.trainer import LoraTrainer

    trainer = LoraTrainer(tiny_model, TrainerConfig(dtype="float32", num_threads=1))
    for model_id in ("graph", "builtin"):
        trainer.create_adapter(model_id, LoraConfig(rank=4, seed=3))
    config = config_of(ppo_like, PPO_RANKS)
    rng = random.Random(5)
    for _ in range(2):
        data = []
        for n in (6, 3, 9):
            old = [-rng.random() * 4 for _ in range(n)]
            adv = [rng.choice([-1.0, 0.0, 2.0]) for _ in range(n)]
            data.append(datum(n, rng, logprobs=old, logprobs_old=old, advantages=adv))
        graph = trainer.forward_backward("graph", data, "custom", config)
        builtin_data = [
            Datum(
                model_input=d.model_input,
                loss_fn_inputs={k: v for k, v in d.loss_fn_inputs.items() if k != "logprobs_old"},
            )
            for d in data
        ]
        builtin = trainer.forward_backward("builtin", builtin_data, "ppo")
        assert graph.metrics["loss:sum"] == pytest.approx(builtin.metrics["loss:sum"], rel=1e-5)
        steps = [
            trainer.optim_step(m, AdamParams(learning_rate=1e-2)).metrics["grad_norm:mean"]
            for m in ("graph", "builtin")
        ]
        assert steps[0] == pytest.approx(steps[1], rel=1e-4) and steps[0] > 0
    probe = [datum(7, rng, weights=[1.0] * 7)]
    a, b = (
        trainer.forward(m, probe).loss_fn_outputs[0]["logprobs"].tolist()
        for m in ("graph", "builtin")
    )
    assert a == pytest.approx(b, abs=1e-5)
    # A bad custom call is a user error and changes nothing: the next step still matches.
    with pytest.raises(InvalidRequestError, match="missing"):
        trainer.forward_backward("graph", [datum(3, rng, advantages=[1.0] * 3)], "custom", config)
    with pytest.raises(InvalidRequestError, match="no gradient accumulated"):
        trainer.optim_step("graph", AdamParams(learning_rate=1e-2))


# -- through the official SDK, against the server --------------------------------------------


@pytest.fixture(scope="module")
def server(ray_local, tiny_model, tmp_path_factory):
    import os

    from rl.server import ServerConfig, build_service, start_in_thread
    from rl.server.keys import KeyStore
    from samplers.config import SamplerConfig
    from trainers.config import TrainerConfig

    os.environ["TINKER_TELEMETRY"] = "0"
    config = ServerConfig(
        port=0,
        home=str(tmp_path_factory.mktemp("custom-server")),
        models=tiny_model,
        sampler=SamplerConfig(engine="torch", num_threads=1),
        trainer=TrainerConfig(dtype="float32", num_threads=1),
        long_poll_s=2.0,
        max_chunk_datums=2,  # a batch of 3 goes as 2 requests: the loss still sums over all
    )
    keys = KeyStore(config.resolved_keys_file())
    api_keys = {"alice": keys.add("alice"), "bob": keys.add("bob")}
    service = build_service(config)
    running = start_in_thread(config, service)
    yield running.url, api_keys
    running.stop()
    service.close()


def sdk_data(seed: int):
    """Datums with every kind of input the loss reads: sampler logprobs under another name,
    advantages, and a rank-0 scale (a torch scalar; the SDK keeps its shape [])."""
    from tinker import types as tt

    rng = random.Random(seed)
    out = []
    for n in (5, 8, 3):
        tokens = [rng.randrange(3000) for _ in range(n + 1)]
        out.append(
            tt.Datum(
                model_input=tt.ModelInput.from_ints(tokens[:-1]),
                loss_fn_inputs={
                    "target_tokens": tokens[1:],
                    "logprobs_old": torch.tensor([-rng.random() * 8 for _ in range(n)]),
                    "advantages": torch.tensor([rng.choice([-1.0, 0.5, 2.0]) for _ in range(n)]),
                    "scale": torch.tensor(0.5 + seed),
                },
            )
        )
    return out


def with_inputs(d, loss_fn_inputs):
    """An SDK datum with other loss_fn_inputs."""
    from tinker import types as tt

    return tt.Datum(model_input=d.model_input, loss_fn_inputs=loss_fn_inputs)


def scaled_ppo(logprobs, logprobs_old, advantages, scale):
    ratio = torch.exp(logprobs - logprobs_old)
    clipped = torch.clamp(ratio, 0.8, 1.2)
    loss = -torch.minimum(ratio * advantages, clipped * advantages).sum() * scale
    return loss, {"custom/ratio:mean": ratio.mean(), "custom/scale:sum": scale}


def test_sdk_server_side_loss_equals_the_client_side_path(server, tiny_model):
    """`create_custom_loss` uploads the graph (the server says custom_loss_server_side), and
    `forward_backward_custom` then runs it in one server call; the same LossHandle without
    its loss_id runs on the client in two passes. Twin models, same losses and metrics,
    same gradient norms, same logprobs after each step."""
    import tinker
    from tinker import types as tt

    url, api_keys = server
    alice = tinker.ServiceClient(base_url=url, api_key=api_keys["alice"])
    assert alice.holder.get_client_config().custom_loss_server_side is True
    ranks = {"logprobs": 1, "logprobs_old": 1, "advantages": 1, "scale": 0}
    handle = alice.create_custom_loss(scaled_ppo, ranks).result()
    assert handle.loss_id == f"{alice.holder.get_session_id()}:loss:0"
    local = dataclasses.replace(handle, loss_id=None)  # the SDK's client-side path
    server_side = alice.create_lora_training_client(tiny_model, rank=4, seed=5).result()
    client_side = alice.create_lora_training_client(tiny_model, rank=4, seed=5).result()
    adam = tt.AdamParams(learning_rate=1e-2)
    probe = [
        with_inputs(
            d,
            {
                "target_tokens": d.loss_fn_inputs["target_tokens"],
                "weights": [1.0] * d.model_input.length,
            },
        )
        for d in sdk_data(9)
    ]
    for step in range(2):
        data = sdk_data(step)
        got = server_side.forward_backward_custom(data, handle)
        want = client_side.forward_backward_custom(data, local)
        got_step, want_step = server_side.optim_step(adam), client_side.optim_step(adam)
        got, want = got.result(), want.result()
        assert "surrogate_loss:sum" in want.metrics and "surrogate_loss:sum" not in got.metrics
        for key in ("loss:sum", "custom/ratio:mean", "custom/scale:sum"):
            assert got.metrics[key] == pytest.approx(want.metrics[key], rel=1e-5), key
        assert got.metrics["custom/scale:sum"] == pytest.approx(3 * (0.5 + step))
        assert got_step.result().metrics["grad_norm:mean"] == pytest.approx(
            want_step.result().metrics["grad_norm:mean"], rel=1e-4
        )
        a, b = (
            [x for o in c.forward(probe, "cross_entropy").result().loss_fn_outputs
             for x in o["logprobs"].tolist()]
            for c in (server_side, client_side)
        )  # fmt: skip
        assert a == pytest.approx(b, abs=1e-5)


def test_sdk_custom_loss_errors_are_clear_and_scoped(server, tiny_model):
    import httpx
    import tinker

    url, api_keys = server
    alice = tinker.ServiceClient(base_url=url, api_key=api_keys["alice"])
    bob = tinker.ServiceClient(base_url=url, api_key=api_keys["bob"])
    handle = alice.create_custom_loss(ppo_like, PPO_RANKS).result()
    batch = sdk_data(1)
    # Another tenant's loss id is unknown to it.
    bobs = bob.create_lora_training_client(tiny_model, rank=4, seed=1).result()
    with pytest.raises(Exception, match="not found"):
        bobs.forward_backward(batch, "custom", {"loss_id": handle.loss_id}).result()
    # A datum without an input the loss reads: a user error naming it; nothing changes.
    client = alice.create_lora_training_client(tiny_model, rank=4, seed=1).result()
    targets_only = {"target_tokens": batch[0].loss_fn_inputs["target_tokens"]}
    broken = [with_inputs(batch[0], targets_only)]
    missing = r"datum 0: loss_fn_inputs is missing \['logprobs_old', 'advantages'\]"
    with pytest.raises(Exception, match=missing):
        client.forward_backward(broken, "custom", {"loss_id": handle.loss_id}).result()
    with pytest.raises(Exception, match="no gradient accumulated"):  # the failed call added none
        client.optim_step(tinker.types.AdamParams(learning_rate=1e-2)).result()
    assert client.forward_backward_custom(batch, handle).result().metrics["loss:sum"]
    # A graph outside the allow-list, sent by hand (the SDK refuses to trace one): the
    # creation's future fails with a user error that names the node and the function.
    graph = with_node(4, target="os.system", args=["echo pwned"])
    body = {
        "session_id": alice.holder.get_session_id(),
        "custom_loss_seq_id": 99,
        "name": "evil",
        "inputs": INPUTS,
        "graph": graph,
        "type": "create_custom_loss",
    }
    with httpx.Client(base_url=url + "/api/v1", headers={"X-API-Key": api_keys["alice"]}) as http:
        request_id = http.post("/create_custom_loss", json=body).json()["request_id"]
        answer = http.post("/retrieve_future", json={"request_id": request_id}).json()
        assert answer["category"] == "user"
        assert "node 'exp' (call_function 'os.system')" in answer["error"]
        assert "not in the allow-list" in answer["error"]
        body["session_id"] = bob.holder.get_session_id()  # another tenant's session
        assert http.post("/create_custom_loss", json=body).status_code == 404
    with httpx.Client(base_url=url + "/api/v1") as anonymous:  # no key: refused
        assert anonymous.post("/create_custom_loss", json=body).status_code == 401
