"""`TritonServer`: the Triton Inference Server bundled in the nvidia-pytriton wheel, started on loopback.

The wheel ships the server binary with its Python backend and a backend stub per Python version.
The stub goes into a backend folder of our own; the stub finds its interpreter on PATH, so the
running interpreter's folder comes first there, and its libpython and the wheel's libraries go on
LD_LIBRARY_PATH. Each server runs in its own process group: stopping it stops every process it
started (stubs, an engine's ranks).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from pathlib import Path

from llmc.runtime.executor import free_port


class TritonServerError(RuntimeError):
    pass


class TritonServer:
    """`with TritonServer(repository) as server:` serves it at server.http_url / server.grpc_url."""

    def __init__(self, repository: str | os.PathLike, *, http_port: int | None = None, grpc_port: int | None = None,
                 metrics_port: int | None = None, ready_timeout: float = 300.0, env: dict | None = None, log_verbose: int = 0):
        """Ports left out are free ones picked now."""
        self.repository = Path(repository).resolve()
        self.ready_timeout = ready_timeout
        self.env, self.log_verbose = env, log_verbose
        self.http_port, self.grpc_port, self.metrics_port = (p or free_port() for p in (http_port, grpc_port, metrics_port))
        self.process: subprocess.Popen | None = None
        self._home: tempfile.TemporaryDirectory | None = None
        self.load_seconds: float | None = None

    http_url = property(lambda self: f"127.0.0.1:{self.http_port}")
    grpc_url = property(lambda self: f"127.0.0.1:{self.grpc_port}")
    metrics_url = property(lambda self: f"http://127.0.0.1:{self.metrics_port}/metrics")

    @property
    def log(self) -> str:
        return Path(self._home.name, "server.log").read_text(errors="replace") if self._home else ""

    def start(self) -> "TritonServer":
        bundle = _bundle()
        self._home = tempfile.TemporaryDirectory(prefix="llmc-triton-")
        backends = Path(self._home.name, "backends")
        shutil.copytree(bundle / "tritonserver" / "backends", backends)
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = bundle / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.exists():
            raise TritonServerError(f"nvidia-pytriton has no Triton Python backend stub for Python {version}")
        shutil.copy2(stub, backends / "python")
        env = dict(os.environ, **(self.env or {}))
        libs = [sysconfig.get_config_var("LIBDIR"), str(bundle.parent / "nvidia_pytriton.libs"), env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs if p)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        command = [
            str(bundle / "tritonserver" / "bin" / "tritonserver"), f"--model-repository={self.repository}",
            f"--backend-directory={backends}", "--http-address=127.0.0.1", f"--http-port={self.http_port}",
            "--grpc-address=127.0.0.1", f"--grpc-port={self.grpc_port}", "--metrics-address=127.0.0.1",
            f"--metrics-port={self.metrics_port}", "--allow-gpu-metrics=false", "--allow-cpu-metrics=false",
            f"--log-verbose={self.log_verbose}", "--exit-timeout-secs=20",
        ]
        start = time.perf_counter()
        with open(Path(self._home.name, "server.log"), "wb") as log:
            self.process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.load_seconds = time.perf_counter() - start
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TritonServerError(f"tritonserver exited with status {self.process.returncode}:\n{self.log[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TritonServerError(f"tritonserver was not ready within {self.ready_timeout} s:\n{self.log[-4000:]}")

    def stop(self) -> None:
        """Shut the server down (models finalize, engines stop their ranks), then end its process group."""
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
            try:
                os.killpg(self.process.pid, signal.SIGKILL)  # whatever of the group is left
            except ProcessLookupError:
                pass
            self.process.wait()
            self.process = None

    def cleanup(self) -> None:
        if self._home is not None:
            self._home.cleanup()
            self._home = None

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        self.cleanup()


def _bundle() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonServerError("the Triton server comes from the nvidia-pytriton wheel: pip install 'llmc[triton]'")
    return Path(list(spec.submodule_search_locations)[0])
