"""The command line as a composition of the stages' configs: lazy dispatch, SAE families
derived from the registry (a family defined right here shows up), nested pipeline options whose
defaults are the stages' own, and clear errors for settings that do not exist or belong to
another family."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from vitscope.composition.cli import SUBCOMMANDS, SUMMARIES, config_class, main, parse
from vitscope.composition.pipeline import (
    PIPELINE_FILLED,
    AnalyzeStage,
    ExtractStage,
    PipelineConfig,
    TrainStage,
)
from vitscope.groundtruth import GroundTruth, write_ground_truth_set
from vitscope.sae import LossContext, LossResult, Sae, SaeHyper, TopKHyper, load_sae_from
from vitscope.store import LocalStore
from vitscope.trainer import TrainConfig, train


def run_cli(*argv: str) -> tuple[int, str]:
    """``vitscope argv...`` in this process: (exit status, what it printed)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = main(list(argv))
        except SystemExit as e:
            code = e.code
    return code or 0, out.getvalue()


def test_a_family_defined_in_a_test_trains_saves_loads_back_and_is_on_the_command_line(tmp_path):
    class SquaredPenaltySae(Sae):
        """ReLU codes with a squared-activation penalty (a family that exists only in this test)."""

        variant = "squared"
        summary = "ReLU with a squared-activation penalty"

        @dataclass(frozen=True)
        class Hyper(SaeHyper):
            knob = "l2_coeff"
            l2_coeff: float = 0.5
            """Weight of the squared-activation penalty."""

        def activate(self, pre: torch.Tensor) -> torch.Tensor:
            return torch.relu(pre)

        def loss(self, x_norm: torch.Tensor, ctx: LossContext = LossContext()) -> LossResult:
            x_hat, z = self.forward_normalized(x_norm)
            recon = (x_hat - x_norm).pow(2).sum(dim=-1).mean()
            penalty = z.pow(2).sum(dim=-1).mean()
            active = z > 0
            return LossResult(recon + self.hyper.l2_coeff * ctx.sparsity_scale * penalty, recon, active.sum(dim=0),
                              active.sum(dim=-1).float().mean(), {"l2": penalty})

    try:
        store = LocalStore(tmp_path)
        m = write_ground_truth_set(store, GroundTruth(n_images=64, grid=(2, 2), d_model=16, n_directions=32))
        res = train(TrainConfig(activations=m.set_id, store=str(tmp_path), sae=SquaredPenaltySae.Hyper(l2_coeff=0.25),
                                expansion=2, batch_size=64, n_tokens=1024, init_sample=256, eval_tokens=256,
                                progress=False))
        sae, record = load_sae_from(store, res.sae_id)
        assert type(sae) is SquaredPenaltySae and sae.hyper == SquaredPenaltySae.Hyper(l2_coeff=0.25)
        assert record.config.variant == "squared" and record.training["l2_coeff"] == 0.25
        assert res.metrics["nmse"] < 1.0  # it learnt something
        code, text = run_cli("train", "--help")
        assert code == 0 and "squared" in text and "--l2-coeff" in text
        assert "ReLU with a squared-activation penalty" in text
        cfg = parse("train", ["--activations", m.set_id, "--variant", "squared", "--l2-coeff", "0.75"])
        assert cfg.sae == SquaredPenaltySae.Hyper(l2_coeff=0.75)
    finally:
        Sae.registry.pop("squared", None)


def test_a_family_must_bring_its_own_hyper_parameters():
    with pytest.raises(TypeError, match="must define its own Hyper"):
        class NoHyper(Sae):  # noqa: F841
            variant = "no-hyper"
    assert "no-hyper" not in Sae.registry


@pytest.mark.parametrize(("argv", "message"), [
    (["train", "--activations", "x", "--k", "5"], "k is not a setting of relu SAEs"),
    (["train", "--activations", "x", "--variant", "jumprelu", "--l1-coeff", "2"],
     "l1_coeff is not a setting of jumprelu SAEs"),
    (["sweep", "--set", "activations=x", "--grid", "kk=1,2"], None),  # parsed fine; the sweep refuses it
])
def test_a_setting_of_another_family_is_a_clear_error(argv, message):
    if message is None:
        from vitscope.trainer import ConfigError, sweep_configs

        with pytest.raises(ConfigError, match="unknown setting 'kk'"):
            sweep_configs(parse(argv[0], argv[1:]))
        return
    code, text = run_cli(*argv)
    assert code == 2 and message in text and "Traceback" not in text


def test_family_options_reach_the_config():
    cfg = parse("train", ["--activations", "x", "--variant", "topk", "--k", "64", "--aux-coeff", "0.1"])
    assert type(cfg) is TrainConfig and cfg.sae == TopKHyper(k=64, aux_coeff=0.1)
    assert parse("train", ["--activations", "x"]).sae == TrainConfig(activations="x").sae  # the default family


@pytest.mark.parametrize("sub", ["verify", "train"])
def test_help_imports_neither_prefect_nor_streamlit(sub):
    script = (f"import sys, contextlib, io\nfrom vitscope.composition.cli import main\n"
              f"with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
              f"    main([{sub!r}, '--help'])\n"
              "print(sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'streamlit')))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_top_level_help_lists_each_subcommand_with_its_config_summary():
    code, text = run_cli("--help")
    assert code == 0
    for sub in SUBCOMMANDS:
        doc = " ".join(inspect.cleandoc(config_class(sub).__doc__).split())
        assert doc.startswith(SUMMARIES[sub]), f"{sub}: summary {SUMMARIES[sub]!r} is not its config's first line"
        assert f"  {sub}" in text
    code, text = run_cli("nope")
    assert code == 2 and "unknown subcommand 'nope'" in text


def test_pipeline_nests_the_stage_configs_with_their_own_defaults():
    stages = {"extract": (ExtractStage, config_class("extract")), "train": (TrainStage, config_class("train")),
              "analyze": (AnalyzeStage, config_class("analyze"))}
    plain = PipelineConfig()
    for name, (stage, cfg_cls) in stages.items():
        assert issubclass(stage, cfg_cls)
        real = {f.name: f for f in dataclasses.fields(cfg_cls)}
        for f in dataclasses.fields(stage):
            if f.name in PIPELINE_FILLED[stage]:
                continue
            mine = getattr(getattr(plain, name), f.name)
            theirs = real[f.name].default_factory() if real[f.name].default_factory is not dataclasses.MISSING \
                else real[f.name].default
            assert mine == theirs, f"--{name}.{f.name}: pipeline default {mine!r}, stage default {theirs!r}"
    cfg = parse("pipeline", ["--data", "/imgs", "--extract.model", "ViT-L-14", "--extract.allow-random-weights",
                             "--train.variant", "topk", "--train.k", "8", "--analyze.top-images", "4"])
    assert (cfg.data, cfg.extract.model, cfg.extract.allow_random_weights) == ("/imgs", "ViT-L-14", True)
    assert type(cfg.train) is TrainStage and cfg.train.sae == TopKHyper(k=8) and cfg.analyze.top_images == 4
    assert cfg.train.expansion == TrainConfig(activations="").expansion  # what `vitscope train` has
    demo = parse("pipeline", [])
    assert demo == PipelineConfig.demo()
    assert parse("pipeline", ["--train.n-tokens", "1000"]).train.n_tokens == 1000  # options override the demo
    code, text = run_cli("pipeline", "--help")
    assert code == 0 and "--train.variant" in text and "--analyze.top-images" in text
    assert "--train.activations" not in text and "--extract.data" not in text and "--analyze.sae" not in text


def test_pipeline_config_round_trips_through_json_as_prefect_parameters():
    """A deployment's parameters are JSON: nested stage settings come back as the stage configs."""
    from pydantic import TypeAdapter

    adapter = TypeAdapter(PipelineConfig)
    cfg = adapter.validate_python(json.loads('{"store": "s3://b/p", "extract": {"device": "cuda", "model": "X"}}'))
    assert type(cfg.extract) is ExtractStage and cfg.extract.model == "X" and cfg.store == "s3://b/p"
    assert cfg.train == PipelineConfig().train
    custom = dataclasses.replace(PipelineConfig(), train=TrainStage(sae=TopKHyper(k=8)))
    assert adapter.validate_python(custom).train.sae == TopKHyper(k=8)  # an instance keeps its family


def readme_commands() -> list[list[str]]:
    """Every `vitscope ...` command line of the README's shell blocks, continuation lines joined,
    comments dropped, ``<placeholders>`` filled in."""
    import re
    import shlex
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["vitscope"] or words[:1] == [".venv/bin/vitscope"]:
                out.append([re.sub(r"<[^>]+>", "x", w) for w in words[1:]])
    return out


def test_every_command_in_the_readme_parses():
    commands = readme_commands()
    assert {c[0] for c in commands} >= {"pipeline", "extract", "train", "sweep", "analyze", "serve", "explore", "verify"}
    for words in commands:
        parse(words[0], words[1:])  # raises (SystemExit from tyro, or ConfigError) on an unknown option


@pytest.mark.parametrize("argv", [
    ["train", "--activations", "nosuchset", "--store", "{store}", "--no-progress"],
    ["sweep", "--activations", "nosuchset", "--store", "{store}", "--grid", "expansion=2,4"],
    ["analyze", "--sae", "nosuchsae", "--store", "{store}", "--no-progress"],
    ["evaluate", "--sae", "nosuchsae", "--store", "{store}", "--no-progress"],
    ["verify", "nosuchset", "--store", "{store}"],
    ["extract", "--data", "{store}/no/such/folder", "--store", "{store}", "--no-progress"],
    ["analyze", "--sae", "../escape", "--store", "{store}"],
    ["sweep", "--activations", "x", "--store", "{store}", "--dask-address", "tcp://127.0.0.1:8786"],
    ["sweep", "--activations", "x", "--store", "{store}", "--groups", "0"],
])
def test_a_user_mistake_is_one_clear_line_and_debug_shows_the_traceback(argv, tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    words = [w.format(store=store) for w in argv]
    code, text = run_cli(*words)
    lines = text.strip().splitlines()
    assert code == 2 and "Traceback" not in text, text
    assert lines[-1].startswith(f"vitscope {argv[0]}: error: ") and len(lines[-1]) > len(f"vitscope {argv[0]}: error: ") + 10
    with pytest.raises(Exception) as raised:  # noqa: PT011 (any of the errors above)
        main([*words, "--debug"])
    assert str(raised.value) in lines[-1]


def test_ls_lists_what_the_pipeline_published(pipeline, tmp_path):
    code, text = run_cli("ls", "--store", pipeline.store_uri)
    assert code == 0
    sections = dict(zip(("sets", "saes", "analyses", "reports"), text.split("\n\n")[1:], strict=True))
    assert pipeline.set_id in sections["sets"]
    sae_row = next(line for line in sections["saes"].splitlines() if line.strip().startswith(pipeline.sae_id))
    assert pipeline.set_id in sae_row and "relu" in sae_row
    assert pipeline.analysis_id in sections["analyses"] and pipeline.report_id in sections["reports"]
    code, text = run_cli("ls", "--store", str(tmp_path / "empty"))
    assert code == 0 and text.count("  none") == 4


def test_sweep_groups_from_the_command_line_publish_what_one_pass_publishes(prefect_server, tmp_path):
    """`vitscope sweep --groups 2` runs the sweep flow (two groups as Prefect tasks on threads) and
    prints the ids a plain `vitscope sweep` of the same grid prints, in the grid's order."""
    from vitscope.sae import list_saes

    gt = GroundTruth(n_images=64, grid=(2, 2), d_model=16, n_directions=32)
    ids = {}
    for groups in ("1", "2"):
        store = LocalStore(tmp_path / groups)
        set_id = write_ground_truth_set(store, gt).set_id
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            code = main(["sweep", "--activations", set_id, "--store", store.uri, "--groups", groups,
                         "--grid", "k=2,3", "expansion=1,2", "--set", "variant=topk", "batch_size=64",
                         "n_tokens=640", "init_sample=256", "eval_tokens=128", "progress=false"])
        assert code == 0, out.getvalue()
        ids[groups] = out.getvalue().split()
        assert sorted(ids[groups]) == sorted(list_saes(store))
    assert len(ids["1"]) == 4 and ids["2"] == ids["1"]


# --- vitscope health: the image's HEALTHCHECK ----------------------------------------------------


def _health(*argv: str) -> subprocess.CompletedProcess:
    """``vitscope health argv...`` in a process of its own, as the image's HEALTHCHECK runs it."""
    return subprocess.run([sys.executable, "-m", "vitscope.composition.cli", "health", *argv],
                          capture_output=True, text=True, timeout=60)


def test_health_passes_on_a_serving_analyzer_and_fails_in_one_line_on_a_closed_port(tmp_path):
    from support import free_port

    from vitscope.analyzer import ServeConfig, serve

    # With a token: health checks must not need it (a container's check has none to send).
    server = serve(ServeConfig(store=str(tmp_path / "store"), port=0, token="not-sent-by-health"))
    try:
        ok = _health("--target", f"grpc://127.0.0.1:{server.port}")
        assert ok.returncode == 0 and "SERVING" in ok.stdout, ok.stdout + ok.stderr
    finally:
        server.stop(grace=None)
    closed = _health("--target", f"grpc://127.0.0.1:{free_port()}", "--timeout", "2")
    assert closed.returncode == 1 and closed.stdout == "", closed.stdout
    (line,) = closed.stderr.strip().splitlines()
    assert line.startswith("vitscope health: unhealthy: the server at grpc://127.0.0.1:") and "UNAVAILABLE" in line


def test_health_finds_the_server_from_what_pid_1_runs(tmp_path, monkeypatch):
    """Without --target, the check reads PID 1's command line (here a stand-in for /proc/1/cmdline)
    and checks the analyzer it names on loopback; a batch job's PID 1 has nothing to check."""
    from vitscope.analyzer import ServeConfig, serve
    from vitscope.composition import health

    server = serve(ServeConfig(store=str(tmp_path / "store"), port=0))
    cmdline = tmp_path / "cmdline"
    monkeypatch.setattr(health, "PID1_CMDLINE", cmdline)
    try:
        # As under `docker run --init` / compose's `init: true`: docker-init, then the console script.
        cmdline.write_bytes(b"\0".join([b"/sbin/docker-init", b"--", b"/usr/local/bin/python3.11",
                                        b"/usr/local/bin/vitscope", b"serve", b"--host", b"0.0.0.0",
                                        b"--port", str(server.port).encode(), b"--store", b"s3://vitscope"]) + b"\0")
        code, text = run_cli("health")
        assert code == 0 and f"the analyzer at grpc://127.0.0.1:{server.port}: SERVING" in text, text
    finally:
        server.stop(grace=None)
    code, text = run_cli("health")
    assert code == 1 and text.strip().startswith("vitscope health: unhealthy: the analyzer"), text
    cmdline.write_bytes(b"vitscope\0extract\0--data\0/data\0")
    code, text = run_cli("health")
    assert code == 0 and "runs no server" in text


@pytest.mark.parametrize(("argv", "env", "url"), [
    (["/usr/local/bin/python3.11", "/usr/local/bin/vitscope", "serve"], {}, "grpc://127.0.0.1:50051"),
    (["vitscope", "serve", "--host", "::", "--port=6000", "--debug"], {}, "grpc://[::1]:6000"),
    (["vitscope", "serve", "--tls-cert", "c.pem", "--tls-key", "k.pem"], {}, "grpcs://localhost:50051"),
    (["tini", "--", "vitscope", "explore", "--analyzer", "analyzer:50051", "--host", "0.0.0.0", "--port", "8600"],
     {}, "http://127.0.0.1:8600/_stcore/health"),
    (["/usr/local/bin/python", "/usr/local/bin/prefect", "server", "start", "--host", "0.0.0.0"], {},
     "http://127.0.0.1:4200/api/health"),
    (["prefect", "server", "start"], {"PREFECT_SERVER_API_PORT": "4300"}, "http://127.0.0.1:4300/api/health"),
    (["prefect", "worker", "start", "--pool", "gpu", "--with-healthcheck"], {"PREFECT_WORKER_WEBSERVER_PORT": "8081"},
     "http://127.0.0.1:8081/health"),
    (["prefect", "worker", "start", "--pool", "gpu"], {}, None),
    (["vitscope", "train", "--activations", "x"], {}, None),
    (["/bin/bash"], {}, None),
    ([], {}, None),
])
def test_health_checks_the_server_that_a_command_line_runs(argv, env, url):
    from vitscope.composition.health import probe_of_command

    probe = probe_of_command(argv, env)
    assert (probe.url if probe else None) == url


def test_health_passes_on_a_serving_explorer(tmp_path):
    from support import free_port, wait_for_port

    from vitscope.explorer.launch import explorer_command, explorer_env

    port = free_port()
    with open(tmp_path / "streamlit.log", "w") as log:
        # Streamlit's health endpoint answers without the analyzer, so none is started.
        proc = subprocess.Popen(explorer_command(port), env=explorer_env(f"127.0.0.1:{free_port()}"),
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(port, proc)
            ok = _health("--target", f"http://127.0.0.1:{port}/_stcore/health")
            assert ok.returncode == 0 and "HTTP 200" in ok.stdout, ok.stdout + ok.stderr
        finally:
            proc.terminate()
            proc.wait(timeout=20)
    closed = _health("--target", f"http://127.0.0.1:{port}/_stcore/health", "--timeout", "2")
    assert closed.returncode == 1 and len(closed.stderr.strip().splitlines()) == 1, closed.stderr


def test_health_passes_on_a_prefect_server(prefect_server):
    """The path the check uses for `prefect server start` (/api/health) on a real Prefect server."""
    from prefect.settings import PREFECT_API_URL

    api = PREFECT_API_URL.value()
    assert api.endswith("/api"), api
    ok = _health("--target", f"{api}/health")
    assert ok.returncode == 0 and "HTTP 200" in ok.stdout, ok.stdout + ok.stderr


def test_a_command_s_log_leaves_out_open_clip_s_chatter(tiny_model_name, planted_data, tmp_path):
    """`vitscope extract` logs its own progress at INFO but not the lines open_clip writes at INFO
    on the root logger for every model it builds; VITSCOPE_LOG=DEBUG brings them back."""
    argv = [str(Path(sys.executable).parent / "vitscope"), "extract", "--model", tiny_model_name, "--data",
            str(planted_data[0]), "--store", str(tmp_path), "--max-images", "4", "--no-progress"]
    logs = {level: subprocess.run(argv, capture_output=True, text=True, timeout=300,
                                  env={**os.environ, "VITSCOPE_LOG": level}) for level in ("INFO", "DEBUG")}
    for out in logs.values():
        assert out.returncode == 0, out.stderr[-3000:]
    assert " INFO vitscope." in logs["INFO"].stderr and " INFO root: " not in logs["INFO"].stderr
    assert " INFO root: " in logs["DEBUG"].stderr  # open_clip did say something, and it is only hidden
