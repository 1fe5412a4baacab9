"""lm-evaluation-harness through the server's OpenAI door (scripts/evals.sh), against the
RL loop's own grading of the same problems (slow: it sets up `.venv-eval` on first use and
starts a real server process).

A tiny random model answers nonsense, so its score says little; what is checked is that the
two evals are the same eval: for each problem lm-eval asked, its greedy reply through the door
is the reply our sampler gives the prompt the arithmetic env renders, and lm-eval's grade of
it is the env's. The SmolLM2 figures (base and a trained checkpoint) are in docs/server.md.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess

import pytest
import tinker
from server_process import ROOT, server_process
from transformers import AutoTokenizer

from envs.arithmetic import TASK
from envs.chat import ChatRenderer
from envs.problem import Problem, ProblemEnv

pytestmark = pytest.mark.slow
LIMIT = 8  # problems


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    with server_process(tiny_model, tmp_path_factory.mktemp("evals-server")) as running:
        yield running


def test_lm_eval_through_the_door_is_our_own_eval(server, tiny_model, tmp_path):
    url, key = server
    out = tmp_path / "evals"
    env = {**os.environ, "TINKER_BASE_URL": url, "TINKER_API_KEY": key}
    result = subprocess.run(
        ["bash", "scripts/evals.sh", tiny_model, "--limit", str(LIMIT), "--output_path", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-5000:])
    (results_file,) = out.rglob("results_*.json")
    (samples_file,) = out.rglob("samples_engineroom_arithmetic_level1_*.jsonl")
    score = json.loads(results_file.read_text())["results"]["engineroom_arithmetic_level1"]
    samples = [json.loads(line) for line in samples_file.read_text().splitlines()]
    assert len(samples) == LIMIT

    # Ours: the env's prompt, greedy for 16 tokens through the Tinker API, graded by the env.
    renderer = ChatRenderer(AutoTokenizer.from_pretrained(tiny_model))
    service = tinker.ServiceClient(base_url=url, api_key=key)
    sampler = service.create_sampling_client(base_model=tiny_model).result()
    greedy = tinker.types.SamplingParams(max_tokens=16, temperature=0.0)
    grades = []
    for sample in samples:
        problem = Problem(**sample["doc"])
        env = ProblemEnv(renderer, TASK, problem)
        prompt, stop = asyncio.run(env.initial_observation())
        params = greedy.model_copy(update={"stop": stop})
        answer = sampler.sample(tinker.types.ModelInput.from_ints(prompt), 1, params).result()
        tokens = answer.sequences[0].tokens
        reply = renderer.tokenizer.decode(tokens, skip_special_tokens=True)
        assert sample["resps"][0][0] == reply, problem
        grade = asyncio.run(env.step(tokens)).metrics["correct"]
        assert sample["exact_match"] == grade, problem
        grades.append(grade)
    assert score["exact_match,last_number"] == pytest.approx(sum(grades) / len(grades))
