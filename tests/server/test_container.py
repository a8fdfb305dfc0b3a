"""The Docker image, imitated without a Docker engine: the Dockerfile's bake steps run (as root, where the tests
run as root) into a directory that then stands for the image's /opt/subspec/models (root-owned, read-only),
and docker/entrypoint.sh runs as an unprivileged user (nobody; the tests' own user where they do not run as
root, with the baked directory read-only to it all the same) with the image's environment (the Dockerfile's ENV lines, image paths mapped to local
ones), a writable home and model volume, and an argument as `docker run IMAGE --port N` passes one. The
server must serve the default model from the baked conversion, pass the image's health check on that port,
answer a chat completion and stop cleanly on SIGTERM (`docker stop`).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.server.server_harness import REPO_ROOT, free_port, wait_healthy

pytestmark = pytest.mark.slow

DOCKERFILE = (REPO_ROOT / "Dockerfile").read_text()
ENTRYPOINT = REPO_ROOT / "docker" / "entrypoint.sh"
HEALTHCHECK = REPO_ROOT / "docker" / "healthcheck.py"
# The Dockerfile's bake steps after the default model's download (which the test replaces by a copy of the
# cached file: the same bytes, checked by hash again by `subspec prepare`).
BAKE_STEPS = (
    "touch -m -d @1704067200 /opt/subspec/models/SmolLM2-135M-Instruct.Q4_1.gguf",
    "SUBSPEC_CACHE_DIR=/opt/subspec/models subspec prepare --config /app/configs/default.yaml --dtype bfloat16",
    "chmod -R a+rX,a-w /opt/subspec/models",
)
USER = 65534  # nobody
CAP_DAC_READ_SEARCH = 2


def image_env() -> dict[str, str]:
    """Every variable the Dockerfile's ENV instructions set, in order (later ones win)."""
    env: dict[str, str] = {}
    for instruction in re.findall(r"^ENV (.*)$", DOCKERFILE.replace("\\\n", " "), flags=re.M):
        env.update(item.split("=", 1) for item in shlex.split(instruction))
    return env


def world_readable(path: Path) -> bool:
    """Whether any user can read `path`: each directory above it searchable by others, and it readable."""
    return all(p.stat().st_mode & stat.S_IXOTH for p in path.parents) and bool(path.stat().st_mode & stat.S_IROTH)


def unprivileged() -> list[str]:
    """The command prefix that runs a command as the image's kind of user: nobody when the tests run as root
    (with the right to read, never to write, what is not its own where this interpreter is not
    world-readable, as the image's /opt/venv is: a root-only pyenv), else the test's own user."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("running as an unprivileged user needs setpriv (util-linux)")
    prefix = ["setpriv", f"--reuid={USER}", f"--regid={USER}", "--clear-groups"]
    paths = sysconfig.get_paths()
    if all(world_readable(Path(paths[name])) for name in ("stdlib", "purelib", "platlib")):
        return prefix
    bounding = int(re.search(r"^CapBnd:\s*(\w+)", Path("/proc/self/status").read_text(), re.M).group(1), 16)
    if not bounding >> CAP_DAC_READ_SEARCH & 1:
        pytest.skip(f"{sys.prefix} is not readable by other users, and CAP_DAC_READ_SEARCH is not available")
    return [*prefix, "--inh-caps=-all,+dac_read_search", "--ambient-caps=-all,+dac_read_search"]


@pytest.fixture
def image_root() -> Iterator[Path]:
    """A directory any user can enter (pytest's tmp_path is private to root), removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="subspec-image-"))
    root.chmod(0o755)
    yield root
    for directory, _, _ in os.walk(root):  # a-w directories block removal for a non-root owner
        os.chmod(directory, 0o755)
    shutil.rmtree(root)


def test_the_image_serves_the_baked_default_model_as_its_user(image_root, default_model_path):
    user = unprivileged()
    baked, volume, home = image_root / "opt-subspec-models", image_root / "models", image_root / "home"
    local = {"/opt/subspec/models": baked, "/models": volume, "/home/subspec": home,
             "/app/configs": REPO_ROOT / "configs"}

    def mapped(text: str) -> str:
        return re.sub(r"(?<![\w/])(/opt/subspec/models|/models|/home/subspec|/app/configs)",
                      lambda m: str(local[m.group(1)]), text)

    # `subspec` as the image installs it, running this checkout.
    bin_dir = image_root / "bin"
    bin_dir.mkdir()
    (bin_dir / "subspec").write_text(f'#!/bin/sh\ncd {shlex.quote(str(REPO_ROOT))} && '
                                     f'exec {shlex.quote(sys.executable)} -m server "$@"\n')
    (bin_dir / "subspec").chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SUBSPEC_", "HF_")) and k not in ("PORT", "HOME")}
    base["PATH"] = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"

    # The build: the downloaded file, then the Dockerfile's own bake commands.
    baked.mkdir()
    shutil.copy(default_model_path, baked / default_model_path.name)
    for step in BAKE_STEPS:
        assert step in DOCKERFILE, f"the Dockerfile no longer runs `{step}`"
        done = subprocess.run(mapped(step), shell=True, env=base, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{step}\n{done.stdout}{done.stderr}"
    for path in baked.rglob("*"):  # what the image's user must read
        assert world_readable(path), path

    # What the image provides at run time: its environment, a home and a volume the user owns.
    for directory in (volume / "huggingface", volume / "cache", home):
        directory.mkdir(parents=True)
        if user:
            os.chown(directory, USER, USER)
    env = {**base, **{k: mapped(v) for k, v in image_env().items() if k not in ("PATH", "VIRTUAL_ENV")},
           "HOME": str(home),
           "SUBSPEC_CONFIG": mapped("/app/configs/default.yaml"),  # as compose passes it
           "SUBSPEC_PORT_FILE": str(home / "subspec.port"),  # the image's /tmp, private to this test
           "SUBSPEC_DTYPE": "bfloat16",  # what auto picks on the image's GPU (and the dtype baked); float32 here
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    assert env["SUBSPEC_DEFAULT_MODEL_PATH"].startswith(str(baked)) and env["SUBSPEC_CACHE_DIR"] == str(volume / "cache")

    port = free_port()
    log_path = image_root / "server.log"
    with log_path.open("w") as log:
        server = subprocess.Popen([*user, "sh", str(ENTRYPOINT), "--port", str(port), "--host", "127.0.0.1"],
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        try:
            wait_healthy(f"http://127.0.0.1:{port}", 120, server)
        except (RuntimeError, TimeoutError) as exc:
            pytest.fail(f"{exc}; log:\n{log_path.read_text()}")
        assert Path(env["SUBSPEC_PORT_FILE"]).read_text() == f"{port}\n"  # the port given on the command line
        probe = subprocess.run([*user, sys.executable, str(HEALTHCHECK)], env=env, capture_output=True, text=True,
                               timeout=30)
        assert probe.returncode == 0, probe.stdout
        reply = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 8,
            "temperature": 0})
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"]
        server.send_signal(signal.SIGTERM)  # docker stop
        assert server.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has drained
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(10)
    log_text = log_path.read_text()
    assert f"skipped: done before: {baked}/converted/" in log_text  # the baked bfloat16 checkpoint, not a new one
