"""The package as users install it: built to an sdist and a wheel, installed into a fresh venv with
the locked versions, and used from a folder outside the checkout.

Every other test imports the checkout; only these would see a module left out of the wheel (the
``runs`` subpackage once was, and no test noticed). They need the package registry (pip installs
the core dependencies into the venv), which CI and the developers' machines reach.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.live import ROOT, Server, free_port, stop_group, wait_until_answering
from tests.test_docs import DOCS_BLOCKS, _curl_blocks

#: Modules of an extra: importing one without its dependency names the extra to install.
EXTRA_MODULES = {
    "flask_sse_run.llm.batch": "llm",
    "flask_sse_run.llm.generation": "llm",
    "flask_sse_run.llm.sampling": "llm",
    "flask_sse_run.metrics": "metrics",
    "flask_sse_run.metrics_files": "metrics",
    "flask_sse_run.tracing": "tracing",
}

#: Run by the venv's Python from an empty folder: every module of the installed package, and the
#: Falcon blueprint on an app of its own, without torch.
IMPORT_EVERYTHING = """
import importlib, json, pkgutil, sys
import flask_sse_run
from flask import Flask
from flask_sse_run.llm import falcon_blueprint, init_falcon

outcome = {"file": flask_sse_run.__file__, "modules": {}}
for info in pkgutil.walk_packages(flask_sse_run.__path__, "flask_sse_run."):
    try:
        importlib.import_module(info.name)
        outcome["modules"][info.name] = None
    except ImportError as error:
        outcome["modules"][info.name] = str(error)
app = Flask("own")
app.register_blueprint(falcon_blueprint)
client = app.test_client()
run = client.post("/falcon/run", json={"prompt": "Tell me a story"})
health = client.get("/falcon/health")
outcome["run"] = [run.status_code, run.get_json()]
outcome["health"] = [health.status_code, health.get_json()]
outcome["models"] = client.get("/falcon/v1/models").status_code
outcome["torch"] = "torch" in sys.modules
print(json.dumps(outcome))
"""


def _source_modules() -> set[str]:
    paths = (ROOT / "flask_sse_run").rglob("*.py")
    return {str(path.relative_to(ROOT)) for path in paths if "__pycache__" not in path.parts}


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The sdist, and the wheel built from it (as an installer from an index would)."""
    out = tmp_path_factory.mktemp("dist")
    source = tmp_path_factory.mktemp("source") / "flask-sse-run"
    # A copy: a build in the checkout reuses its build/ folder, where modules deleted since stay.
    tracked = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in tracked:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((ROOT / name).read_bytes())
    subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(out), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return sdist, wheel


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory, dists: tuple[Path, Path]) -> Path:
    """A fresh venv with the wheel and its core dependencies, at the lock's versions."""
    path = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=120)
    pip = [str(path / "bin" / "python"), "-m", "pip", "install", "-q"]
    lock = str(ROOT / "constraints.txt")
    result = subprocess.run([*pip, "-c", lock, str(dists[1])], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return path


def test_the_wheel_holds_every_module_of_the_library_and_nothing_else(dists: tuple[Path, Path]) -> None:
    names = zipfile.ZipFile(dists[1]).namelist()
    library = {name for name in names if not name.startswith("flask_sse_run-0.1.0.dist-info/")}
    assert {name for name in library if name.endswith(".py")} == _source_modules()
    assert library - _source_modules() == {"flask_sse_run/py.typed"}  # no tests, benches, docs, app
    metadata = zipfile.ZipFile(dists[1]).read("flask_sse_run-0.1.0.dist-info/METADATA").decode()
    assert "License: BSD-3-Clause" in metadata.splitlines()
    assert "License-File: LICENSE" in metadata
    licence = zipfile.ZipFile(dists[1]).read("flask_sse_run-0.1.0.dist-info/licenses/LICENSE")
    assert licence == (ROOT / "LICENSE").read_bytes()


def test_the_sdist_carries_the_license_and_the_library(dists: tuple[Path, Path]) -> None:
    with tarfile.open(dists[0]) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
        pkg_info = sdist.extractfile("flask_sse_run-0.1.0/PKG-INFO")
        assert pkg_info is not None and "License: BSD-3-Clause" in pkg_info.read().decode().splitlines()
    assert {"LICENSE", "setup.py", "pyproject.toml", "README.md"} <= names
    assert _source_modules() <= names


def test_every_module_imports_from_the_installed_package_or_names_its_extra(
    venv: Path, tmp_path: Path
) -> None:
    result = subprocess.run(
        [str(venv / "bin" / "python"), "-c", IMPORT_EVERYTHING],
        cwd=tmp_path,  # outside the checkout: nothing of it is on sys.path
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    outcome = json.loads(result.stdout)
    assert outcome["file"].startswith(str(venv))
    modules: dict[str, str | None] = outcome["modules"]
    expected = {name.removesuffix(".py").replace("/", ".") for name in _source_modules()}
    assert set(modules) == {name.removesuffix(".__init__") for name in expected} - {"flask_sse_run"}
    failed = {name: error for name, error in modules.items() if error is not None}
    assert set(failed) == set(EXTRA_MODULES), failed
    for name, error in failed.items():
        assert f"pip install 'flask-sse-run[{EXTRA_MODULES[name]}]'" in error, (name, error)
    # The Falcon blueprint, without torch: 503s that say how to enable it, its OpenAI routes.
    (run_status, run_body), (health_status, health_body) = outcome["run"], outcome["health"]
    assert run_status == 503 and "pip install 'flask-sse-run[llm]'" in run_body["error"]
    assert health_status == 503 and "pip install 'flask-sse-run[llm]'" in health_body["message"]
    assert outcome["models"] == 200 and outcome["torch"] is False


@pytest.fixture
def readme_app(venv: Path, tmp_path: Path) -> Iterator[Server]:
    """The README's ten-line example as ``yourmodule.py``, under the venv's ``gunicorn -k gevent``."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "yourmodule.py").write_text(DOCS_BLOCKS["README.md:import time"])
    port = free_port()
    log = tmp_path / "gunicorn.log"
    command = [
        str(venv / "bin" / "gunicorn"), "-k", "gevent", "--bind", f"127.0.0.1:{port}",
        "--no-control-socket", "yourmodule:app",
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, cwd=project, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = Server(process, port, log)
    try:
        wait_until_answering(server, 60)
        yield server
    finally:
        stop_group(process)


def test_the_readmes_example_streams_from_the_installed_package_under_gunicorn(readme_app: Server) -> None:
    ((command, expected),) = list(_curl_blocks())
    parts = re.findall(r"'[^']*'|\S+", command)[1:]
    args = ["curl", "-sS", *[p.strip("'").replace("http://127.0.0.1:8000", readme_app.url) for p in parts]]
    arrivals: list[tuple[float, str]] = []
    with subprocess.Popen(args, stdout=subprocess.PIPE, text=True) as curl:
        assert curl.stdout is not None
        for line in curl.stdout:
            arrivals.append((time.monotonic(), line))
        assert curl.wait(timeout=30) == 0
    assert "".join(line for _, line in arrivals) == expected
    # Sent as made, one second apart, not collected into one response at the end.
    data = [at for at, line in arrivals if line.startswith("data: ")]
    assert len(data) == 3 and data[-1] - data[0] > 1.0, readme_app.log()


def test_ci_runs_the_readmes_command_2_with_the_lock() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n# \d\..*\n(.*)\n```", readme)
    assert len(commands) >= 2 and "-c constraints.txt" in commands[1]
    assert f'"{commands[1]}"' in (ROOT / ".ci" / "run").read_text()


def test_the_lock_pins_every_package_the_extras_install() -> None:
    from importlib.metadata import distribution

    pinned = {
        re.sub(r"[-_.]+", "-", line.split("==")[0]).lower(): line.split("==")[1].strip()
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    }
    wanted: list[str] = distribution("flask-sse-run").requires or []
    first_word = re.compile(r"[^\s<>=!~;\[(]+")
    matches = [first_word.match(line) for line in wanted]
    names = {re.sub(r"[-_.]+", "-", match.group()).lower() for match in matches if match}
    assert names - set(pinned) == set()
    assert pinned["torch"] == "2.13.0"
