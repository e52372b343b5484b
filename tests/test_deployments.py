"""The Prefect deployments of deploy/prefect/prefect.yaml for real: ``prefect server start`` on
loopback, a process work pool, every process deployment, a tag concurrency limit and a worker,
all as deploy/README.md has them; runs started with ``prefect deployment run`` or the API and
checked through the API (states, artifacts, parameter schemas, task run times).

One server and worker serve the module: starting them takes about half of this file's time."""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from support import REPO, free_port, wait_for_port

from vitscope.analyzer import AnalyzeConfig
from vitscope.composition.options import field_docs
from vitscope.composition.pipeline import PIPELINE_FILLED, PipelineConfig, TrainStage
from vitscope.evaluator import EvaluateConfig
from vitscope.extractor import ExtractConfig
from vitscope.trainer import SweepConfig, TrainConfig

POOL = "vitscope-process"
GPU_TAG = "gpu-test-worker"
"""The worker's own GPU tag (VITSCOPE_GPU_TAG), under a tag concurrency limit of 1."""
PREFECT = str(Path(sys.executable).with_name("prefect"))


@dataclass
class PrefectStack:
    """A running Prefect server with vitscope's process deployments and a worker serving them."""

    api_url: str
    env: dict[str, str]
    ran: list[list[str]] = field(default_factory=list)
    """The arguments of every ``prefect`` command run so far."""

    def cli(self, *args: str) -> str:
        """Run a ``prefect`` command from the repository root; its output (raises if it fails)."""
        self.ran.append(list(args))
        proc = subprocess.run([PREFECT, *args], cwd=REPO, env=self.env, capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, f"prefect {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    def popen(self, *args: str, env: dict[str, str] | None = None, **kw: Any) -> subprocess.Popen:
        """Start a ``prefect`` command from the repository root."""
        self.ran.append(list(args))
        return subprocess.Popen([PREFECT, *args], cwd=REPO, env=env or self.env, **kw)

    @contextmanager
    def client(self) -> Iterator[Any]:
        """A synchronous Prefect client on this server (whatever server the session's settings name)."""
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: self.api_url}), get_client(sync_client=True) as client:
            yield client

    @contextmanager
    def holding(self, limit: str) -> Iterator[None]:
        """One slot of a concurrency limit, held by this process until the block ends: through the
        API, since Prefect's ``concurrency()`` also emits events, which the session would go on
        trying to deliver to this server once it has stopped."""
        with self.client() as client:
            lease = client.increment_concurrency_slots_with_lease(names=[limit], slots=1, mode="concurrency",
                                                                  lease_duration=600).json()
            assert lease["limits"], f"no concurrency limit {limit}"
            try:
                yield
            finally:
                client.release_concurrency_slots_with_lease(UUID(lease["lease_id"]))

    def start(self, deployment: str, cfg: dict[str, Any]) -> UUID:
        """A flow run of ``deployment`` with parameter ``cfg``, created through the API."""
        with self.client() as client:
            dep = client.read_deployment_by_name(deployment)
            return client.create_flow_run_from_deployment(dep.id, parameters={"cfg": cfg}).id

    def wait(self, run_id: UUID, timeout: float = 240) -> Any:
        """The flow run once its state is final."""
        deadline = time.monotonic() + timeout
        with self.client() as client:
            while time.monotonic() < deadline:
                run = client.read_flow_run(run_id)
                if run.state and run.state.is_final():
                    return run
                time.sleep(0.5)
        raise TimeoutError(f"flow run {run_id} still {run.state_name} after {timeout} s")

    def task_runs(self, run_id: UUID) -> list[Any]:
        """The task runs of a flow run."""
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        with self.client() as client:
            return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id])))


def _stop(proc: subprocess.Popen) -> None:
    """End a process started in a session of its own, and what it started (the server's uvicorn,
    the worker's flow runs)."""
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="module")
def prefect_stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectStack]:
    """deploy/README.md's Prefect section on loopback: a server, the process pool, the process
    deployments, a tag concurrency limit of 1 on the worker's GPU tag, and a worker."""
    home = tmp_path_factory.mktemp("prefect-stack")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1",
           # The worker looks for runs every second instead of every ten, and a task waiting for a
           # slot asks again within a second instead of within its limit's average hold (up to 30 s).
           "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_SERVER_TASKS_TAG_CONCURRENCY_SLOT_WAIT_SECONDS": "1"}
    stack = PrefectStack(env["PREFECT_API_URL"], env)
    with open(home / "server.log", "w") as server_log, open(home / "worker.log", "w") as worker_log:
        server = stack.popen("server", "start", "--host", "127.0.0.1", "--port", str(port), stdout=server_log,
                             stderr=subprocess.STDOUT, start_new_session=True)
        worker = None
        try:
            # Made while the server starts, for the runs.
            request.getfixturevalue("tiny_model_name")
            request.getfixturevalue("planted_data")
            wait_for_port(port, server, timeout=120)
            stack.cli("work-pool", "create", POOL, "--type", "process")
            worker = stack.popen("worker", "start", "--pool", POOL, env={**env, "VITSCOPE_GPU_TAG": GPU_TAG},
                                 stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True)
            with ThreadPoolExecutor(2) as side_by_side:
                done = [side_by_side.submit(stack.cli, "concurrency-limit", "create", GPU_TAG, "1"),
                        side_by_side.submit(stack.cli, "--no-prompt", "deploy", "--prefect-file", "deploy/prefect/prefect.yaml",
                                    "--name", "*-process")]
                for d in done:
                    d.result()
            yield stack
        finally:
            if worker is not None:
                _stop(worker)
            _stop(server)


@dataclass
class Runs:
    """The flow runs of this module's tests, by what they are for."""

    pipeline: UUID
    store: Path
    failing: UUID
    gpu_pair: list[UUID]


@pytest.fixture(scope="module")
def runs(prefect_stack, tiny_model_name, planted_data, tmp_path_factory) -> Runs:
    """Every run the tests below check, started together: each flow run is a process that spends
    ~10 s of a core importing torch and Prefect, so side by side they take half as long on two
    cores. The test process holds the one slot of the worker's GPU tag until both extract runs of
    the pair have their task waiting for it, so that both are due at once when it lets go."""
    tmp = tmp_path_factory.mktemp("runs")
    data, _ = planted_data
    store = tmp / "pipeline-store"
    with prefect_stack.holding(f"tag:{GPU_TAG}"):
        pipeline = prefect_stack.popen("deployment", "run", "vitscope-pipeline/pipeline-process", "--param",
                                       f"cfg={json.dumps(_pipeline_cfg(data, store, tiny_model_name))}",
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        failing = prefect_stack.start("vitscope-train/train-process",
                                      {"activations": "0123456789abcdef", "store": str(tmp / "empty")})
        pair = [prefect_stack.start("vitscope-extract/extract-process",
                                    {"data": str(data), "store": str(tmp / f"store-{n}"), "model": tiny_model_name,
                                     "pretrained": None, "layers": [-1], "workers": 0, "max_images": n,
                                     "device": "cpu", "progress": False}) for n in (16, 24)]
        out, _ = pipeline.communicate(timeout=120)
        assert pipeline.returncode == 0, out
        deadline = time.monotonic() + 180
        while sum(len(prefect_stack.task_runs(r)) for r in pair) < 2:
            assert time.monotonic() < deadline, "the extract runs' tasks never came to wait for the slot"
            time.sleep(0.5)
        assert not any(t.start_time for r in pair for t in prefect_stack.task_runs(r)), "a task ran without the slot"
    return Runs(UUID(re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)), store, failing, pair)


STAGES = {"vitscope-extract/extract-process": ExtractConfig, "vitscope-train/train-process": TrainConfig,
          "vitscope-sweep/sweep-process": SweepConfig, "vitscope-analyze/analyze-process": AnalyzeConfig,
          "vitscope-evaluate/evaluate-process": EvaluateConfig,
          "vitscope-pipeline/pipeline-process": PipelineConfig}
"""Each process deployment, and the config its parameter ``cfg`` is."""


def test_every_stage_is_a_deployment_whose_form_describes_its_settings(prefect_stack):
    with prefect_stack.client() as client:
        schemas = {name: client.read_deployment_by_name(name).parameter_openapi_schema for name in STAGES}
    for name, cls in STAGES.items():
        schema = schemas[name]
        assert schema["required"] == ["cfg"] and schema["properties"]["cfg"]["description"], name
        form = schema["definitions"][cls.__name__]
        docs = field_docs(cls)
        assert docs and {k: form["properties"][k].get("description") for k in docs if k in form["properties"]} == \
            {k: d for k, d in docs.items() if k in form["properties"]}, name
        assert form["additionalProperties"] is False, name
    train = schemas["vitscope-train/train-process"]["definitions"]["TrainConfig"]["properties"]
    assert "sae" not in train and "topk" in train["variant"]["enum"] and train["variant"]["default"] == "relu"
    assert train["k"]["anyOf"][0] == {"type": "integer"} and train["k"]["description"].startswith("topk, ")
    assert train["lr"] == {"default": 4e-4, "description": field_docs(TrainStage)["lr"], "title": "Lr", "type": "number"}
    # The pipeline's form leaves out what the pipeline sets itself (each stage's store and inputs).
    definitions = schemas["vitscope-pipeline/pipeline-process"]["definitions"]
    for stage, hidden in PIPELINE_FILLED.items():
        assert not set(hidden) & set(definitions[stage.__name__]["properties"]), stage
    assert "variant" in definitions["TrainStage"]["properties"]


def _pipeline_cfg(data: Path, store: Path, model: str) -> dict[str, Any]:
    """The pipeline on the tiny model, small enough for a few seconds, training a topk SAE."""
    return {"data": str(data), "store": str(store),
            "extract": {"model": model, "pretrained": None, "layers": [-1], "workers": 0, "images_per_shard": 16,
                        "max_images": 48, "device": "cpu", "progress": False},
            "train": {"variant": "topk", "k": 8, "expansion": 2, "batch_size": 512, "n_tokens": 8192,
                      "device": "cpu", "progress": False},
            "analyze": {"top_images": 4, "device": "cpu", "progress": False},
            "evaluate": {"images": 16, "device": "cpu", "progress": False}}


def test_pipeline_deployment_completes_and_publishes_its_artifacts(prefect_stack, runs):
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    run = prefect_stack.wait(runs.pipeline)
    assert run.state.is_completed(), run.state.message
    with prefect_stack.client() as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[run.id])))
    by_type: dict[str, list[Any]] = {}
    for a in artifacts:
        by_type.setdefault(a.type, []).append(a)
    # The SAE's metrics, a table of one row, trained as the flat form of its cfg asked.
    (table,) = by_type["table"]
    (row,) = json.loads(table.data)
    sae_id = row["sae_id"]
    assert row["variant"] == "topk" and row["k"] == 8 and row["nmse"] >= 0 and row["l0"] > 0
    # Its firing-frequency histogram, a PNG inside the image artifact's URL.
    (image,) = by_type["image"]
    assert image.key == f"sae-{sae_id[:12]}-frequency"
    assert base64.b64decode(image.data.removeprefix("data:image/png;base64,"))[:8] == b"\x89PNG\r\n\x1a\n"
    # What the pipeline published, with the command and the link that open the explorer on it.
    (result,) = [a for a in by_type["markdown"] if a.key == "pipeline-result"]
    assert f"vitscope explore --store {runs.store}" in result.data and f"?sae={sae_id}" in result.data
    assert (runs.store / "saes" / sae_id).is_dir()


def test_a_failing_stage_fails_the_run_with_the_stage_s_error(prefect_stack, runs):
    run = prefect_stack.wait(runs.failing)
    assert run.state.is_failed()
    assert "no published activation set '0123456789abcdef'" in run.state.message, run.state.message
    (train,) = prefect_stack.task_runs(run.id)
    assert train.state.is_failed() and train.run_count == 1  # a missing id is not retried


def test_a_gpu_limit_of_one_runs_two_stages_one_after_the_other(prefect_stack, runs):
    with prefect_stack.client() as client:
        assert client.read_concurrency_limit_by_tag(GPU_TAG).concurrency_limit == 1
    finished = [prefect_stack.wait(r) for r in runs.gpu_pair]
    assert all(r.state.is_completed() for r in finished), [r.state.message for r in finished]
    first, second = sorted((t for r in runs.gpu_pair for t in prefect_stack.task_runs(r)), key=lambda t: t.start_time)
    assert GPU_TAG in first.tags and GPU_TAG in second.tags
    assert first.end_time <= second.start_time, (first.start_time, first.end_time, second.start_time)
    # Nor did any other stage of this module's runs share the slot with another (a subflow's
    # task run in its parent stands for the subflow, whose own tasks take the slot).
    for r in (runs.pipeline, runs.failing):
        prefect_stack.wait(r)
    spans = sorted((t.start_time, t.end_time) for r in (runs.pipeline, runs.failing, *runs.gpu_pair)
                   for t in prefect_stack.task_runs(r) if t.start_time and not t.state.state_details.child_flow_run_id)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False)), spans


README = REPO / "deploy" / "README.md"
_WORDS = {"server", "start", "work-pool", "create", "deploy", "concurrency-limit", "worker", "deployment", "run"}
"""The words of the prefect subcommands above; any other argument is a value."""


def _shape(args: list[str]) -> tuple[str, ...]:
    """A prefect command's subcommand and options, its values left out."""
    return tuple(a if a.startswith("-") or a in _WORDS else "." for a in args)


def test_the_readme_runs_what_this_module_ran(prefect_stack, runs):
    from vitscope.composition import flows

    section = README.read_text().split("## 5. ", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    ran = {_shape(args) for args in prefect_stack.ran}
    by_name = {f.name: f for f in (flows.extract_flow, flows.train_flow, flows.sweep_flow, flows.analyze_flow,
                                   flows.evaluate_flow, flows.pipeline_flow)}
    commands = 0
    for line in re.sub(r"\\\n\s*", " ", block).splitlines():
        words = shlex.split(line, comments=True)
        while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):  # environment assignments
            words.pop(0)
        if not words or words[0] != "prefect":
            continue
        commands += 1
        assert _shape(words[1:]) in ran, f"deploy/README.md runs what no test ran: {line.strip()}"
        if words[1:3] == ["deployment", "run"]:
            # Its example parameters are valid for the deployment's flow.
            cfg = json.loads(words[words.index("--param") + 1].removeprefix("cfg="))
            by_name[words[3].split("/")[0]].validate_parameters({"cfg": cfg})
    assert commands >= 8
